"""Sample grids as PNG, one per temperature (the same noise at every temperature).

    python tools/sample.py RUN_OR_CKPT [--n 64] [--temperatures 0.6,0.8,1.0] [--out grid.png] [--seed 0]

A stage-1 model (vqgan), which has no prior to sample from, gets a reconstruction grid instead:
n validation images (spread over the split) in rows of 8, each row above its reconstruction through the codes
(RUN_DIR/samples/<checkpoint>_recon-val.png).

Default output: RUN_DIR/samples/<checkpoint>_t<T>.png; with --out and several temperatures,
grid_t0.6.png, grid_t0.8.png, ... The run's EMA weights are used when it kept them; for NVAE,
give the `_bn-t…` checkpoint of tools/recalibrate_bn.py for the samples the paper shows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.errors import UserError, run_cli  # noqa: E402


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--temperatures: expected numbers like 0.6,0.8,1.0, got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--n", type=int, default=64, help="samples per grid (64)")
    p.add_argument("--temperatures", default="0.6,0.8,1.0")
    p.add_argument("--out", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    a = p.parse_args(argv)
    from framework.config import Range, SEED, check_flags

    check_flags(a, {"n": Range(1, 4096), "seed": SEED})
    from framework.eval.checkpoints import finish, load
    from framework.eval.sampling import check_temperatures, recon_grid, sample_grids
    from framework.task import Codes, Samples, has

    temps = check_temperatures(floats(a.temperatures))
    loaded = load(a.path, ema=not a.no_ema, frozen=False)
    if not has(loaded.task, Samples) and has(loaded.task, Codes):
        path = recon_grid(loaded, a.n, a.out or None)
        if loaded.env.is_main:
            print(f"{loaded.describe()}\n{a.n} validation images above their reconstructions -> {path}")
        finish(loaded.env)
        return 0
    loaded.add_frozen()
    paths = sample_grids(loaded, a.n, temps, a.out or None, a.seed)
    if loaded.env.is_main:
        print(loaded.describe())
        for t, path in zip(temps, paths):
            print(f"t={t:g}: {a.n} samples -> {path}")
    finish(loaded.env)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
