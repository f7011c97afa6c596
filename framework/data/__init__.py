"""Data on FFCV: sources -> .beton (write), and the sharded deterministic loaders (loader, order).

    sources   image folders, FFHQ / CelebA-HQ, the bundled sets (mnist5k, digits, photos)
    write     write_beton(source, OUT.beton, …): check every image, write under a temporary name
    order     GlobalOrder (training: disjoint shards, order a function of (seed, epoch)), EvalShard
    loader    BetonInfo, TrainLoader, EvalLoader over FFCV's compiled pipeline
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .order import EvalShard, GlobalOrder

__all__ = ["EvalShard", "GlobalOrder", "build_loaders", "to_model_input"]


def to_model_input(x: torch.Tensor, num_bits: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> floats in [-1, 1] on `device`, quantised to `num_bits` as NVAE does:
    v = floor(x / 2^(8 - b)) in 0..2^b - 1, then 2 v / (2^b - 1) - 1."""
    x = x.to(device, non_blocking=True)
    if num_bits < 8:
        x = torch.bitwise_right_shift(x, 8 - num_bits)
    y = x.float() * (2.0 / (2**num_bits - 1)) - 1.0
    return y.to(dtype)


def read_fields(cfg, task_fields) -> tuple:
    """The fields a run reads: the family's, then the recipe's data.fields."""
    return tuple(dict.fromkeys([*task_fields, *cfg.fields]))


def build_loaders(cfg, env, grad_accum: int, seed: int, fields=("image",), batches=None):
    """(TrainLoader, EvalLoader) for this rank, from the recipe's `data:` block; `batches`: the
    global batch of every step when the family schedules it (Task.global_batches), else
    data.batch_size per rank at every step."""
    from .loader import BetonInfo, EvalLoader, TrainLoader

    info = BetonInfo(cfg.path)
    fields = read_fields(cfg, fields)
    info.check_fields(fields)
    if cfg.channels not in (1, 3):
        raise UserError(f"key 'data.channels' is {cfg.channels}; expected 1 (grey, the first channel) or 3 (RGB)")
    if "image" in fields:
        info.check_shape(cfg.resolution)
        info.check_channels(cfg.channels)
    train = TrainLoader(info, GlobalOrder(info.ids("train"), cfg.batch_size, env.world_size, env.rank, grad_accum,
                                          seed, batches), cfg.channels, cfg.workers, cfg.flip, fields)
    ev = EvalLoader(info, EvalShard(info.ids("val"), cfg.eval_batch_size or cfg.batch_size, env.world_size,
                                    env.rank), cfg.channels, cfg.workers, fields)
    return train, ev
