"""Write a `Source` into a .beton file: fields `image` (RGB, jpg or raw), `label`, `split`.

Every image of a file source is decoded completely once before anything is written, so a bad
file is found (and named) before the output exists. The file is written under a temporary
name beside OUT and renamed when whole; an existing OUT is replaced only with `overwrite`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..errors import UserError
from .sources import BadImage, Source

_SOURCE: Source | None = None  # the source being checked, inherited by forked workers
_RES = 0


def _check_one(i: int) -> tuple[int, str]:
    try:
        _SOURCE.load(i, _RES)
        return i, ""
    except BadImage as e:
        return i, str(e)


@dataclass
class Summary:
    path: Path
    images: int
    train: int
    val: int
    skipped: int
    bytes: int
    seconds: float

    def line(self) -> str:
        return (f"wrote {self.path}: {self.images} images ({self.train} train, {self.val} val), "
                f"{self.skipped} skipped, {self.bytes / 2**20:.1f} MiB, {self.seconds:.1f} s")


class _Items:
    """What FFCV's writer indexes: (image, label, split) of the images kept."""

    def __init__(self, source: Source, keep: np.ndarray, resolution: int):
        self.source, self.keep, self.resolution = source, keep, resolution

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, j):
        i = int(self.keep[j])
        return self.source.load(i, self.resolution), int(self.source.labels[i]), int(self.source.splits[i])


def find_bad(source: Source, resolution: int, workers: int = 2, progress: bool = True) -> list[tuple[int, str]]:
    """[(index, reason)] of the images that cannot be read whole, in source order."""
    global _SOURCE, _RES
    if not source.is_files:
        return []
    from tqdm import tqdm

    _SOURCE, _RES = source, resolution
    bad = []
    try:
        bar = tqdm(total=len(source), desc="checking", unit="img", disable=not progress, dynamic_ncols=True)
        if workers > 1 and len(source) > 1:
            with get_context("fork").Pool(workers) as pool:
                for i, why in pool.imap(_check_one, range(len(source)), chunksize=16):
                    bar.update(1)
                    if why:
                        bad.append((i, why))
        else:
            for i in range(len(source)):
                _, why = _check_one(i)
                bar.update(1)
                if why:
                    bad.append((i, why))
        bar.close()
    finally:
        _SOURCE = None
    return sorted(bad)


def write_beton(source: Source, path, resolution: int, mode: str = "jpg", quality: int = 90,
                on_error: str = "fail", overwrite: bool = False, workers: int = 2,
                progress: bool = True) -> Summary:
    from .loader import import_ffcv

    import_ffcv()
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from tqdm import tqdm

    t0 = time.perf_counter()
    path = Path(path)
    if mode not in ("jpg", "raw"):
        raise UserError(f"mode must be jpg or raw, got {mode!r}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {quality}")
    if resolution < 1:
        raise UserError(f"--resolution must be at least 1, got {resolution}")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise UserError(f"output folder not found: {path.parent}")
    if len(source) == 0:
        raise UserError(f"{source.name}: no images to write")

    bad = find_bad(source, resolution, workers, progress)
    if bad and on_error == "fail":
        i, why = bad[0]
        raise UserError(f"{source.describe(i)}: cannot read image ({why}); {len(bad)} bad file(s) in all; "
                        f"pass --on-error skip to leave them out")
    bad_set = {i for i, _ in bad}
    keep = np.array([i for i in range(len(source)) if i not in bad_set], np.int64)
    if len(keep) == 0:
        raise UserError(f"{source.name}: none of the {len(source)} images can be read")

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fields = {"image": RGBImageField(write_mode=mode, jpeg_quality=quality), "label": IntField(),
              "split": IntField()}
    quiet_tqdm = lambda *a, **k: tqdm(*a, desc="writing", unit="img", disable=not progress,  # noqa: E731
                                      dynamic_ncols=True, **k)
    saved = ffcv.writer.tqdm
    ffcv.writer.tqdm = quiet_tqdm  # FFCV's writer always shows a bar; honour progress=False
    try:
        writer = ffcv.writer.DatasetWriter(str(tmp), fields, num_workers=max(1, workers))
        writer.from_indexed_dataset(_Items(source, keep, resolution), chunksize=64)
        os.replace(tmp, path)
    finally:
        ffcv.writer.tqdm = saved
        if tmp.exists():
            tmp.unlink()

    listing = path.with_name(path.name + ".skipped.txt")
    if bad:
        text = "".join(f"{source.describe(i)}\t{why}\n" for i, why in bad)
        tmp_list = listing.with_name(f".{listing.name}.tmp")
        tmp_list.write_text(text)
        os.replace(tmp_list, listing)
    elif listing.exists():  # a list left by an earlier conversion to this name is no longer true
        listing.unlink()
    val = int((source.splits[keep] == 1).sum())
    return Summary(path, len(keep), len(keep) - val, val, len(bad), path.stat().st_size, time.perf_counter() - t0)
