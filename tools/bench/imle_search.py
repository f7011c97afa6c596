"""IMLE's nearest-neighbour search (framework/models/glann/search.py): for N codes, the exact
nearest of 2N mapped samples, as each IMLE refresh does — FAISS's flat L2 index against the torch
fallback (chunked matrix products), on one and two ranks (the codes sharded, the samples on every
rank, the answers gathered), both re-ranking 8 float32 candidates per code in float64.

    python tools/bench/imle_search.py [--n 70000] [--dims 64,512] [--chunk 1024]

Each case runs once in a fresh process (torchrun for two ranks, the machine's cores split between
them), codes and samples standard normal from a fixed seed; the time is rank 0's wall clock of the
whole sharded search (gather included), no warm-up (a search is minutes of work: its first call is
the cost a refresh pays). `assignment` is a checksum of the codes' answers: equal checksums are
equal assignments (FAISS = torch, 1 rank = 2). One JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child(n: int, d: int, backend: str, chunk: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import hashlib
    import resource

    import torch

    from framework import distributed as dist
    from framework.models.glann.search import sharded_nearest

    env = dist.init() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    g = torch.Generator().manual_seed(0)
    codes, samples = torch.randn(n, d, generator=g), torch.randn(2 * n, d, generator=g)
    dist.barrier()
    t0 = time.perf_counter()
    idx, d2 = sharded_nearest(codes, samples, backend, refine=8, chunk=chunk)
    sec = time.perf_counter() - t0
    out = {"seconds": round(sec, 2), "codes_per_s": round(n / sec, 1),
           "assignment": hashlib.sha256(idx.numpy().tobytes()).hexdigest()[:12],
           "mean_sq_distance": round(float(d2.mean()), 4),
           "peak_rss_gib_rank0": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "threads_per_rank": torch.get_num_threads()}
    if env is not None:
        dist.barrier()
        dist.shutdown()
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, n, d, backend, chunk, out = sys.argv
        r = child(int(n), int(d), backend, int(chunk))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(out).write_text(json.dumps(r))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=70_000, help="codes (FFHQ's 70,000); samples: 2n")
    ap.add_argument("--dims", default="64,512")
    ap.add_argument("--chunk", type=int, default=1024, help="codes per matrix product on the torch path")
    ap.add_argument("--timeout", type=int, default=3600)
    a = ap.parse_args()
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT))
    from framework.distributed import _free_port
    from framework.models.glann.search import faiss_available

    backends = ["faiss", "torch"] if faiss_available() else ["torch"]
    cores = os.cpu_count() or 1
    results = {}
    for d in [int(x) for x in a.dims.split(",")]:
        for backend in backends:
            for world in (1, 2):
                key = f"d{d}_{backend}_{world}rank"
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "r.json"
                    args = [__file__, "--child", str(a.n), str(d), backend, str(a.chunk), str(out)]
                    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // world)), PYTHONPATH=str(ROOT))
                    cmd = ([sys.executable, *args] if world == 1 else
                           [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                            f"--master_port={_free_port()}", *args])
                    try:
                        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
                        results[key] = (json.loads(out.read_text()) if p.returncode == 0 and out.exists()
                                        else {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]})
                    except subprocess.TimeoutExpired:
                        results[key] = {"error": f"timed out after {a.timeout} s"}
                print(f"{key}: {results[key]}", file=sys.stderr, flush=True)
    sums = {k: v.get("assignment") for k, v in results.items()}
    by_dim = {}
    for k, v in sums.items():
        by_dim.setdefault(k.split("_")[0], set()).add(v)
    print(json.dumps({
        "benchmark": "imle_search",
        "settings": {"codes": a.n, "samples": 2 * a.n, "dims": a.dims, "refine": 8, "torch_chunk": a.chunk,
                     "faiss": "IndexFlatL2 (faiss-cpu)" if faiss_available() else "not installed",
                     "timing": "one search per fresh process, rank 0 wall clock, no warm-up",
                     "cores": cores, "torch": torch.__version__, "machine": platform.processor() or platform.machine()},
        "results": results,
        "same_assignment_in_every_case": {k: len(v) == 1 and None not in v for k, v in by_dim.items()}}))


if __name__ == "__main__":
    main()
