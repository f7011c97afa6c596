"""What the DeepSpeed engine costs per step against a plain PyTorch loop, in the same run.

The VAE of recipes/vae/mnist5k.yaml at batch 64, one process: the same model, data, noise,
optimizer (AdamW) and clipping, stepped (a) by a plain loop — loss.backward(), clip, step,
zero_grad — and (b) through the framework's engine (ZeRO-2 by default, skip gate included).
Blocks of steps alternate between the two so that machine noise hits both alike; the median
step time of each is reported. Prints one JSON object.

    python tools/bench/engine_overhead.py [--batch 64] [--steps 30] [--rounds 5] [--stages 2]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from framework import distributed  # noqa: E402
from framework.config import load_recipe  # noqa: E402
from framework.data import build_loaders, to_model_input  # noqa: E402
from framework.engine import build_engine, lr_at  # noqa: E402
from framework.errors import run_cli  # noqa: E402
from framework.models.vae.model import VAE  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "vae" / "mnist5k.yaml"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=5, help="alternating blocks per contender")
    ap.add_argument("--stages", default="2", help="ZeRO stages to time, e.g. 0,2")
    ap.add_argument("--data", default="data/mnist5k.beton",
                    help="the demo's .beton (make data/mnist5k.beton writes it)")
    args = ap.parse_args(argv)

    r = load_recipe(RECIPE, [f"data.batch_size={args.batch}", "run.dir=/tmp/unused", f"data.path={args.data}"])
    env = distributed.init()
    torch.manual_seed(0)
    m, d = r.model, r.data
    base = VAE(d.channels, d.resolution, m.width, m.latent_dim, m.num_mix, m.blocks_per_scale, d.num_bits)
    train, _ = build_loaders(d, env, 1, 0)
    batches = [to_model_input(train.batch(s)[0]["image"], d.num_bits, "cpu") for s in range(8)]
    eps = [torch.randn(args.batch, m.latent_dim) for _ in range(8)]

    # (a) the plain loop
    plain = copy.deepcopy(base)
    opt = torch.optim.AdamW(plain.parameters(), lr=lr_at(0, r.engine, 1000), betas=tuple(r.engine.optimizer.betas))

    def plain_step(i):
        recon, kl = plain(batches[i % 8], eps[i % 8])
        loss = (recon + kl).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), r.engine.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    contenders = {"plain_pytorch": plain_step}
    for stage in [int(s) for s in args.stages.split(",")]:
        cfg = load_recipe(RECIPE, [f"engine.zero_stage={stage}", "run.dir=/tmp/unused",
                                   f"data.path={args.data}"]).engine
        eng = build_engine(f"zero{stage}", copy.deepcopy(base), cfg, args.batch, 1, 1000)

        def engine_step(i, eng=eng):
            recon, kl = eng(batches[i % 8], eps[i % 8])
            eng.backward((recon + kl).mean())
            eng.step(boundary=True)

        contenders[f"deepspeed_zero{stage}"] = engine_step

    for fn in contenders.values():  # warm-up
        for i in range(5):
            fn(i)
    times = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            for i in range(args.steps):
                t0 = time.perf_counter()
                fn(i)
                times[name].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out = {
        "benchmark": "engine_overhead",
        "settings": {"model": "vae (recipes/vae/mnist5k.yaml)", "batch": args.batch, "precision": "fp32",
                     "device": "cpu", "threads": torch.get_num_threads(), "processes": 1,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "timed_steps_per_contender": args.steps * args.rounds, "rounds": args.rounds,
                     "torch": torch.__version__, "machine": platform.processor() or platform.machine()},
        "median_ms_per_step": {k: round(v, 2) for k, v in ms.items()},
        "overhead_vs_plain_pct": {k: round(100 * (v / ms["plain_pytorch"] - 1), 1)
                                  for k, v in ms.items() if k != "plain_pytorch"},
    }
    if env.is_main:
        print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(run_cli(main))
