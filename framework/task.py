"""The small interface between a model family and the trainer.

A family's `Task` says which modules it trains (one DeepSpeed engine each, updated in the
order given), the loss of a micro-batch for each of them, per-image evaluation metrics, and
how to sample. The trainer owns everything else: engines, data, skips, EMA, checkpoints.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class StepContext:
    """What a task's loss sees besides the batch."""

    step: int
    micro: int
    engines: dict  # name -> framework.engine.Engine
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    batch_size: int  # per rank, per micro-batch
    grad_accum: int
    seed: int
    stream: str = ""  # the engine being trained: its loss draws noise of its own
    _draws: int = field(default=0)

    def model(self, name: str):
        """The engine of `name`, for a forward pass whose gradients train it."""
        return self.engines[name]

    @contextmanager
    def frozen(self, name: str):
        """`name`'s module with its parameters frozen, e.g. the discriminator in a generator step:
        gradients flow through it to the input but never into its parameters or engine."""
        module = self.engines[name].module
        flags = [(p, p.requires_grad) for p in module.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield module
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def randn(self, *shape: int, batch: int | None = None) -> torch.Tensor:
        """Standard normal noise of shape (batch_size, *shape) for this rank's micro-batch.

        Drawn for the whole global batch from (seed, step, draw) and sliced like the loader
        slices the images, so each image gets the same noise whatever the world size and the
        accumulation: 1 process with batch 2B, 2 with batch B, or 1 with B and 2 micro-batches
        train the same model. A `batch` other than batch_size (the short last batch of
        evaluation) draws this rank's rows only.
        """
        self._draws += 1
        if batch is not None and batch != self.batch_size:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [self.seed, 8, zlib.crc32(self.stream.encode()), self.step, self.micro, self._draws, self.rank]).generate_state(1)[0]))
            return torch.randn((batch, *shape), generator=g).to(self.device, self.dtype)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [self.seed, 7, zlib.crc32(self.stream.encode()), self.step, self._draws]).generate_state(1)[0]))
        full = torch.randn((self.batch_size * self.world_size * self.grad_accum, *shape), generator=g)
        chunk = self.micro * self.world_size + self.rank  # the loader's layout of a global step
        mine = full[chunk * self.batch_size:(chunk + 1) * self.batch_size]
        return mine.to(self.device, self.dtype)


class Task:
    """Base class of a family's task; see framework/models/vae/task.py for a complete one."""

    main: str = ""  # the engine whose loss is logged as `loss` (default: the first)
    ema_module: str = ""  # the module whose weights get an EMA and are used to sample

    def __init__(self, recipe, env):
        self.recipe = recipe
        self.env = env

    def modules(self) -> dict[str, torch.nn.Module]:
        """name -> module, in update order; each becomes one engine."""
        raise NotImplementedError

    def param_groups(self, name: str, module: torch.nn.Module):
        """Optimizer parameter groups of `name` (default: all trainable parameters)."""
        return None

    def loss(self, name: str, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss that trains engine `name` on micro-batch x, and metrics to log."""
        raise NotImplementedError

    def evaluate(self, x: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Per-image metrics (B,) on validation images; the trainer averages them over the set."""
        return {}

    def sample(self, n: int, temperature: float, generator: torch.Generator, ctx: StepContext) -> torch.Tensor:
        """n images in [0, 1], (n, C, H, W), float."""
        raise NotImplementedError

    def example_forward(self, name: str, module: torch.nn.Module, batch: int, device) -> None:
        """Runs `module` once on made-up inputs of `batch` images (tools/model_summary.py measures
        activations with it); families that do not define it get no activation estimate."""
        raise NotImplementedError

    def summary(self) -> dict:
        """Family-specific figures for tools/model_summary.py (default: none)."""
        return {}
