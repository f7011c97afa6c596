"""What a recipe builds, without data or a GPU: parameters, the family's own figures (for NVAE:
latent groups per scale, latent dimensions, BatchNorm layers, regularised convolutions), and an
estimate of the activation memory of one training forward pass.

    python tools/model_summary.py RECIPE [key=value ...] [--batch B] [--json]

The model is built on PyTorch's meta device (no memory, no time), and one forward pass at batch
B (default: the recipe's data.batch_size) is traced with hooks. Activation memory is estimated
as the bytes of every leaf module's output (what autograd keeps, roughly), at the recipe's
precision; with `engine.activation_checkpointing: blocks` only each block's output is kept,
plus the largest block while it is recomputed. (framework/summary.py does the work.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.config import load_recipe  # noqa: E402
from framework.errors import run_cli  # noqa: E402
from framework.summary import summarize  # noqa: E402


def gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batch", type=int, default=0, help="images per forward (default: data.batch_size)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (bytes) instead of a table")
    args = ap.parse_intermixed_args(argv)
    from framework.config import AT_LEAST_0, check_flags

    check_flags(args, {"batch": AT_LEAST_0})
    r = load_recipe(args.recipe, args.overrides, check_files=False)
    out = {"recipe": str(args.recipe), **summarize(r, args.batch)}
    if args.json:
        print(json.dumps(out))
        return 0
    width = max(len(k) for k in out) + 2
    for k, v in out.items():
        if k == "parameters":
            v = ", ".join(f"{n} {c:,}" for n, c in v.items())
        elif k == "activation_estimate":
            v = "; ".join(f"{n} at batch {e['batch']} {e['precision']}: {gib(e['without_checkpointing'])} "
                          f"(checkpointing blocks: {gib(e['with_checkpointing_blocks'])})"
                          for n, e in v.items()) or "n/a"
        elif isinstance(v, list) and v and all(isinstance(row, dict) for row in v):  # a table (PGGAN's schedule)
            print(f"{k}:")
            cols = list(v[0])
            cells = [[str(c) for c in cols]] + [[f"{row.get(c)}" for c in cols] for row in v]
            widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
            for r in cells:
                print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
            continue
        print(f"{k + ':':<{width}} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
