"""The VAE as a task of the trainer: one engine, loss = negative ELBO in bits/dim."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...config import AT_LEAST_1
from ...task import StepContext
from ...task import Task as BaseTask
from .model import VAE


@dataclass
class ModelConfig:
    family: str = "vae"
    width: int = 64  # channels of every conv
    latent_dim: int = 32
    num_mix: int = 10  # logistic mixture components of the likelihood
    blocks_per_scale: int = 1


RANGES = {"width": AT_LEAST_1, "latent_dim": AT_LEAST_1, "num_mix": AT_LEAST_1, "blocks_per_scale": AT_LEAST_1}


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    return nats / (dims * math.log(2.0))


class Task(BaseTask):
    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        m, d = recipe.model, recipe.data
        self.dims = d.channels * d.resolution**2
        self.vae = VAE(d.channels, d.resolution, m.width, m.latent_dim, m.num_mix, m.blocks_per_scale,
                       d.num_bits, recipe.engine.activation_checkpointing)

    def modules(self):
        return {"vae": self.vae}

    def _nelbo(self, x: torch.Tensor, ctx: StepContext, engine):
        eps = ctx.randn(self.vae.latent_dim)
        recon, kl = engine(x, eps)
        return bits_per_dim(recon, self.dims), bits_per_dim(kl, self.dims)

    def loss(self, name, x, ctx):
        recon, kl = self._nelbo(x, ctx, ctx.model("vae"))
        bpd = recon + kl
        return bpd.mean(), {"recon_bpd": recon.mean(), "kl_bpd": kl.mean()}

    def evaluate(self, x, ctx):
        recon, kl = self._nelbo(x, ctx, ctx.model("vae").module)
        return {"bpd": recon + kl, "recon_bpd": recon, "kl_bpd": kl}

    def sample(self, n, temperature, generator, ctx):
        vae = ctx.module("vae")
        z = temperature * torch.randn(n, self.vae.latent_dim, generator=generator, device=generator.device)
        x = vae.decode(z.to(ctx.device, ctx.dtype)).sample(generator=generator)
        return (x + 1) / 2
