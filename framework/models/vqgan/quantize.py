"""Quantizers of the vqgan family (`model.quantizer.kind`).

`vq` — VQ-VAE's nearest-code quantizer (van den Oord et al. 2017) with the straight-through
estimator: z_q = z + sg[e_k - z], k = argmin_j |z - e_j|^2, loss |sg[z] - e|^2 + beta |z - sg[e]|^2
(beta on the commitment term, as the paper). taming's VectorQuantizer2(legacy=True), which its
VQModel uses, puts beta on the codebook term instead (taming issues #46, #57): `legacy_beta`
reproduces that. Options that keep the codebook in use:
  codebook_dim  look codes up in a low-dimensional linear projection of z (factorised codes,
                Yu et al. 2022 "Vector-quantized Image Modeling with Improved VQGAN"; LlamaGen's
                tokenizer, Sun et al. 2024, reports 97% usage with 8-dim codes)
  l2_normalize  z and the codes on the unit sphere: nearest = cosine distance (the same sources)
  ema           codebook updated as exponential moving averages of the counts and sums of the z
                assigned to each code (VQ-VAE's appendix; taming's EMAVectorQuantizer): N <- g N +
                (1-g) n, m <- g m + (1-g) sum z, e = m / ((N + eps) / (sum N + K eps) * sum N); the
                counts and sums of a step are all-reduced over ranks and micro-batches, so every
                rank holds the same codebook; the codebook is then a buffer, not trained, and its
                loss is the commitment term alone
  restart_dead  a code unused for that many steps is replaced by an encoder output drawn from
                the step's global batch (Dhariwal et al. 2020, Jukebox), the same draw on every rank
`fsq` — finite scalar quantisation (Mentzer et al. 2023): z projected to len(levels) dims, each
bounded by tanh to its level count and rounded (straight-through); no codebook, no loss; index
= mixed-radix digits of the levels.

Every step logs codebook usage (the fraction of codes hit in the last `usage_window` steps, on
any rank) and perplexity (exp of the entropy of the step's global code histogram).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed as dist


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    p = counts.double() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p + 1e-10)).sum())


class _Usage(nn.Module):
    """Per-code step of last use (a buffer, so it is checkpointed) and the step's histogram."""

    def __init__(self, n_codes: int, window: int):
        super().__init__()
        self.n_codes, self.window = n_codes, window
        self.register_buffer("last_used", torch.full((n_codes,), -(2**62), dtype=torch.long))
        self._counts = None  # this step's counts so far (this rank, earlier micro-batches)

    def add(self, idx: torch.Tensor) -> torch.Tensor:
        c = torch.bincount(idx.reshape(-1), minlength=self.n_codes).double()
        self._counts = c if self._counts is None else self._counts + c
        return c

    def close_step(self, step: int, counts: torch.Tensor) -> dict:
        """counts: the step's global histogram (all ranks, all micro-batches)."""
        self.last_used[counts > 0] = step
        self._counts = None
        return {"usage": (step - self.last_used < self.window).double().mean(), "perplexity": perplexity(counts)}


class VectorQuantizer(nn.Module):
    """(B, D, H, W) -> z_q (B, D, H, W), loss, indices (B, H, W)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy_beta: bool = False,
                 codebook_dim: int = 0, l2_normalize: bool = False, ema: bool = False, ema_decay: float = 0.99,
                 ema_eps: float = 1e-5, restart_dead: int = 0, usage_window: int = 100):
        super().__init__()
        self.n_embed, self.beta, self.legacy_beta = n_embed, beta, legacy_beta
        self.l2, self.ema, self.decay, self.eps, self.restart_dead = l2_normalize, ema, ema_decay, ema_eps, restart_dead
        self.dim = codebook_dim or embed_dim
        if codebook_dim:
            self.in_proj = nn.Linear(embed_dim, codebook_dim)
            self.out_proj = nn.Linear(codebook_dim, embed_dim)
        self.embedding = Codebook(n_embed, self.dim, l2_normalize, trained=not ema)
        if ema:
            self.register_buffer("ema_count", torch.zeros(n_embed, dtype=torch.float32))
            self.register_buffer("ema_sum", self.embedding.weight.detach().clone().float())
        self.usage = _Usage(n_embed, usage_window)
        self._pool: list[torch.Tensor] = []  # this step's z (restart candidates), per micro-batch
        self._sums = None

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """indices (B, H, W) -> z_q (B, embed_dim, H, W)"""
        q = self.embedding(idx=idx)
        if hasattr(self, "out_proj"):
            q = self.out_proj(q)
        return q.permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor, ctx=None):
        b, _, h, w = z.shape
        z = z.permute(0, 2, 3, 1)
        if hasattr(self, "in_proj"):
            z = self.in_proj(z)
        if self.l2:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, self.dim)
        e, idx = self.embedding(flat.detach())
        e = e.view_as(z).to(z.dtype)
        commit = (z - e.detach()).pow(2).mean()
        if self.ema:
            loss = self.beta * commit
        else:
            book = (z.detach() - e).pow(2).mean()
            loss = (book * self.beta + commit) if self.legacy_beta else (book + self.beta * commit)
        zq = z + (e - z).detach()
        if hasattr(self, "out_proj"):
            zq = self.out_proj(zq)
        zq = zq.permute(0, 3, 1, 2).contiguous()
        idx = idx.view(b, h, w)
        metrics = {}
        if ctx is not None and ctx.phase == "train" and self.training:
            metrics = self._train_step(flat.detach(), idx, ctx)
        return zq, loss, idx, metrics

    @torch.no_grad()
    def _train_step(self, flat: torch.Tensor, idx: torch.Tensor, ctx) -> dict:
        """Accumulates the step's statistics; on the last micro-batch reduces them over ranks and
        applies the EMA update, the restarts and the usage bookkeeping."""
        self.usage.add(idx)
        if self.ema:
            s = torch.zeros(self.n_embed, self.dim, dtype=torch.float64, device=flat.device)
            s.index_add_(0, idx.reshape(-1), flat.double())
            self._sums = s if self._sums is None else self._sums + s
        if self.restart_dead:
            self._pool.append(flat.float())
        if ctx.micro < ctx.grad_accum - 1:
            return {}
        total = dist.all_reduce_sum(self.usage._counts.clone())
        if self.ema:
            if self.ema_count.dtype != torch.float32:  # a bf16/fp16 engine cast the buffers: keep sums in fp32
                self.ema_count, self.ema_sum = self.ema_count.float(), self.ema_sum.float()
            sums = dist.all_reduce_sum(self._sums)
            self._sums = None
            g = self.decay
            self.ema_count.mul_(g).add_(total.float(), alpha=1 - g)
            self.ema_sum.mul_(g).add_(sums.float(), alpha=1 - g)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (n + self.n_embed * self.eps) * n
            self.codebook.copy_((self.ema_sum / smoothed.unsqueeze(1)).to(self.codebook.dtype))
        out = self.usage.close_step(ctx.step, total)
        if self.restart_dead:
            self._restart(ctx)
        return out

    @torch.no_grad()
    def _restart(self, ctx) -> None:
        """Codes unused for restart_dead steps <- z drawn from the global batch: every rank gathers
        the step's z in the loader's chunk order (micro-batch, then rank) and draws the same rows
        with a generator seeded by (seed, step)."""
        local = torch.stack(self._pool)  # (micro, rows, dim)
        self._pool = []
        dead = (ctx.step - self.usage.last_used) >= self.restart_dead
        gathered = dist.all_gather_cat(local.unsqueeze(0))  # (world, micro, rows, dim)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pool = gathered.transpose(0, 1).reshape(-1, self.dim)  # chunk = micro * world + rank
        g = torch.Generator().manual_seed((ctx.seed * 1_000_003 + ctx.step) % (2**63))
        rows = torch.randint(len(pool), (n_dead,), generator=g)
        new = pool[rows.to(pool.device)]
        where = dead.nonzero().squeeze(1)
        self.codebook[where] = new.to(self.codebook.dtype)
        self.usage.last_used[where] = ctx.step
        if self.ema:
            self.ema_sum[where] = new.float()
            self.ema_count[where] = 1.0


class Codebook(nn.Module):
    """The K x D codes (taming's key `quantize.embedding.weight`): a parameter, or a buffer when
    EMA updates it. Every use of the weight happens inside this module's forward, so ZeRO-3
    gathers it there (a partitioned parameter is empty outside its module's forward)."""

    def __init__(self, n: int, dim: int, l2_normalize: bool, trained: bool):
        super().__init__()
        w = torch.empty(n, dim).uniform_(-1.0 / n, 1.0 / n)  # taming's initialisation
        if trained:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)
        self.l2 = l2_normalize

    def codes(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=1) if self.l2 else self.weight

    def forward(self, flat: torch.Tensor | None = None, idx: torch.Tensor | None = None):
        """flat (N, D) -> (the nearest codes (N, D), their indices (N,)); or idx -> its codes."""
        e = self.codes()
        if idx is not None:
            return F.embedding(idx, e)
        with torch.no_grad():
            f = flat.to(e.dtype)
            d = f.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * f @ e.t()
            idx = d.argmin(1)
        return F.embedding(idx, e), idx


class FSQ(nn.Module):
    """Finite scalar quantisation: (B, D, H, W) -> z_q (B, D, H, W), loss 0, indices (B, H, W)."""

    def __init__(self, levels, embed_dim: int, usage_window: int = 100, eps: float = 1e-3):
        super().__init__()
        levels = [int(v) for v in levels]
        self.d = len(levels)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer("basis", torch.tensor([math.prod(levels[:i]) for i in range(self.d)], dtype=torch.long),
                             persistent=False)
        self.n_embed = math.prod(levels)
        self.eps = eps
        self.in_proj = nn.Linear(embed_dim, self.d)
        self.out_proj = nn.Linear(self.d, embed_dim)
        self.usage = _Usage(self.n_embed, usage_window)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Each dim into (-L/2, L/2) (shifted by 1/2 for even L), so rounding gives L values."""
        lv = self.levels.to(z.dtype)
        half_l = (lv - 1) * (1 - self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.tan(offset / half_l)  # as the paper's code (tan, not atanh: the levels are still L)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        b = self.bound(z)
        return b + (torch.round(b) - b).detach()  # straight-through rounding; integer levels

    def codes_to_indices(self, q: torch.Tensor) -> torch.Tensor:
        digits = (q.round().long() + self.levels // 2)  # 0 .. L-1
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, idx: torch.Tensor) -> torch.Tensor:
        digits = (idx.unsqueeze(-1) // self.basis) % self.levels
        return (digits - self.levels // 2).float()

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        q = self.indices_to_codes(idx) / (self.levels // 2).float()
        return self.out_proj(q.to(self.out_proj.weight.dtype)).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor, ctx=None):
        z = self.in_proj(z.permute(0, 2, 3, 1))
        q = self.quantize(z)
        idx = self.codes_to_indices(q.detach())
        zq = self.out_proj(q / (self.levels // 2).to(q.dtype)).permute(0, 3, 1, 2).contiguous()
        metrics = {}
        if ctx is not None and ctx.phase == "train" and self.training:
            self.usage.add(idx)
            if ctx.micro == ctx.grad_accum - 1:
                total = dist.all_reduce_sum(self.usage._counts.clone())
                metrics = self.usage.close_step(ctx.step, total)
        return zq, zq.new_zeros(()), idx, metrics
