"""A GPT over code grids in taming-transformers' minGPT layout (taming/modules/transformer/mingpt.py).

Token embedding + a learned position embedding (zeros at init), pre-LN blocks (separate
key / query / value / proj linears, a 4x MLP with GELU, dropout), a final LayerNorm and a bias-free
head, under taming's parameter names, so `GPT(1024, 512, 24, 16, 1024)` has taming's 304,932,864
parameters and loads its state dict. Attention is torch's scaled_dot_product_attention (flash or
memory-efficient kernels on CUDA).

A sequence is s_0 = the condition (taming's start token: a code id shared with the code table, or a
class embedding of its own), s_{q+1} = code q of the grid in raster order; the output at position q
predicts code q. `forward(idx, pos, cache)` embeds the inputs at positions pos .. pos + n - 1: with a
`KVCache` it writes their keys and values in place at those positions and attends to everything
cached before them, so sampling feeds one token (or a chunk) at a time. Every parameter is used
inside the forward of the module that owns it (ZeRO-3 gathers a module's parameters around its
own forward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class KVCache:
    """Keys and values of every layer, preallocated: k, v (layers, batch, heads, length, head_dim),
    written in place (no concatenation). `rows(a, b)` is a view of batch rows a..b-1 sharing the
    storage (the sliding-window sampler keeps one cache per window in one allocation)."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, device, dtype,
                 k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        shape = (layers, batch, heads, length, head_dim)
        self.k = k if k is not None else torch.empty(shape, device=device, dtype=dtype)
        self.v = v if v is not None else torch.empty(shape, device=device, dtype=dtype)
        self.length = length

    @classmethod
    def for_model(cls, model: "GPT", batch: int, length: int | None = None, device=None, dtype=None) -> "KVCache":
        p = model.head.weight
        return cls(len(model.blocks), batch, model.n_head, length or model.block_size,
                   model.n_embd // model.n_head, device or p.device, dtype or p.dtype)

    def rows(self, start: int, stop: int) -> "KVCache":
        return KVCache(0, 0, 0, self.length, 0, None, None, self.k[:, start:stop], self.v[:, start:stop])

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]


def causal_mask(pos: int, n: int, device) -> torch.Tensor:
    """(n, pos + n) boolean: query pos + i may attend to keys 0 .. pos + i."""
    return torch.arange(pos + n, device=device)[None, :] <= (pos + torch.arange(n, device=device))[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float, resid_pdrop: float):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
        self.key = nn.Linear(n_embd, n_embd)
        self.query = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.attn_drop = nn.Dropout(attn_pdrop)  # kept for taming's names; the rate goes to SDPA
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head
        self.attn_pdrop = attn_pdrop

    def forward(self, x: torch.Tensor, cache: tuple | None = None, pos: int = 0) -> torch.Tensor:
        b, n, c = x.shape
        h = self.n_head
        q = self.query(x).view(b, n, h, c // h).transpose(1, 2)
        k = self.key(x).view(b, n, h, c // h).transpose(1, 2)
        v = self.value(x).view(b, n, h, c // h).transpose(1, 2)
        drop = self.attn_pdrop if self.training else 0.0
        if cache is None:
            if pos:
                raise ValueError("pos > 0 needs a KV cache")
            y = _attend(q, k, v, drop, causal=True)
        else:
            kc, vc = cache
            kc[:, :, pos:pos + n] = k
            vc[:, :, pos:pos + n] = v
            keys, values = kc[:, :, :pos + n], vc[:, :, :pos + n]
            if n == 1:
                y = _attend(q, keys, values, drop)
            elif pos == 0:
                y = _attend(q, keys, values, drop, causal=True)
            else:
                y = _attend(q, keys, values, drop, mask=causal_mask(pos, n, x.device))
        y = y.transpose(1, 2).reshape(b, n, c)
        return self.resid_drop(self.proj(y))


_XFORMERS = None


def _xformers():
    global _XFORMERS
    if _XFORMERS is None:
        try:
            import xformers.ops as xops  # optional; CUDA kernels only

            _XFORMERS = xops
        except Exception:  # not installed, or built without kernels for this machine
            _XFORMERS = False
    return _XFORMERS


def _attend(q, k, v, drop: float, causal: bool = False, mask=None):
    """softmax(q k^T / sqrt(d)) v, causal or under a boolean mask: xformers' memory-efficient kernel
    for causal training on CUDA when it is installed, else torch's SDPA (flash / memory-efficient
    kernels on CUDA, the math kernel on the CPU)."""
    if causal and mask is None and q.is_cuda and q.shape[2] == k.shape[2] and _xformers():
        xops = _xformers()
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=xops.LowerTriangularMask(), p=drop)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal and mask is None)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float, resid_pdrop: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, attn_pdrop, resid_pdrop)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(resid_pdrop))
        self.checkpointed = False

    def forward(self, x, cache=None, pos: int = 0):
        x = x + self.attn(self.ln1(x), cache, pos)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 12, n_head: int = 8, n_embd: int = 256,
                 embd_pdrop: float = 0.0, resid_pdrop: float = 0.0, attn_pdrop: float = 0.0, n_classes: int = 0,
                 checkpointing: bool = False):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        # class-conditional: one row per class and a last "no class" row (classifier-free guidance)
        self.cond_emb = nn.Embedding(n_classes + 1, n_embd) if n_classes else None
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))
        self.drop = nn.Dropout(embd_pdrop)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, attn_pdrop, resid_pdrop) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.vocab_size, self.block_size, self.n_head, self.n_embd = vocab_size, block_size, n_head, n_embd
        self.n_classes = n_classes
        self.apply(self._init_weights)
        for b in self.blocks:
            b.checkpointed = checkpointing

    @staticmethod
    def _init_weights(module):  # taming's: N(0, 0.02) linears and embeddings, zero biases, unit LayerNorms
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def forward(self, idx: torch.Tensor, pos: int = 0, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """idx (B, n): the inputs at positions pos .. pos + n - 1 (position 0: the condition id, a class
        or n_classes for none when class-conditional, else the start token's code id) -> logits
        (B, n, vocab), or (B, 1, vocab) of the last position with last_only."""
        n = idx.shape[1]
        if pos + n > self.block_size:
            raise ValueError(f"positions {pos}..{pos + n - 1} exceed block_size {self.block_size}")
        if self.cond_emb is not None and pos == 0:
            x = torch.cat([self.cond_emb(idx[:, :1]), self.tok_emb(idx[:, 1:])], dim=1)
        else:
            x = self.tok_emb(idx)
        x = self.drop(x + self.pos_emb[:, pos:pos + n])
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, cache.layer(i), pos)
            elif block.checkpointed and block.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if last_only:
            x = x[:, -1:]
        return self.head(self.ln_f(x))


def gpt_parameters(vocab_size: int, block_size: int, n_layer: int, n_embd: int, n_classes: int = 0) -> int:
    """The count in closed form (checked against the module in the tests)."""
    block = 4 * n_embd + 4 * (n_embd * n_embd + n_embd) + (8 * n_embd * n_embd + 5 * n_embd)
    cond = (n_classes + 1) * n_embd if n_classes else 0
    return vocab_size * n_embd + cond + block_size * n_embd + n_layer * block + 2 * n_embd + n_embd * vocab_size


def flops_per_token(model: GPT, context: int) -> float:
    """Forward multiply-adds x 2 of one token attending to `context` earlier ones (for the profile)."""
    d, layers = model.n_embd, len(model.blocks)
    return 2.0 * (layers * (12 * d * d + 2 * context * d) + d * model.vocab_size)


__all__ = ["GPT", "KVCache", "causal_mask", "flops_per_token", "gpt_parameters"]
