"""Re-estimate NVAE's BatchNorm statistics for sampling; writes a new checkpoint beside the source.

    python tools/recalibrate_bn.py RUN_OR_CKPT [--temperature 0.7] [--batch-size B] [--iters 500]
    torchrun --nproc_per_node=N tools/recalibrate_bn.py RUN_OR_CKPT ...   (statistics over all ranks)

Every BatchNorm that sampling reaches is reset and gets the exact pooled mean and variance of its
inputs over iters x batch x ranks prior samples at the temperature (a true average, not the
reference's leftover exponential one). Defaults are NVAE's evaluation: 500 iterations, t = 0.7,
the training batch size. The run's EMA weights are used when it kept them. The training
checkpoint is never modified; the result is `<checkpoint>_bn-t<T>` (model.pt, recipe.yaml,
eval.json with the settings), which eval_bpd.py, profile_sampling.py and sample.py accept. An
existing one is refused unless --overwrite, which also removes the figures written beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--temperature", type=float, default=0.7, help="prior temperature of the samples (0.7)")
    p.add_argument("--batch-size", type=int, default=0, help="samples per iteration and rank (training's)")
    p.add_argument("--iters", type=int, default=500, help="iterations (500, as NVAE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the trained weights even if the run kept an EMA")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing recalibrated checkpoint (and the results written beside it)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from framework.config import AT_LEAST_0, AT_LEAST_1, POSITIVE, SEED, check_flags

    check_flags(a, {"temperature": POSITIVE, "batch_size": AT_LEAST_0, "iters": AT_LEAST_1, "seed": SEED})
    from framework.eval.checkpoints import finish, load
    from framework.eval.recalibrate import bn_layers, recalibrate_checkpoint

    loaded = load(a.path, ema=not a.no_ema)
    bn_layers(loaded)  # the family check, before any work
    out, rec = recalibrate_checkpoint(loaded, a.temperature, a.batch_size, a.iters, a.seed, not a.no_progress,
                                      a.overwrite)
    if loaded.env.is_main:
        print(f"{loaded.describe()}\nrecalibrated {rec['layers_recalibrated']} BatchNorm layers "
              f"({rec['layers_kept']} not reached by sampling kept) | t={rec['temperature']:g} | "
              f"{rec['iters']} iters x batch {rec['batch_size']} x {rec['world_size']} ranks = {rec['samples']} "
              f"samples | {rec['seconds']:.1f} s\nwrote {out}", flush=True)
    finish(loaded.env)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
