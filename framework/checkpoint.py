"""Atomic checkpoints and automatic resume.

RUN_DIR/checkpoints/step_NNNNNNNN/
    <engine>/...          DeepSpeed's own files for each engine (model, optimizer, ZeRO shards)
    ema_rank<R>.pt        EMA (rank 0 only, or every rank's shard on ZeRO-3)
    rng_rank<R>.pt        python, numpy and torch RNG states of every rank
    trainer.json          step, data position, skip counts, world size — written last

Everything is written into `.tmp_step_NNNNNNNN/` and renamed by rank 0 once every rank has
finished, so a kill at any moment leaves the previous checkpoint whole; a folder counts as a
checkpoint only if it is named step_* and holds trainer.json.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .errors import UserError

STATE_FILE = "trainer.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder (-> its newest complete checkpoint)."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    if p.is_dir():
        latest = latest_checkpoint(p / "checkpoints")
        if latest is not None:
            return latest
        raise UserError(f"{p}: no complete checkpoint in {p / 'checkpoints'}")
    raise UserError(f"{p}: no such run or checkpoint folder")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Checkpointer:
    def __init__(self, root: Path, keep: int, env):
        self.root, self.keep, self.env = Path(root), keep, env

    def clean_partial(self) -> None:
        """Removes folders a killed writer left behind (rank 0, before anything is written)."""
        if self.env.is_main and self.root.is_dir():
            for p in self.root.glob(".tmp_step_*"):
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def save(self, step: int, engines: dict, ema, state: dict, sleep_s: float = 0.0) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        for name, eng in engines.items():
            eng.ds.save_checkpoint(str(tmp), tag=name, save_latest=False)
        r = self.env.rank
        if ema is not None and (ema.sharded or self.env.is_main):
            torch.save(ema.state_dict(), tmp / f"ema_rank{r}.pt")
        torch.save(rng_state(), tmp / f"rng_rank{r}.pt")
        if sleep_s:  # fault injection for the tests: widen the window a kill can hit
            time.sleep(sleep_s)
        dist.barrier()
        if self.env.is_main:
            _fsync_tree(tmp)
            with open(tmp / STATE_FILE, "w") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # the same step saved again (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in complete_checkpoints(self.root)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, path: Path, engines: dict, ema, load_optimizer: bool = True) -> dict:
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("world_size") != self.env.world_size:
            raise UserError(f"{path}: checkpoint was written by world size {state.get('world_size')}, "
                            f"this run has world size {self.env.world_size}; resume with the same world size")
        for name, eng in engines.items():
            if not (path / name).is_dir():
                raise UserError(f"{path}: checkpoint holds no engine {name!r}")
            loaded, _ = eng.ds.load_checkpoint(str(path), tag=name, load_optimizer_states=load_optimizer,
                                               load_lr_scheduler_states=False)
            if loaded is None:
                raise UserError(f"{path / name}: DeepSpeed could not load this checkpoint")
        r = self.env.rank
        if ema is not None:
            f = path / (f"ema_rank{r}.pt" if ema.sharded else "ema_rank0.pt")
            if f.is_file():
                ema.load_state_dict(torch.load(f, map_location="cpu", weights_only=False))
        rng = path / f"rng_rank{r}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
        return state
