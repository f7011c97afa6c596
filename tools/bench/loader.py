"""Loader throughput: the framework's FFCV TrainLoader (jpg, raw) against a torch DataLoader
decoding JPEG files with PIL, and the decode limit (one thread decoding the same JPEG bytes
with libjpeg-turbo, x workers).

The same images everywhere: `--count` random 256 px crops of the bundled photographs (the
`photos` set), written once to a jpg .beton; the JPEG files the PIL loader reads are the very
bytes stored in that .beton, and the decode limit decodes those bytes too. Batch 32, 2 workers,
random order, warm page cache, one warm-up epoch, then the median of 3 timed epochs, images/s.
Every contender delivers the same thing: uint8 (B, 3, H, W) batches the caller owns. The FFCV
loaders are built once and iterated epoch after epoch, as training does; the PIL loader keeps
its workers between epochs (its best case). Prints one JSON object.

    python tools/bench/loader.py [--count 2000] [--batch 32] [--workers 2] [--epochs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# The loader alone, as on a GPU machine where the CPU only feeds data: OpenMP threads wait
# passively (framework/__init__.py sets this where a GPU is present; spinning threads halved
# FFCV's jpg rate here). Must precede torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import framework  # noqa: E402,F401

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from framework.data import sources  # noqa: E402
from framework.data.loader import BetonInfo, TrainLoader  # noqa: E402
from framework.data.order import GlobalOrder  # noqa: E402
from framework.data.turbojpeg import Decoder  # noqa: E402
from framework.data.write import write_beton  # noqa: E402


class JpegFiles(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def epochs_per_sec(make_iter, epochs: int, n: int) -> tuple[float, list[float]]:
    rates = []
    for e in range(epochs + 1):  # the first is the warm-up
        t0 = time.perf_counter()
        seen = 0
        for x in make_iter(e):
            seen += x.shape[0]
        if e:
            rates.append(seen / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    src = sources.photos(args.resolution, args.count, 0.0, seed=0)
    betons = {}
    for mode in ("jpg", "raw"):
        betons[mode] = work / f"photos_{mode}.beton"
        write_beton(src, betons[mode], args.resolution, mode, args.quality, workers=args.workers, progress=False)
    info = BetonInfo(betons["jpg"])
    jpegs = [info.stored_jpeg(i) for i in range(args.count)]
    files = []
    (work / "jpg").mkdir()
    for i, b in enumerate(jpegs):
        files.append(work / "jpg" / f"{i:05d}.jpg")
        files[-1].write_bytes(b)
    for p in list(betons.values()) + files:  # warm page cache
        p.read_bytes()

    results = {}
    for mode, path in betons.items():
        info_m = BetonInfo(path)
        ld = TrainLoader(info_m, GlobalOrder(info_m.ids("train"), args.batch, 1, 0, 1, seed=0), 3, args.workers)

        def ffcv_epoch(e, ld=ld):
            for s in range(e * ld.steps_per_epoch, (e + 1) * ld.steps_per_epoch):
                yield from (b["image"] for b in ld.batch(s))
        results[f"ffcv_{mode}"] = epochs_per_sec(ffcv_epoch, args.epochs, args.count)
        ld.close()

    ds = JpegFiles(files)

    pil = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                      drop_last=True, persistent_workers=True,
                                      generator=torch.Generator().manual_seed(0))

    def pil_epoch(e):
        return iter(pil)
    results["torch_pil"] = epochs_per_sec(pil_epoch, args.epochs, args.count)

    dec = Decoder(fast_dct=True)
    rates = []
    for _ in range(args.epochs + 1):
        t0 = time.perf_counter()
        for b in jpegs:
            dec.decode(b)
        rates.append(len(jpegs) / (time.perf_counter() - t0))
    single = statistics.median(rates[1:])
    limit = single * args.workers

    ips = {k: round(v[0], 1) for k, v in results.items()}
    out = {
        "benchmark": "loader",
        "settings": {"images": args.count, "resolution": args.resolution, "jpeg_quality": args.quality,
                     "mean_jpeg_bytes": int(np.mean([len(b) for b in jpegs])), "batch": args.batch,
                     "workers": args.workers, "order": "random", "drop_last": True,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "page_cache": "warm",
                     "timed_epochs": args.epochs, "statistic": "median images/s after 1 warm-up epoch",
                     "cpu_count": torch.multiprocessing.cpu_count(),
                     "machine": platform.processor() or platform.machine()},
        "images_per_sec": ips,
        "decode_limit": {"single_thread_libjpeg_turbo_fastdct": round(single, 1), "x_workers": round(limit, 1)},
        "ffcv_jpg_vs_pil": round(ips["ffcv_jpg"] / ips["torch_pil"], 2),
        "ffcv_jpg_vs_decode_limit": round(ips["ffcv_jpg"] / limit, 2),
        "decode_limit_vs_pil": round(limit / ips["torch_pil"], 2),  # the most any jpg loader could beat PIL by
        "targets": {"ffcv_jpg_vs_pil": ">= 3", "ffcv_jpg_vs_decode_limit": ">= 0.7"},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
