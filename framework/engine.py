"""DeepSpeed engines built from a recipe's `engine:` block.

Each engine gets a client optimizer (torch's AdamW or Adamax, so nothing is JIT-compiled)
whose class is extended with a *skip gate*: just before the parameters would change, the
gate reads the global gradient norm (the one DeepSpeed's ZeRO/bf16/fp16 wrapper has just
computed, or its own on ZeRO-0 fp32 where gradients are whole on every rank) and refuses the
update when it, or the loss, is non-finite or above the recipe's threshold. Every rank sees
the same norm, so every rank takes the same decision, on every ZeRO stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from .errors import UserError

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax, "adam": torch.optim.Adam}


@dataclass
class GateDecision:
    grad_norm: float
    skip: bool
    reason: str = ""


class _SkipGate:
    """Mixed into the client optimizer's class; see the module docstring."""

    _owner = None  # DeepSpeed's wrapper optimizer when there is one (it computes the norm)
    _clip = 0.0  # clipping done here when there is no wrapper (ZeRO-0 fp32)
    _threshold = 0.0
    _force_skip = ""
    _decision: GateDecision | None = None

    def arm(self, force_skip: str = "") -> None:
        self._force_skip = force_skip
        self._decision = None
        if self._owner is not None and hasattr(self._owner, "_global_grad_norm"):
            self._owner._global_grad_norm = None

    def _local_norm(self) -> float:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _decide(self) -> GateDecision:
        norm = getattr(self._owner, "_global_grad_norm", None) if self._owner is not None else None
        if norm is None:
            norm = self._local_norm()
            if self._clip > 0 and math.isfinite(norm) and norm > self._clip:
                scale = self._clip / (norm + 1e-6)
                for g in self.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            p.grad.mul_(scale)
        norm = float(norm)
        if self._force_skip:
            return GateDecision(norm, True, self._force_skip)
        if not math.isfinite(norm):
            return GateDecision(norm, True, "grad_norm_nonfinite")
        if self._threshold > 0 and norm > self._threshold:
            return GateDecision(norm, True, "grad_norm_above_threshold")
        return GateDecision(norm, False)

    def step(self, closure=None):
        # ZeRO-3 calls step once per parameter sub-group: decide once per update.
        if self._decision is None:
            self._decision = self._decide()
        if self._decision.skip:
            return None
        return super().step(closure)


def gated(cls):
    return type(f"Gated{cls.__name__}", (_SkipGate, cls), {})


def lr_at(step: int, cfg: DictConfig, total_steps: int) -> float:
    """Linear warm-up to optimizer.lr, then cosine to schedule.min_lr at total_steps."""
    base, s = cfg.optimizer.lr, cfg.schedule
    if s.warmup_steps > 0 and step < s.warmup_steps:
        return base * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return base
    span = max(1, total_steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr + 0.5 * (base - s.min_lr) * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: DictConfig, micro_batch: int, world_size: int, has_wrapper_clip: bool) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.clip if has_wrapper_clip else 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds["zero_force_ds_cpu_optimizer"] = False
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return ds


@dataclass
class Engine:
    """A DeepSpeed engine with its gated optimizer and learning-rate schedule."""

    name: str
    ds: object  # deepspeed.DeepSpeedEngine
    gate: _SkipGate
    cfg: DictConfig
    total_steps: int
    last: GateDecision | None = field(default=None)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def set_lr(self, step: int, lr: float | None = None) -> float:
        """Sets the learning rate of `step`: `lr` when given, else the recipe's schedule."""
        lr = lr_at(step, self.cfg, self.total_steps) if lr is None else float(lr)
        for g in self.ds.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # a group's own multiple (GLO: the generator's 0.1)
        return lr

    @torch.no_grad()
    def edit_(self, param: torch.nn.Parameter, fn) -> None:
        """Replaces a parameter's value by fn(its whole fp32 value) between steps, on every ZeRO stage
        and precision: the optimizer's fp32 master (ZeRO-1/2/3, bf16) and the module's copy both
        change, on every rank (GLO's projection of the codes onto the sphere). Call on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        if hasattr(param, "ds_id"):  # ZeRO-3: a partition here, the fp32 master in the optimizer
            import deepspeed

            new = fn(safe_get_full_fp32_param(param))
            safe_set_full_fp32_param(param, new)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(new.to(param.dtype))
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2 or DeepSpeed's bf16 optimizer
            new = fn(safe_get_full_fp32_param(param))
            safe_set_full_fp32_param(param, new)
            param.data.copy_(new.to(param.dtype))
        else:  # the torch optimizer holds the module's parameters
            param.data.copy_(fn(param.data.float()).to(param.dtype))

    def reset_optimizer_state(self) -> None:
        """Forgets the optimizer's moments (re-created at the next update), as PGGAN does at each new
        resolution; the client optimizer is the innermost one on every ZeRO stage and precision."""
        self.gate.state.clear()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self, boundary: bool, force_skip: str = "") -> GateDecision | None:
        """DeepSpeed's step; at an accumulation boundary returns what happened to the update."""
        if not boundary:
            self.ds.step()
            return None
        self.gate.arm(force_skip)
        self.ds.step()
        decision = self.gate._decision
        if decision is None:  # DeepSpeed's wrapper found an overflow and skipped by itself
            norm = getattr(self.ds.optimizer, "_global_grad_norm", None)
            decision = GateDecision(float("inf") if norm is None else float(norm), True, "overflow")
        self.last = decision
        return decision


def build_engine(name: str, module: torch.nn.Module, cfg: DictConfig, micro_batch: int, world_size: int,
                 total_steps: int, threshold: float = 0.0, param_groups=None) -> Engine:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if cfg.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise UserError(f"engine.precision: fp16 is not supported by DeepSpeed's "
                        f"{get_accelerator().device_name()} accelerator on this machine; use bf16 or fp32")
    if cfg.precision == "bf16" and not get_accelerator().is_bf16_supported():
        raise UserError(f"engine.precision: bf16 is not supported by DeepSpeed's "
                        f"{get_accelerator().device_name()} accelerator on this machine; use fp32")
    if cfg.optimizer.lr_per_image > 0:  # taming's lr = base_lr x global batch
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(cfg, {"optimizer": {"lr": cfg.optimizer.lr_per_image * micro_batch * cfg.grad_accum
                                                  * world_size}})
        OmegaConf.set_readonly(cfg, True)
    opt_cfg = cfg.optimizer
    cls = gated(OPTIMIZERS[opt_cfg.name])
    params = param_groups if param_groups is not None else [p for p in module.parameters() if p.requires_grad]
    optimizer = cls(params, lr=lr_at(0, cfg, total_steps), betas=tuple(opt_cfg.betas), eps=opt_cfg.eps,
                    weight_decay=opt_cfg.weight_decay)
    wrapped = cfg.zero_stage > 0 or cfg.precision != "fp32"
    ds_cfg = deepspeed_config(cfg, micro_batch, world_size, has_wrapper_clip=wrapped)
    engine, ds_opt, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg,
                                                dist_init_required=False)
    optimizer._owner = ds_opt if ds_opt is not optimizer else None
    optimizer._clip = 0.0 if optimizer._owner is not None else cfg.clip
    optimizer._threshold = threshold
    return Engine(name, engine, optimizer, cfg, total_steps)


def compute_dtype(cfg: DictConfig) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
