"""Sampling speed: ms/image and images/s per batch size, the plain model against its fast path.

    python tools/profile_sampling.py RUN_OR_CKPT_OR_RECIPE [--batch-sizes 1,4,16,36] [--temperature 1.0]
                                     [--repeats 10] [--precision fp32|bf16] [--json OUT]

A recipe (.yaml) times its architecture with random weights. Each batch size runs `--warmup`
untimed passes, then `--repeats` timed ones (median, min, max; CUDA synchronised). A pass is one
prior sample of the whole batch and the draw from the output distribution. The fast path
(BatchNorm folded into the convolutions, weight normalisation precomputed, framework/models/nvae/
fast.py) runs on the same noise; the largest difference of its samples from the plain model's is
reported next to the times. Prints a table and one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.errors import UserError, run_cli  # noqa: E402


def ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes: expected integers like 1,4,16,36, got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run folder, a checkpoint folder, or a recipe (random weights)")
    p.add_argument("--batch-sizes", default="1,4,16,36")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fast", action="store_true", help="time the plain model only")
    p.add_argument("--json", default="", help="also write the JSON object here")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from framework.config import AT_LEAST_0, AT_LEAST_1, POSITIVE, SEED, check_flags

    check_flags(a, {"temperature": POSITIVE, "repeats": AT_LEAST_1, "warmup": AT_LEAST_0, "seed": SEED})
    from framework.eval.checkpoints import finish, load
    from framework.eval.sampling import format_table, profile_sampling

    loaded = load(a.path)
    r = profile_sampling(loaded, ints(a.batch_sizes), a.temperature, a.repeats, a.warmup, a.precision, a.seed,
                         not a.no_fast, not a.no_progress)
    if loaded.env.is_main:
        print(f"{loaded.describe()}\n{r['device_name']} ({r['device']}, {r['threads']} threads) | {r['precision']} | "
              f"t={r['temperature']:g} | {r['warmup']} warm-up + {r['repeats']} timed passes | channels_last "
              f"{r['channels_last']} | torch {r['torch']}\n{format_table(r)}")
        if r["max_abs_diff_fast_vs_plain"]:
            print("fast vs plain, largest sample difference: " +
                  ", ".join(f"batch {b}: {d:.1e}" for b, d in r["max_abs_diff_fast_vs_plain"].items()))
        text = json.dumps(r)
        print(text, flush=True)
        if a.json:
            Path(a.json).write_text(text)
    finish(loaded.env)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
