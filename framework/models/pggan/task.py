"""Progressive GAN as a task of the trainer: engines `disc` then `gen` (one D update, then one G
update, per step: the official D_repeats = 1), the generator's EMA (Gs, beta 0.999, no warm-up).

The schedule (schedule.py) is a function of the step: the images shown before it, the level
(networks at 2^level px), alpha, the global minibatch (Task.global_batches: the loader reads it)
and the learning rates (Task.lr), with the optimisers' state reset where the level of detail
crosses an integer. So a run resumed anywhere (in the middle of a fade too) continues with the
same alpha and the same batches; the task state saved with each checkpoint records the phase the
run stopped in, and a resume whose schedule gives another refuses in one line.

Reals: the target-resolution batch (one .beton), mirrored by data.flip, average-pooled on the
device to 2^level and cross-faded with its own 2x box blur by 1 - alpha (the official
process_reals: FadeLOD), exactly what the official multi-resolution TFRecords give.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ...config import AT_LEAST_0, AT_LEAST_1, POSITIVE
from ...errors import UserError
from ...task import Last, Task as BaseTask
from .loss import d_loss, g_loss
from .networks import Discriminator, Generator, channel_table, downscale2d, parameter_count, upscale2d
from .schedule import Phase, Plan, Schedule, ScheduleConfig


@dataclass
class LossConfig:
    gp_lambda: float = 10.0  # wgan_lambda
    gp_target: float = 1.0  # wgan_target
    eps_drift: float = 0.001  # wgan_epsilon: eps D(real)^2


@dataclass
class ModelConfig:
    family: str = "pggan"
    latent: int = 512  # latent_size (0: nf(0), as the official default)
    fmap_base: int = 8192
    fmap_max: int = 512
    mbstd_group_size: int = 4  # 0 or 1: no minibatch stddev layer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)


RANGES = {
    "latent": AT_LEAST_0, "fmap_base": AT_LEAST_1, "fmap_max": AT_LEAST_1, "mbstd_group_size": AT_LEAST_0,
    "schedule.initial_resolution": AT_LEAST_1, "schedule.phase_images": AT_LEAST_0,
    "schedule.fade_images": AT_LEAST_0, "schedule.batch": AT_LEAST_1, "schedule.lr": POSITIVE,
    "schedule.minibatch_repeats": AT_LEAST_1,
    "loss.gp_lambda": AT_LEAST_0, "loss.gp_target": POSITIVE, "loss.eps_drift": AT_LEAST_0,
}


def uniform_from_normal(n: torch.Tensor) -> torch.Tensor:
    """U(0, 1) from standard normals (their CDF): the mixing factors keep the row-keyed noise's
    independence from the world size."""
    return 0.5 * (1.0 + torch.erf(n.float() / math.sqrt(2.0)))


def fade_reals(x: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
    """Target-resolution images -> the reals of `level`: 2x2 average pooling down to 2^level, then
    lerp(x, its 2x box blur, 1 - alpha) (official FadeLOD; the blur of a fading level is the
    previous level's image shown at this one)."""
    factor = x.shape[-1] // 2 ** level
    if factor > 1:
        x = F.avg_pool2d(x, factor)
    if alpha < 1.0 and x.shape[-1] > 4:
        x = torch.lerp(x, upscale2d(downscale2d(x)), 1.0 - float(alpha))
    return x


class Task(BaseTask):
    main = "disc"
    ema_module = "gen"
    ema_warmup = False  # the official Gs: beta 0.999 from the first step

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        m, d = recipe.model, recipe.data
        if recipe.engine.activation_checkpointing != "none":
            raise UserError("key 'engine.activation_checkpointing': family 'pggan' differentiates D twice for its "
                            "gradient penalty and does not checkpoint activations (its networks fit without)")
        self.unit = env.world_size * recipe.engine.grad_accum
        self.schedule = Schedule(m.schedule, d.resolution, self.unit)
        self.top = self.schedule.top
        self.plan: Plan = self.schedule.plan(recipe.train.steps)
        group = m.mbstd_group_size
        for res in self.plan.resolutions():
            micro = self.schedule.batch_of(res) // self.unit
            if group > 1 and micro % min(group, micro):
                raise UserError(f"PGGAN: the micro-batch at {res} px is {micro} images per rank, not a multiple of "
                                f"model.mbstd_group_size {group} (the minibatch stddev groups)")
        self.gen = Generator(d.resolution, d.channels, m.latent, m.fmap_base, m.fmap_max)
        self.disc = Discriminator(d.resolution, d.channels, m.fmap_base, m.fmap_max, group)
        self.latent = self.gen.latent
        self._trained = 0  # steps trained by this process (the checkpoint's step after them)
        self._loaded: dict | None = None

    # -- the spine's hooks ----------------------------------------------------------------------
    def modules(self):
        return {"disc": self.disc, "gen": self.gen}

    def engine_overrides(self, name):
        lr = float(self.recipe.model.schedule.lr)
        return {"optimizer": {"name": "adamw", "lr": lr, "betas": [0.0, 0.99], "eps": 1e-8, "weight_decay": 0.0},
                "schedule": {"warmup_steps": 0, "decay": "constant"}}

    def global_batches(self, steps):
        return self.plan.batches()[:steps]

    def lr(self, name, step):
        p = self.plan[step]
        return p.lr_d if name == "disc" else p.lr_g

    def reset_optimizer(self, name, step):
        return step > 0 and Schedule.resets(self.plan[step - 1], self.plan[step])

    def prepare_batch(self, batch, ctx):
        from ...data import to_model_input

        x = to_model_input(batch["image"], self.recipe.data.num_bits, ctx.device, ctx.dtype)
        if ctx.phase != "train":
            return x
        p = self.plan[ctx.step]
        return fade_reals(x, p.level, p.alpha)

    def loss(self, name, x, ctx):
        p, lc = self.plan[ctx.step], self.recipe.model.loss
        self._trained = max(self._trained, ctx.step + 1)
        z = ctx.randn(self.latent)
        if name == "disc":
            with torch.no_grad():
                fake = ctx.module("gen")(z, p.level, p.alpha)
            u = uniform_from_normal(ctx.randn(1)).reshape(-1)
            loss, terms = d_loss(ctx.model("disc"), x, fake, u, p.level, p.alpha, lc.gp_lambda, lc.gp_target,
                                 lc.eps_drift, penalty_net=ctx.module("disc"))
            phase = {"resolution": Last(torch.tensor(float(p.resolution))), "alpha": Last(torch.tensor(p.alpha)),
                     "lod": Last(torch.tensor(p.lod)), "kimg": Last(torch.tensor((p.images + p.batch) / 1000.0))}
            return loss, {**terms, **phase}
        fake = ctx.model("gen")(z, p.level, p.alpha)
        with ctx.frozen("disc") as d:
            return g_loss(d, fake, p.level, p.alpha)

    # -- state: the phase the run stopped in ----------------------------------------------------
    def phase_after(self, steps: int) -> Phase:
        """The phase of the last of `steps` trained steps (no steps: the first one's)."""
        return self.plan[min(max(steps, 1), len(self.plan)) - 1]

    @staticmethod
    def _describe(p: Phase) -> dict:
        return {"images": int(p.images + p.batch), "resolution": p.resolution, "level": p.level,
                "alpha": float(p.alpha), "lod": float(p.lod)}

    def state_dict(self):
        if not self._trained:
            return {}
        return {"step": self._trained, "unit": self.unit, **self._describe(self.phase_after(self._trained))}

    def load_state_dict(self, state):
        if not state:
            return
        self._loaded = dict(state)
        self._trained = int(state["step"])
        if self._trained > len(self.plan) or state.get("unit") != self.unit:
            # a longer run's checkpoint under a shorter train.steps (the trainer stops at once), or
            # another world size x accumulation (its batches round differently; the trainer refuses
            # that unless train.resume_changed=allow, and a tool samples at the recorded phase)
            return
        now = self._describe(self.phase_after(self._trained))
        was = {k: state[k] for k in now}
        if now != was and self.recipe.train.resume_changed != "allow":
            raise ValueError(f"PGGAN: the checkpoint stopped at step {self._trained} with {was}, this recipe's "
                             f"schedule gives {now} there (set train.resume_changed=allow to continue on it)")

    # -- sampling --------------------------------------------------------------------------------
    def current(self, step: int) -> tuple[int, float]:
        """(level, alpha) to sample at: the phase after `step` trained steps; a tool's model (step 0)
        the phase its checkpoint recorded, or the target resolution for untrained weights."""
        if step > 0:
            p = self.phase_after(step)
            return p.level, p.alpha
        if self._loaded:
            return int(self._loaded["level"]), float(self._loaded["alpha"])
        return self.top, 1.0

    def sample(self, n, temperature, generator, ctx):
        level, alpha = self.current(ctx.step)
        z = temperature * torch.randn(n, self.latent, generator=generator, device=generator.device)
        img = ctx.module("gen")(z.to(ctx.device, ctx.dtype), level, alpha)
        img = upscale2d(img, 2 ** (self.top - level))  # shown at the target size (nearest, as official grids)
        return ((img.float() + 1) / 2).clamp(0, 1)

    def example_forward(self, name, module, batch, device):
        z = torch.randn(batch, self.latent, device=device)
        if name == "gen":
            module(z)
        else:
            module(torch.randn(batch, self.recipe.data.channels, 2 ** self.top, 2 ** self.top, device=device))

    def summary(self):
        rows = [{"from_step": s, "from_kimg": p.images / 1000, "resolution": p.resolution, "fading": p.alpha < 1,
                 "batch": p.batch, "lr_g": p.lr_g, "lr_d": p.lr_d} for s, p in self.plan.runs()]
        last = self.plan[-1]
        return {"channels": channel_table(2 ** self.top, fmap_base=self.recipe.model.fmap_base,
                                          fmap_max=self.recipe.model.fmap_max),
                "parameters": {"gen": parameter_count(self.gen), "disc": parameter_count(self.disc)},
                "images_shown": last.images + last.batch, "schedule": rows}
