"""FFCV loaders over a .beton written by framework.data.write (tools/write_ffcv.py).

FFCV's compiled pipeline decodes the images (libjpeg-turbo, in `workers` threads) into batch
buffers it reuses; each batch is copied out at once (`_own`) so what the trainer keeps is its
own. The order comes from framework.data.order: FFCV is told exactly which ids to read and
in which order, epoch by epoch, starting mid-epoch when a run resumes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .order import EvalShard, GlobalOrder

SPLITS = {"train": 0, "val": 1}


def _own(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A copy of FFCV's (B, 3, H, W) uint8 batch buffer, keeping the first `channels` channels."""
    return x[:, :channels].clone(memory_format=torch.contiguous_format)


class BetonInfo:
    """What a .beton holds: per image its size, storage mode, label and split."""

    def __init__(self, path):
        from ffcv.reader import Reader

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such .beton file (write it with tools/write_ffcv.py)")
        try:
            self.reader = Reader(str(self.path))
        except Exception as e:  # FFCV asserts / numpy errors on a foreign file
            raise UserError(f"{self.path}: not a readable .beton file ({type(e).__name__}: {e})".strip()) from None
        names = self.reader.field_names
        missing = [n for n in ("image", "label", "split") if n not in names]
        if missing:
            raise UserError(f"{self.path}: .beton has no field(s) {', '.join(missing)}; write it with tools/write_ffcv.py")
        md = self.reader.metadata
        col = lambda n: md[md.dtype.names[names.index(n)]]  # noqa: E731
        image = col("image")
        self.heights = np.asarray(image["height"])
        self.widths = np.asarray(image["width"])
        self.modes = np.asarray(image["mode"])  # 0 jpg, 1 raw
        self._ptrs = np.asarray(image["data_ptr"])
        self.labels = np.asarray(col("label"))
        self.splits = np.asarray(col("split"))
        self.num_images = int(self.reader.num_samples)

    def ids(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == SPLITS[split])

    def stored_bytes(self, i: int) -> bytes:
        at = self.reader.alloc_table
        ptr = self._ptrs[i]
        size = int(at["size"][np.flatnonzero(at["ptr"] == ptr)[0]])
        with open(self.path, "rb") as f:
            f.seek(int(ptr))
            return f.read(size)

    def stored_jpeg(self, i: int) -> bytes:
        if self.modes[i] != 0:
            raise ValueError(f"{self.path}: image {i} is stored raw, not as JPEG")
        return self.stored_bytes(i)

    def check_shape(self, resolution: int, where: str = "data.resolution") -> None:
        sizes = set(zip(self.heights.tolist(), self.widths.tolist()))
        if sizes != {(resolution, resolution)}:
            found = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
            raise UserError(f"key '{where}' is {resolution} but {self.path} holds {found} images")


class _Plan:
    """FFCV traversal order: the ids this rank reads in an epoch, from a given step on."""

    def __init__(self, fn):
        self.fn = fn
        self.epoch_start = {}

    def sample_order(self, epoch: int):
        return self.fn(epoch, self.epoch_start.get(epoch, 0)).astype(np.uint64)


def _ffcv_loader(info: BetonInfo, batch: int, workers: int, first_order: np.ndarray, drop_last: bool):
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    return Loader(str(info.path), batch_size=batch, num_workers=max(1, workers), order=OrderOption.SEQUENTIAL,
                  indices=first_order.astype(np.uint64), os_cache=True, drop_last=drop_last,
                  pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()],
                             "label": None, "split": None}, batches_ahead=2)


class TrainLoader:
    """`batch(step)` -> this rank's micro-batches of that global step, uint8 (B, C, H, W)."""

    def __init__(self, info: BetonInfo, order: GlobalOrder, channels: int = 3, workers: int = 2,
                 flip: bool = False):
        self.info, self.order, self.channels, self.flip = info, order, channels, flip
        self.steps_per_epoch = order.steps_per_epoch
        self.global_batch = order.global_batch
        self.batch_size = order.batch
        self._ffcv = _ffcv_loader(info, order.batch, workers, order.rank_epoch(0), drop_last=True)
        self._plan = _Plan(lambda e, start: order.rank_epoch(e, start))
        self._ffcv.traversal_order = self._plan
        self._it = None
        self._next = None

    def indices(self, step: int) -> list[np.ndarray]:
        return self.order.indices(step)

    def _restart(self, step: int) -> None:
        if self._it is not None:
            self._it.close()
        epoch, k = divmod(step, self.steps_per_epoch)
        self._plan.epoch_start = {epoch: k}
        self._ffcv.next_epoch = epoch
        self._it = iter(self._ffcv)

    def _flips(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.order.seed, epoch, 0xF11B]).random(self.info.num_images) < 0.5

    def batch(self, step: int) -> list[torch.Tensor]:
        if self._it is None or step != self._next or step % self.steps_per_epoch == 0:
            self._restart(step)
        out = []
        for ids in self.order.indices(step):
            (x,) = next(self._it)
            x = _own(x, self.channels)
            if self.flip:
                mask = torch.from_numpy(self._flips(step // self.steps_per_epoch)[ids])
                x[mask] = x[mask].flip(-1)
            out.append(x)
        self._next = step + 1
        return out

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


class EvalLoader:
    """Iterates (uint8 batch, number of real images in it) over this rank's validation shard."""

    def __init__(self, info: BetonInfo, shard: EvalShard, channels: int = 3, workers: int = 2):
        self.info, self.shard, self.channels = info, shard, channels
        self.batch_size = shard.batch
        order = shard.padded()
        self._ffcv = _ffcv_loader(info, shard.batch, workers, order, drop_last=False) if len(order) else None

    def __len__(self) -> int:
        return len(self.shard)

    def __iter__(self):
        if self._ffcv is None:
            return
        self._ffcv.next_epoch = 0
        for (x,), n in zip(self._ffcv, self.shard.valid_counts()):
            yield _own(x, self.channels), n
