"""GLANN as a task of the trainer: the GLO stage, IMLE in its latent space, and pixel IMLE.

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

IMLE (`model.stage: imle`, IMLETask) learns the official mapping T from noise to the GLO run's
codes; pixel IMLE (`model.stage: imle_pixels`, PixelIMLETask) learns a generator straight from
noise to the training images under L2 or LPIPS. Both share _IMLE: the seeded refresh rounds, the
exact nearest-neighbour assignment over the ranks (search.py) and its place in the task state.
Every stage also walks between codes (`interpolate`, tools/sample.py's second grid).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...config import AT_LEAST_1, POSITIVE, Range
from ...errors import UserError
from ...task import Task as BaseTask
from ..vqgan.task import LPIPSConfig
from .networks import DeepGenerator, Generator, LatentTable, Mapping
from .perceptual import LaplacianL1, VGGDistance


@dataclass
class GLOConfig:
    lr: float = 0.01  # the codes' learning rate (official learning_rate)
    factor: float = 0.1  # the generator's learning rate = lr x factor
    decay_epochs: int = 20  # halve both every this many epochs (official decay)
    decay_rate: float = 0.5
    loss: str = "vgg"  # vgg: the official VGG distance | l1: pixels only (the official force_l2 path) | lap1: GLO's Laplacian-pyramid L1
    lap_levels: int = 4  # lap1: pyramid levels (ours: the official code ships no pyramid)
    vgg_weights: str = ""  # "": torchvision's vgg16-397923af.pth in the torch hub cache; "random": tests only


@dataclass
class IMLEConfig:
    noise: int = 32  # the noise's dimension (official icp dim)
    hidden: int = 128  # T's hidden width (official _netT)
    samples_per_code: int = 2  # mapped samples drawn per code at each refresh (official: 2 x the codes)
    refresh_every: int = 0  # steps between nearest-neighbour searches; 0: once an epoch (official)
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-5  # torch.optim.Adam's (L2 in the gradient), as official
    decay_epochs: int = 50
    decay_rate: float = 0.5
    backend: str = "auto"  # auto (faiss on the CPU when it imports; on CUDA faiss-gpu, else torch) | faiss | torch
    refine: int = 8  # float32 candidates re-ranked in float64 per code
    distance: str = "l2"  # imle_pixels: l2 (pixels in [-1, 1]) | lpips
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)  # imle_pixels with distance lpips


@dataclass
class ModelConfig:
    family: str = "glann"
    stage: str = "glo"  # glo | imle (over a GLO run's codes) | imle_pixels (IMLE in image space, no GLO)
    glo_run: str = ""  # imle: the GLO run (or checkpoint) whose codes and generator it uses
    nz: int = 64  # the codes' dimension (imle_pixels: the generator's noise)
    generator: str = "dcgan"  # dcgan: the official 28-64 px generator | deep: ours, 128-256 px
    do_bn: bool = False  # BatchNorm in the dcgan generator (official: true for MNIST, false for CIFAR-10)
    glo: GLOConfig = field(default_factory=GLOConfig)
    imle: IMLEConfig = field(default_factory=IMLEConfig)


RANGES = {"nz": AT_LEAST_1, "glo.lr": POSITIVE, "glo.lap_levels": Range(2), "glo.factor": POSITIVE, "glo.decay_epochs": AT_LEAST_1,
          "glo.decay_rate": Range(0, 1, lo_open=True), "imle.noise": AT_LEAST_1, "imle.hidden": AT_LEAST_1,
          "imle.samples_per_code": AT_LEAST_1, "imle.refresh_every": Range(0), "imle.lr": POSITIVE,
          "imle.weight_decay": Range(0), "imle.decay_epochs": AT_LEAST_1, "imle.decay_rate": Range(0, 1, lo_open=True),
          "imle.refine": AT_LEAST_1}


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
    """The family's task: GLOTask, IMLETask or PixelIMLETask by model.stage."""

    def __new__(cls, recipe, env):
        if cls is Task:
            stages = {"glo": GLOTask, "imle": IMLETask, "imle_pixels": PixelIMLETask}
            if recipe.model.stage not in stages:
                raise UserError(f"key 'model.stage' is {recipe.model.stage!r}; expected glo, imle or imle_pixels")
            cls = stages[recipe.model.stage]
        return super().__new__(cls)

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        from ...data.loader import BetonInfo

        d = recipe.data
        info = BetonInfo(d.path)
        self.info = info
        self.train_ids = train = info.ids("train")
        self.num_codes = len(train)
        self.row_of = np.full(info.num_images, -1, np.int64)
        self.row_of[train] = np.arange(len(train))
        self.global_batch = d.batch_size * env.world_size * recipe.engine.grad_accum
        self.steps_per_epoch = max(1, len(train) // self.global_batch)

    def rows(self, batch, ctx) -> torch.Tensor:
        rows = torch.from_numpy(self.row_of[batch["index"].numpy()]).to(ctx.device)
        if (rows < 0).any():
            raise ValueError("GLANN: a batch holds an image outside the training split (it has no code)")
        return rows

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def sample(self, n, temperature, generator, ctx):
        raise NotImplementedError

    def interpolate(self, pairs: int, steps: int, generator: torch.Generator, ctx) -> torch.Tensor:
        """`pairs` rows of `steps` images: from one code (or noise) to another in equal steps."""
        a, b = self.endpoints(pairs, generator, ctx)
        w = torch.linspace(0, 1, steps, device=a.device, dtype=a.dtype).view(1, steps, 1)
        z = (1 - w) * a.unsqueeze(1) + w * b.unsqueeze(1)
        return self.images_from(z.reshape(pairs * steps, -1), ctx)


def build_generator(m, d) -> torch.nn.Module:
    if m.generator == "dcgan":
        return Generator(m.nz, d.resolution, d.channels, m.do_bn)
    if m.generator == "deep":
        return DeepGenerator(m.nz, d.resolution, d.channels)
    raise UserError(f"key 'model.generator' is {m.generator!r}; expected dcgan or deep")


class GLOTask(Task):
    fields = ("image", "index")
    main = "glo"

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        m, d = recipe.model, recipe.data
        if m.glo.loss not in ("vgg", "l1", "lap1"):
            raise UserError(f"key 'model.glo.loss' is {m.glo.loss!r}; expected vgg, l1 or lap1")
        if m.glo.loss == "lap1" and d.resolution // 2 ** (m.glo.lap_levels - 2) < 3:
            raise UserError(f"key 'model.glo.lap_levels' is {m.glo.lap_levels}: too many levels for "
                            f"{d.resolution} px (the next-to-last level must keep at least 3 px)")
        self.glo = GLO(LatentTable(self.num_codes, m.nz), build_generator(m, d))
        self.distance = (VGGDistance(m.glo.vgg_weights, "model.glo.vgg_weights", d.resolution)
                         if m.glo.loss == "vgg" else None)
        self.lap1 = LaplacianL1(m.glo.lap_levels) if m.glo.loss == "lap1" else None

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
        return x, self.rows(batch, ctx)

    def loss(self, name, batch, ctx):
        x, rows = batch
        fake = ctx.model("glo")(rows)
        real = (x + 1) / 2
        if self.distance is not None:
            per = ctx.module("vgg")(fake, real)
        elif self.lap1 is not None:
            per = self.lap1(fake, real)
        else:
            per = (2 * fake - 2 * real).abs().flatten(1).mean(1)
        return per.mean(), {"rec_l1": (fake - real).abs().mean().detach() * 2}

    def sample(self, n, temperature, generator, ctx):
        """The official 'gaussian' grid: codes from a Gaussian fitted to the table, normalised."""
        glo = ctx.module("glo")
        w = self.table(ctx).double()
        mu = w.mean(0)
        cov = torch.cov(w.T) + 1e-9 * torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        eps = torch.randn(n, w.shape[1], generator=generator, device=generator.device, dtype=torch.float64)
        z = mu + temperature * eps.to(w.device) @ torch.linalg.cholesky(cov).T
        return glo.generator(z.to(ctx.device, ctx.dtype)).float().clamp(0, 1)

    def table(self, ctx) -> torch.Tensor:
        """The whole table (gathered under ZeRO-3)."""
        weight = ctx.module("glo").table.emb.weight
        if hasattr(weight, "ds_id"):
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(weight).to(ctx.device)
        return weight.detach()

    def endpoints(self, pairs, generator, ctx):
        """The codes of two training images per row, drawn at random (GLO's interpolations)."""
        rows = torch.randint(0, self.num_codes, (2, pairs), generator=generator, device=generator.device)
        w = self.table(ctx).float()
        return w[rows[0].to(w.device)], w[rows[1].to(w.device)]

    def images_from(self, z, ctx):
        return ctx.module("glo").generator(z.to(ctx.device, ctx.dtype)).float().clamp(0, 1)

    def example_forward(self, name, module, batch, device):
        module(torch.zeros(batch, dtype=torch.long, device=device))


class _IMLE(Task):
    """What IMLE in latent space and in pixels share: every `imle.refresh_every` steps (default:
    an epoch) every rank draws the same samples_per_code x N noise vectors (seeded by the run's
    seed and the refresh round), generates them in training mode in chunks of the global batch
    (BatchNorm's statistics per chunk, as the official loop maps batch by batch) and each target
    (a code, an image) gets its nearest generated sample (search.py, the targets sharded over the
    ranks); the steps until the next refresh pull each target's sample towards it, over the
    targets in the loader's sharded order. The assignment (the round, each target's noise and
    sample index, the mean distance) is the task's state: a resumed run continues exactly."""

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        self.cfg = recipe.model.imle
        if self.cfg.backend not in ("auto", "faiss", "torch"):
            raise UserError(f"key 'model.imle.backend' is {self.cfg.backend!r}; expected auto, faiss or torch")
        from .search import faiss_available, pick_backend

        self.backend = pick_backend(self.cfg.backend, env.device if hasattr(env, "device") else "cpu")
        if self.backend == "faiss" and not faiss_available():
            raise UserError("key 'model.imle.backend' is faiss but faiss does not import (pip install faiss-cpu)")
        self.refresh_every = self.cfg.refresh_every or self.steps_per_epoch
        self.round = -1
        self.noise = None  # (N, noise): each target's assigned noise
        self.index = None  # (N,): its sample's number in the round's draw
        self.distance = float("nan")

    # -- what a stage supplies ------------------------------------------------------------------
    noise_dim: int

    def generate(self, e: torch.Tensor, ctx) -> torch.Tensor:
        """noise -> what is compared with the targets (no gradient, training mode)"""
        raise NotImplementedError

    def assign(self, e: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def engine_overrides(self, name):
        c = self.cfg
        return {"optimizer": {"name": "adam", "lr": float(c.lr), "betas": [0.5, 0.999], "eps": 1e-8,
                              "weight_decay": float(c.weight_decay)},
                "schedule": {"warmup_steps": 0, "decay": "constant"}}

    def lr(self, name, step):
        c = self.cfg
        return c.lr * c.decay_rate ** (self.epoch(step) // c.decay_epochs)

    def reset_optimizer(self, name, step):
        return step > 0 and step % self.steps_per_epoch == 0  # new optimizer every epoch, as official

    def chunks(self, e: torch.Tensor, ctx):
        """The round's samples, generated in chunks of the global batch."""
        for i in range(0, len(e), self.global_batch):
            yield self.generate(e[i:i + self.global_batch], ctx)

    @torch.no_grad()
    def refresh(self, step: int, ctx) -> None:
        """The round of `step`: every rank draws and generates the same samples, the targets'
        nearest ones are found over the ranks."""
        from ...task import draw_base

        total = self.cfg.samples_per_code * self.num_codes
        g = torch.Generator(device=ctx.device).manual_seed(draw_base(self.recipe.run.seed, 0x1E, step // self.refresh_every))
        e = torch.randn(total, self.noise_dim, generator=g, device=ctx.device)
        idx, d2 = self.assign(e, ctx)
        self.round, self.noise, self.index = step // self.refresh_every, e[idx].cpu(), idx.cpu()
        self.distance = float(d2.mean())

    def assigned(self, rows, ctx) -> torch.Tensor:
        """The noise of each row's sample, refreshed first when a new round begins."""
        if ctx.micro == 0 and self.round != ctx.step // self.refresh_every:
            self.refresh(ctx.step, ctx)
        return self.noise[rows.cpu()].to(ctx.device, ctx.dtype)

    def metrics(self) -> dict:
        from ...task import Last

        return {"nn_distance": Last(torch.tensor(self.distance)), "round": Last(torch.tensor(float(self.round)))}

    def state_dict(self):
        if self.noise is None:
            return {}
        return {"round": self.round, "noise": self.noise, "index": self.index, "distance": self.distance}

    def load_state_dict(self, state):
        if not state:
            return
        if len(state["noise"]) != self.num_codes:
            raise ValueError(f"GLANN IMLE: the checkpoint's assignment covers {len(state['noise'])} targets, "
                             f"this run has {self.num_codes}")
        self.round, self.noise, self.index = int(state["round"]), state["noise"], state["index"]
        self.distance = float(state["distance"])

    def endpoints(self, pairs, generator, ctx):
        e = torch.randn(2, pairs, self.noise_dim, generator=generator, device=generator.device).to(ctx.device)
        return e[0], e[1]

    def sample(self, n, temperature, generator, ctx):
        e = temperature * torch.randn(n, self.noise_dim, generator=generator, device=generator.device)
        return self.images_from(e.to(ctx.device), ctx)

    def example_forward(self, name, module, batch, device):
        module(torch.randn(batch, self.noise_dim, device=device))


class IMLETask(_IMLE):
    """IMLE in GLO's latent space (the official icp.py): T maps noise to codes; the targets are the
    GLO run's codes (projected onto the sphere, as the official saves them), the distance L2, the
    loss the mean squared error T(e_i) - z_i. The GLO run's table and generator are frozen
    modules; samples are G(T(e)), e ~ N(0, t^2 I)."""

    fields = ("index",)
    main = "mapping"

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        m = recipe.model
        if not m.glo_run:
            raise UserError("key 'model.glo_run' is empty: the IMLE stage needs the GLO run whose codes it models")
        self.glo_loaded = self._load_glo(m.glo_run)
        glo = self.glo_loaded.modules["glo"]
        self.nz = glo.table.emb.weight.shape[1]
        self.noise_dim = self.cfg.noise
        self.mapping = Mapping(self.cfg.noise, self.nz, self.cfg.hidden)

    def _load_glo(self, path):
        from pathlib import Path

        from ...eval.checkpoints import load

        p = Path(path)
        if not p.exists():
            raise UserError(f"key 'model.glo_run': {p}: no such run or checkpoint folder")
        with torch.random.fork_rng(devices=[]):  # the GLO task's construction must not move this run's streams
            loaded = load(p, self.env, ema=False, overrides=["model.glo.loss=l1"], frozen=False)
        if loaded.family != "glann" or loaded.recipe.model.stage != "glo":
            raise UserError(f"key 'model.glo_run': {p} is a {loaded.family} run"
                            f"{' (stage ' + loaded.recipe.model.stage + ')' if loaded.family == 'glann' else ''}, "
                            f"not a GLANN GLO run")
        n = loaded.modules["glo"].table.emb.weight.shape[0]
        if n != self.num_codes:
            raise UserError(f"key 'model.glo_run': {p} has codes for {n} images, {self.recipe.data.path} has "
                            f"{self.num_codes} training images (another data set?)")
        loaded.modules["glo"].requires_grad_(False)
        loaded.modules["glo"].table.project_()  # the official codes are saved right after get_norm
        return loaded

    def modules(self):
        return {"mapping": self.mapping}

    def frozen_modules(self):
        return {"glo": self.glo_loaded.modules["glo"]}

    def codes(self, ctx) -> torch.Tensor:
        return ctx.module("glo").table.emb.weight.detach()

    def generate(self, e, ctx):
        return ctx.module("mapping")(e.to(ctx.dtype)).float()

    def assign(self, e, ctx):
        from .search import sharded_nearest

        return sharded_nearest(self.codes(ctx).float(), torch.cat(list(self.chunks(e, ctx))), self.backend,
                               self.cfg.refine)

    def prepare_batch(self, batch, ctx):
        return self.rows(batch, ctx)

    def loss(self, name, rows, ctx):
        e = self.assigned(rows, ctx)
        z = self.codes(ctx)[rows]
        loss = torch.nn.functional.mse_loss(ctx.model("mapping")(e).float(), z.float())
        return loss, self.metrics()

    def images_from(self, e, ctx):
        z = ctx.module("mapping")(e.to(ctx.device, ctx.dtype))
        return ctx.module("glo").generator(z).float().clamp(0, 1)


class PixelIMLETask(_IMLE):
    """IMLE in image space (Li & Malik 2018), the baseline GLANN improves on: a generator G maps
    noise (model.nz) straight to images; the targets are the training images, the distance L2 on
    pixels in [-1, 1] (the sum of squares) or LPIPS (`imle.distance: lpips`: the nearest sample
    under LPIPS, searched as L2 between LPIPS vectors, search.StreamingNearest, without ever
    holding all the samples' vectors); the loss the mean squared error of G(e_i) against image i
    (or its LPIPS). The training images are read once (uint8, on the CPU) for the searches."""

    fields = ("image", "index")
    main = "generator"

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        m, d = recipe.model, recipe.data
        if self.cfg.distance not in ("l2", "lpips"):
            raise UserError(f"key 'model.imle.distance' is {self.cfg.distance!r}; expected l2 or lpips")
        self.noise_dim = m.nz
        self.generator = build_generator(m, d)
        self.lpips = None
        if self.cfg.distance == "lpips":
            from ...losses.lpips import LPIPS

            l = self.cfg.lpips
            self.lpips = LPIPS(l.vgg_weights, l.heads, key="model.imle.lpips")
        self.images = None  # (N, C, H, W) uint8: the targets, in row order
        self.search = None

    def modules(self):
        return {"generator": self.generator}

    def frozen_modules(self):
        return {"lpips": self.lpips} if self.lpips is not None else {}

    def targets(self, rows: torch.Tensor, ctx) -> torch.Tensor:
        from ...data import to_model_input

        if self.images is None:
            self.images = read_images(self.info, self.train_ids, self.recipe.data.channels)
        return to_model_input(self.images[rows.cpu()], self.recipe.data.num_bits, ctx.device)

    def generate(self, e, ctx):
        x = 2 * ctx.module("generator")(e.to(ctx.dtype)).float() - 1
        return x.flatten(1) if self.lpips is None else ctx.module("lpips").embed(x)

    def assign(self, e, ctx):
        if self.lpips is None:
            from .search import sharded_nearest

            every = torch.arange(self.num_codes)
            return sharded_nearest(self.targets(every, ctx).flatten(1), torch.cat(list(self.chunks(e, ctx))),
                                   self.backend, self.cfg.refine)
        from .search import StreamingNearest

        if self.search is None:  # the images' LPIPS vectors (this rank's blocks), once a run
            self.search = StreamingNearest(self.num_codes)
            lp = ctx.module("lpips")
            self.search.set_queries(lambda rows: torch.cat([lp.embed(self.targets(rows[i:i + 64], ctx))
                                                            for i in range(0, len(rows), 64)]))
        self.search.reset()
        for c in self.chunks(e, ctx):
            self.search.add(c)
        return self.search.result()

    def prepare_batch(self, batch, ctx):
        from ...data import to_model_input

        return to_model_input(batch["image"], self.recipe.data.num_bits, ctx.device, ctx.dtype), self.rows(batch, ctx)

    def loss(self, name, batch, ctx):
        x, rows = batch
        e = self.assigned(rows, ctx)
        fake = 2 * ctx.model("generator")(e).float() - 1
        if self.lpips is None:
            loss = torch.nn.functional.mse_loss(fake, x.float())
        else:
            loss = ctx.module("lpips")(fake, x.float()).mean()
        return loss, self.metrics()

    def images_from(self, e, ctx):
        return ctx.module("generator")(e.to(ctx.device, ctx.dtype)).float().clamp(0, 1)


def read_images(info, ids, channels: int) -> torch.Tensor:
    """The .beton's images `ids` in that order, (N, C, H, W) uint8 on the CPU."""
    from ...data.loader import EvalLoader
    from ...data.order import EvalShard

    out = []
    for batch, n in EvalLoader(info, EvalShard(ids, 256, 1, 0), channels, 1):
        out.append(batch["image"][:n].clone())
    return torch.cat(out)
