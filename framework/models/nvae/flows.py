"""NVAE's inverse autoregressive flows (NVlabs/NVAE `neural_ar_operations.py`, re-written):
volume-preserving z <- z - mu(z), mu from masked (autoregressive) convolutions, in pairs whose
second member runs in the mirrored order. The log-determinant is zero."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import Conv2D


def channel_mask(c_in: int, groups: int, c_out: int, zero_diag: bool) -> torch.Tensor:
    """Which input channels each output channel of the centre tap may see: (C_out, C_in / groups)."""
    if groups == c_in:  # depthwise: each channel only itself
        return torch.zeros(c_out, 1) if zero_diag else torch.ones(c_out, 1)
    assert groups == 1 and (c_in % c_out == 0 or c_out % c_in == 0), (c_in, c_out)
    m = torch.ones(c_out, c_in)
    if c_out >= c_in:
        r = c_out // c_in
        for i in range(c_in):
            m[i * r:(i + 1) * r, i + 1:] = 0
            if zero_diag:
                m[i * r:(i + 1) * r, i:i + 1] = 0
    else:
        r = c_in // c_out
        for i in range(c_out):
            m[i:i + 1, (i + 1) * r:] = 0
            if zero_diag:
                m[i:i + 1, i * r:(i + 1) * r] = 0
    return m


def conv_mask(k: int, c_in: int, groups: int, c_out: int, zero_diag: bool, mirror: bool) -> torch.Tensor:
    """Raster-order mask: rows above the centre, the centre row left of the centre, and at the
    centre the channel mask. Mirrored: the same, read from the bottom right."""
    c = (k - 1) // 2
    m = torch.ones(c_out, c_in // groups, k, k)
    m[:, :, c:, :] = 0
    m[:, :, c, :c] = 1
    m[:, :, c, c] = channel_mask(c_in, groups, c_out, zero_diag)
    return torch.flip(m, dims=[2, 3]) if mirror else m


def ar_conv(c_in, c_out, k, padding=0, groups=1, bias=False, zero_diag=True, mirror=False, init_coeff=1.0):
    conv = Conv2D(c_in, c_out, k, padding=padding, groups=groups, bias=bias,
                  mask=conv_mask(k, c_in, groups, c_out, zero_diag, mirror))
    if init_coeff != 1.0:
        with torch.no_grad():
            conv.log_weight_norm.add_(math.log(init_coeff))
    return conv


class CellAR(nn.Module):
    def __init__(self, num_z: int, mirror: bool, ex: int = 6, k: int = 5):
        super().__init__()
        hidden = int(round(num_z * ex))
        self.conv1 = ar_conv(num_z, hidden, 3, padding=1, zero_diag=True, mirror=mirror)
        self.conv2 = ar_conv(hidden, hidden, k, padding=(k - 1) // 2, groups=hidden, zero_diag=False, mirror=mirror)
        self.mu = ar_conv(hidden, num_z, 1, bias=True, zero_diag=False, mirror=mirror, init_coeff=0.1)

    def forward(self, z):
        s = F.elu(self.conv2(F.elu(self.conv1(z))))
        return z - self.mu(F.elu(s))


class PairedCellAR(nn.Module):
    def __init__(self, num_z: int):
        super().__init__()
        self.cell1 = CellAR(num_z, mirror=False)
        self.cell2 = CellAR(num_z, mirror=True)

    def forward(self, z):
        return self.cell2(self.cell1(z))
