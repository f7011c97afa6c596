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
    """The training order. `batch` is the per-rank micro-batch of every step; or `batches` gives
    the global batch of each step 0..len-1 (a growing GAN's per-resolution minibatch), each a
    multiple of world x accum. Either way step s takes the next global batch of ids from the
    current epoch's permutation when that many are left, else the first of the next epoch's (the
    rest of the epoch is dropped), so a fixed batch gives `steps_per_epoch` equal steps an epoch.

    FFCV reads a rank's ids in pieces: runs of steps with the same epoch and micro-batch size."""

    def __init__(self, ids, batch: int, world: int, rank: int, accum: int = 1, seed: int = 0, batches=None):
        self.ids = np.asarray(ids, np.int64)
        self.world, self.rank, self.accum, self.seed = world, rank, accum, seed
        n = len(self.ids)
        self._cached = (-1, None)
        if batches is None:
            self.batches = None
            self.batch = batch
            self.global_batch = batch * world * accum
            self.steps_per_epoch = n // self.global_batch
            if self.steps_per_epoch < 1:
                raise UserError(f"data: {n} training images are fewer than one global batch of "
                                f"{self.global_batch} (data.batch_size {batch} x world {world} x engine.grad_accum "
                                f"{accum})")
            return
        self.batches = np.asarray(batches, np.int64)
        unit = world * accum
        if len(self.batches) == 0:
            raise UserError("data: a batch schedule of no steps")
        bad = np.flatnonzero((self.batches < unit) | (self.batches % unit != 0))
        if len(bad):
            s = int(bad[0])
            raise UserError(f"data: the global batch of step {s} is {int(self.batches[s])}, not a positive multiple "
                            f"of world {world} x engine.grad_accum {accum}")
        if int(self.batches.max()) > n:
            raise UserError(f"data: {n} training images are fewer than the largest global batch of the schedule "
                            f"({int(self.batches.max())})")
        self.batch = int(self.batches[0]) // unit
        self.global_batch = int(self.batches[0])
        self.steps_per_epoch = None  # epochs have different numbers of steps
        self._epoch, self._start = self._tables(self.batches, n)
        self._images = np.concatenate([[0], np.cumsum(self.batches)])
        piece = np.ones(len(self.batches), bool)
        piece[1:] = (np.diff(self._epoch) != 0) | (np.diff(self.batches) != 0)
        self._piece_starts = np.flatnonzero(piece)

    @staticmethod
    def _tables(batches: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, offset into the epoch's permutation) of every step: one pass over the runs of
        equal batches and the epochs."""
        steps = len(batches)
        epoch, start = np.empty(steps, np.int64), np.empty(steps, np.int64)
        bounds = [0, *(np.flatnonzero(np.diff(batches)) + 1).tolist(), steps]
        e = pos = 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            g, s = int(batches[a]), a
            while s < b:
                fit = (n - pos) // g
                if fit == 0:
                    e, pos = e + 1, 0
                    continue
                k = min(fit, b - s)
                epoch[s:s + k] = e
                start[s:s + k] = pos + g * np.arange(k)
                pos, s = pos + g * k, s + k
        return epoch, start

    def _check(self, step: int) -> None:
        if self.batches is not None and not 0 <= step < len(self.batches):
            raise IndexError(f"step {step} outside the batch schedule's {len(self.batches)} steps")

    def global_batch_at(self, step: int) -> int:
        self._check(step)
        return self.global_batch if self.batches is None else int(self.batches[step])

    def micro_at(self, step: int) -> int:
        """This rank's micro-batch size at `step`."""
        return self.global_batch_at(step) // (self.world * self.accum)

    def images_before(self, step: int) -> int:
        """Images shown by the steps before `step` (all ranks)."""
        if self.batches is None:
            return step * self.global_batch
        return int(self._images[min(step, len(self.batches))])

    def epoch_of(self, step: int) -> int:
        """The epoch `step` reads from (past the schedule's end: that of its last step)."""
        if self.batches is None:
            return step // self.steps_per_epoch
        return int(self._epoch[min(max(step, 0), len(self.batches) - 1)])

    def piece(self, step: int) -> tuple[int, int]:
        """[first, end) of the steps that share `step`'s epoch and micro-batch size."""
        if self.batches is None:
            e = step // self.steps_per_epoch
            return e * self.steps_per_epoch, (e + 1) * self.steps_per_epoch
        self._check(step)
        k = int(np.searchsorted(self._piece_starts, step, side="right")) - 1
        first = int(self._piece_starts[k])
        end = int(self._piece_starts[k + 1]) if k + 1 < len(self._piece_starts) else len(self.batches)
        return first, end

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x0DA7A])
            self._cached = (epoch, self.ids[rng.permutation(len(self.ids))])
        return self._cached[1]

    def indices(self, step: int) -> list[np.ndarray]:
        """This rank's micro-batches of global step `step`: `accum` arrays of micro_at(step) ids."""
        if self.batches is None:
            epoch, k = divmod(step, self.steps_per_epoch)
            at, g = k * self.global_batch, self.global_batch
        else:
            self._check(step)
            epoch, at, g = int(self._epoch[step]), int(self._start[step]), int(self.batches[step])
        block = self.permutation(epoch)[at:at + g]
        b, w, r = g // (self.world * self.accum), self.world, self.rank
        return [block[(m * w + r) * b:(m * w + r + 1) * b] for m in range(self.accum)]

    def rank_piece(self, step: int) -> np.ndarray:
        """Every id this rank reads from `step` to the end of its piece, in order."""
        parts = [mb for s in range(step, self.piece(step)[1]) for mb in self.indices(s)]
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
