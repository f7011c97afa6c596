"""NVAE training step: images/s and peak memory, activation checkpointing off and on, in one run.

For each architecture (the `celebahq256` recipe at batch 1, the `mnist` recipe at batch 16) and
each of `engine.activation_checkpointing: none | blocks`, a fresh process builds the model of the
recipe and times full training steps — forward, the recipe's loss (reconstruction, balanced KL,
spectral and BatchNorm regularisers), backward, Adamax — after one warm-up step (median). Peak memory is
the process's peak RSS on the CPU (max allocated on CUDA). A process that runs out of the memory
limit (default 22 GiB, so the machine survives) is reported as such. Prints one JSON object.

    python tools/bench/nvae_step.py [--steps 3] [--mnist-steps 10] [--only mnist|celebahq256] [--precision fp32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from child import run_child, timed_steps  # noqa: E402
CASES = {"celebahq256": 1, "mnist": 16}


def child(recipe: str, batch: int, ckpt: str, steps: int, precision: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import framework  # noqa: F401
    import torch

    from framework.config import load_recipe
    from framework.distributed import DistEnv
    from framework.models import build_task
    from framework.task import StepContext

    r = load_recipe(ROOT / "recipes" / "nvae" / f"{recipe}.yaml",
                    [f"engine.activation_checkpointing={ckpt}", f"data.batch_size={batch}"], check_files=False)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    task = build_task(r, DistEnv(0, 0, 1, "127.0.0.1", 0, "single"))
    net = task.model.to(dev).train()
    opt = torch.optim.Adamax(net.parameters(), lr=1e-3, eps=1e-3, weight_decay=3e-4)

    class _Eng:  # what StepContext expects of an engine: callable, with .module
        module = net

        def __call__(self, *a):
            return net(*a)

    d = r.data
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 2**d.num_bits, (batch, d.channels, d.resolution, d.resolution), generator=g).float()
         / (2**d.num_bits - 1) * 2 - 1).to(dev)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    def step(s):
        ctx = StepContext(step=s, micro=0, _engines={"nvae": _Eng()}, device=dev, dtype=torch.float32, rank=0,
                          world_size=1, batch_size=batch, grad_accum=1, seed=0)
        with torch.autocast(dev.type, dtype=dtype, enabled=precision != "fp32"):
            loss, _ = task.loss("nvae", x, ctx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {**timed_steps(step, steps, batch), "parameters": sum(p.numel() for p in net.parameters())}


def run_case(recipe, batch, ckpt, steps, precision, limit_gib, timeout):
    return run_child([sys.executable, __file__, "--child", recipe, str(batch), ckpt, str(steps), precision], limit_gib, timeout)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, recipe, batch, ckpt, steps, precision = sys.argv
        print(json.dumps(child(recipe, int(batch), ckpt, int(steps), precision)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="celebahq256: timed steps after one warm-up (default 3)")
    ap.add_argument("--mnist-steps", type=int, default=10, help="mnist: timed steps after one warm-up (default 10)")
    ap.add_argument("--only", choices=sorted(CASES), default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--memory-limit-gib", type=float, default=22.0)
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args()
    results = {}
    for recipe, batch in CASES.items():
        if args.only and recipe != args.only:
            continue
        for ckpt in ("none", "blocks"):
            steps = args.mnist_steps if recipe == "mnist" else args.steps
            results[f"{recipe}_b{batch}_{ckpt}"] = run_case(recipe, batch, ckpt, steps, args.precision,
                                                            args.memory_limit_gib, args.timeout)
            print(f"{recipe} batch {batch} checkpointing {ckpt}: {results[f'{recipe}_b{batch}_{ckpt}']}",
                  file=sys.stderr, flush=True)
    ratios = {}
    for recipe, batch in CASES.items():
        off, on = results.get(f"{recipe}_b{batch}_none"), results.get(f"{recipe}_b{batch}_blocks")
        if off and on and "error" not in off and "error" not in on:
            ratios[recipe] = {"memory_saved_pct": round(100 * (1 - on["peak_memory_gib"] / off["peak_memory_gib"]), 1),
                              "time_added_pct": round(100 * (on["sec_per_step"] / off["sec_per_step"] - 1), 1)}
    import torch

    out = {"benchmark": "nvae_step",
           "settings": {"precision": args.precision, "timed_steps": {"celebahq256": args.steps, "mnist": args.mnist_steps},
                        "warmup_steps": 1,
                        "statistic": "median step time", "optimizer": "torch Adamax",
                        "loss": "recipe loss: recon + balanced KL + spectral + BN regularisers",
                        "device": "cuda" if torch.cuda.is_available() else "cpu",
                        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
                        "memory_limit_gib": args.memory_limit_gib, "torch": torch.__version__,
                        "machine": platform.processor() or platform.machine()},
           "results": results, "checkpointing_effect": ratios,
           "targets": {"memory_saved_pct": ">= 40", "time_added_pct": "<= 35",
                       "celebahq256_blocks_peak_gib": "<= 10 (fp32, CPU)"}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
