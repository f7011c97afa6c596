"""Two engines, updated in order: the discriminator on real and (detached) fake images, then
the generator through the discriminator with the discriminator's parameters frozen."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import AT_LEAST_1
from ...task import Task as BaseTask
from .model import Discriminator, Generator


@dataclass
class ModelConfig:
    family: str = "dcgan"
    z_dim: int = 64
    width: int = 64


RANGES = {"z_dim": AT_LEAST_1, "width": AT_LEAST_1}


class Task(BaseTask):
    main = "gen"
    ema_module = "gen"

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        m, d, ck = recipe.model, recipe.data, recipe.engine.activation_checkpointing
        self.z_dim = m.z_dim
        self.disc = Discriminator(m.width, d.channels, d.resolution, ck)
        self.gen = Generator(m.z_dim, m.width, d.channels, d.resolution, ck)

    def modules(self):
        return {"disc": self.disc, "gen": self.gen}

    def loss(self, name, x, ctx):
        z = ctx.randn(self.z_dim)
        if name == "disc":
            with torch.no_grad():
                fake = ctx.module("gen")(z)
            d = ctx.model("disc")
            real_logits, fake_logits = d(x), d(fake)
            loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            return loss, {"real_score": real_logits.mean(), "fake_score": fake_logits.mean()}
        fake = ctx.model("gen")(z)
        with ctx.frozen("disc") as d:  # non-saturating generator loss, no gradient into D
            loss = F.softplus(-d(fake)).mean()
        return loss, {}

    def sample(self, n, temperature, generator, ctx):
        z = temperature * torch.randn(n, self.z_dim, generator=generator, device=generator.device)
        return (ctx.module("gen")(z.to(ctx.device, ctx.dtype)) + 1) / 2
