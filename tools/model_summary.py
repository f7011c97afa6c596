"""What a recipe builds, without data or a GPU: parameters, the family's own figures (for NVAE:
latent groups per scale, latent dimensions, BatchNorm layers, regularised convolutions), and an
estimate of the activation memory of one training forward pass.

    python tools/model_summary.py RECIPE [key=value ...] [--batch B] [--json]

The model is built on PyTorch's meta device (no memory, no time), and one forward pass at batch
B (default: the recipe's data.batch_size) is traced with hooks. Activation memory is estimated
as the bytes of every leaf module's output (what autograd keeps, roughly), at the recipe's
precision; with `engine.activation_checkpointing: blocks` only each block's output is kept,
plus the largest block while it is recomputed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from framework.activation_checkpoint import Checkpointed  # noqa: E402
from framework.config import load_recipe  # noqa: E402
from framework.distributed import DistEnv  # noqa: E402
from framework.errors import run_cli  # noqa: E402
from framework.models import build_task  # noqa: E402


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
        if isinstance(m, Checkpointed):
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


def gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batch", type=int, default=0, help="images per forward (default: data.batch_size)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_intermixed_args(argv)
    r = load_recipe(args.recipe, args.overrides, check_files=False)
    batch = args.batch or r.data.batch_size
    elem = 4 if r.engine.precision == "fp32" else 2
    with torch.device("meta"):
        task = build_task(r, DistEnv(0, 0, 1, "127.0.0.1", 0, "single"))
        modules = task.modules()
    out = {"recipe": str(args.recipe), "family": r.model.family,
           "input": f"{r.data.channels}x{r.data.resolution}x{r.data.resolution}, {r.data.num_bits}-bit",
           "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in modules.items()},
           **task.summary(), "activation_estimate": {}}
    for n, m in modules.items():
        est = activation_bytes(task, n, m, batch, elem)
        if est:
            out["activation_estimate"][n] = {"batch": batch, "precision": r.engine.precision,
                                             **{k: gib(v) for k, v in est.items()}}
    if args.json:
        print(json.dumps(out))
        return 0
    width = max(len(k) for k in out) + 2
    for k, v in out.items():
        if k == "parameters":
            v = ", ".join(f"{n} {c:,}" for n, c in v.items())
        elif k == "activation_estimate":
            v = "; ".join(f"{n} at batch {e['batch']} {e['precision']}: {e['without_checkpointing']} "
                          f"(checkpointing blocks: {e['with_checkpointing_blocks']})" for n, e in v.items()) or "n/a"
        print(f"{k + ':':<{width}} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
