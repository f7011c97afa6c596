"""GLANN as a task of the trainer — the GLO stage so far (issue 15, in progress).

GLO (`model.stage: glo`): one engine `glo` holding the latent table (a code per training image)
and the generator, trained jointly as the official glo.py does: each image's code is looked up by
its row (the image's place among the .beton's training images, from the batch's `index`), G(z)
against the image under the official VGG distance (perceptual.py), Adam(0.5, 0.999) with the
codes at `glo.lr` and the generator at `glo.lr` x `glo.factor` (param groups of one engine), both
halved every `glo.decay_epochs` epochs and their state reset at each epoch (the official loop
makes new optimizers every epoch), and the codes projected back onto the unit sphere after each
epoch (the official get_norm; through Engine.edit_, so on every ZeRO stage the optimizer's master
copy moves too). The table is a parameter like any other: ZeRO shards it.

Samples of the GLO stage alone are the official visualize()'s "gaussian" grid: codes drawn from a
Gaussian fitted to the table (its mean and covariance), normalised, through G.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...config import AT_LEAST_1, POSITIVE, Range
from ...errors import UserError
from ...task import Task as BaseTask
from .networks import DeepGenerator, Generator, LatentTable
from .perceptual import VGGDistance


@dataclass
class GLOConfig:
    lr: float = 0.01  # the codes' learning rate (official learning_rate)
    factor: float = 0.1  # the generator's learning rate = lr x factor
    decay_epochs: int = 20  # halve both every this many epochs (official decay)
    decay_rate: float = 0.5
    loss: str = "vgg"  # vgg: the official VGG distance | l1: pixels only (the official force_l2 path)
    vgg_weights: str = ""  # "": torchvision's vgg16-397923af.pth in the torch hub cache; "random": tests only


@dataclass
class ModelConfig:
    family: str = "glann"
    stage: str = "glo"  # glo (imle, imle_pixels: not built yet)
    nz: int = 64
    generator: str = "dcgan"  # dcgan: the official 28-64 px generator | deep: ours, 128-256 px
    do_bn: bool = False  # BatchNorm in the dcgan generator (official: true for MNIST, false for CIFAR-10)
    glo: GLOConfig = field(default_factory=GLOConfig)


RANGES = {"nz": AT_LEAST_1, "glo.lr": POSITIVE, "glo.factor": POSITIVE, "glo.decay_epochs": AT_LEAST_1,
          "glo.decay_rate": Range(0, 1, lo_open=True)}


class GLO(torch.nn.Module):
    """The table and the generator, one module (one engine): rows -> images in [0, 1]."""

    def __init__(self, table: LatentTable, generator: torch.nn.Module):
        super().__init__()
        self.table, self.generator = table, generator

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.generator(self.table(rows))


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(2, dim=1, keepdim=True)


class Task(BaseTask):
    fields = ("image", "index")
    main = "glo"

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        from ...data.loader import BetonInfo

        m, d = recipe.model, recipe.data
        if m.stage != "glo":
            raise UserError(f"key 'model.stage' is {m.stage!r}; only glo is built so far (issue 15)")
        if m.glo.loss not in ("vgg", "l1"):
            raise UserError(f"key 'model.glo.loss' is {m.glo.loss!r}; expected vgg or l1")
        info = BetonInfo(d.path)
        train = info.ids("train")
        self.num_codes = len(train)
        self.row_of = np.full(info.num_images, -1, np.int64)
        self.row_of[train] = np.arange(len(train))
        global_batch = d.batch_size * env.world_size * recipe.engine.grad_accum
        self.steps_per_epoch = max(1, len(train) // global_batch)
        if m.generator == "dcgan":
            g = Generator(m.nz, d.resolution, d.channels, m.do_bn)
        elif m.generator == "deep":
            g = DeepGenerator(m.nz, d.resolution, d.channels)
        else:
            raise UserError(f"key 'model.generator' is {m.generator!r}; expected dcgan or deep")
        self.glo = GLO(LatentTable(self.num_codes, m.nz), g)
        self.distance = (VGGDistance(m.glo.vgg_weights, "model.glo.vgg_weights", d.resolution)
                         if m.glo.loss == "vgg" else None)

    def modules(self):
        return {"glo": self.glo}

    def frozen_modules(self):
        return {"vgg": self.distance} if self.distance is not None else {}

    def param_groups(self, name, module):
        return [{"params": list(module.table.parameters()), "lr_scale": 1.0},
                {"params": list(module.generator.parameters()), "lr_scale": float(self.recipe.model.glo.factor)}]

    def engine_overrides(self, name):
        return {"optimizer": {"name": "adamw", "lr": float(self.recipe.model.glo.lr), "betas": [0.5, 0.999],
                              "eps": 1e-8, "weight_decay": 0.0},
                "schedule": {"warmup_steps": 0, "decay": "constant"}}

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def lr(self, name, step):
        g = self.recipe.model.glo
        return g.lr * g.decay_rate ** (self.epoch(step) // g.decay_epochs)

    def reset_optimizer(self, name, step):
        return step > 0 and step % self.steps_per_epoch == 0  # new optimizers every epoch, as official

    def after_step(self, step, engines):
        if (step + 1) % self.steps_per_epoch == 0:
            engines["glo"].edit_(engines["glo"].module.table.emb.weight, _unit_rows)

    def prepare_batch(self, batch, ctx):
        from ...data import to_model_input

        x = to_model_input(batch["image"], self.recipe.data.num_bits, ctx.device, ctx.dtype)
        rows = torch.from_numpy(self.row_of[batch["index"].numpy()]).to(ctx.device)
        if (rows < 0).any():
            raise ValueError("GLO: a batch holds an image outside the training split (it has no code)")
        return x, rows

    def loss(self, name, batch, ctx):
        x, rows = batch
        fake = ctx.model("glo")(rows)
        real = (x + 1) / 2
        if self.distance is None:
            per = (2 * fake - 2 * real).abs().flatten(1).mean(1)
        else:
            per = ctx.module("vgg")(fake, real)
        return per.mean(), {"rec_l1": (fake - real).abs().mean().detach() * 2}

    def sample(self, n, temperature, generator, ctx):
        """The official 'gaussian' grid: codes from a Gaussian fitted to the table, normalised."""
        glo = ctx.module("glo")
        w = glo.table.emb.weight.detach().double()
        if hasattr(glo.table.emb.weight, "ds_id"):  # ZeRO-3: the whole table
            from deepspeed.utils import safe_get_full_fp32_param

            w = safe_get_full_fp32_param(glo.table.emb.weight).double()
        mu = w.mean(0)
        cov = torch.cov(w.T) + 1e-9 * torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        eps = torch.randn(n, w.shape[1], generator=generator, device=generator.device, dtype=torch.float64)
        z = mu + temperature * eps.to(w.device) @ torch.linalg.cholesky(cov).T
        return glo.generator(z.to(ctx.device, ctx.dtype)).float().clamp(0, 1)

    def example_forward(self, name, module, batch, device):
        module(torch.zeros(batch, dtype=torch.long, device=device))
