"""The interface between a model family and the trainer.

A family's `Task` says which modules it trains (one DeepSpeed engine each, updated in the
order given) and which it only uses (frozen: LPIPS's VGG, a stage-1 model under a prior), which
fields of the .beton it reads and how a batch of them becomes model input, the loss of a
micro-batch for each engine, when an engine is active and with which settings, the state it
owns besides its weights, and its evaluation metrics (per image, or sums over the whole set).
Everything else — engines, data, skips, EMA, checkpoints, signals — is the trainer's.

Optional capabilities (sampling, reconstruction grids, the after-training tools) are Protocols
below; the trainer and the tools check for them with `require` and refuse a family without
one in one line.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .errors import UserError

# -- noise ---------------------------------------------------------------------------------

_MASK = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijective hash of a 64-bit integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 31)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def row_seed(base: int, key: int) -> int:
    """The seed of one row's noise: a hash of the draw's base seed and the row's key."""
    return _mix64(base ^ _mix64(int(key))) & ((1 << 63) - 1)


def draw_base(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]).generate_state(2, np.uint64)[0])


def per_row_normal(base: int, keys, shape: tuple, device, dtype=torch.float32,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(len(keys), *shape) standard normals, row i a function of (base, keys[i]) only: each row
    is drawn on `device` by a generator seeded for that row. The cost is that of this rank's
    rows, whatever the size of the batch they belong to."""
    device = torch.device(device)
    g = generator if generator is not None and generator.device == device else torch.Generator(device=device)
    out = torch.empty((len(keys), *shape), device=device, dtype=torch.float32)
    for i, k in enumerate(keys):
        g.manual_seed(row_seed(base, int(k)))
        out[i].normal_(generator=g)
    return out.to(dtype)


@dataclass
class Sum:
    """An evaluation value summed over the whole set (all batches, all ranks, in float64), for
    set-level metrics (codebook usage, perplexity, FID statistics); `Task.finish_eval` turns the
    sums into figures. Rows of padding must be left out by the task (`ctx.valid`)."""

    value: torch.Tensor


@dataclass
class Last:
    """A training metric of the whole step (the same on every rank, e.g. codebook usage after
    the step's all-reduce): logged as the value of the last micro-batch, not averaged."""

    value: torch.Tensor


@dataclass
class StepContext:
    """What a task's loss, evaluation and sampling see besides the batch."""

    step: int
    micro: int
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    batch_size: int  # per rank, per micro-batch
    grad_accum: int
    seed: int
    stream: str = ""  # the engine being trained: its loss draws noise of its own
    phase: str = "train"  # train | eval | sample
    rows: np.ndarray | None = None  # the global key of each row: place in the global batch, or image index
    valid: int = -1  # evaluation: rows of the batch that are real images (the rest is padding)
    _engines: dict = field(default_factory=dict)  # name -> framework.engine.Engine (or a bare holder)
    _frozen: dict = field(default_factory=dict)  # name -> frozen nn.Module
    _draws: int = 0
    _generator: torch.Generator | None = None

    def __post_init__(self):
        if self.rows is None:  # training layout: chunk micro * world + rank of the global step
            chunk = self.micro * self.world_size + self.rank
            self.rows = np.arange(chunk * self.batch_size, (chunk + 1) * self.batch_size)
        if self.valid < 0:
            self.valid = len(self.rows)

    def model(self, name: str):
        """The engine of `name`, for a forward pass whose gradients train it."""
        return self._engines[name]

    def module(self, name: str) -> torch.nn.Module:
        """The bare module of engine `name`, or the frozen module `name` (no engine, no gradients
        into it unless the caller asks for them)."""
        if name in self._engines:
            return self._engines[name].module
        if name in self._frozen:
            return self._frozen[name]
        raise KeyError(f"no engine or frozen module {name!r} (have {', '.join([*self._engines, *self._frozen])})")

    @contextmanager
    def frozen(self, name: str):
        """`name`'s module with its parameters frozen, e.g. the discriminator in a generator step:
        gradients flow through it to the input but never into its parameters or engine."""
        module = self.module(name)
        flags = [(p, p.requires_grad) for p in module.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield module
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def randn(self, *shape: int, batch: int | None = None) -> torch.Tensor:
        """Standard normal noise (rows, *shape) for this micro-batch, drawn on the device.

        Each row's noise is a function of (seed, engine, phase, step, draw, row key) only, where
        the key of a training row is its place in the global batch (chunk micro * world + rank
        of the loader's layout) and that of an evaluation row the image's index in the .beton:
        1 process with batch 2B, 2 with batch B, or 1 with B and 2 micro-batches train the same
        model, evaluation figures do not depend on the world size, and a rank draws only its
        own rows (the cost per rank does not grow with the cluster)."""
        if batch is not None and batch != len(self.rows):
            raise ValueError(f"randn: batch {batch} but this context has {len(self.rows)} rows")
        self._draws += 1
        base = draw_base(self.seed, 7, zlib.crc32(self.stream.encode()), zlib.crc32(self.phase.encode()),
                         self.step, self._draws)
        if self._generator is None or self._generator.device != torch.device(self.device):
            self._generator = torch.Generator(device=self.device)
        return per_row_normal(base, self.rows, tuple(shape), self.device, self.dtype, self._generator)


# -- the task --------------------------------------------------------------------------------

class Task:
    """Base class of a family's task; see framework/models/vae/task.py for a small complete one
    and tests/toy_family.py for one that uses every part of the interface."""

    main: str = ""  # the engine whose loss is logged as `loss` (default: the first)
    ema_module: str = ""  # the module whose weights get an EMA and are used to sample
    ema_warmup: bool = True  # the EMA's decay warms up (framework/ema.py); False: constant from the start
    fields: tuple = ("image",)  # what the task reads from the .beton: image, label, index, or any stored field
    zero_stages: tuple = (0, 1, 2, 3)  # the ZeRO stages the family supports (checked when a recipe loads)

    def __init__(self, recipe, env):
        self.recipe = recipe
        self.env = env

    def modules(self) -> dict[str, torch.nn.Module]:
        """name -> module, in update order; each becomes one engine."""
        raise NotImplementedError

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """name -> module the task uses but does not train: put on the device and dtype, in eval
        mode, with no gradients into its parameters; never an engine, never in a checkpoint or
        the EMA (load its weights with framework.checkpoint.load_module_weights)."""
        return {}

    def param_groups(self, name: str, module: torch.nn.Module):
        """Optimizer parameter groups of `name` (default: all trainable parameters)."""
        return None

    def engine_overrides(self, name: str) -> dict:
        """The family's default settings for engine `name` (keys of the recipe's per-engine block:
        optimizer, schedule, clip, start_step); the recipe's `engine.engines.<name>` wins."""
        return {}

    def active(self, name: str, step: int) -> bool:
        """Whether engine `name` trains at `step` (an inactive engine does no work). The trainer
        also skips an engine before its `start_step`."""
        return True

    def global_batches(self, steps: int):
        """The global batch of every step 0..steps-1 when the family schedules it (PGGAN's minibatch
        per resolution), each a multiple of world x grad_accum; None (default): data.batch_size per
        rank at every step. StepContext.batch_size is then the step's micro-batch size."""
        return None

    def lr(self, name: str, step: int) -> float | None:
        """Engine `name`'s learning rate at `step` when the family sets it (PGGAN's per resolution);
        None (default): the recipe's optimizer.lr and schedule."""
        return None

    def reset_optimizer(self, name: str, step: int) -> bool:
        """True to clear engine `name`'s optimizer state before `step` (PGGAN's new resolution)."""
        return False

    def after_step(self, step: int, engines: dict) -> None:
        """Called on every rank after step `step`'s updates (and before its EMA, evaluation and
        checkpoint): a family's edit of its weights between steps, through
        `engines[name].edit_(param, fn)` (GLO's codes projected onto the sphere after each epoch)."""

    def prepare_batch(self, batch: dict, ctx: StepContext):
        """What the loader read (field name -> this micro-batch's tensor, on the CPU) -> the input
        `loss` and `evaluate` receive. Default: the images as floats in [-1, 1] on the device,
        quantised to data.num_bits."""
        from .data import to_model_input

        return to_model_input(batch["image"], self.recipe.data.num_bits, ctx.device, ctx.dtype)

    def loss(self, name: str, x, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss that trains engine `name` on micro-batch x, and metrics to log."""
        raise NotImplementedError

    def evaluate(self, x, ctx: StepContext) -> dict:
        """Validation values of a batch: a (B,) tensor is per image (the trainer averages it over
        the set, padding left out); a `Sum` is summed over the set and handed to `finish_eval`."""
        return {}

    def finish_eval(self, sums: dict[str, torch.Tensor], images: int) -> dict[str, float]:
        """Set-level figures from the `Sum`s of the whole set (float64, every rank's batches)."""
        return {}

    def state_dict(self) -> dict:
        """State the family owns besides weights (a growing GAN's resolution and fade, an IMLE
        assignment): saved with every checkpoint, one file per rank, and restored on resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__module__}: the checkpoint holds task state this family does not own")

    def example_forward(self, name: str, module: torch.nn.Module, batch: int, device) -> None:
        """Runs `module` once on made-up inputs of `batch` images (tools/model_summary.py measures
        activations with it); families that do not define it get no activation estimate."""
        raise NotImplementedError

    def summary(self) -> dict:
        """Family-specific figures for tools/model_summary.py (default: none)."""
        return {}


# -- optional capabilities --------------------------------------------------------------------

@runtime_checkable
class Samples(Protocol):
    """Draws images from the model: sample grids in training, tools/sample.py."""

    def sample(self, n: int, temperature: float, generator: torch.Generator, ctx: StepContext) -> torch.Tensor:
        """n images in [0, 1], (n, C, H, W), float; noise from `generator` (on ctx.device)."""


@runtime_checkable
class Interpolates(Protocol):
    """Walks between two latent codes (or noise vectors): tools/sample.py's interpolation grid."""

    def interpolate(self, pairs: int, steps: int, generator: torch.Generator, ctx: StepContext) -> torch.Tensor:
        """pairs x steps images in [0, 1], row by row, each row from one end to the other."""


@runtime_checkable
class Visualizes(Protocol):
    """Pictures of a fixed validation batch (reconstructions), logged beside the samples."""

    def visualize(self, x, ctx: StepContext) -> torch.Tensor:
        """Images in [0, 1], (n, C, H, W), e.g. inputs and reconstructions interleaved."""


@runtime_checkable
class PriorSampling(Protocol):
    """Sampling through latent noise and an output distribution (BN recalibration, the profile)."""

    def prior_noise(self, module, n: int, generator: torch.Generator, device) -> list: ...

    def prior_params(self, module, n: int, temperature: float, generator: torch.Generator, device): ...

    def images(self, module, params, temperature: float, generator: torch.Generator) -> torch.Tensor: ...


@runtime_checkable
class BatchNormRecalibration(PriorSampling, Protocol):
    def bn_layers(self, module) -> list: ...


@runtime_checkable
class FastSampling(PriorSampling, Protocol):
    def fast_sampler(self, module): ...


@runtime_checkable
class ImportanceWeights(Protocol):
    """log p(x|z) + log p(z) - log q(z|x) for the importance-weighted bound (tools/eval_bpd.py);
    the task's `dims` is the number of scored pixel values."""

    def eval_input(self, x: torch.Tensor, generators: list) -> torch.Tensor: ...

    def log_weights(self, module, x: torch.Tensor, eps: list) -> torch.Tensor: ...


@runtime_checkable
class Codes(Protocol):
    """Images -> grids of discrete codes and back (stage 1 of a two-stage model): the code .beton
    of tools/encode_codes.py, tools/eval_recon.py, a prior's first stage."""

    def encode_indices(self, module, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, h, w) int64 code indices"""

    def decode_indices(self, module, idx: torch.Tensor) -> torch.Tensor:
        """(B, h, w) -> images (B, C, H, W) in [-1, 1]"""

    def code_shape(self) -> tuple[int, int, int]:
        """(number of codes, h, w)"""


@runtime_checkable
class CodePrior(Protocol):
    """A prior over a first stage's code grids: bits per token (tools/eval_bpd.py), code samples
    decoded through the frozen first stage (tools/sample.py), tokens/s (tools/profile_sampling.py).
    Its task also has `tokens` (codes per grid) and `grid` (h, w)."""

    def token_nll(self, module, x) -> torch.Tensor:
        """(B,) nats of each grid of a prepared batch (the sum over its codes)"""

    def sample_codes(self, module, n: int, generator: torch.Generator, sampling=None, grid=None, labels=None,
                     cached: bool = True) -> torch.Tensor:
        """(n, H, W) int64 codes"""

    def decode(self, idx: torch.Tensor, first=None) -> torch.Tensor:
        """codes -> images in [0, 1] through the first stage"""


CAPABILITIES = {Samples: "draw samples", CodePrior: "model code grids", Codes: "encode images to codes", Visualizes: "show reconstructions",
                Interpolates: "interpolate between codes", PriorSampling: "sample through a prior",
                BatchNormRecalibration: "recalibrate BatchNorm", FastSampling: "sample through a fast path",
                ImportanceWeights: "give importance weights"}


def has(task, capability) -> bool:
    return isinstance(task, capability)


def require(task, capability, what: str) -> None:
    """A one-line UserError when `task`'s family lacks `capability` (or every one of a tuple of
    them; `what`: the tool asking)."""
    caps = capability if isinstance(capability, tuple) else (capability,)
    if any(isinstance(task, c) for c in caps):
        return
    from .models import FAMILIES, family_module

    able = [f for f in sorted(FAMILIES) if any(issubclass(family_module(f).Task, c) for c in caps)]
    family = task.recipe.model.family
    raise UserError(f"{what}: family {family!r} cannot {' or '.join(CAPABILITIES[c] for c in caps)}"
                    f"{' (families that can: ' + ', '.join(able) + ')' if able else ''}")
