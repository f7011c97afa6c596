"""FID, KID and precision/recall of a run's samples against its data set (also under torchrun / SLURM).

    python tools/eval_fid.py RUN_OR_CKPT [--n 50000] [--split train|val] [--temperature T]
                             [--batch-size B] [--metrics fid,kid,pr] [--recon] [--seed S]

Draws --n samples through the family's sampler (the EMA weights where the run kept them; for NVAE
give the `_bn-t…` checkpoint of tools/recalibrate_bn.py; a prior decodes through its first stage
and is scored against the first stage's images), converts them to uint8 as a saved PNG holds them
and scores them with torch-fidelity's FID Inception against the real images of the split. Block k
of B samples is drawn with a seed of (seed, k) on rank k mod world: 1 and N ranks score the same
samples. --recon (a stage-1 model: vqgan) scores the reconstructions of every image of the split
instead (rFID). Under torchrun, write --num-samples for --n (torchrun takes --n for one of its own
options).

The Inception weights are read from eval.inception_weights (default: the torch hub cache file
torch-fidelity downloads, checkpoints/weights-inception-2015-12-05-6726825d.pth), never downloaded;
`--inception-weights random` uses seeded random weights (a test stand-in: the figures are not FID).
The real images' statistics are cached beside the .beton (<beton>.fid-<split>-<net>.npz) and reused
until the file changes. Writes `<checkpoint>.fid-<split>-n<N>-t<T>.json` (or `.rfid-<split>.json`).
FID is biased upwards at small n: compare figures at the same n (the papers use 50,000).
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
    # --num-samples: the same flag for torchrun, whose parser reads --n as an abbreviation of its own options
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=50000,
                   help="samples to score (50000, the papers' n)")
    p.add_argument("--split", default="train", help="real images to score against: train (default), val or all")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="samples per block and images per forward pass (64)")
    p.add_argument("--metrics", default="fid,kid,pr")
    p.add_argument("--recon", action="store_true", help="score reconstructions of the split (stage-1 models: rFID)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception-weights", default=None, help="a file or 'random' (default: eval.inception_weights)")
    p.add_argument("--data", default="", help="another .beton of real images (default: the recipe's)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", default="", help="JSON path (default: beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from framework.config import AT_LEAST_1, Range, SEED, check_flags

    check_flags(a, {"n": Range(2), "batch_size": AT_LEAST_1, "seed": SEED, "temperature": Range(0, lo_open=True)})
    from framework.eval.checkpoints import finish, load
    from framework.eval.fid import (InceptionFeatures, _default_path_of, check_metrics, evaluate_samples,
                                    format_report, inception_setting)

    metrics = check_metrics(a.metrics)
    if a.path.endswith((".yaml", ".yml")) and not a.out:
        raise UserError(f"{a.path}: a recipe (random weights, for timing) needs --out FILE.json")
    loaded = load(a.path, ema=not a.no_ema)
    weights = a.inception_weights if a.inception_weights is not None else loaded.recipe.eval.inception_weights
    inception_setting(weights)  # a missing file: one line, before any sampling
    net = InceptionFeatures(weights, loaded.device)
    r = evaluate_samples(loaded, net, a.n, a.split, a.temperature, a.batch_size, metrics, a.recon, a.seed, a.data,
                         not a.no_progress)
    r["inception_weights"] = net.weights
    if loaded.env.is_main:
        out = Path(a.out) if a.out else _default_path_of(loaded, a.split, r["n"], a.temperature, a.recon)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(r, indent=1))
        tmp.replace(out)
        print(f"{loaded.describe()}\n{format_report(r)}\nwrote {out}", flush=True)
    finish(loaded.env)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
