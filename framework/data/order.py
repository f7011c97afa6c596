"""Which images each rank reads, and when: pure functions of (ids, seed, epoch, world, rank).

Training: epoch e is a permutation of the split's ids drawn from (seed, e); global step s of the
epoch takes the s-th block of `batch x world x accum` ids, and micro-batch m of rank r is the
chunk m * world + r of that block (the layout StepContext.randn slices its noise by). So the
same global batch trains the same images whatever the world size or accumulation, the ranks'
shards are disjoint, and a resumed run reads exactly the batches it has not read yet.

Evaluation: rank r takes ids[r::world]; every rank runs the same number of batches (ZeRO-3
needs every rank in every forward), the short ones padded and marked as such, so each image is
counted exactly once.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import UserError


class GlobalOrder:
    def __init__(self, ids, batch: int, world: int, rank: int, accum: int = 1, seed: int = 0):
        self.ids = np.asarray(ids, np.int64)
        self.batch, self.world, self.rank, self.accum, self.seed = batch, world, rank, accum, seed
        self.global_batch = batch * world * accum
        self.steps_per_epoch = len(self.ids) // self.global_batch
        if self.steps_per_epoch < 1:
            raise UserError(f"data: {len(self.ids)} training images are fewer than one global batch of "
                            f"{self.global_batch} (data.batch_size {batch} x world {world} x engine.grad_accum {accum})")
        self._cached = (-1, None)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x0DA7A])
            self._cached = (epoch, self.ids[rng.permutation(len(self.ids))])
        return self._cached[1]

    def indices(self, step: int) -> list[np.ndarray]:
        """This rank's micro-batches of global step `step`: `accum` arrays of `batch` ids."""
        epoch, k = divmod(step, self.steps_per_epoch)
        block = self.permutation(epoch)[k * self.global_batch:(k + 1) * self.global_batch]
        b, w, r = self.batch, self.world, self.rank
        return [block[(m * w + r) * b:(m * w + r + 1) * b] for m in range(self.accum)]

    def rank_epoch(self, epoch: int, from_step: int = 0) -> np.ndarray:
        """Every id this rank reads in `epoch`, in order, from step `from_step` of the epoch on."""
        steps = range(epoch * self.steps_per_epoch + from_step, (epoch + 1) * self.steps_per_epoch)
        parts = [mb for s in steps for mb in self.indices(s)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class EvalShard:
    def __init__(self, ids, batch: int, world: int, rank: int):
        self.ids = np.asarray(ids, np.int64)
        self.batch, self.world, self.rank = batch, world, rank
        self.mine = self.ids[rank::world]
        largest = math.ceil(len(self.ids) / world) if len(self.ids) else 0
        self.num_batches = math.ceil(largest / batch)

    def __len__(self) -> int:
        return self.num_batches

    def valid_counts(self) -> list[int]:
        """Real images in each batch (the rest is padding)."""
        n = len(self.mine)
        return [max(0, min(self.batch, n - i * self.batch)) for i in range(self.num_batches)]

    def padded(self) -> np.ndarray:
        """mine, then padding (the first id) up to num_batches x batch."""
        total = self.num_batches * self.batch
        if total == 0:
            return np.zeros(0, np.int64)
        filler = self.mine[0] if len(self.mine) else self.ids[0]
        return np.concatenate([self.mine, np.full(total - len(self.mine), filler, np.int64)])
