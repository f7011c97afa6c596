"""IMLE's exact nearest-neighbour search: for every GLO code, the nearest of the mapped noise
samples under L2 (the official icp.py: faiss.IndexFlatL2 over the samples, searched with the codes).

Both backends find candidates in float32 — FAISS's flat index (`faiss-cpu`'s IndexFlatL2; with
codes on a CUDA device and a FAISS built with GPU support, its GpuIndexFlatL2 on that device) or
chunked torch matrix products (on the codes' device, no extra dependency) — then re-rank each code's `refine` best candidates in
float64, ties to the lowest sample index. So the two backends give the same assignment (a float32
near-tie can order two candidates either way; the float64 re-ranking settles it the same way), and
it is the brute-force float64 answer unless the true nearest sample is not among a code's
`refine` float32 candidates, which would need a float32 error larger than the gap to the
`refine`-th candidate.

Across ranks: rank r searches the codes r, r + W, r + 2W, ... against all samples (every rank holds
them: they are drawn from seeded noise) and the answers are gathered back into code order; each
code's answer is computed the same way on any world size, so the assignment does not depend on it.
"""
from __future__ import annotations

import importlib

import torch

from ... import distributed as dist


def faiss_available() -> bool:
    try:
        importlib.import_module("faiss")
    except ImportError:
        return False
    return True


def _candidates_torch(queries: torch.Tensor, points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    q, p = queries.float(), points.float()
    pn = p.pow(2).sum(1)
    out = []
    for i in range(0, len(q), chunk):
        qc = q[i:i + chunk]
        d2 = pn.unsqueeze(0) - 2.0 * (qc @ p.T)  # |q|^2 is the same along a row: left out
        out.append(d2.topk(k, dim=1, largest=False).indices)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long, device=queries.device)


def faiss_gpu_available() -> bool:
    """A FAISS built with GPU support (faiss-gpu), and a CUDA device."""
    try:
        faiss = importlib.import_module("faiss")
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available() and faiss.get_num_gpus() > 0


def pick_backend(requested: str, device: torch.device) -> str:
    """`auto`: FAISS where it searches on the codes' device (on the CPU; on CUDA when it has GPU
    support), else torch's products on that device (on CUDA: a CPU FAISS would copy everything
    to the host and search there, slower than the GPU's matrix products)."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda":
        return "faiss" if faiss_gpu_available() else "torch"
    return "faiss" if faiss_available() else "torch"


def _candidates_faiss(queries: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    import faiss
    import numpy as np

    if queries.is_cuda and faiss_gpu_available():
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = queries.device.index or 0
        index = faiss.GpuIndexFlatL2(res, points.shape[1], cfg)
    else:
        index = faiss.IndexFlatL2(points.shape[1])
    index.add(np.ascontiguousarray(points.detach().float().cpu().numpy()))
    _, idx = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
    return torch.from_numpy(idx).to(queries.device)


def nearest(queries: torch.Tensor, points: torch.Tensor, backend: str = "torch", refine: int = 8,
            chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest point of each query, its squared distance in float64)."""
    if len(points) == 0:
        raise ValueError("nearest: no points to search")
    k = min(refine, len(points))
    with torch.no_grad():
        if backend == "faiss":
            cand = _candidates_faiss(queries, points, k)
        elif backend == "torch":
            cand = _candidates_torch(queries, points, k, chunk)
        else:
            raise ValueError(f"nearest: backend {backend!r} (torch or faiss)")
        cand = cand.sort(dim=1).values  # ascending sample index: the first of equal distances wins
        d2 = (points.double()[cand] - queries.double().unsqueeze(1)).pow(2).sum(-1)
        best = d2.argmin(dim=1)  # the first minimum
        rows = torch.arange(len(queries), device=queries.device)
        return cand[rows, best], d2[rows, best]


def sharded_nearest(codes: torch.Tensor, samples: torch.Tensor, backend: str = "torch", refine: int = 8,
                    chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest` over the ranks: this rank searches its codes (rows rank::world) against all
    samples; every rank gets the whole assignment, in code order."""
    world, rank = dist.world_size(), dist.rank()
    n = len(codes)
    per = -(-n // world)  # ceil: every rank gathers the same number of rows (padded)
    mine = torch.arange(rank, n, world, device=codes.device)
    idx, d2 = nearest(codes[mine], samples, backend, refine, chunk)
    pad = per - len(mine)
    if pad:
        idx = torch.cat([idx, idx.new_full((pad,), -1)])
        d2 = torch.cat([d2, d2.new_zeros(pad)])
    all_idx = dist.all_gather_cat(idx).view(world, per)
    all_d2 = dist.all_gather_cat(d2).view(world, per)
    # rank r's j-th row is code r + j * world
    order_idx = all_idx.T.reshape(-1)[:n]
    order_d2 = all_d2.T.reshape(-1)[:n]
    return order_idx, order_d2


class StreamingNearest:
    """The nearest sample of each query under L2 when the samples come in chunks and are never all
    held (pixel IMLE under LPIPS: a 32 px image's LPIPS vector has 124,928 numbers). The queries
    are cut into fixed blocks of `block` rows and rank r keeps blocks r, r + W, ... with their
    running best; a chunk's distances to a block are one float32 matrix product of the same
    shapes and inputs on any world size, so the assignment does not depend on it (ties, and
    float32 near-ties, go to the lowest sample index: a later chunk wins only when strictly nearer).
    Usage: `set_queries(fn)` with fn(rows) -> their vectors, `add(chunk)` per chunk in sample
    order, then `result()` (on every rank: the whole assignment in query order)."""

    def __init__(self, n: int, block: int = 256):
        self.n, self.block = n, block
        self.world, self.rank = dist.world_size(), dist.rank()
        self.nblocks = -(-n // block)
        self.mine = list(range(self.rank, self.nblocks, self.world))
        self.q, self.qn, self.best_d, self.best_i = {}, {}, {}, {}
        self.seen = 0

    def rows(self, b: int) -> torch.Tensor:
        return torch.arange(b * self.block, min(self.n, (b + 1) * self.block))

    def set_queries(self, fn) -> None:
        for b in self.mine:
            q = fn(self.rows(b)).float()
            self.q[b], self.qn[b] = q, q.pow(2).sum(1)

    def reset(self) -> None:
        self.seen = 0
        for b in self.mine:
            self.best_d[b] = torch.full((len(self.q[b]),), float("inf"), device=self.q[b].device)
            self.best_i[b] = torch.zeros(len(self.q[b]), dtype=torch.long, device=self.q[b].device)

    @torch.no_grad()
    def add(self, chunk: torch.Tensor) -> None:
        s = chunk.float()
        sn = s.pow(2).sum(1)
        for b in self.mine:
            d = (self.qn[b].unsqueeze(1) + sn.unsqueeze(0) - 2.0 * (self.q[b] @ s.T)).clamp_min(0)
            v, i = d.min(1)  # the first minimum within the chunk
            better = v < self.best_d[b]
            self.best_d[b] = torch.where(better, v, self.best_d[b])
            self.best_i[b] = torch.where(better, i + self.seen, self.best_i[b])
        self.seen += len(s)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        per = -(-self.nblocks // self.world)  # blocks per rank, padded to the same count
        dev = next(iter(self.q.values())).device if self.q else torch.device("cpu")
        idx = torch.full((per, self.block), -1, dtype=torch.long, device=dev)
        d2 = torch.zeros(per, self.block, dtype=torch.float32, device=dev)
        for j, b in enumerate(self.mine):
            k = len(self.best_i[b])
            idx[j, :k], d2[j, :k] = self.best_i[b], self.best_d[b]
        all_idx = dist.all_gather_cat(idx.reshape(-1)).view(self.world, per, self.block)
        all_d2 = dist.all_gather_cat(d2.reshape(-1)).view(self.world, per, self.block)
        # rank r's j-th block is block r + j * world
        order = all_idx.transpose(0, 1).reshape(-1)[:self.n], all_d2.transpose(0, 1).reshape(-1)[:self.n]
        return order[0], order[1].double()
