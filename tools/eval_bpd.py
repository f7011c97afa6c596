"""Bits/dim by importance weighting, on every image of a split exactly once (also under torchrun).

    python tools/eval_bpd.py RUN_OR_CKPT [--split val] [--iw-samples 1000] [--batch-size B] [--chunk C]

log p(x) ~= logsumexp_k[log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K with z_k ~ q(z|x), in
nats and bits/dim = nats / (C H W ln 2); the ELBO from the same K samples. Mean +- standard error
over the images. K = 1000 is NVAE's setting for its reported figures. K is processed C samples at
a time (default: about twice the training batch of rows per forward pass) so memory stays bounded.
Writes `<checkpoint>.bpd-<split>-k<K>.json` beside the checkpoint.

A prior over codes (family prior) is scored exactly instead (its likelihood is a product of
softmaxes): the negative log-likelihood of every code grid of the split in bits per token
(nats / ln 2 per code) and bits per image (the sum over the grid, a property of the code grid,
not of pixels), written to `<checkpoint>.bits-<split>.json`; --iw-samples and --chunk do not apply.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--split", default="val", help="val (default) or train")
    p.add_argument("--iw-samples", type=int, default=1000, help="K, importance samples per image (1000)")
    p.add_argument("--batch-size", type=int, default=0, help="images per forward pass (data.eval_batch_size)")
    p.add_argument("--chunk", type=int, default=0, help="importance samples per forward pass (auto)")
    p.add_argument("--data", default="", help="another .beton of the same shape (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", default="", help="JSON path (default: beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from framework.config import AT_LEAST_0, AT_LEAST_1, SEED, check_flags

    check_flags(a, {"iw_samples": AT_LEAST_1, "batch_size": AT_LEAST_0, "chunk": AT_LEAST_0, "seed": SEED})
    from framework.eval.bpd import check_family, evaluate_bpd
    from framework.eval.checkpoints import finish, load
    from framework.task import CodePrior, has

    from framework.task import ImportanceWeights, require

    loaded = load(a.path, ema=not a.no_ema, frozen=False)
    require(loaded.task, (ImportanceWeights, CodePrior), f"{loaded.path}: eval_bpd.py")
    if has(loaded.task, CodePrior):
        return token_bits(loaded, a)
    loaded.add_frozen()
    check_family(loaded)
    r = evaluate_bpd(loaded, a.split, a.iw_samples, a.batch_size, a.chunk, a.seed, a.data, not a.no_progress)
    if loaded.env.is_main:
        out = Path(a.out) if a.out else loaded.path.with_name(f"{loaded.path.name}.bpd-{a.split}-k{a.iw_samples}.json")
        out.write_text(json.dumps(r, indent=1))
        bn = "recalibrated" if r["bn_recalibrated"] else "training statistics"
        print(f"{loaded.describe()}\nsplit {r['split']} | {r['images']} images | K={r['iw_samples']} (chunks of "
              f"{r['chunk']}) | {r['num_bits']}-bit | {r['dims']} dims | {r['likelihood']} | BN {bn} | "
              f"world {r['world_size']} | seed {r['seed']} | {r['seconds']:.1f} s\n"
              f"NLL  {r['bpd']:.4f} +- {r['bpd_se']:.4f} bits/dim ({r['nll_nats']:.3f} +- {r['nll_nats_se']:.3f} nats)\n"
              f"ELBO {r['elbo_bpd']:.4f} +- {r['elbo_bpd_se']:.4f} bits/dim ({r['nelbo_nats']:.3f} nats)\n"
              f"wrote {out}", flush=True)
    finish(loaded.env)
    return 0


def token_bits(loaded, a) -> int:
    from framework.eval.checkpoints import finish
    from framework.eval.tokens import evaluate_token_bits

    r = evaluate_token_bits(loaded, a.split, a.batch_size, a.data, not a.no_progress)
    if loaded.env.is_main:
        out = Path(a.out) if a.out else loaded.path.with_name(f"{loaded.path.name}.bits-{a.split}.json")
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(r, indent=1))
        tmp.replace(out)
        print(f"{loaded.describe()}\nsplit {r['split']} | {r['grids']} code grids of {r['tokens_per_grid']} codes "
              f"({r['vocab']} in the vocabulary; uniform: {r['uniform_bits_per_token']:.3f} bits per token) | "
              f"world {r['world_size']} | {r['seconds']:.1f} s\n"
              f"NLL {r['bits_per_token']:.4f} +- {r['bits_per_token_se']:.4f} bits per token\n"
              f"    {r['bits_per_image']:.1f} +- {r['bits_per_image_se']:.1f} bits per image (of the code grid, not of "
              f"pixels)\nwrote {out}", flush=True)
    finish(loaded.env)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
