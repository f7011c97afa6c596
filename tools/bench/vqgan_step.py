"""VQGAN training step at 256 px (the faceshq architecture), GAN terms on: s/step, images/s and
peak memory of this framework's step against taming-transformers' algorithm, in one run.

Both steps train the same modules (the faceshq recipe's autoencoder, PatchGAN and LPIPS — random
VGG16 weights, which cost what ImageNet ones do) with torch Adam(0.5, 0.9), fp32, on a fixed
random batch:

  taming     taming's VQModel.training_step under PyTorch Lightning, written out: autoencoder
             forward, LPIPS, D(x^) with D trainable (Lightning 1.0 does not toggle optimizers),
             autograd.grad of nll and g at the decoder's last weight, the full backward, Adam; then
             a second autoencoder forward (with its graph, as Lightning's optimizer_idx 1 does),
             D on x and sg[x^], backward, Adam.
  framework  framework/models/vqgan's Task.loss for engine `ae` then `disc`: one autoencoder
             forward, LPIPS and D back-propagated once each, the adaptive weight from conv_out's
             input; checkpointing off and on (engine.activation_checkpointing: blocks).

Each case runs in a fresh process (peak RSS on the CPU, max allocated on CUDA): one warm-up step,
then the median of --steps. Prints one JSON object.

    python tools/bench/vqgan_step.py [--steps 3] [--batches 1,2]
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


def child(impl: str, batch: int, ckpt: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from framework.config import load_recipe
    from framework.distributed import DistEnv
    from framework.models import build_task
    from framework.models.vqgan.loss import hinge_d_loss
    from framework.task import StepContext

    r = load_recipe(ROOT / "recipes" / "vqgan" / "faceshq256.yaml",
                    [f"engine.activation_checkpointing={ckpt}", f"data.batch_size={batch}", "model.loss.disc_start=0",
                     "model.lpips.vgg_weights=random", "engine.precision=fp32"], check_files=False)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    task = build_task(r, DistEnv(0, 0, 1, "127.0.0.1", 0, "single"))
    ae, disc = task.ae.to(dev).train(), task.disc.to(dev).train()
    lpips = task.frozen_modules()["lpips"].to(dev)
    opt_ae = torch.optim.Adam(ae.parameters(), lr=4.5e-6 * batch, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=4.5e-6 * batch, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, 256, 256, generator=g) * 2 - 1).to(dev)
    lw = r.model.loss

    class Eng:  # what StepContext expects of an engine: callable, with .module
        def __init__(self, m):
            self.module = m

        def __call__(self, *a, **k):
            return self.module(*a, **k)

    def framework_step(s):
        for name, opt in (("ae", opt_ae), ("disc", opt_d)):
            ctx = StepContext(step=s, micro=0, device=dev, dtype=torch.float32, rank=0, world_size=1, batch_size=batch,
                              grad_accum=1, seed=0, stream=name, _engines={"ae": Eng(ae), "disc": Eng(disc)},
                              _frozen={"lpips": lpips})
            loss, _ = task.loss(name, x, ctx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def taming_step(s):
        out = ae(x)
        xrec, qloss = out["rec"], out["qloss"]
        rec = (x - xrec).abs() + lw.perceptual_weight * lpips(x, xrec).view(-1, 1, 1, 1)
        nll = rec.mean()
        g_loss = -disc(xrec).mean()
        last = ae.decoder.conv_out.weight
        gn, = torch.autograd.grad(nll, last, retain_graph=True)
        gg, = torch.autograd.grad(g_loss, last, retain_graph=True)
        d_weight = torch.clamp(gn.norm() / (gg.norm() + 1e-4), 0.0, 1e4).detach() * lw.disc_weight
        loss = nll + d_weight * lw.disc_factor * g_loss + lw.codebook_weight * qloss.mean()
        opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        opt_ae.step()
        xrec = ae(x)["rec"]  # Lightning's optimizer_idx 1: the autoencoder again, graph kept
        d_loss = lw.disc_factor * hinge_d_loss(disc(x.detach()), disc(xrec.detach()))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

    return timed_steps(framework_step if impl == "framework" else taming_step, steps, batch)


def run_case(impl, batch, ckpt, steps, limit_gib, timeout):
    return run_child([sys.executable, __file__, "--child", impl, str(batch), ckpt, str(steps)], limit_gib, timeout)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, impl, batch, ckpt, steps = sys.argv
        print(json.dumps(child(impl, int(batch), ckpt, int(steps))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--memory-limit-gib", type=float, default=22.0)
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results, ratios = {}, {}
    for b in batches:
        for impl, ckpt in (("taming", "none"), ("framework", "none"), ("framework", "blocks")):
            key = f"{impl}_b{b}" + (f"_ckpt_{ckpt}" if impl == "framework" else "")
            results[key] = run_case(impl, b, ckpt, args.steps, args.memory_limit_gib, args.timeout)
            print(f"{key}: {results[key]}", file=sys.stderr, flush=True)
        base = results[f"taming_b{b}"]
        for ckpt in ("none", "blocks"):
            ours = results[f"framework_b{b}_ckpt_{ckpt}"]
            if "error" not in base and "error" not in ours:
                ratios[f"b{b}_ckpt_{ckpt}"] = {
                    "speedup_per_image": round(base["sec_per_step"] / ours["sec_per_step"], 2),
                    "memory_ratio": round(ours["peak_memory_gib"] / base["peak_memory_gib"], 2)}
    import torch

    print(json.dumps({
        "benchmark": "vqgan_step",
        "settings": {"architecture": "recipes/vqgan/faceshq256.yaml (ae 72,141,699, disc 2,765,633, LPIPS 14,716,160)",
                     "resolution": 256, "precision": "fp32", "optimizer": "torch Adam(0.5, 0.9)",
                     "gan_terms": "on (disc_start 0), adaptive weight, hinge", "timed_steps": args.steps,
                     "warmup_steps": 1, "statistic": "median step time",
                     "device": "cuda" if torch.cuda.is_available() else "cpu",
                     "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())), "torch": torch.__version__,
                     "machine": platform.processor() or platform.machine()},
        "results": results, "framework_vs_taming": ratios,
        "target": "speedup_per_image >= 1.3 at memory_ratio <= 1"}))


if __name__ == "__main__":
    main()
