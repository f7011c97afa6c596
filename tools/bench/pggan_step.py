"""PGGAN training step: images/s of a full discriminator + generator step of the official networks
(framework/models/pggan: G_paper / D_paper, the official channel table) at 64 and 256 px, the
WGAN-GP discriminator loss with its gradient penalty (double backward), and the share of the step
that the penalty costs, measured against the same step without it in the same run.

    step       D: G(z) without gradients, D on the reals and the fakes, the penalty's D pass on the
               mixed images, its create_graph gradient and the double backward, Adam(0, 0.99, eps 1e-8);
               G: G(z), D frozen, -D(G(z)), Adam; the EMA of G (beta 0.999)
    baseline   the same step with the penalty left out (a plain WGAN step): the difference is the
               penalty's cost (its extra D forward, the first backward and the double backward)
    no_double  the step with the penalty's forward and gradient computed but not trained through
               (create_graph off, the term detached): the difference to `step` is the double backward

Networks for a 256 px target, run at the stable phase (alpha = 1) of level 6 (64 px) and 8 (256 px);
torch.optim.Adam on the bare modules (the trainer's engines add little: tools/bench/engine_overhead.py),
fp32, each case in a fresh process: one warm-up step, then the median of --steps. One JSON object.

    python tools/bench/pggan_step.py [--steps 2] [--batch64 8] [--batch256 4]
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


def child(resolution: int, batch: int, penalty: str, steps: int) -> dict:
    """penalty: wgan_gp (the step), no_double (the penalty without its double backward), no_penalty."""
    sys.path.insert(0, str(ROOT))
    import math

    import torch

    from framework.models.pggan import Discriminator, Generator, d_loss, g_loss, gradient_norms
    from framework.models.pggan.loss import _fp32

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    g, d = Generator(256).to(dev), Discriminator(256).to(dev)
    ema = [p.detach().clone() for p in g.parameters()]
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.0, 0.99), eps=1e-8)
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.0, 0.99), eps=1e-8)
    level = int(math.log2(resolution))
    gen = torch.Generator().manual_seed(0)
    real = (torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1).to(dev)

    def step():
        z = torch.randn(batch, 512, generator=gen).to(dev)
        with torch.no_grad():
            fake = g(z, level, 1.0)
        u = torch.rand(batch, generator=gen).to(dev)
        if penalty == "wgan_gp":
            loss, _ = d_loss(d, real, fake, u, level, 1.0)
        else:
            rs, fs = _fp32(d(real, level, 1.0)), _fp32(d(fake, level, 1.0))
            loss = (fs - rs + 0.001 * rs.pow(2)).mean()
            if penalty == "no_double":
                mixed = torch.lerp(real, fake, u.view(-1, 1, 1, 1))
                norms = gradient_norms(d, mixed, level, 1.0, create_graph=False)
                loss = loss + 10 * (norms.detach() - 1).pow(2).mean()
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        d.requires_grad_(False)
        loss, _ = g_loss(d, g(torch.randn(batch, 512, generator=gen).to(dev), level, 1.0), level, 1.0)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        d.requires_grad_(True)
        with torch.no_grad():
            for s, p in zip(ema, g.parameters()):
                s.lerp_(p, 1 - 0.999)

    return timed_steps(lambda s: step(), steps, batch)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, res, batch, penalty, steps = sys.argv
        print(json.dumps(child(int(res), int(batch), penalty, int(steps))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up (default 2)")
    ap.add_argument("--batch64", type=int, default=8)
    ap.add_argument("--batch256", type=int, default=4)
    ap.add_argument("--memory-limit-gib", type=float, default=22.0)
    ap.add_argument("--timeout", type=int, default=3600)
    a = ap.parse_args()
    results, shares, double = {}, {}, {}
    for res, batch in ((64, a.batch64), (256, a.batch256)):
        for penalty in ("wgan_gp", "no_double", "no_penalty"):
            key = f"{res}px_b{batch}_{penalty}"
            results[key] = run_child([sys.executable, __file__, "--child", str(res), str(batch), penalty,
                                      str(a.steps)], a.memory_limit_gib, a.timeout)
            print(f"{key}: {results[key]}", file=sys.stderr, flush=True)
        full, mid, plain = (results[f"{res}px_b{batch}_{k}"] for k in ("wgan_gp", "no_double", "no_penalty"))
        if not any("error" in r for r in (full, mid, plain)):
            shares[f"{res}px"] = round(1 - plain["sec_per_step"] / full["sec_per_step"], 3)
            double[f"{res}px"] = round(1 - mid["sec_per_step"] / full["sec_per_step"], 3)
    import torch

    from framework.models.pggan import Discriminator, Generator, channel_table
    from framework.models.pggan.networks import parameter_count

    print(json.dumps({
        "benchmark": "pggan_step",
        "settings": {"networks": f"official G_paper / D_paper for 256 px (G {parameter_count(Generator(256)):,}, "
                                 f"D {parameter_count(Discriminator(256)):,}), channels {channel_table(256)}",
                     "phase": "stable (alpha 1)", "loss": "WGAN-GP, lambda 10, drift 0.001", "precision": "fp32",
                     "optimizer": "torch Adam(0, 0.99, eps 1e-8), lr 1e-3", "timed_steps": a.steps, "warmup_steps": 1,
                     "statistic": "median step time", "device": "cuda" if torch.cuda.is_available() else "cpu",
                     "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())), "torch": torch.__version__,
                     "machine": platform.processor() or platform.machine()},
        "results": results, "gradient_penalty_share_of_step": shares, "double_backward_share_of_step": double}))


if __name__ == "__main__":
    main()
