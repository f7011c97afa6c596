"""PGGAN's training schedule, counted in real images shown, as the official `TrainingSchedule`
(train.py): `phase_images` at a resolution, then `fade_images` fading in the next one, from
`initial_resolution` up to the target; per-resolution (global) batch sizes and learning rates;
re-evaluated every `minibatch_repeats` steps (the official loop: 4 minibatches, then the schedule
again), so alpha moves in steps of 4 minibatches; the optimisers' state is reset whenever the
level of detail crosses an integer (the start and the end of each fade: the official
`reset_opt_for_new_lod`).

    lod       = log2(target) - log2(initial) - phase - max(images in phase - phase_images, 0) / fade_images,
                clipped at 0 (phase = floor(images / (phase_images + fade_images)))
    level     = log2(target) - floor(lod)     (the networks run at 2^level pixels)
    alpha     = 1 - (lod - floor(lod))        (the newest block's weight in the fade)

One step here is one discriminator update and one generator update on one minibatch (the
official D_repeats = 1), and shows `batch` real images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ...errors import UserError


@dataclass
class ScheduleConfig:
    initial_resolution: int = 4
    phase_images: int = 600_000  # lod_training_kimg x 1000: images at a resolution
    fade_images: int = 600_000  # lod_transition_kimg x 1000: images fading in the next
    batch: int = 16  # global minibatch (minibatch_base)
    batch_per_resolution: dict = field(default_factory=dict)  # resolution -> global minibatch (minibatch_dict)
    lr: float = 0.001  # G_lrate_base = D_lrate_base
    lr_g_per_resolution: dict = field(default_factory=dict)
    lr_d_per_resolution: dict = field(default_factory=dict)
    minibatch_repeats: int = 4


@dataclass(frozen=True)
class Phase:
    images: int  # real images shown before this step
    lod: float
    level: int  # the networks run at 2^level pixels
    alpha: float  # weight of the newest block (1: no fade)
    batch: int  # global minibatch of this step
    lr_g: float
    lr_d: float

    @property
    def resolution(self) -> int:
        return 2 ** self.level


def _int_keys(d: dict, what: str, kind=int) -> dict:
    """{resolution: value} with positive values; a value of None is YAML's reading of `{4:16}` (no
    space after the colon: the base-60 number 256 as a key with no value)."""
    try:
        out = {int(k): v for k, v in dict(d).items()}
    except (TypeError, ValueError):
        raise UserError(f"key 'model.{what}': keys must be resolutions (4, 8, …), got {list(dict(d))}") from None
    for k, v in out.items():
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (kind is float or v == int(v))
        if not ok:
            hint = " (write {4: 16} with a space after the colon: YAML reads 4:16 as the number 256)" if v is None else ""
            raise UserError(f"key 'model.{what}': {k}: {v!r} is not a positive {kind.__name__}{hint}")
    return {k: kind(v) for k, v in out.items()}


class Schedule:
    def __init__(self, cfg: ScheduleConfig, target_resolution: int, unit: int = 1):
        """unit: world size x gradient accumulation; every minibatch is rounded down to a multiple."""
        top = int(math.log2(target_resolution)) if target_resolution > 0 else -1
        if target_resolution < 8 or 2 ** top != target_resolution:
            raise UserError(f"key 'data.resolution' is {target_resolution}; PGGAN's target must be a power of two >= 8")
        first = int(math.log2(cfg.initial_resolution)) if cfg.initial_resolution > 0 else -1
        if cfg.initial_resolution < 4 or 2 ** first != cfg.initial_resolution or cfg.initial_resolution > target_resolution:
            raise UserError(f"key 'model.schedule.initial_resolution' is {cfg.initial_resolution}; it must be a power "
                            f"of two in 4..{target_resolution} (data.resolution)")
        if cfg.phase_images < 0 or cfg.fade_images < 0 or cfg.phase_images + cfg.fade_images == 0:
            raise UserError(f"keys 'model.schedule.phase_images' and 'fade_images' are {cfg.phase_images} and "
                            f"{cfg.fade_images}: a schedule of zero images (both must be >= 0 and not both 0)")
        if cfg.minibatch_repeats < 1:
            raise UserError(f"key 'model.schedule.minibatch_repeats' is {cfg.minibatch_repeats}; it must be >= 1")
        self.cfg, self.top, self.first, self.unit = cfg, top, first, unit
        self.batches = _int_keys(cfg.batch_per_resolution, "schedule.batch_per_resolution")
        self.lr_g = _int_keys(cfg.lr_g_per_resolution, "schedule.lr_g_per_resolution", float)
        self.lr_d = _int_keys(cfg.lr_d_per_resolution, "schedule.lr_d_per_resolution", float)
        for res in range(first, top + 1):
            b = self.batch_of(2 ** res)
            if b < unit:
                raise UserError(f"key 'model.schedule': the minibatch at {2 ** res} px is {self.raw_batch(2 ** res)}, "
                                f"fewer than world size x engine.grad_accum = {unit}")

    def raw_batch(self, resolution: int) -> int:
        return int(self.batches.get(resolution, self.cfg.batch))

    def batch_of(self, resolution: int) -> int:
        b = self.raw_batch(resolution)
        return b - b % self.unit  # divisible by the ranks, as the official code divides by GPUs

    def lod(self, images: int) -> float:
        c = self.cfg
        span = c.phase_images + c.fade_images
        phase = images // span
        into = images - phase * span
        lod = (self.top - self.first) - phase
        if c.fade_images > 0:
            lod -= max(into - c.phase_images, 0) / c.fade_images
        return max(float(lod), 0.0)

    def at_images(self, images: int) -> Phase:
        lod = self.lod(images)
        level = self.top - math.floor(lod)
        res = 2 ** level
        return Phase(images, lod, level, 1.0 - (lod - math.floor(lod)), self.batch_of(res),
                     float(self.lr_g.get(res, self.cfg.lr)), float(self.lr_d.get(res, self.cfg.lr)))

    def _level_changes(self) -> list[int]:
        """Image counts where the level may change: each fade's start and each phase's end."""
        c, n = self.cfg, self.top - self.first
        span = c.phase_images + c.fade_images
        return sorted({t for p in range(n + 1) for t in (p * span + c.phase_images, (p + 1) * span)})

    def _last_images_of_levels(self) -> list[int]:
        """The last image count of each level but the top: a fade's start (its lod is still whole),
        or without fades the image before the jump."""
        c, n = self.cfg, self.top - self.first
        span = c.phase_images + c.fade_images
        if c.fade_images > 0:
            return [p * span + c.phase_images for p in range(n)]
        return [(p + 1) * span - 1 for p in range(n)]

    def _groups(self, groups: int | None = None, total_images: int | None = None):
        """(start images, minibatch) of each group of minibatch_repeats steps: a loop over the runs of
        one level (few; the level decides the minibatch), each filled at once."""
        r, lasts = self.cfg.minibatch_repeats, self._last_images_of_levels()
        starts, batches, images, count = [], [], 0, 0
        while (groups is None or count < groups) and (total_images is None or images < total_images):
            b = self.at_images(images).batch
            last = next((t for t in lasts if t >= images), None)
            left = [(last - images) // (b * r) + 1 if last is not None else None,
                    groups - count if groups is not None else None,
                    math.ceil((total_images - images) / (b * r)) if total_images is not None else None]
            k = max(1, min(v for v in left if v is not None))
            starts.append(images + b * r * np.arange(k, dtype=np.int64))
            batches.append(np.full(k, b, np.int64))
            images, count = images + b * r * k, count + k
        return np.concatenate(starts), np.concatenate(batches)

    def plan(self, steps: int) -> "Plan":
        """The phase of every step 0..steps-1, re-evaluated every minibatch_repeats steps."""
        r = self.cfg.minibatch_repeats
        starts, batches = self._groups(groups=math.ceil(steps / r))
        return Plan(self, starts, batches, steps)

    def steps_for(self, total_images: int) -> int:
        """Steps until `total_images` real images have been shown (the official total_kimg)."""
        if total_images <= 0:
            return 0
        r = self.cfg.minibatch_repeats
        starts, batches = self._groups(total_images=total_images)
        last = len(starts) - 1  # the group in which the total is reached
        return last * r + math.ceil((total_images - int(starts[last])) / int(batches[last]))

    @staticmethod
    def resets(prev: Phase | None, cur: Phase) -> bool:
        """The official reset_opt_for_new_lod: the level of detail crossed an integer."""
        if prev is None:
            return False
        return (math.floor(cur.lod) != math.floor(prev.lod)) or (math.ceil(cur.lod) != math.ceil(prev.lod))


class Plan:
    """The phases of steps 0..steps-1, stored per group of minibatch_repeats steps (a 1024 px run
    has millions of steps); plan[s] is step s's Phase."""

    def __init__(self, schedule: Schedule, starts: np.ndarray, batches: np.ndarray, steps: int):
        self.schedule, self.starts, self.group_batches, self.steps = schedule, starts, batches, steps
        self.repeats = schedule.cfg.minibatch_repeats
        self._group_phase = {}

    def __len__(self) -> int:
        return self.steps

    def _phase_of_group(self, g: int) -> Phase:
        if g not in self._group_phase:
            if len(self._group_phase) > 4096:
                self._group_phase.clear()
            self._group_phase[g] = self.schedule.at_images(int(self.starts[g]))
        return self._group_phase[g]

    def __getitem__(self, step):
        if isinstance(step, slice):
            return [self[s] for s in range(*step.indices(self.steps))]
        if step < 0:
            step += self.steps
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside the plan's {self.steps} steps")
        g, k = divmod(step, self.repeats)
        p = self._phase_of_group(g)
        return Phase(p.images + k * p.batch, p.lod, p.level, p.alpha, p.batch, p.lr_g, p.lr_d)

    def __iter__(self):
        return (self[s] for s in range(self.steps))

    def batches(self) -> np.ndarray:
        """The global minibatch of every step."""
        return np.repeat(self.group_batches, self.repeats)[:self.steps]

    def runs(self):
        """(first step, Phase) where the level, the fading or the minibatch changes."""
        out, prev = [], None
        for g in self._group_starts_of_levels():
            p = self._phase_of_group(g)
            key = (p.level, p.alpha < 1, p.batch)
            if key != prev:
                out.append((g * self.repeats, p))
                prev = key
        return out

    def resolutions(self) -> list[int]:
        return sorted({2 ** lv for lv in self.levels()})

    def levels(self) -> set[int]:
        return {self._phase_of_group(g).level for g in self._group_starts_of_levels()}

    def _group_starts_of_levels(self):
        """The groups where the level, the fading or the minibatch can change: the first, those
        evaluated first at and first after each fade's start and each phase's end, and each
        minibatch change."""
        b = self.group_batches
        idx = [0, *(np.flatnonzero(np.diff(b)) + 1).tolist()]
        changes = self.schedule._level_changes()  # a group at a change reads the old phase, the next the new
        for side in ("left", "right"):
            idx += [int(i) for i in np.searchsorted(self.starts, changes, side=side) if i < len(b)]
        return sorted(set(idx))
