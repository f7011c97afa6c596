"""GLO's reconstruction loss as the official code computes it (vgg_metric.py, utils.distance_metric):
L1 on the pixels plus L1 on VGG16 features, images mapped from [0, 1] to [-1, 1] and fed to VGG16
as they are (no ImageNet normalisation); grey images repeated to 3 channels; 28 px images padded
by 2 to 32 px first (train_glo / glo.py).

    size 16: 2 feature levels; 28 and 32: 3; 64: 4   (_VGGDistance: per-image means, summed)
    size > 64: 5 levels, plus the same on 4x4 average-pooled images with 4 levels (_VGGMSDistance)

The levels are torchvision's `vgg16.features` layers [2, 7, 12, 21, 30]. What the official loop
hands back is subtler than the indices: it keeps each selected layer's output and then runs the
next layer, an in-place ReLU, which overwrites it — so every level but the last is the ReLU's
output (relu1_2, relu2_2, relu3_2, relu4_3), and the last level is its layer's own output (the
loop stops there: conv3_2 before its ReLU at 3 levels, pool5 at 5). This module computes exactly
that, without relying on in-place aliasing (tests/test_glann.py checks it against a literal
re-run of the official loop with in-place ReLUs).

The VGG16 weights are the LPIPS ones (framework/losses/vgg.py: torchvision's file from the torch
hub cache or a recipe key; a missing file is one line; "random" for tests).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...losses.vgg import load_vgg16_features

LAYER_IDS = (2, 7, 12, 21, 30)


def levels_for(size: int) -> int:
    """The official distance_metric's choice: 2 at 16 px, 3 at 28/32, 4 at 64; above 64 the
    multi-scale distance (5 + 4 levels)."""
    if size <= 16:
        return 2
    if size <= 32:
        return 3
    if size <= 64:
        return 4
    return 5


class VGGDistance(nn.Module):
    """(B,) distances between image batches in [0, 1] (the official per-image form; the
    multi-scale form's batch means are the means of these)."""

    def __init__(self, weights: str = "", key: str = "model.glo.vgg_weights", size: int = 32):
        super().__init__()
        self.vgg = load_vgg16_features(weights, key)
        for m in self.vgg.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.size = size
        self.multiscale = size > 64
        self.levels = levels_for(size)
        self.requires_grad_(False)

    def features(self, x: torch.Tensor, levels: int) -> list[torch.Tensor]:
        ids = LAYER_IDS[:levels]
        out = []
        for i in range(ids[-1] + 1):
            x = self.vgg[i](x)
            if i in ids:
                out.append(x)
            elif i - 1 in ids[:-1]:  # the in-place ReLU after a kept level overwrote it
                out[-1] = x
        return out

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> [-1, 1], 3 channels, 28 px padded to 32 (zeros of the [0, 1] image)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] == 28:
            x = F.pad(x, (2, 2, 2, 2))
        return 2 * x - 1

    def _single(self, a: torch.Tensor, b: torch.Tensor, levels: int) -> torch.Tensor:
        n = a.shape[0]
        loss = (a - b).abs().reshape(n, -1).mean(1)
        fa, fb = self.features(a, levels), self.features(b, levels)
        for x, y in zip(fa, fb):
            loss = loss + (x - y).abs().reshape(n, -1).mean(1)
        return loss

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        a, b = self.prepare(fake), self.prepare(real)
        if not self.multiscale:
            return self._single(a, b, self.levels)
        return self._single(a, b, 5) + self._single(F.avg_pool2d(a, 4), F.avg_pool2d(b, 4), 4)


# -- the GLO paper's Laplacian-pyramid L1 (model.glo.loss: lap1) ------------------------------------

_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)  # Burt & Adelson's 5-tap binomial filter, /16


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Separable 5x5 binomial blur of each channel, reflect padding (sizes >= 3)."""
    c = x.shape[1]
    k = x.new_tensor(_TAPS) / 16.0
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, (gain * k).view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def _expand(g: torch.Tensor, shape) -> torch.Tensor:
    """Burt & Adelson's EXPAND: zeros between the samples, the blur with gain 4, cut to `shape`."""
    b, c, h, w = g.shape
    up = g.new_zeros(b, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = g
    return _blur(up, 4.0)[:, :, :shape[-2], :shape[-1]]


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[L^0 (finest band) ... L^(levels-2), the low-pass G^(levels-1)]: G^(j+1) = REDUCE(G^j)
    (blur, every second sample), L^j = G^j - EXPAND(G^(j+1)); the sum of EXPANDs gives x back."""
    out, g = [], x
    for _ in range(levels - 1):
        down = _blur(g)[:, :, ::2, ::2]
        out.append(g - _expand(down, g.shape))
        g = down
    out.append(g)
    return out


class LaplacianL1(nn.Module):
    """(B,) Lap1 of GLO (Bojanowski et al. 2018): sum_j 2^(-2j) mean |L^j(a) - L^j(b)| over a
    `levels`-level Laplacian pyramid, j = 0 the finest level, the low-pass residual the last; images
    in [0, 1] compared as [-1, 1] like the VGG distance's pixel term. GLANN's paper names this loss
    as GLO's; the official GLANN code ships no pyramid (its glo.py has `pyr.MS_Lap(4, 5)` commented
    out), so the filter (5-tap binomial, reflect padding) and 4 levels are ours."""

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        n = fake.shape[0]
        pa, pb = laplacian_pyramid(2 * fake - 1, self.levels), laplacian_pyramid(2 * real - 1, self.levels)
        return sum(4.0 ** -j * (a - b).abs().reshape(n, -1).mean(1) for j, (a, b) in enumerate(zip(pa, pb)))
