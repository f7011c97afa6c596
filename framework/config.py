"""Recipes: YAML files read with omegaconf into dataclass schemas.

A recipe may extend another (`base: ../other.yaml`, relative to the file that names it);
`key=value` arguments override dotted keys. Every mistake — unknown or mistyped key, wrong
type, missing value, missing file — is a `UserError` naming the key and the file, raised
before anything is written.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import yaml
from omegaconf import DictConfig, ListConfig, MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import UserError


@dataclass
class RunConfig:
    dir: str = MISSING  # run folder: recipe.yaml, metrics.jsonl, tb/, samples/, checkpoints/
    seed: int = 0


@dataclass
class DataConfig:
    path: str = MISSING  # a .beton file written by tools/write_ffcv.py
    resolution: int = 32
    channels: int = 1
    num_bits: int = 8  # n-bit quantisation of the pixels (NVAE uses 5 at 256 px)
    batch_size: int = 32  # per rank and per micro-batch; global = batch_size * world * grad_accum
    eval_batch_size: int = 0  # 0: same as batch_size
    workers: int = 2
    flip: bool = False  # random horizontal flip of training images
    fields: list[str] = field(default_factory=list)  # .beton fields to read besides the family's own (e.g. label)


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adamax | adam (L2 weight decay in the gradient, as torch.optim.Adam)
    lr: float = 1e-3
    # > 0: lr = lr_per_image x the global batch (batch_size x world x grad_accum), as taming's
    # main.py scales its base_learning_rate; replaces lr
    lr_per_image: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0  # linear warm-up from 0 to optimizer.lr
    decay: str = "cosine"  # cosine | constant (after warm-up)
    min_lr: float = 0.0  # cosine ends here at train.steps


@dataclass
class EngineConfig:
    zero_stage: int = 0  # 0..3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (dynamic loss scaling)
    grad_accum: int = 1
    clip: float = 0.0  # gradient clipping by global norm; 0 disables
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU memory
    activation_checkpointing: str = "none"  # none | blocks
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # per-engine settings, engine name -> {optimizer, schedule, clip, start_step}: each replaces the
    # block above for that engine only (e.g. a discriminator's lr, or its first step)
    engines: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PerEngineConfig:
    """What may differ between the engines of one run (the rest of `engine:` is shared)."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    clip: float = 0.0
    start_step: int = 0  # the engine does no work before this step (a VQGAN's disc_start)


@dataclass
class SkipConfig:
    # Skip an update whose loss or gradient norm is non-finite or above these thresholds
    # (as VDVAE does); 0 disables a threshold, non-finite values are always skipped.
    grad_norm_threshold: float = 0.0
    loss_threshold: float = 0.0
    max_consecutive: int = 20  # abort the run after this many skipped updates in a row


@dataclass
class DebugConfig:
    # Fault injection, used by the tests to exercise recovery paths; all off by default.
    nan_loss_at_steps: list[int] = field(default_factory=list)
    sleep_after_step_s: float = 0.0
    sleep_in_checkpoint_s: float = 0.0
    sleep_in_eval_s: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 1000
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    sample_every: int = 0  # 0: only at the end
    num_samples: int = 64
    sample_temperature: float = 1.0
    checkpoint_every: int = 0  # 0: only at the end (and on SIGUSR2/SIGTERM)
    keep_checkpoints: int = 3
    ema: float = 0.0  # EMA decay of the weights; 0 disables
    progress: bool = True
    resume_changed: str = "refuse"  # refuse | allow: resume a checkpoint although training keys changed
    fid_every: int = 0  # log val/fid (samples against the validation split) every N steps; 0: never (costly)
    fid_samples: int = 5000  # samples per val/fid (FID is biased upwards at small n)
    skip: SkipConfig = field(default_factory=SkipConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


@dataclass
class LauncherConfig:
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int = 0  # 0: one per GPU (one per core slot without GPUs)
    partition: Optional[str] = None
    time: str = "24:00:00"
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    mem: Optional[str] = None
    cpus_per_task: int = 8
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to finish a step and checkpoint
    max_requeues: int = 20  # requeues after time limits (preemptions requeue without limit)
    job_name: str = ""  # default: the run folder's name


@dataclass
class EvalConfig:
    # torch-fidelity's FID Inception weights (tools/eval_fid.py, train.fid_every): '' = the torch hub
    # cache's checkpoints/weights-inception-2015-12-05-6726825d.pth; 'random' = seeded random (tests)
    inception_weights: str = ""


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING  # the family's own dataclass, chosen by model.family
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: lo <= v <= hi (or < where open; None: unbounded)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT = Range(0), Range(1), Range(0, lo_open=True), Range(0, 1)
FRACTION = Range(0, 1, hi_open=True)
SEED = Range(0, 2**32 - 1)

ENGINE_RANGES = {
    "optimizer.lr": AT_LEAST_0, "optimizer.lr_per_image": AT_LEAST_0, "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": AT_LEAST_0,
    "optimizer.betas": FRACTION, "schedule.warmup_steps": AT_LEAST_0, "schedule.min_lr": AT_LEAST_0,
    "clip": AT_LEAST_0, "start_step": AT_LEAST_0,
}

# Every numeric key of the schemas has its range here (model.* keys: the family's RANGES);
# tests/test_recipes.py checks that none is left out.
RANGES = {
    "run.seed": SEED,
    "data.resolution": Range(1, 8192), "data.channels": Range(1, 3), "data.num_bits": Range(1, 8),
    "data.batch_size": AT_LEAST_1, "data.eval_batch_size": AT_LEAST_0, "data.workers": Range(0, 256),
    "engine.zero_stage": Range(0, 3), "engine.grad_accum": AT_LEAST_1,
    **{f"engine.{k}": v for k, v in ENGINE_RANGES.items() if k != "start_step"},
    "train.steps": AT_LEAST_1, "train.log_every": AT_LEAST_1, "train.eval_every": AT_LEAST_0,
    "train.sample_every": AT_LEAST_0, "train.num_samples": Range(1, 4096), "train.sample_temperature": POSITIVE,
    "train.checkpoint_every": AT_LEAST_0, "train.fid_every": AT_LEAST_0, "train.fid_samples": Range(2), "train.keep_checkpoints": AT_LEAST_0, "train.ema": FRACTION,
    "train.skip.grad_norm_threshold": AT_LEAST_0, "train.skip.loss_threshold": AT_LEAST_0,
    "train.skip.max_consecutive": AT_LEAST_1, "train.debug.nan_loss_at_steps": AT_LEAST_1,
    "train.debug.sleep_after_step_s": AT_LEAST_0, "train.debug.sleep_in_checkpoint_s": AT_LEAST_0,
    "train.debug.sleep_in_eval_s": AT_LEAST_0,
    "launcher.nodes": AT_LEAST_1, "launcher.gpus_per_node": Range(0, 64), "launcher.tasks_per_node": Range(0, 1024),
    "launcher.cpus_per_task": AT_LEAST_1, "launcher.signal_delay_s": AT_LEAST_0, "launcher.max_requeues": AT_LEAST_0,
}


def _check_ranges(cfg: DictConfig, where: str, ranges: dict, prefix: str = "") -> None:
    for key, rng in ranges.items():
        value = OmegaConf.select(cfg, key)
        values = list(value) if isinstance(value, (list, ListConfig)) else [value]
        for v in values:
            if v is None:
                continue
            if v not in rng:
                raise UserError(f"{where}: key '{prefix}{key}' is {v!r}; it must be {rng}")


def check_flags(args, ranges: dict) -> None:
    """A tool's numeric flags against their ranges: `ranges` maps an argparse dest to a Range; a
    value outside is a UserError naming the flag (`--iw-samples is 0; it must be >= 1`)."""
    for dest, rng in ranges.items():
        value = getattr(args, dest)
        if value is not None and value not in rng:
            raise UserError(f"--{dest.replace('_', '-')} is {value!r}; it must be {rng}")


def numeric_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every int/float (or list of int/float) key of a structured config, dotted (by the schema's
    types, so empty lists and missing values count too)."""
    from omegaconf.nodes import FloatNode, IntegerNode

    out = []
    for k in cfg.keys():
        node = cfg._get_node(k)
        if isinstance(node, DictConfig):
            out += numeric_keys(node, f"{prefix}{k}.")
        elif isinstance(node, (IntegerNode, FloatNode)):
            out.append(f"{prefix}{k}")
        elif isinstance(node, ListConfig) and node._metadata.element_type in (int, float):
            out.append(f"{prefix}{k}")
    return out


CHOICES = {
    "engine.precision": ("fp32", "bf16", "fp16"),
    "engine.zero_stage": (0, 1, 2, 3),
    "engine.activation_checkpointing": ("none", "blocks"),
    "engine.optimizer.name": ("adamw", "adamax", "adam"),
    "engine.schedule.decay": ("cosine", "constant"),
    "train.resume_changed": ("refuse", "allow"),
}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of blocks (run, data, model, …)")
    return data


def _chain(path: Path, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """[(file, its keys without `base`)] from the most basic recipe to `path`."""
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: `base:` chain loops back to this file")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str):
        raise UserError(f"{path}: key 'base' must be a relative path to another recipe")
    base_path = (path.parent / base)
    if not base_path.is_file():
        raise UserError(f"{path}: key 'base' names a file that does not exist: {base_path}")
    return _chain(base_path, seen + (path,)) + [(path, data)]


def _dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            node = cfg._get_node(k)
            if isinstance(node, DictConfig):
                keys += _dotted_keys(node, full + ".")
    return keys


def _suggest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not near:  # a typo in the last part only: compare within the same block
        block, _, leaf = key.rpartition(".")
        same = [v.rpartition(".")[2] for v in valid if v.rpartition(".")[0] == block]
        leaf_near = difflib.get_close_matches(leaf, same, n=1, cutoff=0.5)
        near = [f"{block}.{leaf_near[0]}" if block else leaf_near[0]] if leaf_near else []
    return f" (did you mean '{near[0]}'?)" if near else ""


def _explain(e: OmegaConfBaseException, where: str, schema: DictConfig) -> UserError:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        return UserError(f"{where}: unknown key '{key}'{_suggest(key, _dotted_keys(schema))}")
    if isinstance(e, ValidationError):
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        return UserError(f"{where}: key '{key}' has the wrong type: {msg}")
    return UserError(f"{where}: key '{key}': {str(getattr(e, 'msg', e)).splitlines()[0]}")


def _family_of(layers: list[tuple[str, Any]]) -> tuple[str, str]:
    family, origin = None, None
    for where, cfg in layers:
        model = cfg.get("model") if isinstance(cfg, (dict, DictConfig)) else None
        if isinstance(model, (dict, DictConfig)) and "family" in model:
            family, origin = model["family"], where
    if family is None:
        raise UserError(f"{layers[-1][0]}: missing required key 'model.family'")
    return family, origin


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise UserError(f"command line: override '{o}' must look like key=value")
        if o.split("=", 1)[0].strip() == "base":
            raise UserError("command line: 'base' cannot be overridden; write a recipe that extends it")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise UserError(f"command line: cannot parse overrides: {str(e).splitlines()[0]}")


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), check_files: bool = True) -> DictConfig:
    """Reads, merges, overrides and validates a recipe; returns a read-only DictConfig.
    `check_files=False` skips the check that data.path exists (tools that only build models)."""
    from .models import model_schema  # the registry (lazy: families import torch)

    chain = [(str(p), OmegaConf.create(d)) for p, d in _chain(Path(path))]
    layers = chain + [("command line", _parse_overrides(list(overrides)))]
    family, origin = _family_of(layers)
    schema_cls = model_schema(family, origin)
    schema = OmegaConf.structured(Recipe(model=schema_cls()))
    merged = schema
    for where, cfg in layers:
        try:
            merged = OmegaConf.merge(merged, cfg)
        except OmegaConfBaseException as e:
            raise _explain(e, where, schema) from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise UserError(f"{layers[-2][0]}: missing required value for key '{missing[0]}'")
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, layers[-2][0], schema) from None
    _check(merged, layers[-2][0], check_files)
    OmegaConf.set_readonly(merged, True)
    return merged


def _check(r: DictConfig, where: str, check_files: bool = True) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(r, key)
        if value not in allowed:
            raise UserError(f"{where}: key '{key}' is {value!r}; expected one of {', '.join(map(str, allowed))}")
    _check_ranges(r, where, RANGES)
    from .models import family_module

    fam = family_module(r.model.family, where)
    _check_ranges(r.model, where, getattr(fam, "RANGES", {}), "model.")
    if r.data.channels not in (1, 3):
        raise UserError(f"{where}: key 'data.channels' is {r.data.channels}; expected 1 (grey) or 3 (RGB)")
    stages = getattr(fam.Task, "zero_stages", (0, 1, 2, 3))
    if r.engine.zero_stage not in stages:
        why = getattr(fam.Task, "zero_stages_why", "")
        raise UserError(f"{where}: key 'engine.zero_stage' is {r.engine.zero_stage}; family {r.model.family!r} "
                        f"supports ZeRO {', '.join(map(str, stages))}{' (' + why + ')' if why else ''}")
    if check_files and not Path(r.data.path).is_file():
        raise UserError(f"{where}: key 'data.path' names a file that does not exist: {r.data.path} "
                        "(write it with tools/write_ffcv.py)")
    if r.engine.offload_optimizer and r.engine.zero_stage == 0:
        raise UserError(f"{where}: key 'engine.offload_optimizer' needs engine.zero_stage >= 1")


def to_yaml(recipe: DictConfig) -> str:
    return OmegaConf.to_yaml(recipe, resolve=True)


# Keys that change what is logged, kept or shown, but not the numbers a run computes: they may
# change between a checkpoint and its resume. Every other key must match (train.resume_changed).
NOT_TRAINING = ("run.dir", "launcher.", "train.progress", "train.log_every", "train.eval_every",
                "train.sample_every", "train.num_samples", "train.sample_temperature", "train.checkpoint_every",
                "train.keep_checkpoints", "train.resume_changed", "train.debug.", "data.workers",
                "data.eval_batch_size", "data.path", "train.fid_every", "train.fid_samples", "eval.")


def _flatten(d: Any, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def training_keys(recipe: DictConfig) -> dict:
    """dotted key -> value of every key that must match for a resumed run to continue exactly."""
    flat = _flatten(OmegaConf.to_container(recipe, resolve=True))
    return {k: v for k, v in flat.items() if not any(k == x or (x.endswith(".") and k.startswith(x))
                                                      for x in NOT_TRAINING)}


def recipe_hash(recipe: DictConfig) -> str:
    """A hash of the training keys (what a checkpoint records to recognise its recipe)."""
    return hashlib.sha256(json.dumps(training_keys(recipe), sort_keys=True, default=str).encode()).hexdigest()[:16]


def as_dict(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def engine_config(recipe: DictConfig, name: str, family_defaults: dict | None = None,
                  where: str = "recipe") -> DictConfig:
    """Engine `name`'s settings: the shared `engine:` block, then the family's defaults for that
    engine, then the recipe's `engine.engines.<name>`; unknown keys are errors."""
    e = recipe.engine
    base = OmegaConf.structured(PerEngineConfig)
    base = OmegaConf.merge(base, {"optimizer": e.optimizer, "schedule": e.schedule, "clip": e.clip})
    layers = [(f"family default for engine {name!r}", family_defaults or {})]
    if name in e.engines:
        layers.append((f"{where}: engine.engines.{name}", e.engines[name]))
    for what, layer in layers:
        try:
            base = OmegaConf.merge(base, layer)
        except OmegaConfBaseException as ex:
            key = getattr(ex, "full_key", "?")
            raise UserError(f"{what}: key '{key}' is not a per-engine setting (optimizer, schedule, clip, "
                            f"start_step) or has the wrong type") from None
    per = OmegaConf.to_container(base, resolve=True)
    full = OmegaConf.merge(OmegaConf.to_container(e, resolve=True), {k: per[k] for k in ("optimizer", "schedule", "clip")})
    full = OmegaConf.create({**OmegaConf.to_container(full), "start_step": per["start_step"]})
    for key, allowed in (("optimizer.name", CHOICES["engine.optimizer.name"]),
                         ("schedule.decay", CHOICES["engine.schedule.decay"])):
        if OmegaConf.select(full, key) not in allowed:
            raise UserError(f"{where}: engine {name!r}: key '{key}' is {OmegaConf.select(full, key)!r}; "
                            f"expected one of {', '.join(allowed)}")
    _check_ranges(full, f"{where}: engine {name!r}", ENGINE_RANGES)
    OmegaConf.set_readonly(full, True)
    return full
