"""FFCV loaders over a .beton written by framework.data.write (tools/write_ffcv.py).

FFCV's compiled pipeline decodes the fields a task reads (images with libjpeg-turbo in
`workers` threads, labels, stored arrays such as code grids) into batch buffers it reuses; each
batch is copied out at once (`_own`) so what the trainer keeps is its own. A batch is a dict:
field name -> tensor, plus `index`, each row's index in the .beton. The order comes from
framework.data.order: FFCV is told exactly which ids to read and in which order, epoch by epoch,
starting mid-epoch when a run resumes. A .beton is checked when it is opened: its header's
sizes against the file, and an allocation-table entry for every stored item (a file cut short
loses its table, and FFCV would read the lost items back as zeros).

FFCV sets torch's intra-op thread count to its own: to 1 when it is imported, to `workers` when a
loader is built and at the start of every epoch (from its loader thread, concurrently with the
main thread). `import_ffcv()` imports it keeping the process's count and turns its Compiler's
thread setting into numba's alone, so the model's CPU work runs on the threads the process was
given (torch's default, OMP_NUM_THREADS, torch.set_num_threads) and torch's thread pools are never
resized from two threads at once.
"""
from __future__ import annotations

import atexit
import sys
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .order import EvalShard, GlobalOrder

SPLITS = {"train": 0, "val": 1}


@contextmanager
def torch_threads_kept():
    """Restores torch's intra-op thread count after FFCV has set its own."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _cache_numba_typed_dicts() -> None:
    """FFCV's import fills a numba typed Dict (ffcv.fields.rgb_image's IMAGE_MODES), which compiles
    numba's typed-dict functions: about 2.5 s of every process that reads a .beton. Those functions
    do not depend on FFCV or on us, so they are compiled once and cached on disk by numba (beside
    numba's own sources, or its user-wide cache where that is read-only) for every later process."""
    import numba.typed.typeddict as td

    for name in ("_make_dict", "_length", "_setitem", "_getitem", "_delitem", "_contains", "_get", "_setdefault",
                 "_iter", "_popitem", "_copy"):
        fn = getattr(td, name, None)
        if fn is not None and hasattr(fn, "enable_caching") and not fn.signatures:
            try:
                fn.enable_caching()
            except RuntimeError:  # numba finds no writable cache folder: compile in memory as before
                return


def import_ffcv() -> None:
    """Imports FFCV (its import sets torch's threads to 1: undone) and makes its Compiler set the
    threads of its own numba kernels only. Call before any other use of ffcv."""
    if "ffcv" not in sys.modules:
        _cache_numba_typed_dicts()
    with torch_threads_kept():
        from ffcv.pipeline.compiler import Compiler
    if getattr(Compiler, "_torch_threads_left_alone", False):
        return
    import numba
    from multiprocessing import cpu_count

    def set_num_threads(cls, n):
        n = n if n >= 1 else cpu_count()
        cls.num_threads = n
        numba.set_num_threads(n)

    Compiler.set_num_threads = classmethod(set_num_threads)
    Compiler._torch_threads_left_alone = True


# FFCV reads each epoch in a daemon thread (its EpochIterator) that runs compiled numba kernels
# into buffers it reuses. Its close() frees the buffers without stopping the thread, and an
# iterator abandoned after a batch (the trainer's picture batch, a tool's first batch) keeps its
# thread running: at interpreter exit the thread is torn down in the middle of native code and
# the process aborts ("terminate called without an active exception", SIGABRT after a finished
# run). Every epoch started here is stopped before its buffers go: on a restart, at the end or
# abandonment of an evaluation pass, on close, and at exit for whatever is still running.
_LIVE_EPOCHS: "weakref.WeakSet" = weakref.WeakSet()


def _start_epoch(loader):
    it = iter(loader)
    _LIVE_EPOCHS.add(it)
    return it


def _stop_epoch(it) -> None:
    """Stops an FFCV epoch's thread and waits for it, then frees its buffers. The thread sees the
    request when a put into its full output queue times out (0.5 s); but at the end of its order it
    puts its end marker without a timeout and blocks for good if nobody reads (an unread one held
    every test process for the 120 s join timeout at exit). So after a grace period the queue is
    read one batch at a time: that lets the end marker in, and a thread still mid-epoch decodes at
    most a batch or two more before it sees the request (draining it all would decode the rest of
    the epoch)."""
    from queue import Empty

    it.terminate_event.set()
    deadline = time.monotonic() + 120
    it.join(timeout=1.0)
    while it.is_alive() and time.monotonic() < deadline:
        try:
            it.output_queue.get_nowait()
        except Empty:
            pass
        it.join(timeout=0.6)
    it.close()
    _LIVE_EPOCHS.discard(it)


@atexit.register
def _stop_live_epochs() -> None:
    for it in list(_LIVE_EPOCHS):
        _stop_epoch(it)


VIRTUAL = ("index",)  # fields every batch can have without storing them


def _own(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A copy of FFCV's (B, 3, H, W) uint8 batch buffer, keeping the first `channels` channels."""
    return x[:, :channels].clone(memory_format=torch.contiguous_format)


def _own_field(name: str, x: torch.Tensor, channels: int) -> torch.Tensor:
    if name == "image":
        return _own(x, channels)
    x = x.clone()
    return x.reshape(-1) if name in ("label", "split") else x


class BetonInfo:
    """What a .beton holds: per image its size, storage mode, label and split."""

    def __init__(self, path):
        import_ffcv()
        from ffcv.reader import Reader

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such .beton file (write it with tools/write_ffcv.py)")
        try:
            self.reader = Reader(str(self.path))
        except Exception as e:  # FFCV asserts / numpy errors on a foreign file
            raise UserError(f"{self.path}: not a readable .beton file ({type(e).__name__}: {e})".strip()) from None
        names = self.field_names = self.reader.field_names
        missing = [n for n in ("split",) if n not in names]
        if missing:
            raise UserError(f"{self.path}: .beton has no field(s) {', '.join(missing)}; write it with tools/write_ffcv.py")
        self.num_images = int(self.reader.num_samples)
        self._verify()
        md = self.reader.metadata
        col = lambda n: md[md.dtype.names[names.index(n)]]  # noqa: E731
        self.has_images = "image" in names
        if self.has_images:
            image = col("image")
            self.heights = np.asarray(image["height"])
            self.widths = np.asarray(image["width"])
            self.modes = np.asarray(image["mode"])  # 0 jpg, 1 raw
            self._ptrs = np.asarray(image["data_ptr"])
        self.labels = np.asarray(col("label")) if "label" in names else np.zeros(self.num_images, np.int64)
        self.splits = np.asarray(col("split"))

    def _verify(self) -> None:
        """Refuses a damaged file: sizes in the header against the file, every stored item in the
        allocation table and inside the data region."""
        from ffcv.types import ALLOC_TABLE_TYPE

        r, size = self.reader, self.path.stat().st_size
        at_ptr = int(r.header["alloc_table_ptr"])
        where = f"{self.path}: damaged .beton"
        if len(r.metadata) != self.num_images:
            raise UserError(f"{where}: the header says {self.num_images} items, the file holds metadata for "
                            f"{len(r.metadata)} (cut short? write it again with tools/write_ffcv.py)")
        if at_ptr > size or (size - at_ptr) % ALLOC_TABLE_TYPE.itemsize:
            raise UserError(f"{where}: its allocation table at byte {at_ptr} does not fit a {size}-byte file "
                            f"(cut short? write it again with tools/write_ffcv.py)")
        at = r.alloc_table
        ptrs = [r.metadata[n]["data_ptr"] for n in r.metadata.dtype.names
                if r.metadata[n].dtype.names and "data_ptr" in r.metadata[n].dtype.names]
        if ptrs:
            stored = np.concatenate([np.asarray(p, np.uint64).reshape(-1) for p in ptrs])
            lost = ~np.isin(stored, at["ptr"])
            if lost.any():
                raise UserError(f"{where}: {int(lost.sum())} of {len(stored)} stored items have no allocation-table "
                                f"entry (cut short? write it again with tools/write_ffcv.py)")
        if len(at) and int((at["ptr"].astype(np.int64) + at["size"].astype(np.int64)).max()) > at_ptr:
            raise UserError(f"{where}: an item runs past the data region (write it again with tools/write_ffcv.py)")

    def check_fields(self, fields) -> None:
        missing = [f for f in fields if f not in self.field_names and f not in VIRTUAL]
        if missing:
            raise UserError(f"{self.path}: .beton has no field(s) {', '.join(missing)} (it holds "
                            f"{', '.join(self.field_names)}); the recipe's family or data.fields reads them")

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

    def is_colour(self, k: int = 16, tolerance: int = 3) -> bool:
        """Whether the images are in colour, judged on k images spread over the file: any pixel
        whose channels differ by more than `tolerance` (JPEG's chroma rounding of grey) is colour."""
        if not self.has_images or self.num_images == 0:
            return False
        from .turbojpeg import Decoder

        dec = None
        for i in np.unique(np.linspace(0, self.num_images - 1, min(k, self.num_images)).astype(int)):
            data = self.stored_bytes(int(i))
            if self.modes[i] == 0:
                dec = dec or Decoder()
                img = dec.decode(data).astype(np.int16)
            else:
                img = np.frombuffer(data, np.uint8)[:self.heights[i] * self.widths[i] * 3].reshape(
                    self.heights[i], self.widths[i], 3).astype(np.int16)
            if np.abs(img[..., 0] - img[..., 1]).max() > tolerance or np.abs(img[..., 1] - img[..., 2]).max() > tolerance:
                return True
        return False

    def check_channels(self, channels: int, where: str = "data.channels") -> None:
        colour = self.is_colour()
        if channels == 3 and not colour:
            raise UserError(f"key '{where}' is 3 but {self.path} holds grey images (R = G = B in every image "
                            f"sampled); set {where}=1")
        if channels == 1 and colour:
            raise UserError(f"key '{where}' is 1 but {self.path} holds colour images (1 keeps only their red "
                            f"channel); set {where}=3")

    def check_shape(self, resolution: int, where: str = "data.resolution") -> None:
        if not self.has_images:
            return
        sizes = set(zip(self.heights.tolist(), self.widths.tolist()))
        if sizes != {(resolution, resolution)}:
            found = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
            raise UserError(f"key '{where}' is {resolution} but {self.path} holds {found} images")


class _Plan:
    """FFCV traversal order: the ids this rank reads in the current piece (see GlobalOrder)."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def sample_order(self, epoch: int):
        return self.ids.astype(np.uint64)


def _pipeline(info: BetonInfo, name: str):
    from ffcv.fields.decoders import FloatDecoder, IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import ToTensor, ToTorchImage

    kind = type(info.reader.handlers[name]).__name__
    if kind == "RGBImageField":
        return [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()]
    decoders = {"IntField": IntDecoder, "FloatField": FloatDecoder, "NDArrayField": NDArrayDecoder}
    if kind not in decoders:
        raise UserError(f"{info.path}: field {name!r} is an FFCV {kind}, which the loader cannot hand to a task")
    return [decoders[kind](), ToTensor()]


def _ffcv_loader(info: BetonInfo, batch: int, workers: int, first_order: np.ndarray, drop_last: bool, fields):
    """-> (FFCV loader, the stored fields it yields, in the order it yields them)."""
    import_ffcv()
    from ffcv.loader import Loader, OrderOption

    stored = [n for n in info.field_names if n in fields]
    pipelines = {n: (_pipeline(info, n) if n in stored else None) for n in info.field_names}
    loader = Loader(str(info.path), batch_size=batch, num_workers=max(1, workers), order=OrderOption.SEQUENTIAL,
                    indices=first_order.astype(np.uint64), os_cache=True, drop_last=drop_last,
                    pipelines=pipelines, batches_ahead=2)
    return loader, stored


def _as_batch(stored: list[str], outputs, ids: np.ndarray, fields, channels: int) -> dict:
    batch = {n: _own_field(n, x, channels) for n, x in zip(stored, outputs)}
    if "index" in fields:
        batch["index"] = torch.from_numpy(np.asarray(ids, np.int64).copy())
    return batch


class TrainLoader:
    """`batch(step)` -> this rank's micro-batches of that global step: dicts of the task's fields
    (`image`: uint8 (B, C, H, W); `label`, `index`: int64 (B,); stored arrays as written). With a
    batch schedule (GlobalOrder's `batches`) there is one FFCV loader per micro-batch size, made
    when first needed."""

    def __init__(self, info: BetonInfo, order: GlobalOrder, channels: int = 3, workers: int = 2,
                 flip: bool = False, fields=("image",)):
        info.check_fields(fields)
        self.info, self.order, self.channels, self.flip, self.fields = info, order, channels, flip, tuple(fields)
        self.workers = workers
        self.steps_per_epoch = order.steps_per_epoch
        self.global_batch = order.global_batch
        self.batch_size = order.batch
        self._loaders: dict[int, tuple] = {}  # micro-batch size -> (FFCV loader, stored fields, plan)
        self._loader(order.batch)
        self._stored = self._loaders[order.batch][1]
        self._it = None
        self._next = None
        self._piece_end = -1

    def _loader(self, micro: int):
        if micro not in self._loaders:
            # FFCV cuts each epoch's order to len(loader) batches, which it counts on the order it is
            # built with: the whole split, longer than any piece of one rank
            ffcv, stored = _ffcv_loader(self.info, micro, self.workers, self.order.ids, True, self.fields)
            plan = _Plan(np.zeros(0, np.int64))
            ffcv.traversal_order = plan
            self._loaders[micro] = (ffcv, stored, plan)
        return self._loaders[micro]

    def indices(self, step: int) -> list[np.ndarray]:
        return self.order.indices(step)

    def micro_at(self, step: int) -> int:
        return self.order.micro_at(step)

    def global_batch_at(self, step: int) -> int:
        return self.order.global_batch_at(step)

    def _restart(self, step: int) -> None:
        if self._it is not None:
            _stop_epoch(self._it)
            self._it = None
        ffcv, _, plan = self._loader(self.order.micro_at(step))
        plan.ids = self.order.rank_piece(step)
        self._piece_end = self.order.piece(step)[1]
        if self._stored:
            self._it = _start_epoch(ffcv)

    def _flips(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.order.seed, epoch, 0xF11B]).random(self.info.num_images) < 0.5

    def batch(self, step: int) -> list[dict]:
        if step != self._next or step >= self._piece_end:
            self._restart(step)
        out = []
        for ids in self.order.indices(step):
            outputs = next(self._it) if self._stored else ()
            b = _as_batch(self._stored, outputs, ids, self.fields, self.channels)
            if self.flip and "image" in b:
                mask = torch.from_numpy(self._flips(self.order.epoch_of(step))[ids])
                b["image"][mask] = b["image"][mask].flip(-1)
            out.append(b)
        self._next = step + 1
        return out

    def close(self) -> None:
        if self._it is not None:
            _stop_epoch(self._it)
            self._it = None


class EvalLoader:
    """Iterates (batch dict, number of real images in it) over this rank's validation shard; the
    batch always has `index` (padding rows repeat an index of the shard)."""

    def __init__(self, info: BetonInfo, shard: EvalShard, channels: int = 3, workers: int = 2, fields=("image",)):
        info.check_fields(fields)
        self.info, self.shard, self.channels, self.fields = info, shard, channels, tuple(fields) + ("index",)
        self.batch_size = shard.batch
        self.order = order = shard.padded()
        self._ffcv, self._stored = (_ffcv_loader(info, shard.batch, workers, order, False, self.fields)
                                    if len(order) else (None, []))

    def __len__(self) -> int:
        return len(self.shard)

    def __iter__(self):
        if self._ffcv is None:
            return
        self._ffcv.next_epoch = 0
        b = self.batch_size
        it = _start_epoch(self._ffcv)
        try:
            for j, (outputs, n) in enumerate(zip(it, self.shard.valid_counts())):
                yield _as_batch(self._stored, outputs, self.order[j * b:(j + 1) * b], self.fields, self.channels), n
        finally:  # exhausted, or abandoned (the generator closed): the thread stops either way
            _stop_epoch(it)
