"""Stage-1 tools over every image of a split (or the whole file) exactly once across ranks:

evaluate_recon  L1, MSE and PSNR (pixels in [0, 1]), LPIPS (when its VGG16 weights are there),
                codebook usage and perplexity of the split's codes; mean +- standard error
encode_codes    each image's code grid (and its mirror image's with flip) into a .beton that a
                prior trains from: fields `codes` (int16, (h, w); int32 above 32,768 codes),
                `codes_flipped` (with flip), `label`, `split`, `source_index` (the image's row in the
                image .beton; rows keep that order), and OUT.json beside it with the vocabulary,
                grid, checkpoint and source. Written by rank 0 under a temporary name, then renamed.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..data import to_model_input
from ..data.loader import BetonInfo, EvalLoader
from ..data.order import EvalShard
from ..errors import UserError
from ..models.vqgan.quantize import perplexity
from ..task import Codes, require
from .checkpoints import Loaded


def check_family(loaded: Loaded, tool: str) -> None:
    require(loaded.task, Codes, f"{loaded.path}: {tool}")


def _split_ids(info: BetonInfo, split: str) -> np.ndarray:
    if split == "all":
        return np.arange(info.num_images, dtype=np.int64)
    if split not in ("train", "val"):
        raise UserError(f"--split is {split!r}; expected train, val or all")
    return info.ids(split)


def _batches(loaded: Loaded, info: BetonInfo, ids: np.ndarray, batch_size: int, desc: str, progress: bool,
             fields=("image",)):
    """(this rank's real rows of each batch: dict of fields, their image indices) with a progress bar."""
    from tqdm import tqdm

    d, env = loaded.recipe.data, loaded.env
    shard = EvalShard(ids, batch_size, env.world_size, env.rank)
    loader = EvalLoader(info, shard, d.channels, d.workers, fields)
    bar = tqdm(total=len(ids), desc=desc, unit="img", dynamic_ncols=True, mininterval=1.0,
               disable=not (progress and env.is_main))
    for batch, n in loader:
        bar.update(min(len(ids), n * env.world_size) if n else 0)
        if n:
            yield {k: v[:n] for k, v in batch.items()}
    bar.close()


def _open(loaded: Loaded, data_path: str) -> BetonInfo:
    d = loaded.recipe.data
    info = BetonInfo(data_path or d.path)
    info.check_shape(d.resolution)
    info.check_channels(d.channels)
    return info


@torch.no_grad()
def evaluate_recon(loaded: Loaded, lpips=None, split: str = "val", batch_size: int = 0, data_path: str = "",
                   progress: bool = True) -> dict:
    check_family(loaded, "eval_recon.py")
    d, env, task, net = loaded.recipe.data, loaded.env, loaded.task, loaded.module
    info = _open(loaded, data_path)
    ids = _split_ids(info, split)
    if len(ids) == 0:
        raise UserError(f"{info.path}: no {split} images")
    batch_size = batch_size or d.eval_batch_size or d.batch_size
    n_codes = task.code_shape()[0]
    names = ["l1", "mse", "psnr"] + (["lpips"] if lpips is not None else [])
    sums = torch.zeros(1 + 2 * len(names), dtype=torch.float64)  # n, then sum and sum of squares per metric
    counts = torch.zeros(n_codes, dtype=torch.float64)
    t0 = time.perf_counter()
    for batch in _batches(loaded, info, ids, batch_size, "reconstruction", progress):
        x = to_model_input(batch["image"], d.num_bits, loaded.device)
        idx = task.encode_indices(net, x)
        rec = task.decode_indices(net, idx)
        diff = (x - rec).float()
        mse = diff.pow(2).mean((1, 2, 3)) / 4  # pixels in [0, 1]
        vals = {"l1": diff.abs().mean((1, 2, 3)) / 2, "mse": mse, "psnr": 10 * torch.log10(1 / mse.clamp_min(1e-10))}
        if lpips is not None:
            vals["lpips"] = lpips(x, rec).float()
        row = [torch.tensor([float(len(x))], dtype=torch.float64)]
        for k in names:
            v = vals[k].double().cpu()
            row += [v.sum().reshape(1), v.pow(2).sum().reshape(1)]
        sums += torch.cat(row)
        counts += torch.bincount(idx.reshape(-1).cpu(), minlength=n_codes).double()
    sums = dist.all_reduce_sum(sums.to(loaded.device)).cpu()
    counts = dist.all_reduce_sum(counts.to(loaded.device)).cpu()
    n = int(sums[0])
    if n != len(ids):
        raise RuntimeError(f"scored {n} images of {len(ids)}")
    out = {"checkpoint": str(loaded.path), "family": loaded.family, "data": str(info.path), "split": split,
           "images": n, "batch_size": batch_size, "world_size": env.world_size, "weights": loaded.info.get("weights"),
           "num_bits": d.num_bits, "codes": n_codes, "grid": list(task.code_shape()[1:])}
    for i, k in enumerate(names):
        s, s2 = float(sums[1 + 2 * i]), float(sums[2 + 2 * i])
        mean = s / n
        var = max(s2 / n - mean * mean, 0.0) * n / max(n - 1, 1)
        out[k], out[f"{k}_se"] = mean, math.sqrt(var / n)
    out["usage"] = float((counts > 0).double().mean())
    out["perplexity"] = float(perplexity(counts))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def code_dtype(n_codes: int):
    return np.int16 if n_codes <= 32768 else np.int32


@torch.no_grad()
def encode_codes(loaded: Loaded, data_path: str, out: str | os.PathLike, flip: bool = False, batch_size: int = 0,
                 overwrite: bool = False, progress: bool = True) -> dict:
    check_family(loaded, "encode_codes.py")
    d, env, task, net = loaded.recipe.data, loaded.env, loaded.task, loaded.module
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"output folder not found: {out.parent}")
    info = _open(loaded, data_path)
    n_codes, h, w = task.code_shape()
    dtype = code_dtype(n_codes)
    ids = np.arange(info.num_images, dtype=np.int64)
    batch_size = batch_size or d.eval_batch_size or d.batch_size
    t0 = time.perf_counter()
    mine_idx, mine_codes, mine_flip = [], [], []
    for batch in _batches(loaded, info, ids, batch_size, "encoding", progress, ("image", "index")):
        x = to_model_input(batch["image"], d.num_bits, loaded.device)
        mine_idx.append(batch["index"])
        mine_codes.append(task.encode_indices(net, x).cpu())
        if flip:
            mine_flip.append(task.encode_indices(net, x.flip(3)).cpu())
    # every rank's rows to rank 0, padded to the largest shard
    per_rank = math.ceil(len(ids) / env.world_size)
    def packed(parts, shape):  # noqa: E306
        t = torch.cat(parts) if parts else torch.zeros((0, *shape), dtype=torch.long)
        pad = torch.full((per_rank - len(t), *shape), -1, dtype=torch.long)
        return torch.cat([t.long(), pad]).to(loaded.device)
    gathered = [dist.all_gather_cat(packed(mine_idx, ()).unsqueeze(0)).cpu().reshape(-1)]
    gathered.append(dist.all_gather_cat(packed(mine_codes, (h, w)).unsqueeze(0)).cpu().reshape(-1, h, w))
    if flip:
        gathered.append(dist.all_gather_cat(packed(mine_flip, (h, w)).unsqueeze(0)).cpu().reshape(-1, h, w))
    index = gathered[0].numpy()
    keep = index >= 0
    order = np.argsort(index[keep], kind="stable")
    rows = index[keep][order]
    if not np.array_equal(rows, ids):
        raise RuntimeError(f"encoded {len(rows)} images of {len(ids)} (or some twice)")
    codes = gathered[1].numpy()[keep][order].astype(dtype)
    flipped = gathered[2].numpy()[keep][order].astype(dtype) if flip else None
    meta = {"checkpoint": str(loaded.path), "family": loaded.family, "source": str(info.path),
            "source_bytes": info.path.stat().st_size, "images": int(len(ids)), "codes": int(n_codes),
            "grid": [int(h), int(w)], "dtype": np.dtype(dtype).name, "flip": bool(flip),
            "weights": loaded.info.get("weights"), "world_size": env.world_size}
    if env.is_main:
        _write_codes(out, codes, flipped, info.labels, info.splits, overwrite)
        tmp = out.with_name(f".{out.name}.json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out.with_name(out.name + ".json"))
    dist.barrier()
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    return meta


def _write_codes(out: Path, codes: np.ndarray, flipped, labels, splits, overwrite: bool) -> None:
    from ..data.loader import import_ffcv

    import_ffcv()
    import ffcv.writer
    from ffcv.fields import IntField, NDArrayField

    fields = {"codes": NDArrayField(dtype=codes.dtype, shape=codes.shape[1:])}
    if flipped is not None:
        fields["codes_flipped"] = NDArrayField(dtype=codes.dtype, shape=codes.shape[1:])
    fields.update(label=IntField(), split=IntField(), source_index=IntField())

    class Rows:
        def __len__(self):
            return len(codes)

        def __getitem__(self, i):
            row = (codes[i],) + ((flipped[i],) if flipped is not None else ())
            return (*row, int(labels[i]), int(splits[i]), int(i))

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    saved = ffcv.writer.tqdm
    ffcv.writer.tqdm = lambda *a, **k: __import__("tqdm").tqdm(*a, disable=True, **k)
    try:
        writer = ffcv.writer.DatasetWriter(str(tmp), fields, num_workers=1)  # one worker: the same bytes every time
        writer.from_indexed_dataset(Rows(), chunksize=256)
        os.replace(tmp, out)
    finally:
        ffcv.writer.tqdm = saved
        if tmp.exists():
            tmp.unlink()
