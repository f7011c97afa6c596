"""Reconstruction quality of a stage-1 (VQGAN / VQ-VAE) run, every image of a split once (also
under torchrun).

    python tools/eval_recon.py RUN_OR_CKPT [--split val] [--batch-size B] [--data OTHER.beton]

L1, MSE and PSNR with pixels in [0, 1] (PSNR = 10 log10(1 / MSE) per image, then averaged), LPIPS
(VGG, v0.1) when its VGG16 weights are found (else left out, with the reason), codebook usage (the
fraction of codes the split uses) and perplexity; mean +- standard error over the images.
Writes `<checkpoint>.recon-<split>.json` beside the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.errors import UserError, run_cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--split", default="val", help="val (default), train or all")
    p.add_argument("--batch-size", type=int, default=0, help="images per forward pass (data.eval_batch_size)")
    p.add_argument("--data", default="", help="another .beton of the same shape (default: the recipe's)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", default="", help="JSON path (default: beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from framework.config import AT_LEAST_0, check_flags

    check_flags(a, {"batch_size": AT_LEAST_0})
    from framework.eval.checkpoints import finish, load
    from framework.eval.recon import check_family, evaluate_recon
    from framework.losses import LPIPS

    loaded = load(a.path, ema=not a.no_ema, frozen=False)
    check_family(loaded, "eval_recon.py")
    lp = loaded.recipe.model.lpips
    lpips, why = None, ""
    try:
        lpips = LPIPS(lp.vgg_weights, lp.heads).to(loaded.device)
    except UserError as e:
        why = str(e)
    r = evaluate_recon(loaded, lpips, a.split, a.batch_size, a.data, not a.no_progress)
    r["lpips_vgg"] = ("random weights (model.lpips.vgg_weights: random): not comparable" if lp.vgg_weights == "random"
                      else (lp.vgg_weights or "torch hub cache") if lpips is not None else f"not computed: {why}")
    if loaded.env.is_main:
        out = Path(a.out) if a.out else loaded.path.with_name(f"{loaded.path.name}.recon-{a.split}.json")
        out.write_text(json.dumps(r, indent=1))
        lines = [f"{loaded.describe()}",
                 f"split {r['split']} | {r['images']} images | {r['num_bits']}-bit | {r['codes']} codes on a "
                 f"{r['grid'][0]} x {r['grid'][1]} grid | world {r['world_size']} | {r['seconds']:.1f} s"]
        for k, unit in (("l1", ""), ("mse", ""), ("psnr", " dB"), ("lpips", "")):
            if k in r:
                lines.append(f"{k:<6} {r[k]:.5f} +- {r[k + '_se']:.5f}{unit}")
        lines += [f"lpips  {r['lpips_vgg']}" if "lpips" not in r or lp.vgg_weights == "random" else "",
                  f"codebook usage {r['usage']:.4f} | perplexity {r['perplexity']:.1f}", f"wrote {out}"]
        print("\n".join(ln for ln in lines if ln), flush=True)
    finish(loaded.env)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
