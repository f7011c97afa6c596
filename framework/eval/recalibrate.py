"""BatchNorm re-estimation for sampling (NVAE section 5 / the reference's `--readjust_bn`).

A model trained with BatchNorm samples badly with its training running statistics: they were
accumulated on posterior samples, as an exponential average that still remembers early
training. The reference re-runs 500 batches of prior samples in train mode and keeps whatever
exponential average results. Here every BatchNorm that sampling reaches is reset and its
statistics become the exact pooled mean and (unbiased) variance of its inputs over all
iters x batch x ranks samples, combined across ranks in float64; each layer normalises with its
batch's statistics while they are collected, as the reference's train-mode pass does. Layers
that sampling never reaches (the encoder's) keep their training statistics.
"""
from __future__ import annotations

import time

import torch

from .. import distributed as dist
from ..errors import UserError
from ..task import BatchNormRecalibration, require
from .checkpoints import Loaded, derived_path, seeded_generator, write_eval_checkpoint


def bn_layers(loaded: Loaded) -> list:
    require(loaded.task, BatchNormRecalibration, f"{loaded.path}: recalibrate_bn.py")
    return loaded.task.bn_layers(loaded.module)


def sample_generator(seed: int, rank: int, it: int) -> torch.Generator:
    return seeded_generator(seed, 11, rank, it)


@torch.no_grad()
def recalibrate(loaded: Loaded, temperature: float = 0.7, batch_size: int = 0, iters: int = 500, seed: int = 0,
                progress: bool = True) -> dict:
    """Re-estimates the statistics in place; -> the record written to eval.json."""
    from ..models.nvae.ops import Moments

    if temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {temperature}")
    if iters < 1:
        raise UserError(f"--iters must be at least 1, got {iters}")
    batch_size = batch_size or loaded.recipe.data.batch_size
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    net, env = loaded.module, loaded.env
    bns = bn_layers(loaded)
    net.eval()
    for bn in bns:
        bn.train()
        bn.moments = Moments(bn.num_features)
    t0 = time.perf_counter()
    from tqdm import tqdm

    try:
        for it in tqdm(range(iters), desc="recalibrating BN", unit="batch", disable=not (progress and env.is_main),
                       dynamic_ncols=True, mininterval=1.0):
            loaded.task.prior_params(net, batch_size, temperature, sample_generator(seed, env.rank, it),
                                     loaded.device)
        reached = [bn for bn in bns if bn.moments.n > 0]
        # every rank's moments of every layer, one row per rank, summed into place across ranks
        width = sum(1 + 2 * bn.num_features for bn in reached)
        table = torch.zeros(env.world_size, width, dtype=torch.float64)
        table[env.rank] = torch.cat([bn.moments.as_row() for bn in reached]) if reached else table[env.rank]
        table = dist.all_reduce_sum(table)
        at = 0
        for bn in reached:
            c = bn.num_features
            m = Moments.from_rows(table[:, at:at + 1 + 2 * c], c)
            at += 1 + 2 * c
            bn.running_mean.copy_(m.mean.to(bn.running_mean))
            bn.running_var.copy_(m.unbiased_var().to(bn.running_var))
            bn.num_batches_tracked.fill_(iters * env.world_size)
    finally:
        for bn in bns:
            bn.moments = None
            bn.eval()
    return {"temperature": temperature, "batch_size": batch_size, "iters": iters, "world_size": env.world_size,
            "seed": seed, "samples": iters * batch_size * env.world_size, "layers_recalibrated": len(reached),
            "layers_kept": len(bns) - len(reached), "seconds": round(time.perf_counter() - t0, 2),
            "statistics": "pooled mean and unbiased variance of every input (momentum None: a true average)"}


def recalibrate_checkpoint(loaded: Loaded, temperature: float = 0.7, batch_size: int = 0, iters: int = 500,
                           seed: int = 0, progress: bool = True, overwrite: bool = False):
    """Recalibrates and writes `<checkpoint>_bn-t<T>` beside the source; -> (path, record). An existing
    one is refused unless `overwrite`; then the figures written beside it (`<it>.*.json`: bits/dim,
    profile), which described the old statistics, are removed with it."""
    out = derived_path(loaded.path, f"_bn-t{temperature:g}")
    stale = sorted(out.parent.glob(f"{out.name}.*.json"))
    if out.exists() and not overwrite:
        extra = f" and {len(stale)} result file(s) beside it" if stale else ""
        raise UserError(f"{out}: a recalibrated checkpoint exists already{extra}; pass --overwrite to replace "
                        f"them")
    record = recalibrate(loaded, temperature, batch_size, iters, seed, progress)
    if loaded.env.is_main:
        for f in stale:
            f.unlink(missing_ok=True)
    info = {**loaded.info, "source": loaded.info.get("source", str(loaded.path)), "bn": record}
    write_eval_checkpoint(loaded, out, info)
    return out, record
