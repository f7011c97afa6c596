"""What the per-case benchmarks share: run one case in a fresh Python process (its own peak RSS)
under an address-space limit, and read the one JSON line it prints."""
from __future__ import annotations

import json
import os
import resource
import subprocess


def run_child(cmd: list[str], limit_gib: float, timeout: int) -> dict:
    """-> the case's JSON object, or {"error": ...} (out of memory under the limit, timed out, or
    the last line of its stderr)."""

    def limit():
        if limit_gib > 0:
            b = int(limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (b, b))

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        oom = "memory" in p.stderr.lower() or p.returncode in (-9, 137)
        return {"error": f"out of memory under the {limit_gib} GiB limit" if oom else tail[:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def timed_steps(step, steps: int, batch: int) -> dict:
    """step(s) once untimed (the warm-up), then `steps` timed calls (synchronised on CUDA): the
    median s/step, images/s at `batch`, and the process's peak memory (max allocated on CUDA, peak
    RSS on the CPU)."""
    import statistics
    import time

    import torch

    cuda = torch.cuda.is_available()
    times = []
    for s in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(s)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sec = statistics.median(times[1:])
    return {"sec_per_step": round(sec, 3), "images_per_sec": round(batch / sec, 4),
            "peak_memory_gib": round(peak / 2**30, 2), "memory": "max allocated (CUDA)" if cuda else "peak RSS"}
