"""Sampling speed: ms/image and images/s per batch size, the plain model against its fast path.

    python tools/profile_sampling.py RUN_OR_CKPT_OR_RECIPE [--batch-sizes 1,4,16,36] [--temperature 1.0]
                                     [--repeats 10] [--precision fp32|bf16] [--json OUT]

A recipe (.yaml) times its architecture with random weights. Each batch size runs `--warmup`
untimed passes, then `--repeats` timed ones (median, min, max; CUDA synchronised). A pass is one
prior sample of the whole batch and the draw from the output distribution. The fast path
(BatchNorm folded into the convolutions, weight normalisation precomputed, framework/models/nvae/
fast.py) runs on the same noise; the largest difference of its samples from the plain model's is
reported next to the times. Prints a table and one JSON object.

A prior over codes (family prior) is timed as tokens/s of the code sampler and ms/image
including the first stage's decode, the static-KV-cache sampler against the uncached one (a full
forward per code, as taming's `sample`) in the same run, on the same uniforms (the share of equal
codes is reported). Its options: --top-k (default 250 here, taming's), --top-p, --grid H,W (a larger
grid: the cached sliding window against taming's window rule), --tokens N (time the first N codes
of each grid only: the uncached sampler of a large prior takes minutes per grid; its cost grows
with the position, so a prefix flatters it), --first-stage (a stage-1 run or recipe to decode
with), --no-uncached, and key=value overrides of a recipe.

    python tools/profile_sampling.py recipes/prior/faceshq256_gpt.yaml --first-stage recipes/vqgan/faceshq256.yaml
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
    p.add_argument("--batch-sizes", default="", help="default 1,4,16,36 (priors: 1,8)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=None, help="default 10 (priors: 3)")
    p.add_argument("--warmup", type=int, default=None, help="default 2 (priors: 1)")
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fast", action="store_true", help="time the plain model only")
    p.add_argument("--json", default="", help="also write the JSON object here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides of a recipe (priors)")
    p.add_argument("--top-k", type=int, default=None, help="priors: default 250 (taming's), at most the vocabulary")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--grid", default="")
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--first-stage", default="")
    p.add_argument("--no-uncached", action="store_true")
    a = p.parse_intermixed_args(argv)
    from framework.config import AT_LEAST_0, AT_LEAST_1, POSITIVE, SEED, check_flags

    check_flags(a, {"temperature": POSITIVE, "repeats": AT_LEAST_1, "warmup": AT_LEAST_0, "seed": SEED})
    from framework.eval.checkpoints import load
    from framework.eval.sampling import format_table, profile_sampling
    from framework.task import CodePrior, has

    from framework.task import PriorSampling, require

    loaded = load(a.path, overrides=a.overrides, frozen=False)
    require(loaded.task, (PriorSampling, CodePrior), f"{loaded.path}: profile_sampling.py")
    if has(loaded.task, CodePrior):
        return profile_prior(loaded, a)
    if a.overrides:
        raise UserError(f"overrides {' '.join(a.overrides)}: only for priors over codes (family prior)")
    loaded.add_frozen()
    r = profile_sampling(loaded, ints(a.batch_sizes or "1,4,16,36"), a.temperature,
                         10 if a.repeats is None else a.repeats, 2 if a.warmup is None else a.warmup, a.precision, a.seed,
                         not a.no_fast, not a.no_progress)
    if loaded.env.is_main:
        print(f"{loaded.describe()}\n{r['device_name']} ({r['device']}, {r['threads']} threads) | {r['precision']} | "
              f"t={r['temperature']:g} | {r['warmup']} warm-up + {r['repeats']} timed passes | channels_last "
              f"{r['channels_last']} | torch {r['torch']}\n{format_table(r)}")
        if r["max_abs_diff_fast_vs_plain"]:
            print("fast vs plain, largest sample difference: " +
                  ", ".join(f"batch {b}: {d:.1e}" for b, d in r["max_abs_diff_fast_vs_plain"].items()))
    return emit(loaded, r, a)


def emit(loaded, r: dict, a) -> int:
    """The JSON object on stdout (and in --json) from rank 0; then the process group ends."""
    from framework.eval.checkpoints import finish

    if loaded.env.is_main:
        text = json.dumps(r)
        print(text, flush=True)
        if a.json:
            Path(a.json).write_text(text)
    finish(loaded.env)
    return 0


def profile_prior(loaded, a) -> int:
    from framework.config import Range, check_flags
    from framework.eval.tokens import format_token_table, parse_grid, profile_tokens
    from framework.models.prior.sampling import SamplingConfig

    check_flags(a, {"top_k": Range(0), "top_p": Range(0, 1, lo_open=True), "tokens": Range(0)})
    task = loaded.task
    if a.first_stage or loaded.recipe.model.first_stage:
        task.load_first_stage(a.first_stage)
    top_k = min(250, loaded.recipe.model.vocab_size) if a.top_k is None else a.top_k
    s = SamplingConfig(a.temperature, top_k, a.top_p, 1.0)
    bs = ints(a.batch_sizes or "1,8")
    r = profile_tokens(loaded, bs, s, 3 if a.repeats is None else a.repeats, 1 if a.warmup is None else a.warmup,
                       a.precision, a.seed, parse_grid(a.grid), not a.no_uncached, not a.no_progress, a.tokens)
    if loaded.env.is_main:
        print(f"{loaded.describe()}\n{r['device_name']} ({r['device']}, {r['threads']} threads) | {r['precision']} | "
              f"{r['arch']} {r['parameters']:,} parameters | grid {r['grid'][0]}x{r['grid'][1]}"
              f"{' (sliding window over ' + 'x'.join(map(str, r['trained_grid'])) + ')' if r['window'] else ''} | "
              f"{r['timed_tokens']} codes timed per grid | t={r['temperature']:g} top-k {r['top_k'] or 'off'} "
              f"top-p {r['top_p']:g} | decode {'through ' + str(r['first_stage']) if r['decode'] else ('not timed (a partial grid)' if r['timed_tokens'] < r['tokens_per_image'] else 'none (no first stage)')}"
              f" | {r['warmup']} warm-up + {r['repeats']} timed passes | torch {r['torch']}\n{format_token_table(r)}")
    return emit(loaded, r, a)


if __name__ == "__main__":
    sys.exit(run_cli(main))
