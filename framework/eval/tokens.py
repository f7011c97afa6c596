"""After-training tools of a prior over code grids (framework.task.CodePrior):

evaluate_token_bits  the negative log-likelihood of every grid of a split (each exactly once across
                     ranks) in bits per token (nats / ln 2 per code) and bits per image (the sum
                     over the grid: a property of the code grid, not of pixels); mean +- s.e.
profile_tokens       sampling speed per batch size, the KV-cached sampler against the uncached one
                     (a full forward per token, taming's `sample`) in the same run: tokens/s of the
                     codes, ms/image including the first stage's decode; warm-up passes untimed.
                     A grid larger than the prior's is sampled with the sliding window (cached)
                     against taming's window rule (a full window forward per code).
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from .. import distributed as dist
from ..data.loader import BetonInfo, EvalLoader
from ..data.order import EvalShard
from ..errors import UserError
from ..task import CodePrior, require
from .checkpoints import Loaded
from .sampling import _autocast, _cpu_name, format_rows, timed

LN2 = math.log(2.0)


def parse_grid(text: str):
    """--grid H,W -> (H, W), or None for an empty flag; a bad value is a one-line UserError."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--grid: expected H,W like 32,32, got {text!r}") from None
    if h < 1 or w < 1:
        raise UserError(f"--grid: expected positive sizes, got {text!r}")
    return h, w


def check_family(loaded: Loaded, tool: str) -> None:
    require(loaded.task, CodePrior, f"{loaded.path}: {tool}")


@torch.no_grad()
def evaluate_token_bits(loaded: Loaded, split: str = "val", batch_size: int = 0, data_path: str = "",
                        progress: bool = True) -> dict:
    check_family(loaded, "eval_bpd.py")
    if split not in ("train", "val"):
        raise UserError(f"--split is {split!r}; expected train or val")
    d, env, task = loaded.recipe.data, loaded.env, loaded.task
    path = data_path or d.path
    task.check_codes(path)
    info = BetonInfo(path)
    ids = info.ids(split)
    if len(ids) == 0:
        raise UserError(f"{path}: no {split} grids")
    batch_size = batch_size or d.eval_batch_size or d.batch_size
    shard = EvalShard(ids, batch_size, env.world_size, env.rank)
    fields = tuple(f for f in task.fields if f != "codes_flipped")
    loader = EvalLoader(info, shard, d.channels, d.workers, fields)
    sums = torch.zeros(3, dtype=torch.float64)  # n, sum of nats, sum of nats^2 (per grid)
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=len(ids), desc="bits per token", unit="grid", dynamic_ncols=True, mininterval=1.0,
               disable=not (progress and env.is_main))
    ctx = loaded.ctx(batch_size)
    ctx.phase = "eval"
    for batch, n in loader:
        if n == 0:
            continue
        x = task.prepare_batch({k: v[:n] for k, v in batch.items()}, ctx)
        nll = task.token_nll(loaded.module, x).double().cpu()
        sums += torch.stack([torch.tensor(float(n), dtype=torch.float64), nll.sum(), (nll * nll).sum()])
        bar.update(n * env.world_size)
    bar.close()
    sums = dist.all_reduce_sum(sums.to(loaded.device)).cpu()
    count = int(sums[0])
    if count != len(ids):
        raise RuntimeError(f"scored {count} grids of {len(ids)}")
    mean = float(sums[1]) / count
    var = max(float(sums[2]) / count - mean * mean, 0.0) * count / max(count - 1, 1)
    se = math.sqrt(var / count)
    t = task.tokens
    vocab = loaded.recipe.model.vocab_size
    return {"checkpoint": str(loaded.path), "family": loaded.family, "arch": loaded.recipe.model.arch,
            "data": str(path), "split": split, "grids": count, "tokens_per_grid": t, "vocab": vocab,
            "batch_size": batch_size, "world_size": env.world_size, "weights": loaded.info.get("weights"),
            "nll_nats_per_grid": mean, "nll_nats_per_grid_se": se,
            "bits_per_token": mean / (t * LN2), "bits_per_token_se": se / (t * LN2),
            "bits_per_image": mean / LN2, "bits_per_image_se": se / LN2,
            "uniform_bits_per_token": math.log2(vocab), "seconds": round(time.perf_counter() - t0, 2)}


@torch.inference_mode()
def profile_tokens(loaded: Loaded, batch_sizes=(1, 8), sampling=None, repeats: int = 3, warmup: int = 1,
                   precision: str = "fp32", seed: int = 0, grid=None, uncached: bool = True,
                   progress: bool = True, tokens: int = 0) -> dict:
    """Rows of {path: cached|uncached, batch, tokens_per_s, ms_per_image (with decode), ...}."""
    from .sampling import _generator

    check_family(loaded, "profile_sampling.py")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision is {precision!r}; expected fp32 or bf16")
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("--batch-sizes: positive integers, e.g. 1,8")
    task, net, dev = loaded.task, loaded.module, loaded.device
    grid = tuple(grid or task.grid)
    limit = min(tokens, grid[0] * grid[1]) if tokens else 0
    tokens = limit or grid[0] * grid[1]
    decode = task.first is not None and not limit  # a partial grid is not decoded
    paths = ["cached"] + (["uncached"] if uncached else [])
    from tqdm import tqdm

    bar = tqdm(total=len(batch_sizes) * len(paths), desc="profiling", unit="run", dynamic_ncols=True,
               disable=not (progress and loaded.env.is_main))
    rows, same = [], {}
    for b in batch_sizes:
        labels = task.sample_labels(b)
        codes = {}
        for path in paths:
            def run():
                with _autocast(dev, precision):
                    return task.sample_codes(net, b, _generator(seed, b), sampling, grid, labels, path == "cached",
                                            limit)

            times, codes[path] = timed(run, dev, repeats, warmup)
            if decode and path == paths[0]:  # the same decoder work for either sampler: timed once
                dec, _ = timed(lambda: task.decode(codes[path]), dev, repeats, min(warmup, 1))
                t_dec = statistics.median(dec)
            elif not decode:
                t_dec = 0.0
            t_codes = statistics.median(times)
            rows.append({"path": path, "batch": b, "tokens_per_s": b * tokens / t_codes,
                         "ms_per_image": 1000 * (t_codes + t_dec) / b, "decode_ms_per_image": 1000 * t_dec / b,
                         "s_per_batch_min": min(times), "s_per_batch_max": max(times)})
            bar.update(1)
        if "uncached" in codes:
            same[b] = float((codes["cached"] == codes["uncached"]).double().mean())
    bar.close()
    speedup = {}
    for b in batch_sizes:
        by = {r["path"]: r for r in rows if r["batch"] == b}
        if "uncached" in by:
            speedup[b] = by["cached"]["tokens_per_s"] / by["uncached"]["tokens_per_s"]
    m = loaded.recipe.model
    s = sampling or task.sampling
    return {"checkpoint": str(loaded.path), "family": loaded.family, "arch": m.arch,
            "weights": loaded.info.get("weights"), "parameters": sum(p.numel() for p in net.parameters()),
            "grid": list(grid), "trained_grid": list(task.grid), "window": grid != tuple(task.grid),
            "tokens_per_image": grid[0] * grid[1], "timed_tokens": tokens, "vocab": m.vocab_size, "temperature": s.temperature, "top_k": s.top_k,
            "top_p": s.top_p, "guidance": s.guidance, "decode": decode,
            "first_stage": str(task.first.path) if decode else None, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(), "precision": precision, "repeats": repeats, "warmup": warmup,
            "torch": torch.__version__, "results": rows, "speedup_cached_vs_uncached": speedup,
            "same_tokens_cached_vs_uncached": same}


def format_token_table(report: dict) -> str:
    sp = report["speedup_cached_vs_uncached"]
    rows = [{**r, "vs uncached": f"{sp[r['batch']]:.1f}x" if r["path"] == "cached" and r["batch"] in sp else ""}
            for r in report["results"]]
    return format_rows([("path", 9, ""), ("batch", 5, "d"), ("tokens_per_s", 12, ".1f"), ("ms_per_image", 12, ".1f"),
                        ("decode_ms_per_image", 19, ".1f"), ("vs uncached", 11, "s")], rows)


@torch.no_grad()
def sample_prior_grids(loaded: Loaded, n: int, temps, sampling=None, grid=None, out: str | None = None,
                       seed: int = 0, codes_out: str | None = None, nrow: int | None = None) -> list:
    """One decoded PNG grid per temperature (the same uniforms at every temperature); with codes_out,
    the code grids too: an .npz of codes (temperatures, n, H, W), labels and the settings."""
    import dataclasses
    from pathlib import Path

    import numpy as np

    from ..images import save_grid
    from .sampling import _generator, check_temperatures, grid_paths

    check_family(loaded, "sample.py")
    task = loaded.task
    temps = check_temperatures(temps)
    base = sampling or task.sampling
    grid = tuple(grid or task.grid)
    paths = grid_paths(loaded, temps, out)
    if grid != tuple(task.grid) and not out:
        paths = [p.with_name(f"{p.stem}_{grid[0]}x{grid[1]}{p.suffix}") for p in paths]
    labels = task.sample_labels(n)
    all_codes = []
    for t, path in zip(temps, paths):
        s = dataclasses.replace(base, temperature=t)
        codes = task.sample_codes(loaded.module, n, _generator(seed, 0), s, grid, labels)
        all_codes.append(codes.cpu().numpy())
        if loaded.env.is_main:
            save_grid(task.decode(codes), path, nrow=nrow)
    if codes_out and loaded.env.is_main:
        o = Path(codes_out)
        tmp = o.with_name(f".{o.name}.tmp.npz")
        np.savez(tmp, codes=np.stack(all_codes).astype(np.int32), temperatures=np.array(temps),
                 labels=np.array([] if labels is None else labels.numpy()), top_k=base.top_k, top_p=base.top_p,
                 guidance=base.guidance, seed=seed, checkpoint=str(loaded.path))
        import os

        os.replace(tmp, o)
    return paths
