"""Weights for the tools that run after training, from any checkpoint the framework writes.

Three kinds of path are accepted:

    RUN_DIR                               its newest complete training checkpoint
    RUN_DIR/checkpoints/step_N            a training checkpoint (DeepSpeed files of every engine)
    RUN_DIR/checkpoints/step_N_bn-t0.7    an evaluation checkpoint written by a tool
                                          (model.pt + recipe.yaml + eval.json)

A training checkpoint's recipe is RUN_DIR/recipe.yaml. Weights are read from DeepSpeed's files
without building an engine: on ZeRO-0/1/2 the module state in `<engine>/mp_rank_00_model_states.pt`
(whole weights, and every buffer: BN statistics, power-iteration vectors); on ZeRO-3, whose module
state holds empty placeholders, the fp32 parameters are gathered from the optimizer shards with
DeepSpeed's zero_to_fp32 and the buffers come from the module state. The EMA weights
(`ema_rank<R>.pt`, one file, or one shard per rank on ZeRO-3) replace the parameters when the run
kept an EMA and `ema=True`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import distributed as dist
from ..checkpoint import STATE_FILE, resolve_checkpoint
from ..config import load_recipe, to_yaml
from ..errors import UserError
from ..models import build_task
from ..task import StepContext

EVAL_STATE = "eval.json"
EVAL_WEIGHTS = "model.pt"


def seeded_generator(seed: int, tag: int, *stream: int) -> torch.Generator:
    """A CPU generator seeded from (seed, tag, *stream): the tools' noise, independent of rank layout."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, tag, *stream]).generate_state(1)[0]))


def is_eval_checkpoint(p: Path) -> bool:
    return (p / EVAL_WEIGHTS).is_file() and (p / EVAL_STATE).is_file()


def resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if is_eval_checkpoint(p):
        return p
    if p.is_dir() and not (p / STATE_FILE).is_file() and (p / EVAL_WEIGHTS).exists():
        raise UserError(f"{p}: incomplete evaluation checkpoint (no {EVAL_STATE})")
    return resolve_checkpoint(p)


def recipe_of(ckpt: Path) -> Path:
    own = ckpt / "recipe.yaml"
    if own.is_file():
        return own
    run = ckpt.parent.parent / "recipe.yaml"
    if run.is_file():
        return run
    raise UserError(f"{ckpt}: no recipe.yaml beside it (looked in {ckpt} and {ckpt.parent.parent})")


def _load_file(f: Path):
    """torch.load of a checkpoint file; a damaged one is a one-line UserError naming it."""
    from ..checkpoint import DamagedCheckpoint, _torch_load

    try:
        return _torch_load(f)
    except DamagedCheckpoint as e:
        raise UserError(f"{e} (a damaged checkpoint: use an earlier one)") from None


def _zero3_partition(shards: list[torch.Tensor], numel: int) -> torch.Tensor:
    """ZeRO-3 gives rank r the flat elements [r p, (r + 1) p) of each parameter, p = ceil(numel / world),
    the last shard padded; joined again here."""
    return torch.cat([s.reshape(-1) for s in shards])[:numel]


def _module_state(ckpt: Path, name: str) -> dict:
    # ZeRO-0/1/2: mp_rank_00_model_states.pt; ZeRO-3: one per rank, rank 0's holds the buffers
    for f in (ckpt / name / "mp_rank_00_model_states.pt", ckpt / name / "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if f.is_file():
            return _load_file(f)
    raise UserError(f"{ckpt}: no model states of engine {name!r} (mp_rank_00_model_states.pt missing)")


def training_weights(ckpt: Path, name: str, module: torch.nn.Module, state: dict, ema: bool) -> str:
    """Loads engine `name`'s weights into `module`; -> 'ema' or 'model' (which weights)."""
    ds = _module_state(ckpt, name)
    # `.last_weight`: a cache that NVAE runs before 2026-12-01 registered as a parameter by mistake
    sd = {k: v for k, v in ds["module"].items() if not k.endswith(".last_weight")}
    if state.get("zero_stage", 0) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd.update(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=name))
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{ckpt / name}: weights do not fit the recipe's model "
                        f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    if not ema:
        return "model"
    files = sorted(ckpt.glob("ema_rank*.pt"), key=lambda f: int(f.stem[len("ema_rank"):]))
    if not files:
        return "model"
    first = _load_file(files[0])
    params = list(module.parameters())
    if first.get("sharded"):
        world = state.get("world_size", len(files))
        if len(files) != world:
            raise UserError(f"{ckpt}: {len(files)} EMA shards for world size {world}")
        shards = [first["shadow"]] + [_load_file(f)["shadow"]
                                      for f in files[1:]]
        shadow = [_zero3_partition([s[i] for s in shards], p.numel()).view(p.shape) for i, p in enumerate(params)]
    else:
        shadow = first["shadow"]
    if len(shadow) != len(params):
        raise UserError(f"{files[0]}: EMA of {len(shadow)} tensors for a model of {len(params)} parameters")
    with torch.no_grad():
        for p, s in zip(params, shadow):
            p.copy_(s.view(p.shape))
    return "ema"


@dataclass
class Loaded:
    """A model ready for evaluation: the recipe it was trained with, its task, its modules (eval mode)."""

    path: Path  # the checkpoint folder read
    recipe: object
    task: object
    modules: dict
    env: object
    device: torch.device
    info: dict = field(default_factory=dict)  # weights (ema|model), bn (recalibration record or None), source
    frozen: dict = field(default_factory=dict)  # the task's frozen modules, on the device

    @property
    def family(self) -> str:
        return self.recipe.model.family

    @property
    def module(self) -> torch.nn.Module:
        main = self.task.ema_module or self.task.main or next(iter(self.modules))
        return self.modules[main]

    def ctx(self, batch_size: int = 1) -> StepContext:
        """The StepContext a task's sample/evaluate expect, over these modules (no engines)."""
        engines = {n: SimpleNamespace(module=m) for n, m in self.modules.items()}
        return StepContext(step=0, micro=0, device=self.device, dtype=torch.float32, rank=self.env.rank,
                           world_size=self.env.world_size, batch_size=batch_size, grad_accum=1,
                           seed=self.recipe.run.seed, phase="sample", rows=list(range(batch_size)),
                           _engines=engines, _frozen=self.frozen)

    def add_frozen(self) -> None:
        """The task's frozen modules, on the device (load(frozen=False) leaves them out)."""
        self.frozen = self.task.frozen_modules()
        for module in self.frozen.values():
            module.to(self.device).eval().requires_grad_(False)

    def describe(self) -> str:
        bn = self.info.get("bn")
        bn_text = (f"recalibrated (t={bn['temperature']}, {bn['iters']} x {bn['batch_size']} x {bn['world_size']} "
                   f"samples)" if bn else "training statistics")
        return f"checkpoint {self.path} | family {self.family} | weights {self.info.get('weights')} | BN {bn_text}"


def start_processes():
    """One process, or the ranks of torchrun / SLURM (the process group only when there are several)."""
    env = dist.detect()
    if env.world_size > 1:
        env = dist.init(env)
    return env


def finish(env) -> None:
    """Ends the process group in order (all ranks done, then destroyed): a rank that exits with the
    group alive can abort at interpreter shutdown ("terminate called without an active exception")."""
    if env.world_size > 1:
        dist.barrier()
        dist.shutdown()


def load(path: str | os.PathLike, env=None, ema: bool = True, overrides: list[str] = (),
         frozen: bool = True) -> Loaded:
    """A run, training or evaluation checkpoint; or a recipe (.yaml): its model with random weights,
    for timing an architecture. frozen=False leaves out the task's frozen modules (a tool that
    can do without them, e.g. LPIPS when its VGG16 weights are missing)."""
    random_init = str(path).endswith((".yaml", ".yml"))
    ckpt = Path(path) if random_init else resolve(path)
    env = env or start_processes()
    recipe = load_recipe(ckpt if random_init else recipe_of(ckpt), list(overrides), check_files=False)
    torch.manual_seed(recipe.run.seed)
    task = build_task(recipe, env)
    modules = task.modules()
    device = env.device
    if random_init:
        info = {"source": str(ckpt), "weights": "random (recipe)", "bn": None}
    elif is_eval_checkpoint(ckpt):
        info = json.loads((ckpt / EVAL_STATE).read_text())
        weights = _load_file(ckpt / EVAL_WEIGHTS)
        for name, module in modules.items():
            if name not in weights:
                raise UserError(f"{ckpt / EVAL_WEIGHTS}: holds no module {name!r}")
            module.load_state_dict(weights[name])
    else:
        try:
            state = json.loads((ckpt / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{ckpt / STATE_FILE}: unreadable ({type(e).__name__}: {e}) (a damaged checkpoint: use "
                            f"an earlier one)") from None
        info = {"source": str(ckpt), "step": state.get("step"), "bn": None}
        ema_name = task.ema_module or task.main or next(iter(modules))
        for name, module in modules.items():
            if not (ckpt / name).is_dir():
                raise UserError(f"{ckpt}: checkpoint holds no engine {name!r} (is it a {recipe.model.family} run?)")
            used = training_weights(ckpt, name, module, state, ema and name == ema_name)
            if name == ema_name:
                info["weights"] = used
        task_file = ckpt / "task_rank0.pt"  # the family's own state (PGGAN: the phase it stopped in)
        if task_file.is_file():
            try:
                task.load_state_dict(_load_file(task_file))
            except ValueError as e:
                raise UserError(f"{task_file}: {e}") from None
    for module in modules.values():
        module.to(device).eval()
    loaded = Loaded(ckpt, recipe, task, modules, env, device, info)
    if frozen:
        loaded.add_frozen()
    return loaded


def derived_path(ckpt: Path, suffix: str) -> Path:
    """RUN/checkpoints/step_N + '_bn-t0.7' -> RUN/checkpoints/step_N_bn-t0.7 (from a derived one too)."""
    base = ckpt.name.split("_bn-")[0]
    return ckpt.parent / f"{base}{suffix}"


def write_eval_checkpoint(loaded: Loaded, out: Path, info: dict) -> Path:
    """model.pt (every module's state), recipe.yaml, eval.json; written under a temporary name and
    renamed, so a kill leaves either the old folder or the new one. Rank 0 writes."""
    if loaded.env.is_main:
        tmp = out.with_name(f".tmp_{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({n: {k: v.detach().cpu() for k, v in m.state_dict().items()} for n, m in loaded.modules.items()},
                   tmp / EVAL_WEIGHTS)
        (tmp / "recipe.yaml").write_text(to_yaml(loaded.recipe))
        (tmp / EVAL_STATE).write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    dist.barrier()
    return out
