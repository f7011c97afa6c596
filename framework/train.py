"""`python -m framework.train RECIPE [key=value ...]` — also under torchrun and slurm/launch.py.

Exit status: 0 done, 2 bad input (one line naming the file/key), 3 aborted (too many skipped
updates), 75 checkpointed after SIGUSR2/SIGTERM and waiting to be requeued.
"""
from __future__ import annotations

import argparse
import sys

from .errors import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m framework.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipes/<family>/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=200 engine.zero_stage=2")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from .config import load_recipe

    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)  # validated before anything is written
    from .trainer import train

    return train(recipe)


if __name__ == "__main__":
    sys.exit(run_cli(main))
