"""Sampling code grids from a prior: the GPT with a static KV cache (or without, the reference),
a sliding window for grids larger than the training grid, and the PixelCNN in raster order.

Every token is drawn by inverse-CDF from one uniform per row and token, all drawn up front from
the caller's seeded generator in raster order, so two samplers that compute the same logits
draw the same tokens (the tests hold the cached sampler to the uncached one token for token).
Logits are processed in this order: classifier-free guidance (cond + (s - 1)(cond - uncond), a
batch twice as large with the "no class" row), temperature, top-k (ties at the k-th value kept,
as taming's top_k_logits), top-p (the smallest set of most likely tokens whose probability
reaches p).

Sliding window (taming's scripts/make_samples.py rule): code (i, j) of an H x W grid is drawn from
the window of the training grid's size h x w whose row offset is i for i <= h/2, h - (H - i) when
H - i < h/2, else h/2 (the same for columns), at the window position (i - i0, j - j0). Where the
window has not moved since the previous code, its cache only grows by the new code; at the start of
each row every window of that row is filled at once, as one batch (rows above it are final by then),
and kept from row to row while its row offset does not change; so only the codes of the current row
inside a moved window are recomputed per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import UserError
from .gpt import GPT, KVCache


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    guidance: float = 1.0  # classifier-free guidance scale (class-conditional priors); 1: the conditional model


def check_sampling(s: SamplingConfig, vocab: int | None = None, conditional: bool = False) -> SamplingConfig:
    if not s.temperature > 0:
        raise UserError(f"temperature must be > 0, got {s.temperature:g}")
    if s.top_k < 0:
        raise UserError(f"top-k must be >= 1 (0 in a recipe: no filter), got {s.top_k}")
    if not 0 < s.top_p <= 1:
        raise UserError(f"top-p must be in (0, 1], got {s.top_p:g}")
    if s.guidance != 1 and not conditional:
        raise UserError(f"guidance {s.guidance:g} needs a class-conditional prior (model.n_classes > 0)")
    if s.guidance < 0:
        raise UserError(f"guidance must be >= 0, got {s.guidance:g}")
    if vocab is not None and s.top_k > vocab:
        raise UserError(f"top-k is {s.top_k}, more than the {vocab} codes")
    return s


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) -> the same with filtered-out entries at -inf."""
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens more likely than this one
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: torch.Tensor, u: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """(B, V) logits (after guidance), (B,) uniforms in [0, 1) -> (B,) int64 tokens."""
    logits = filter_logits(logits.float() / s.temperature, s.top_k, s.top_p)
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)
    tok = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return tok.clamp_max(logits.shape[-1] - 1)


def uniforms(n: int, tokens: int, generator: torch.Generator, device) -> torch.Tensor:
    """(tokens, n) uniforms: token t of row b is u[t, b], whatever the sampler."""
    return torch.rand((tokens, n), generator=generator, device=generator.device).to(device)


def condition_ids(model, n: int, labels, sos_token: int, s: SamplingConfig, device) -> torch.Tensor:
    """(n,) or (2n,) ids of position 0: labels (then n_classes, "no class", for guidance) or the start code."""
    if getattr(model, "n_classes", 0):
        if labels is None:
            raise ValueError("a class-conditional prior needs labels")
        lab = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(n)
        if s.guidance != 1:
            lab = torch.cat([lab, torch.full_like(lab, model.n_classes)])
        return lab
    return torch.full((n,), sos_token, dtype=torch.long, device=device)


def _guided(logits: torch.Tensor, n: int, s: SamplingConfig) -> torch.Tensor:
    """(n or 2n, V) -> (n, V): rows n.. are the "no class" rows of the same grids."""
    if logits.shape[0] == n:
        return logits
    cond, uncond = logits[:n], logits[n:]
    return cond + (s.guidance - 1) * (cond - uncond)


def _twice(x: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    return x if rows == n else torch.cat([x, x])


@torch.no_grad()
def sample_gpt(model: GPT, n: int, grid: tuple[int, int], generator: torch.Generator, s: SamplingConfig,
               labels=None, sos_token: int = 0, cached: bool = True, limit: int = 0) -> torch.Tensor:
    """(n, h, w) codes of a grid the model was trained on, in raster order (only the first `limit`
    when given: the rest stay 0)."""
    h, w = grid
    T = h * w
    device = model.head.weight.device
    cond = condition_ids(model, n, labels, sos_token, s, device)
    rows = cond.shape[0]
    u = uniforms(n, T, generator, device)
    out = torch.zeros((n, T), dtype=torch.long, device=device)
    steps = min(limit, T) if limit else T
    if cached:
        cache = KVCache.for_model(model, rows, T)
        inp = cond[:, None]
        for t in range(steps):
            logits = model(inp, pos=t, cache=cache)[:, -1]
            out[:, t] = draw(_guided(logits, n, s), u[t], s)
            inp = _twice(out[:, t:t + 1], n, rows)
    else:  # the reference: a full forward per token (taming's cond_transformer.sample)
        seq = cond[:, None]
        for t in range(steps):
            logits = model(seq)[:, -1]
            out[:, t] = draw(_guided(logits, n, s), u[t], s)
            seq = torch.cat([seq, _twice(out[:, t:t + 1], n, rows)], dim=1)
    return out.view(n, h, w)


def window_offset(i: int, size: int, local: int) -> int:
    """taming's rule: the position of code i inside its window of `local` along an axis of `size`."""
    half = local // 2
    if i <= half:
        return i
    if size - i < half:
        return local - (size - i)
    return half


@torch.no_grad()
def sample_window_reference(model: GPT, n: int, grid: tuple[int, int], local: tuple[int, int],
                            generator: torch.Generator, s: SamplingConfig, labels=None, sos_token: int = 0,
                            limit: int = 0):
    """taming's sliding-window sampler, as written there: a full forward of the window per code."""
    H, W = grid
    lh, lw = local
    device = model.head.weight.device
    cond = condition_ids(model, n, labels, sos_token, s, device)
    rows = cond.shape[0]
    u = uniforms(n, H * W, generator, device)
    idx = torch.zeros((n, H, W), dtype=torch.long, device=device)
    for i in range(H):
        li = window_offset(i, H, lh)
        for j in range(W):
            if limit and i * W + j >= limit:
                return idx
            lj = window_offset(j, W, lw)
            i0, j0 = i - li, j - lj
            patch = _twice(idx[:, i0:i0 + lh, j0:j0 + lw].reshape(n, -1), n, rows)
            logits = model(torch.cat([cond[:, None], patch[:, :-1]], dim=1))
            logits = logits.view(rows, lh, lw, -1)[:, li, lj]
            idx[:, i, j] = draw(_guided(logits, n, s), u[i * W + j], s)
    return idx


@torch.no_grad()
def sample_window(model: GPT, n: int, grid: tuple[int, int], local: tuple[int, int], generator: torch.Generator,
                  s: SamplingConfig, labels=None, sos_token: int = 0, limit: int = 0,
                  record: list | None = None) -> torch.Tensor:
    """The sliding-window rule with KV caches (see the module's docstring); the same tokens as
    `sample_window_reference` (up to float rounding of the logits). `record` gets (i, j, i0, j0) of
    every code: the window it was drawn in."""
    H, W = grid
    lh, lw = local
    if H < lh or W < lw:
        raise UserError(f"grid {H}x{W} is smaller than the training grid {lh}x{lw}")
    device = model.head.weight.device
    cond = condition_ids(model, n, labels, sos_token, s, device)
    rows = cond.shape[0]
    u = uniforms(n, H * W, generator, device)
    idx = torch.zeros((n, H, W), dtype=torch.long, device=device)
    starts = sorted({j - window_offset(j, W, lw) for j in range(W)})  # column offset of every window
    slot = {j0: k for k, j0 in enumerate(starts)}
    cache = KVCache.for_model(model, rows * len(starts), lh * lw)

    def window_tokens(i0: int, r0: int, r1: int) -> torch.Tensor:
        """(windows * rows, (r1 - r0) * lw): window rows r0..r1-1 of every window, window-major."""
        parts = [_twice(idx[:, i0 + r0:i0 + r1, j0:j0 + lw].reshape(n, -1), n, rows) for j0 in starts]
        return torch.cat(parts, dim=0)

    upper_i0, upper_rows = None, 0  # the windows' row offset, and how many of their rows the cache holds
    for i in range(H):
        if limit and i * W >= limit:
            return idx
        li = window_offset(i, H, lh)
        i0 = i - li
        # 1) every window of this row gets positions 0 .. li*lw: the condition, then its rows above row i
        #    (all final by now), as one batch; kept from the row above while the row offset stays
        if upper_i0 == i0 and upper_rows <= li:
            inp, pos = window_tokens(i0, upper_rows, li), upper_rows * lw + 1
        else:
            inp, pos = torch.cat([cond.repeat(len(starts))[:, None], window_tokens(i0, 0, li)], dim=1), 0
        upper_i0, upper_rows = i0, li
        last = model(inp, pos=pos, cache=cache, last_only=True)[:, -1] if inp.shape[1] else None
        length = {k: li * lw + 1 for k in range(len(starts))}  # positions valid in each window's cache
        for j in range(W):
            if limit and i * W + j >= limit:
                return idx
            lj = window_offset(j, W, lw)
            j0 = j - lj
            k = slot[j0]
            view = cache.rows(k * rows, (k + 1) * rows)
            p = li * lw + lj  # the output at position p predicts this code
            if p + 1 > length[k]:  # feed the codes of row i at window columns length - li*lw - 1 .. lj - 1
                a = length[k] - li * lw - 1
                inp = _twice(idx[:, i, j0 + a:j0 + lj], n, rows)
                logits = model(inp, pos=length[k], cache=view, last_only=True)[:, -1]
                length[k] = p + 1
            else:  # lj == 0: the output at position li*lw came from step 1 (the last position it computed)
                logits = last[k * rows:(k + 1) * rows]
            idx[:, i, j] = draw(_guided(logits, n, s), u[i * W + j], s)
            if record is not None:
                record.append((i, j, i0, j0))
    return idx


@torch.no_grad()
def sample_pixelcnn(model, n: int, grid: tuple[int, int], generator: torch.Generator, s: SamplingConfig,
                    labels=None, limit: int = 0) -> torch.Tensor:
    """(n, h, w) codes in raster order, one full forward per code (the PixelCNN has no cache)."""
    h, w = grid
    device = next(model.parameters()).device
    u = uniforms(n, h * w, generator, device)
    lab, rows = None, n
    if model.n_classes:
        lab = condition_ids(model, n, labels, 0, s, device)
        rows = lab.shape[0]
    idx = torch.zeros((n, h, w), dtype=torch.long, device=device)
    for i in range(h):
        for j in range(w):
            if limit and i * w + j >= limit:
                return idx
            logits = model(_twice(idx, n, rows), lab)[:, :, i, j]
            idx[:, i, j] = draw(_guided(logits, n, s), u[i * w + j], s)
    return idx
