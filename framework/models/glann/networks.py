"""GLANN's networks (Hoshen, Li & Malik 2019; official code yedidh/glann): the GLO generator, the
per-image latent table and IMLE's mapping T from noise to the latent space.

- `Generator` (model.py `_netG`, 28-64 px): z / |z| (the norm detached, as the official forward),
  a bias-free dense layer to 1024, leaky ReLU 0.2, a bias-free dense layer to 128 x (s/4)^2,
  [BatchNorm], leaky ReLU, reshaped to 128 maps at s/4, a 4x4 stride-2 transposed conv to 64,
  [BatchNorm], leaky ReLU, a 4x4 stride-2 transposed conv to the image channels, sigmoid. Its
  BatchNorms exist whether or not they are used (`do_bn`), and so does the official's unused
  `bn_in`, so the parameter count and the state-dict names are the official ones.
- `DeepGenerator` (ours, for 128-256 px, where the official code has no generator): the same
  head to 512 maps at 4x4, then one 4x4 stride-2 transposed conv per doubling (channels halving
  from 512 down to 32), BatchNorm and leaky ReLU after each, a last transposed conv to the image.
- `LatentTable` (`_netZ`): nn.Embedding(N, d), initialised N(0, 0.01) (the official weights_init),
  looked up by each image's row; `project_()` puts every code back on the unit sphere (the official
  `get_norm`, run after each epoch).
- `Mapping` (icp.py `_netT`): noise (32) -> bias-free dense 128, BatchNorm, ReLU -> dense 128,
  BatchNorm, ReLU -> dense d (bias-free).

Initialisation as the official weights_init: Xavier-normal (gain sqrt 2) for dense layers and
convolutions; BatchNorm and biases at PyTorch's defaults.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..layers import BatchNorm1d, BatchNorm2d


def official_init(m: nn.Module) -> None:
    """model.weights_init: Xavier-normal with gain sqrt(2) for Linear and Conv*, N(0, 0.01) for Embedding."""
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_normal_(m.weight, gain=math.sqrt(2.0))
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=0.01)


def unit(z: torch.Tensor) -> torch.Tensor:
    """z / |z| per row, the norm detached (the official generator's first step)."""
    return z / z.norm(2, dim=1, keepdim=True).detach()


class Generator(nn.Module):
    def __init__(self, nz: int = 64, size: int = 32, channels: int = 1, do_bn: bool = False):
        super().__init__()
        if size % 4 or size < 8:
            raise ValueError(f"the GLO generator makes sizes divisible by 4 (>= 8), not {size}")
        self.nz, self.size, self.channels, self.do_bn = nz, size, channels, do_bn
        self.dim_im = 128 * (size // 4) ** 2
        self.lin_in = nn.Linear(nz, 1024, bias=False)
        self.bn_in = BatchNorm1d(1024)  # defined and never used, as the official
        self.lin_im = nn.Linear(1024, self.dim_im, bias=False)
        self.bn_im = BatchNorm1d(self.dim_im)
        self.conv1 = nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=True)
        self.bn_conv = BatchNorm2d(64)
        self.conv2 = nn.ConvTranspose2d(64, channels, 4, 2, 1, bias=True)
        self.apply(official_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, nz) codes -> images in [0, 1], (B, C, size, size)."""
        x = F.leaky_relu(self.lin_in(unit(z)), 0.2)
        x = self.lin_im(x)
        if self.do_bn:
            x = self.bn_im(x)
        x = F.leaky_relu(x, 0.2).view(-1, 128, self.size // 4, self.size // 4)
        x = self.conv1(x)
        if self.do_bn:
            x = self.bn_conv(x)
        return torch.sigmoid(self.conv2(F.leaky_relu(x, 0.2)))


class DeepGenerator(nn.Module):
    def __init__(self, nz: int = 512, size: int = 256, channels: int = 3, width: int = 512, min_width: int = 32):
        super().__init__()
        steps = int(math.log2(size // 4)) if size >= 8 else 0
        if 4 * 2 ** steps != size:
            raise ValueError(f"the deep generator makes 4 x 2^k px, not {size}")
        self.nz, self.size, self.channels = nz, size, channels
        self.width = width
        self.lin_in = nn.Linear(nz, 1024, bias=False)
        self.lin_im = nn.Linear(1024, width * 16, bias=False)
        self.bn_im = BatchNorm1d(width * 16)
        ups, cin = [], width
        for k in range(steps - 1):
            cout = max(min_width, width // 2 ** (k + 1))
            ups += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=True), BatchNorm2d(cout), nn.LeakyReLU(0.2)]
            cin = cout
        self.ups = nn.Sequential(*ups)
        self.to_image = nn.ConvTranspose2d(cin, channels, 4, 2, 1, bias=True)
        self.apply(official_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.lin_in(unit(z)), 0.2)
        x = F.leaky_relu(self.bn_im(self.lin_im(x)), 0.2).view(-1, self.width, 4, 4)
        return torch.sigmoid(self.to_image(self.ups(x)))


class LatentTable(nn.Module):
    def __init__(self, n: int, nz: int):
        super().__init__()
        self.emb = nn.Embedding(n, nz)
        self.apply(official_init)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.emb(rows)

    @torch.no_grad()
    def project_(self) -> None:
        """Every code divided by its norm (the official get_norm)."""
        w = self.emb.weight
        w.div_(w.norm(2, dim=1, keepdim=True))


class Mapping(nn.Module):
    def __init__(self, noise: int = 32, nz: int = 64, hidden: int = 128):
        super().__init__()
        self.noise, self.nz = noise, nz
        self.lin1 = nn.Linear(noise, hidden, bias=False)
        self.bn1 = BatchNorm1d(hidden)
        self.lin2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = BatchNorm1d(hidden)
        self.lin_out = nn.Linear(hidden, nz, bias=False)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.lin1(e)))
        x = F.relu(self.bn2(self.lin2(x)))
        return self.lin_out(x)
