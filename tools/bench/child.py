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
