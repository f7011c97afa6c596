"""Encode every image of a .beton with a stage-1 (VQGAN / VQ-VAE) model into a code .beton that a
prior trains from (also under torchrun: each image once, on one rank).

    python tools/encode_codes.py RUN_OR_CKPT DATA.beton OUT.beton [--flip] [--batch-size B] [--overwrite]

OUT.beton rows follow DATA.beton's: `codes` (the (h, w) grid of indices, int16; int32 above 32,768
codes), `codes_flipped` (with --flip: the grid of the mirrored image), `label`, `split`,
`source_index`. OUT.beton.json records the vocabulary, the grid, the checkpoint and the source.
Written under a temporary name and renamed.
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
    p.add_argument("data", help="the image .beton to encode")
    p.add_argument("out", help="the code .beton to write")
    p.add_argument("--flip", action="store_true", help="also the codes of each image mirrored left-right")
    p.add_argument("--batch-size", type=int, default=0, help="images per forward pass (data.eval_batch_size)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from framework.config import AT_LEAST_0, check_flags

    check_flags(a, {"batch_size": AT_LEAST_0})
    from framework.eval.checkpoints import finish, load
    from framework.eval.recon import check_family, encode_codes

    loaded = load(a.path, ema=not a.no_ema, frozen=False)
    check_family(loaded, "encode_codes.py")
    r = encode_codes(loaded, a.data, a.out, a.flip, a.batch_size, a.overwrite, not a.no_progress)
    if loaded.env.is_main:
        print(f"{loaded.describe()}\nwrote {a.out}: {r['images']} grids of {r['grid'][0]} x {r['grid'][1]} "
              f"({r['codes']} codes, {r['dtype']}{', with flipped twins' if r['flip'] else ''}) from {r['source']} | "
              f"world {r['world_size']} | {r['seconds']:.1f} s; metadata {a.out}.json", flush=True)
    finish(loaded.env)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
