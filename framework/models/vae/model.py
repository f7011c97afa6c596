"""Conv VAE. Read top to bottom: blocks, encoder, decoder, the ELBO terms."""
from __future__ import annotations

import math

import torch
from torch import nn

from ...activation_checkpoint import maybe_checkpoint
from ..distributions import DiscMixLogistic, gaussian_kl_standard


class ResBlock(nn.Module):
    """x + conv(silu(conv(silu(x)))): no normalisation, so the loss of an image does not
    depend on the other images of its batch (and so not on the world size)."""

    def __init__(self, ch: int):
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.net(x)


class Down(nn.Module):
    """(B, ch, H, W) -> (B, ch, H/2, W/2)"""

    def __init__(self, ch: int, blocks: int):
        super().__init__()
        self.net = nn.Sequential(*[ResBlock(ch) for _ in range(blocks)], nn.Conv2d(ch, ch, 4, stride=2, padding=1))

    def forward(self, x):
        return self.net(x)


class Up(nn.Module):
    """(B, ch, H, W) -> (B, ch, 2H, 2W)"""

    def __init__(self, ch: int, blocks: int):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1), *[ResBlock(ch) for _ in range(blocks)])

    def forward(self, x):
        return self.net(x)


class VAE(nn.Module):
    def __init__(self, channels: int, resolution: int, width: int, latent_dim: int, num_mix: int,
                 blocks_per_scale: int, num_bits: int, activation_checkpointing: str = "none"):
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
        scales = int(math.log2(resolution // 4))
        self.channels, self.num_mix, self.num_bits, self.latent_dim = channels, num_mix, num_bits, latent_dim
        ck = lambda m: maybe_checkpoint(m, activation_checkpointing)  # noqa: E731
        # encoder: (B, C, R, R) -> (B, width, 4, 4) -> (B, 2 * latent)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList([ck(Down(width, blocks_per_scale)) for _ in range(scales)])
        self.to_posterior = nn.Linear(width * 16, 2 * latent_dim)
        # decoder: (B, latent) -> (B, width, 4, 4) -> (B, width, R, R) -> DMoL parameters
        self.from_latent = nn.Linear(latent_dim, width * 16)
        self.up = nn.ModuleList([ck(Up(width, blocks_per_scale)) for _ in range(scales)])
        self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(width, DiscMixLogistic.num_params(channels, num_mix), 3, padding=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stem(x)
        for block in self.down:
            h = block(h)
        mu, logvar = self.to_posterior(h.flatten(1)).chunk(2, dim=1)  # (B, latent) each
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> DiscMixLogistic:
        h = self.from_latent(z).unflatten(1, (-1, 4, 4))
        for block in self.up:
            h = block(h)
        return DiscMixLogistic(self.head(h), self.channels, self.num_mix, self.num_bits)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative ELBO terms in nats per image: (-log p(x|z), KL(q(z|x) || p(z))), each (B,)."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation
        recon = -self.decode(z).log_prob(x)
        return recon, gaussian_kl_standard(mu, logvar)
