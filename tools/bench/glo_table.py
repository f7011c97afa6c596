"""GLO's latent table: what the dense Adam update of the whole table costs against a sparse (lazy)
update of the batch's rows only, and against the rest of a GLO step.

    python tools/bench/glo_table.py [--repeats 3] [--cases mnist,celebahq256]

The official code (glo.py) trains the table (nn.Embedding, dense gradients) with torch.optim.Adam:
every step updates every row — the rows outside the batch have a zero gradient but their Adam
moments are not zero, so they keep moving for a while (beta1 0.5: by 2^-k after k steps). The
framework does the same (the table is a parameter of the GLO engine, ZeRO-sharded; its optimizer
is the engine's). A sparse update (torch.optim.SparseAdam over nn.Embedding(sparse=True), or any
"lazy" Adam) touches only the batch's rows: a different optimizer, and cheaper.

Per case (the recipes' table and generator; the official VGG distance with random VGG16 weights —
the cost is the same with the real ones; fp32 on this machine's CPU, its threads):
- `step_s`: the rest of a GLO step — G's forward and backward through the VGG distance, G's Adam step;
- `dense_table_s`: torch.optim.Adam over the whole table with a dense gradient (batch rows non-zero);
- `sparse_table_s`: torch.optim.SparseAdam over the batch's rows (a sparse gradient);
- `dense_share` = dense / (step + dense): the share of a step the official dense update costs.
Medians of --repeats timed calls after one warm-up. One JSON object.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CASES = {  # name: (table rows, code dim, resolution, channels, generator, batch)
    "mnist": (60_000, 64, 28, 1, "dcgan", 128),
    "celebahq256": (27_000, 512, 256, 3, "deep", 8),
}


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(name: str, repeats: int) -> dict:
    import torch

    from framework.models.glann.networks import DeepGenerator, Generator
    from framework.models.glann.perceptual import VGGDistance

    n, d, size, ch, kind, batch = CASES[name]
    torch.manual_seed(0)
    g = Generator(d, size, ch, do_bn=True) if kind == "dcgan" else DeepGenerator(d, size, ch)
    vgg = VGGDistance("random", size=size).eval()
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.5, 0.999))
    rows = torch.randperm(n)[:batch]
    z = torch.nn.functional.normalize(torch.randn(batch, d), dim=1)
    real = torch.rand(batch, ch, size, size)

    def step():
        opt_g.zero_grad(set_to_none=True)
        vgg(g(z), real).mean().backward()
        opt_g.step()

    dense = torch.nn.Embedding(n, d)
    opt_dense = torch.optim.Adam(dense.parameters(), lr=1e-2, betas=(0.5, 0.999))
    sparse = torch.nn.Embedding(n, d, sparse=True)
    opt_sparse = torch.optim.SparseAdam(sparse.parameters(), lr=1e-2, betas=(0.5, 0.999))
    grad_rows = torch.randn(batch, d)

    def dense_update():
        opt_dense.zero_grad(set_to_none=True)
        (dense(rows) * grad_rows).sum().backward()
        opt_dense.step()

    def sparse_update():
        opt_sparse.zero_grad(set_to_none=True)
        (sparse(rows) * grad_rows).sum().backward()
        opt_sparse.step()

    s, dn, sp = median_time(step, repeats), median_time(dense_update, repeats), median_time(sparse_update, repeats)
    return {"case": name, "table": [n, d], "table_mib": round(n * d * 4 / 2**20, 1), "resolution": size,
            "generator": kind, "batch": batch, "step_s": round(s, 4), "dense_table_s": round(dn, 5),
            "sparse_table_s": round(sp, 5), "dense_vs_sparse": round(dn / sp, 1),
            "dense_share": round(dn / (s + dn), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    a = p.parse_args()
    import torch

    names = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in names if c not in CASES]
    if bad or a.repeats < 1:
        print(f"error: --cases: {bad[0]!r} is not one of {', '.join(CASES)}" if bad else
              "error: --repeats must be at least 1", file=sys.stderr)
        sys.exit(2)
    from framework.eval.sampling import _cpu_name

    out = {"bench": "glo_table", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": _cpu_name(), "machine": platform.machine(), "precision": "fp32", "repeats": a.repeats,
           "vgg_weights": "random", "results": [run_case(c, a.repeats) for c in names]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
