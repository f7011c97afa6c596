"""Generator and discriminator; no BatchNorm, so an image's loss does not depend on its batch."""
from __future__ import annotations

import math

from torch import nn

from ...activation_checkpoint import maybe_checkpoint


class Generator(nn.Module):
    """(B, z_dim) -> (B, C, R, R) in [-1, 1]"""

    def __init__(self, z_dim: int, width: int, channels: int, resolution: int, ckpt: str = "none"):
        super().__init__()
        scales = int(math.log2(resolution // 4))
        self.z_dim = z_dim
        self.fc = nn.Linear(z_dim, width * 16)
        self.ups = nn.ModuleList([maybe_checkpoint(nn.Sequential(
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)), ckpt) for _ in range(scales)])
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z):
        h = self.fc(z).unflatten(1, (-1, 4, 4))  # (B, width, 4, 4)
        for up in self.ups:
            h = up(h)
        return self.out(h).tanh()


class Discriminator(nn.Module):
    """(B, C, R, R) -> (B,) logits"""

    def __init__(self, width: int, channels: int, resolution: int, ckpt: str = "none"):
        super().__init__()
        scales = int(math.log2(resolution // 4))
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.downs = nn.ModuleList([maybe_checkpoint(nn.Sequential(
            nn.LeakyReLU(0.2), nn.Conv2d(width, width, 4, stride=2, padding=1)), ckpt) for _ in range(scales)])
        self.fc = nn.Linear(width * 16, 1)

    def forward(self, x):
        h = self.stem(x)
        for down in self.downs:
            h = down(h)
        return self.fc(nn.functional.leaky_relu(h, 0.2).flatten(1)).squeeze(1)
