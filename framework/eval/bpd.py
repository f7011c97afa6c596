"""Negative log-likelihood by importance weighting (Burda et al. 2016), as NVAE reports it.

    log p(x) ~= logsumexp_k [log p(x | z_k) + log p(z_k) - log q(z_k | x)] - log K,  z_k ~ q(z | x)
    bits/dim  = -log p(x) / (D ln 2),  D = C H W of the pixels the likelihood scores

The ELBO is estimated from the same K samples (their mean log weight), so IW >= ELBO holds on
every image. Every image of the split is scored exactly once across ranks (the evaluation
loader pads the last batches; padding rows are dropped). Each image's noise (and, for binary
data, its binarisation) comes from a generator seeded by (seed, image index, chunk), so the
figures do not depend on the world size, the batch size or the order. K is split into chunks:
one forward pass holds batch x chunk rows, whatever K is.
"""
from __future__ import annotations

import math
import time

import torch

from .. import distributed as dist
from ..data import to_model_input
from ..data.loader import BetonInfo, EvalLoader
from ..data.order import EvalShard
from ..errors import UserError
from ..task import ImportanceWeights, require
from .checkpoints import Loaded, seeded_generator


def _generator(seed: int, index: int, stream: int) -> torch.Generator:
    return seeded_generator(seed, 13, index, stream)


def check_family(loaded: Loaded) -> None:
    require(loaded.task, ImportanceWeights, f"{loaded.path}: eval_bpd.py")


@torch.no_grad()
def image_log_weights(loaded: Loaded, x: torch.Tensor, ids, k: int, chunk: int, seed: int) -> torch.Tensor:
    """(B, K) log weights of images x (B, C, H, W in [-1, 1]) with global indices `ids`."""
    task, net = loaded.task, loaded.module
    b = x.shape[0]
    x = task.eval_input(x, [_generator(seed, int(i), 0) for i in ids])
    out = []
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        gens = [_generator(seed, int(i), 1 + start // chunk) for i in ids]
        eps = [torch.stack([torch.randn((c, *shape), generator=g) for g in gens]).reshape(b * c, *shape)
               .to(loaded.device) for shape in net.latent_shapes]
        rows = x.repeat_interleave(c, dim=0)  # image-major: rows i*c .. i*c + c - 1 are image i
        out.append(task.log_weights(net, rows, eps).double().reshape(b, c).cpu())
    return torch.cat(out, dim=1)


def evaluate_bpd(loaded: Loaded, split: str = "val", iw_samples: int = 1000, batch_size: int = 0, chunk: int = 0,
                 seed: int = 0, data_path: str = "", progress: bool = True) -> dict:
    check_family(loaded)
    if iw_samples < 1:
        raise UserError(f"--iw-samples must be at least 1, got {iw_samples}")
    if split not in ("train", "val"):
        raise UserError(f"--split is {split!r}; expected train or val")
    d, env = loaded.recipe.data, loaded.env
    path = data_path or d.path
    info = BetonInfo(path)
    info.check_shape(d.resolution)
    ids = info.ids(split)
    if len(ids) == 0:
        raise UserError(f"{path}: no {split} images")
    batch_size = batch_size or d.eval_batch_size or d.batch_size
    chunk = chunk or max(1, min(iw_samples, (2 * d.batch_size) // batch_size))
    shard = EvalShard(ids, batch_size, env.world_size, env.rank)
    loader = EvalLoader(info, shard, d.channels, d.workers)
    order = shard.padded()
    dims = loaded.task.dims
    sums = torch.zeros(5, dtype=torch.float64)  # n, sum nll, sum nll^2, sum nelbo, sum nelbo^2 (nats)
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=len(ids), desc=f"IW bits/dim (K={iw_samples})", unit="img", dynamic_ncols=True,
               mininterval=1.0, disable=not (progress and env.is_main))
    for j, (xb, n) in enumerate(loader):
        if n == 0:
            continue
        x = to_model_input(xb["image"][:n], d.num_bits, loaded.device)
        lw = image_log_weights(loaded, x, order[j * batch_size:j * batch_size + n], iw_samples, chunk, seed)
        nll = -(torch.logsumexp(lw, dim=1) - math.log(iw_samples))
        nelbo = -lw.mean(dim=1)
        sums += torch.stack([torch.tensor(float(n), dtype=torch.float64), nll.sum(), (nll * nll).sum(),
                             nelbo.sum(), (nelbo * nelbo).sum()])
        bar.update(n * env.world_size)
    bar.close()
    sums = dist.all_reduce_sum(sums)
    count = int(sums[0])
    if count != len(ids):
        raise RuntimeError(f"scored {count} images of {len(ids)}")

    def stats(s, s2):
        mean = s / count
        var = max(s2 / count - mean * mean, 0.0) * count / max(count - 1, 1)
        return mean, math.sqrt(var / count)

    to_bpd = 1.0 / (dims * math.log(2.0))
    nll_mean, nll_se = stats(float(sums[1]), float(sums[2]))
    elbo_mean, elbo_se = stats(float(sums[3]), float(sums[4]))
    return {"checkpoint": str(loaded.path), "family": loaded.family, "data": str(path), "split": split,
            "images": count, "iw_samples": iw_samples, "chunk": chunk, "batch_size": batch_size,
            "world_size": env.world_size, "seed": seed, "num_bits": d.num_bits, "dims": dims,
            "likelihood": getattr(loaded.recipe.model, "likelihood", ""), "weights": loaded.info.get("weights"),
            "bn_recalibrated": loaded.info.get("bn") is not None, "bn": loaded.info.get("bn"),
            "nll_nats": nll_mean, "nll_nats_se": nll_se, "bpd": nll_mean * to_bpd, "bpd_se": nll_se * to_bpd,
            "nelbo_nats": elbo_mean, "nelbo_nats_se": elbo_se, "elbo_bpd": elbo_mean * to_bpd,
            "elbo_bpd_se": elbo_se * to_bpd, "seconds": round(time.perf_counter() - t0, 2)}
