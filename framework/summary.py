"""What a recipe builds, without data or a GPU (tools/model_summary.py is its command line)."""
from __future__ import annotations

import torch

from .activation_checkpoint import Checkpointed
from .distributed import DistEnv
from .models import build_task


def activation_bytes(task, name, module, batch: int, elem: int) -> dict | None:
    """Bytes kept for backward, estimated from one traced forward: every leaf module's output;
    with checkpointing, the leaves outside blocks, each block's output, and the largest block."""
    totals = {"leaves": 0, "inside_blocks": 0, "block_outputs": 0, "largest_block": 0}
    stack: list[int] = []

    def size(out) -> int:
        if isinstance(out, torch.Tensor):
            return out.numel() * elem
        if isinstance(out, (tuple, list)):
            return sum(size(o) for o in out)
        return 0

    def leaf(mod, inp, out):
        b = size(out)
        totals["leaves"] += b
        if stack:
            totals["inside_blocks"] += b
            stack[-1] += b

    def block_in(mod, inp):
        stack.append(0)

    def block_out(mod, inp, out):
        inside = stack.pop()
        if not stack:
            totals["block_outputs"] += size(out)
            totals["largest_block"] = max(totals["largest_block"], inside)

    hooks = []
    for m in module.modules():
        if isinstance(m, Checkpointed) or getattr(m, "checkpointed", False):  # a wrapper, or a block that checkpoints itself
            hooks += [m.register_forward_pre_hook(block_in), m.register_forward_hook(block_out)]
        elif not list(m.children()):
            hooks.append(m.register_forward_hook(leaf))
    try:
        with torch.no_grad():
            task.example_forward(name, module, batch, torch.device("meta"))
    except NotImplementedError:
        return None
    finally:
        for h in hooks:
            h.remove()
    kept = totals["leaves"] - totals["inside_blocks"] + totals["block_outputs"] + totals["largest_block"]
    return {"without_checkpointing": totals["leaves"], "with_checkpointing_blocks": kept}


def summarize(recipe, batch: int = 0) -> dict:
    """Parameters per module, the family's own figures, and activation estimates (bytes)."""
    batch = batch or recipe.data.batch_size
    elem = 4 if recipe.engine.precision == "fp32" else 2
    with torch.device("meta"):
        task = build_task(recipe, DistEnv(0, 0, 1, "127.0.0.1", 0, "single"))
        modules = task.modules()
    out = {"family": recipe.model.family,
           "input": f"{recipe.data.channels}x{recipe.data.resolution}x{recipe.data.resolution}, "
                    f"{recipe.data.num_bits}-bit",
           "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in modules.items()},
           **task.summary(), "activation_estimate": {}}
    for n, m in modules.items():
        est = activation_bytes(task, n, m, batch, elem)
        if est:
            out["activation_estimate"][n] = {"batch": batch, "precision": recipe.engine.precision, **est}
    return out
