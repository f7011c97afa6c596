"""Sample grids as PNG, one per temperature (the same noise at every temperature).

    python tools/sample.py RUN_OR_CKPT [--n 64] [--temperatures 0.6,0.8,1.0] [--out grid.png] [--seed 0]

A prior over codes (family prior) draws code grids and decodes them through its frozen first stage
(model.first_stage); class-conditional priors put class c in column c. Its options:

    --top-k K --top-p P        filter the logits (default: the recipe's model.sampling)
    --guidance S               classifier-free guidance scale (class-conditional priors)
    --grid H,W                 a grid larger than the training one, by taming's sliding-window rule
                               (e.g. 32,32 codes = 512 px from a 256 px model)
    --codes-out FILE.npz       also save the code grids (temperatures x n x H x W) and the settings

A family that walks between latent codes (glann) also writes an interpolation grid:

    --interpolations P         rows, each from one code (or noise vector) to another (default 8; 0: none)
    --interp-steps S           images per row (default 8) -> RUN_DIR/samples/<checkpoint>_interp.png

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
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--grid", default="", help="H,W code grid (priors; default: the training grid)")
    p.add_argument("--codes-out", default="")
    p.add_argument("--first-stage", default="", help="decode with this stage-1 run instead of model.first_stage")
    p.add_argument("--interpolations", type=int, default=8, help="interpolation rows (families with codes; 0: none)")
    p.add_argument("--interp-steps", type=int, default=8)
    p.add_argument("--no-progress", action="store_true", help="(accepted for symmetry with the other tools)")
    a = p.parse_args(argv)
    from framework.config import Range, SEED, check_flags

    check_flags(a, {"n": Range(1, 4096), "seed": SEED, "top_k": Range(1), "top_p": Range(0, 1, lo_open=True),
                    "guidance": Range(0), "interpolations": Range(0, 4096), "interp_steps": Range(2, 64)})
    from framework.eval.checkpoints import finish, load
    from framework.eval.sampling import check_temperatures, interpolation_grid, recon_grid, sample_grids
    from framework.task import CodePrior, Codes, Interpolates, Samples, has

    temps = check_temperatures(floats(a.temperatures))
    loaded = load(a.path, ema=not a.no_ema, frozen=False)
    if has(loaded.task, CodePrior):
        return sample_prior(loaded, a, temps)
    if any(v is not None for v in (a.top_k, a.top_p, a.guidance)) or a.grid or a.codes_out or a.first_stage:
        raise UserError(f"{loaded.path}: --top-k, --top-p, --guidance, --grid, --codes-out and --first-stage are "
                        f"for priors over codes (family prior), not {loaded.family!r}")
    if not has(loaded.task, Samples) and has(loaded.task, Codes):
        path = recon_grid(loaded, a.n, a.out or None)
        if loaded.env.is_main:
            print(f"{loaded.describe()}\n{a.n} validation images above their reconstructions -> {path}")
        finish(loaded.env)
        return 0
    loaded.add_frozen()
    paths = sample_grids(loaded, a.n, temps, a.out or None, a.seed)
    interp = (interpolation_grid(loaded, a.interpolations, a.interp_steps, a.out or None, a.seed)
              if a.interpolations and has(loaded.task, Interpolates) else None)
    if loaded.env.is_main:
        print(loaded.describe())
        for t, path in zip(temps, paths):
            print(f"t={t:g}: {a.n} samples -> {path}")
        if interp:
            print(f"{a.interpolations} interpolations of {a.interp_steps} steps -> {interp}")
    finish(loaded.env)
    return 0


def sample_prior(loaded, a, temps) -> int:
    import dataclasses

    from framework.eval.checkpoints import finish
    from framework.eval.tokens import sample_prior_grids

    task = loaded.task
    task.load_first_stage(a.first_stage)
    loaded.frozen = {"first_stage": task.first.module}
    s = task.sampling
    s = dataclasses.replace(s, top_k=s.top_k if a.top_k is None else a.top_k,
                            top_p=s.top_p if a.top_p is None else a.top_p,
                            guidance=s.guidance if a.guidance is None else a.guidance)
    from framework.eval.tokens import parse_grid

    grid = parse_grid(a.grid)
    m = loaded.recipe.model
    paths = sample_prior_grids(loaded, a.n, temps, s, grid, a.out or None, a.seed, a.codes_out or None,
                               m.n_classes or None)
    if loaded.env.is_main:
        g = grid or task.grid
        print(f"{loaded.describe()}\nfirst stage {task.first.path} | {g[0]}x{g[1]} codes"
              f"{' (sliding window over the ' + 'x'.join(map(str, task.grid)) + ' training grid)' if grid and tuple(grid) != tuple(task.grid) else ''}"
              f" | top-k {s.top_k or 'off'} | top-p {s.top_p:g} | guidance {s.guidance:g}")
        for t, path in zip(temps, paths):
            print(f"t={t:g}: {a.n} samples -> {path}")
        if a.codes_out:
            print(f"codes -> {a.codes_out}")
    finish(loaded.env)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
