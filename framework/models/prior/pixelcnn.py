"""The gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders") over a grid of codes, as VQ-VAE trains it as its prior.

Two stacks per layer: the vertical stack sees every row above (a (k//2 + 1) x k kernel, the
current row masked in the first layer and, in every layer, never reaching rows below), the
horizontal stack the pixels to the left in the current row (a 1 x (k//2 + 1) kernel, the current
pixel masked in the first layer) plus the vertical stack's features of the row above; so there
is no blind spot: with enough layers every earlier position in raster order reaches the output.
Gates tanh(a) * sigmoid(b), a class embedding added to both halves when class-conditional (one
row more: "no class", for classifier-free guidance), a
residual on the horizontal stack after the first layer, then two 1 x 1 convolutions to logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel is multiplied by a fixed 0/1 mask in its own forward (the weight
    is used only here: ZeRO-3 gathers it around this module's forward)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], padding: tuple[int, int], mask=None):
        super().__init__(cin, cout, kernel, padding=padding)
        self.register_buffer("mask", torch.ones_like(self.weight) if mask is None else mask, persistent=False)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    def __init__(self, dim: int, kernel: int, first: bool, n_classes: int = 0):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"kernel {kernel} must be odd")
        r = kernel // 2
        vmask = torch.ones(2 * dim, dim, r + 1, kernel)
        hmask = torch.ones(2 * dim, dim, 1, r + 1)
        if first:  # the first layer may not see the current row (vertical) or pixel (horizontal)
            vmask[:, :, -1] = 0
            hmask[:, :, :, -1] = 0
        self.vert = MaskedConv2d(dim, 2 * dim, (r + 1, kernel), (r, r), vmask)
        self.vert_to_horiz = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.horiz = MaskedConv2d(dim, 2 * dim, (1, r + 1), (0, r), hmask)
        self.horiz_resid = nn.Conv2d(dim, dim, 1)
        self.cond = nn.Embedding(n_classes + 1, 2 * dim) if n_classes else None  # the last row: no class
        self.first = first

    def forward(self, xv, xh, label=None):
        h, w = xv.shape[-2:]
        v = self.vert(xv)[:, :, :h]  # output row i: input rows i - r .. i (i - 1 in the first layer)
        hz = self.horiz(xh)[:, :, :, :w]  # output column j: input columns j - r .. j (j - 1 first)
        c = self.cond(label)[:, :, None, None] if self.cond is not None else 0
        out_v = _gate(v + c)
        out = _gate(self.vert_to_horiz(v) + hz + c)
        out_h = self.horiz_resid(out) + (0 if self.first else xh)
        return out_v, out_h


class GatedPixelCNN(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 64, n_layers: int = 15, first_kernel: int = 7, kernel: int = 3,
                 out_hidden: int = 512, n_classes: int = 0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList([GatedLayer(dim, first_kernel if i == 0 else kernel, i == 0, n_classes)
                                     for i in range(n_layers)])
        self.output = nn.Sequential(nn.Conv2d(dim, out_hidden, 1), nn.ReLU(), nn.Conv2d(out_hidden, vocab_size, 1))
        self.vocab_size, self.n_classes = vocab_size, n_classes

    def forward(self, codes: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, h, w) int64 -> logits (B, vocab, h, w); logits at (i, j) see only codes before
        (i, j) in raster order."""
        x = self.embedding(codes).permute(0, 3, 1, 2)
        xv, xh = x, x
        for layer in self.layers:
            xv, xh = layer(xv, xh, label)
        return self.output(xh)
