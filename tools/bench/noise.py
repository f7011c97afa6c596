"""Noise per rank: time and memory of one training step's latent noise, against the world size.

For the latents of a recipe (default `nvae/celebahq256`: 6.0 M latent dimensions per image, batch 4
per rank) each case runs in a fresh process that draws one step's noise for the last rank of a
simulated world of W ranks (every rank draws the same amount; nothing is communicated), three
times (median), and reports seconds and the resident memory the noise holds (RSS while it is
alive minus RSS before the draw, the largest of the repeats):

    per_rank      the framework's StepContext.randn: each row from a generator seeded by (seed,
                  step, draw, the row's place in the global batch); a rank draws only its rows
    global_batch  the baseline (the framework before this benchmark): the whole global batch drawn
                  on every rank, then sliced (same guarantee, cost growing with W)

Prints one JSON object; the ratio is global_batch / per_rank at each W.

    python tools/bench/noise.py [--recipe nvae/celebahq256] [--worlds 1,8,24,96] [--batch 4]
                                [--baseline-max-world 24] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def latent_shapes(recipe: str) -> list[list[int]]:
    sys.path.insert(0, str(ROOT))
    import torch

    from framework.config import load_recipe
    from framework.distributed import DistEnv
    from framework.models import build_task

    torch.set_num_threads(1)
    r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml", check_files=False)
    task = build_task(r, DistEnv(0, 0, 1, "127.0.0.1", 0, "single"))
    return [list(s) for s in task.model.latent_shapes], r.data.batch_size


def child(method: str, shapes: list, world: int, batch: int, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from framework.task import StepContext

    import psutil

    proc = psutil.Process()
    rank = world - 1

    def per_rank():
        ctx = StepContext(step=5, micro=0, device=torch.device("cpu"), dtype=torch.float32, rank=rank,
                          world_size=world, batch_size=batch, grad_accum=1, seed=0, stream="nvae")
        return [ctx.randn(*s) for s in shapes]

    def global_batch():
        out = []
        for d, s in enumerate(shapes, 1):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([0, 7, 5, d]).generate_state(1)[0]))
            full = torch.randn((batch * world, *s), generator=g)
            out.append(full[rank * batch:(rank + 1) * batch])  # a view: the global tensor stays alive
        return out

    fn = {"per_rank": per_rank, "global_batch": global_batch}[method]
    times, held = [], []
    for _ in range(repeats):
        before = proc.memory_info().rss
        t0 = time.perf_counter()
        noise = fn()
        times.append(time.perf_counter() - t0)
        held.append(proc.memory_info().rss - before)  # what the step's noise keeps resident
        del noise
    return {"seconds": round(statistics.median(times), 4), "held_mib": round(max(held) / 2**20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="nvae/celebahq256")
    p.add_argument("--worlds", default="1,8,24,96")
    p.add_argument("--batch", type=int, default=0, help="rows per rank (default: the recipe's data.batch_size)")
    p.add_argument("--baseline-max-world", type=int, default=24,
                   help="largest world size the baseline is run at (it needs ~0.09 GiB x W x batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        method, shapes, world, batch, repeats = a.child
        print(json.dumps(child(method, json.loads(shapes), int(world), int(batch), int(repeats))))
        return 0
    worlds = [int(w) for w in a.worlds.split(",")]
    if min(worlds) < 1 or a.repeats < 1 or a.batch < 0:
        print("error: --worlds, --repeats must be positive and --batch >= 0", file=sys.stderr)
        return 2
    shapes, recipe_batch = latent_shapes(a.recipe)
    batch = a.batch or recipe_batch
    dims = sum(int(__import__("math").prod(s)) for s in shapes)
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for world in worlds:
        row = {"world_size": world, "global_batch": world * batch}
        for method in ("per_rank", "global_batch"):
            if method == "global_batch" and world > a.baseline_max_world:
                row[method] = "not run (--baseline-max-world)"
                continue
            out = subprocess.run([sys.executable, __file__, "--child", method, json.dumps(shapes), str(world),
                                  str(batch), str(a.repeats)], capture_output=True, text=True, env=env)
            row[method] = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                           else {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]})
        if isinstance(row["global_batch"], dict) and "seconds" in row["global_batch"]:
            row["time_ratio"] = round(row["global_batch"]["seconds"] / max(row["per_rank"]["seconds"], 1e-9), 2)
        rows.append(row)
        print(f"world {world:>3}: per_rank {row['per_rank']} | global_batch {row['global_batch']}", file=sys.stderr)
    print(json.dumps({"bench": "noise", "recipe": a.recipe, "latent_dims_per_image": dims, "latent_tensors": len(shapes),
                      "batch_per_rank": batch, "repeats": a.repeats, "threads": 1, "device": "cpu",
                      "cpu": platform.processor() or platform.machine(), "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
