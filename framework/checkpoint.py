"""Atomic checkpoints and automatic resume.

RUN_DIR/checkpoints/step_NNNNNNNN/
    <engine>/...          DeepSpeed's own files for each engine (model, optimizer, ZeRO shards)
    ema_rank<R>.pt        EMA (rank 0 only, or every rank's shard on ZeRO-3)
    rng_rank<R>.pt        python, numpy and torch RNG states of every rank
    task_rank<R>.pt       the state the family owns (growing resolution, fade, assignments)
    trainer.json          step, data position, skip counts, what must match to continue exactly
                          (world size, the training keys of the recipe, the data file), and every
                          file above with its size — written last

Everything is written into `.tmp_step_NNNNNNNN/` and renamed by rank 0 once every rank has
finished, so a kill at any moment leaves the previous checkpoint whole; a folder counts as a
checkpoint only if it is named step_* and holds trainer.json. On resume a checkpoint whose
files are missing, of the wrong size or unreadable is passed over, with a warning, for the
previous complete one; a full disk while writing is one line, the older checkpoints intact.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
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


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be loaded as written (missing, short or unreadable file)."""


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path / STATE_FILE}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedCheckpoint(f"{path / STATE_FILE}: not a trainer state")
    return state


def _manifest(root: Path) -> dict:
    return {str(f.relative_to(root)): f.stat().st_size for f in sorted(root.rglob("*")) if f.is_file()}


def verify_files(path: Path, state: dict) -> None:
    """Every file the checkpoint was written with is there, with its size."""
    files = state.get("files")
    if files is None:  # written before manifests existed: nothing to compare
        return
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            raise DamagedCheckpoint(f"{f}: missing")
        if f.stat().st_size != size:
            raise DamagedCheckpoint(f"{f}: {f.stat().st_size} bytes, written with {size}")


def _torch_load(f: Path):
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle errors
        raise DamagedCheckpoint(f"{f}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None


def _disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "file write failed" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _looks_full(root: Path, previous: Path | None) -> bool:
    """torch.save reports a full disk as a bare stream error ("unexpected pos"): judge by the space
    left, against the size of the previous checkpoint (what this one needs again)."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return False
    need = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else 0
    return free < max(2**20, need)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Checkpointer:
    def __init__(self, root: Path, keep: int, env):
        self.root, self.keep, self.env = Path(root), keep, env

    def clean_partial(self) -> None:
        """Removes folders a killed writer left behind (rank 0, before anything is written)."""
        if self.env.is_main and self.root.is_dir():
            for p in self.root.glob(".tmp_step_*"):
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def save(self, step: int, engines: dict, ema, state: dict, task_state: dict | None = None,
             sleep_s: float = 0.0) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        err = None
        try:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as e:
            err = e
        dist.barrier()
        r = self.env.rank
        if err is None:
            try:
                for name, eng in engines.items():
                    eng.ds.save_checkpoint(str(tmp), tag=name, save_latest=False)
                if ema is not None and (ema.sharded or self.env.is_main):
                    torch.save(ema.state_dict(), tmp / f"ema_rank{r}.pt")
                torch.save(rng_state(), tmp / f"rng_rank{r}.pt")
                torch.save(task_state or {}, tmp / f"task_rank{r}.pt")
                if sleep_s:  # fault injection for the tests: widen the window a kill can hit
                    time.sleep(sleep_s)
            except (OSError, RuntimeError) as e:
                err = e
        self._all_written(err, tmp)
        err = None
        if self.env.is_main:
            try:
                _fsync_tree(tmp)
                files = _manifest(tmp)
                with open(tmp / STATE_FILE, "w") as f:
                    json.dump({**state, "files": files}, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                if final.exists():  # the same step saved again (e.g. signal right after a periodic save)
                    shutil.rmtree(final)
                os.rename(tmp, final)
                for old in complete_checkpoints(self.root)[:-self.keep] if self.keep > 0 else []:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError as e:
                err = e
        self._all_written(err, tmp)
        return final

    def _all_written(self, err: BaseException | None, tmp: Path) -> None:
        """Every rank learns whether every rank wrote its part; a failure removes the partial folder
        and is one line (a full disk said as such); the older checkpoints are untouched."""
        failed = dist.all_reduce_sum(torch.tensor([0.0 if err is None else 1.0]))
        if float(failed[0]) == 0:
            return
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        kept = latest_checkpoint(self.root)
        tail = f"; the previous checkpoint {kept} is intact" if kept else ""
        if err is None:
            raise UserError(f"{tmp}: another rank could not write its part of the checkpoint{tail}")
        if _disk_full(err) or _looks_full(self.root, kept):
            try:
                free = shutil.disk_usage(self.root).free / 2**20
            except OSError:
                free = float("nan")
            raise UserError(f"{tmp}: disk full while writing the checkpoint ({free:.0f} MiB free on "
                            f"{self.root}){tail}; free space and run again to resume")
        raise UserError(f"{tmp}: could not write the checkpoint ({type(err).__name__}: {err}){tail}")

    def load(self, path: Path, engines: dict, ema, load_optimizer: bool = True) -> tuple[dict, dict]:
        """Loads every part; -> (trainer state, this rank's task state). Raises DamagedCheckpoint
        for a missing, short or unreadable file (the caller falls back to an older checkpoint)."""
        state = read_state(path)
        verify_files(path, state)
        for name in engines:
            if not (path / name).is_dir():
                raise UserError(f"{path}: checkpoint holds no engine {name!r} (engines of this run: "
                                f"{', '.join(engines)}; of the checkpoint: {', '.join(state.get('engines', []))})")
        r = self.env.rank
        # the small files first: a damaged one is found before any engine state changes
        ema_state = task_state = rng = None
        if ema is not None:
            f = path / (f"ema_rank{r}.pt" if ema.sharded else "ema_rank0.pt")
            if not f.is_file():
                raise DamagedCheckpoint(f"{f}: missing (this run keeps an EMA, train.ema > 0)")
            ema_state = _torch_load(f)
        f = path / f"rng_rank{r}.pt"
        if not f.is_file():
            raise DamagedCheckpoint(f"{f}: missing")
        rng = _torch_load(f)
        f = path / f"task_rank{r}.pt"
        if f.is_file():
            task_state = _torch_load(f)
        elif state.get("files") is not None:
            raise DamagedCheckpoint(f"{f}: missing")
        for name, eng in engines.items():
            try:
                loaded, _ = eng.ds.load_checkpoint(str(path), tag=name, load_optimizer_states=load_optimizer,
                                                   load_lr_scheduler_states=False)
            except RuntimeError as e:
                if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
                    raise UserError(f"{path / name}: the weights do not fit this recipe's model "
                                    f"({str(e).splitlines()[0][:200]})") from None
                raise DamagedCheckpoint(f"{path / name}: unreadable ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
            except (OSError, EOFError, ValueError, KeyError, AssertionError) as e:
                raise DamagedCheckpoint(f"{path / name}: unreadable ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
            if loaded is None:
                raise DamagedCheckpoint(f"{path / name}: DeepSpeed found no checkpoint there")
        if ema_state is not None:
            try:
                ema.load_state_dict(ema_state)
            except (ValueError, RuntimeError) as e:
                raise UserError(f"{path}: its EMA does not fit this recipe's model ({e})") from None
        set_rng_state(rng)
        return state, task_state or {}


def load_module_weights(path: str | os.PathLike, name: str, module: torch.nn.Module, ema: bool = True) -> str:
    """Loads module `name` of another run into `module` (a frozen module: a prior's stage-1 model,
    a perceptual network trained here): `path` is a run folder (its newest checkpoint), a training
    checkpoint or an evaluation checkpoint written by a tool. The EMA weights are used when the run
    kept them and `ema`. -> which weights were read: 'ema', 'model' or 'eval'."""
    from .eval.checkpoints import EVAL_WEIGHTS, is_eval_checkpoint, resolve, training_weights

    ck = resolve(path)
    if is_eval_checkpoint(ck):
        weights = _torch_load(ck / EVAL_WEIGHTS)
        if name not in weights:
            raise UserError(f"{ck / EVAL_WEIGHTS}: holds no module {name!r} (it holds {', '.join(weights)})")
        try:
            module.load_state_dict(weights[name])
        except RuntimeError as e:
            raise UserError(f"{ck / EVAL_WEIGHTS}: module {name!r} does not fit ({str(e).splitlines()[0]})") from None
        return "eval"
    try:
        state = read_state(ck)
    except DamagedCheckpoint as e:
        raise UserError(str(e)) from None
    if not (ck / name).is_dir():
        raise UserError(f"{ck}: holds no engine {name!r} (it holds {', '.join(state.get('engines', []))})")
    return training_weights(ck, name, module, state, ema)
