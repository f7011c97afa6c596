"""Sample grids, and the sampling-speed profile of the plain model against its fast path."""
from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..images import save_grid
from ..task import FastSampling, PriorSampling, Samples, has, require
from .checkpoints import Loaded, seeded_generator


def _generator(seed: int, *stream: int) -> torch.Generator:
    return seeded_generator(seed, 17, *stream)


def check_temperatures(temps) -> list[float]:
    temps = [float(t) for t in temps]
    if not temps:
        raise UserError("--temperatures: give at least one")
    bad = [t for t in temps if not t > 0]
    if bad:
        raise UserError(f"temperature must be > 0, got {bad[0]:g}")
    return temps


def grid_paths(loaded: Loaded, temps: list[float], out: str | None) -> list[Path]:
    if out:
        o = Path(out)
        if len(temps) == 1:
            return [o]
        return [o.with_name(f"{o.stem}_t{t:g}{o.suffix or '.png'}") for t in temps]
    if loaded.path.suffix in (".yaml", ".yml"):
        run = Path(loaded.recipe.run.dir)
    else:
        run = loaded.path.parent.parent
    return [run / "samples" / f"{loaded.path.name}_t{t:g}.png" for t in temps]


@torch.no_grad()
def sample_grids(loaded: Loaded, n: int, temps, out: str | None = None, seed: int = 0) -> list[Path]:
    """One PNG grid of n samples per temperature (the same noise at every temperature)."""
    require(loaded.task, Samples, f"{loaded.path}: sample.py")
    temps = check_temperatures(temps)
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    paths = grid_paths(loaded, temps, out)
    ctx = loaded.ctx(n)
    for t, path in zip(temps, paths):
        images = loaded.task.sample(n, t, _generator(seed, 0), ctx)
        if loaded.env.is_main:
            save_grid(images, path)
    return paths


@torch.no_grad()
def interpolation_grid(loaded: Loaded, pairs: int, steps: int, out: str | None = None, seed: int = 0) -> Path:
    """`pairs` rows of `steps` images, each row walking from one code (or noise vector) to another
    in equal steps (the family's `interpolate`): RUN_DIR/samples/<checkpoint>_interp.png, or
    <out stem>_interp.png beside --out."""
    from ..task import Interpolates

    require(loaded.task, Interpolates, f"{loaded.path}: sample.py --interpolations")
    if pairs < 1 or steps < 2:
        raise UserError(f"--interpolations must be >= 1 and --interp-steps >= 2, got {pairs} and {steps}")
    first = grid_paths(loaded, [1.0], out)[0]
    path = first.with_name(f"{Path(out).stem if out else loaded.path.name}_interp.png")
    images = loaded.task.interpolate(pairs, steps, _generator(seed, 1), loaded.ctx(pairs * steps))
    if loaded.env.is_main:
        save_grid(images, path, nrow=steps)
    return path


@torch.no_grad()
def recon_grid(loaded: Loaded, n: int, out: str | None = None, split: str = "val", nrow: int = 8) -> Path:
    """A stage-1 model's picture: n images spread evenly over the split in rows of `nrow`, each row
    followed by the row of their reconstructions (through the codes)."""
    from ..data import to_model_input
    from ..data.loader import BetonInfo, EvalLoader
    from ..data.order import EvalShard
    from ..task import Codes

    require(loaded.task, Codes, f"{loaded.path}: sample.py")
    d, task = loaded.recipe.data, loaded.task
    info = BetonInfo(d.path)
    ids = info.ids(split)
    ids = ids[np.unique(np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(np.int64))] if len(ids) else ids
    if len(ids) == 0:
        raise UserError(f"{d.path}: no {split} images to reconstruct")
    batch, _ = next(iter(EvalLoader(info, EvalShard(ids, len(ids), 1, 0), d.channels, 1)))
    x = to_model_input(batch["image"][:len(ids)], d.num_bits, loaded.device)
    rec = task.decode_indices(loaded.module, task.encode_indices(loaded.module, x))
    rows = []
    for i in range(0, len(x), nrow):
        rows += [x[i:i + nrow], rec[i:i + nrow]]
    path = Path(out) if out else grid_paths(loaded, [1.0], None)[0].with_name(f"{loaded.path.name}_recon-{split}.png")
    if loaded.env.is_main:
        save_grid((torch.cat(rows).float() + 1) / 2, path, nrow=min(nrow, len(x)))
    return path


# -- speed -------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def timed(fn, device, repeats: int, warmup: int):
    """(seconds of each of `repeats` timed calls after `warmup` untimed ones, the last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


@torch.inference_mode()
def profile_sampling(loaded: Loaded, batch_sizes=(1, 4, 16, 36), temperature: float = 1.0, repeats: int = 10,
                     warmup: int = 2, precision: str = "fp32", seed: int = 0, fast: bool = True,
                     progress: bool = True) -> dict:
    """ms/image of sampling (the prior pass and the output draw) per batch size, plain vs fast path."""
    check_temperatures([temperature])
    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision is {precision!r}; expected fp32 or bf16")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("--batch-sizes: positive integers, e.g. 1,4,16,36")
    task, net, dev = loaded.task, loaded.module, loaded.device
    require(task, PriorSampling, f"{loaded.path}: profile_sampling.py")
    paths = {"plain": net.sample}
    if fast and has(task, FastSampling):
        paths["fast"] = task.fast_sampler(net).sample
    rows = []
    check = {}
    from tqdm import tqdm

    bar = tqdm(total=len(batch_sizes) * len(paths), desc="profiling", unit="run", dynamic_ncols=True,
               disable=not (progress and loaded.env.is_main))
    for b in batch_sizes:
        eps = task.prior_noise(net, b, _generator(seed, b), dev)
        outs = {}
        for name, sample in paths.items():
            def run():
                with _autocast(dev, precision):
                    params = sample(b, temperature, eps)
                    return task.images(net, params.float(), temperature, _generator(seed, b, 1))

            outs[name] = run()
            times, _ = timed(run, dev, repeats, warmup)
            ms = [1000 * t / b for t in times]
            rows.append({"path": name, "batch": b, "ms_per_image": statistics.median(ms), "ms_min": min(ms),
                         "ms_max": max(ms), "images_per_s": b / statistics.median(times)})
            bar.update(1)
        if "fast" in outs:
            check[b] = float((outs["fast"] - outs["plain"]).abs().max())
    bar.close()
    speedup = {}
    for b in batch_sizes:
        by = {r["path"]: r for r in rows if r["batch"] == b}
        if "fast" in by:
            speedup[b] = by["plain"]["ms_per_image"] / by["fast"]["ms_per_image"]
    return {"checkpoint": str(loaded.path), "family": loaded.family, "weights": loaded.info.get("weights"),
            "bn_recalibrated": loaded.info.get("bn") is not None, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(), "precision": precision, "temperature": temperature,
            "repeats": repeats, "warmup": warmup, "channels_last": getattr(net, "channels_last", None),
            "torch": torch.__version__, "results": rows, "speedup_fast_vs_plain": speedup,
            "max_abs_diff_fast_vs_plain": check}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def format_rows(columns: list[tuple[str, int, str]], rows: list[dict]) -> str:
    """A text table: columns are (key, width, format spec: '' left-aligned text, else e.g. '.2f')."""
    def cell(v, w, spec):
        return f"{v:<{w}}" if not spec else (f"{v:>{w}{spec}}" if isinstance(v, (int, float)) else f"{v:>{w}}")
    head = " ".join(f"{k:<{w}}" if not spec else f"{k:>{w}}" for k, w, spec in columns)
    return "\n".join([head] + [" ".join(cell(r[k], w, spec) for k, w, spec in columns) for r in rows])


def format_table(report: dict) -> str:
    sp = report["speedup_fast_vs_plain"]
    rows = [{**r, "vs plain": f"{sp[r['batch']]:.2f}x" if r["path"] == "fast" and r["batch"] in sp else ""}
            for r in report["results"]]
    return format_rows([("path", 6, ""), ("batch", 5, "d"), ("ms_per_image", 12, ".2f"), ("ms_min", 9, ".2f"),
                        ("ms_max", 9, ".2f"), ("images_per_s", 12, ".1f"), ("vs plain", 8, "s")], rows)
