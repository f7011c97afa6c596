"""Sampling speed of the GPT prior: tools/profile_sampling.py on two architectures with random
weights, the static-KV-cache sampler against the uncached one (a full forward per code, the
algorithm of taming's `cond_transformer.sample`) in the same run, and the 512 px sliding window
(32 x 32 codes from a 16 x 16 model) against taming's window rule (a full window forward per code,
scripts/make_samples.py). fp32, top-k 250, temperature 1, each case in a fresh process.

    gpt12    12 layers, 8 heads, width 512, block 256 (39,009,280 parameters)
    faceshq  recipes/prior/faceshq256_gpt.yaml: 24 layers, 16 heads, width 1024 (304,932,864)

ms/image includes decoding the codes through the (random) faceshq VQGAN decoder at 256 px. The
uncached sampler of the faceshq GPT takes minutes per grid on a CPU, so for that architecture the
cached-vs-uncached row times the first --prefix codes of each grid (the uncached cost grows with
the position, so a prefix flatters the uncached sampler), and a second row times the cached
sampler over whole grids. taming-transformers' own samplers, measured on the same 2-core machine
(quoted in the issue, not re-run here), stand beside the figures.

    python tools/bench/prior_sampling.py [--repeats 1] [--prefix 32] [--skip-window]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from child import run_child  # noqa: E402

RECIPE = str(ROOT / "recipes" / "prior" / "faceshq256_gpt.yaml")
FIRST = str(ROOT / "recipes" / "vqgan" / "faceshq256.yaml")
ARCH = {"gpt12": ["model.gpt.n_layer=12", "model.gpt.n_head=8", "model.gpt.n_embd=512", "model.gpt.block_size=256"],
        "faceshq": []}
# tokens/s of taming's samplers on this 2-core machine, fp32, top-k 250 (the measurements)
TAMING = {("gpt12", 1): {"sample": 18.0, "sample_with_past": 75.0}, ("gpt12", 8): {"sample": 23.0, "sample_with_past": 199.0},
          ("faceshq", 1): {"sample": 0.91, "sample_with_past": 11.3}, ("faceshq", 8): {"sample_with_past": 19.9}}


def profile(arch: str, extra: list[str], timeout: int) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / "profile_sampling.py"), RECIPE, *ARCH[arch], "--first-stage", FIRST,
           "--top-k", "250", "--no-progress", "--precision", "fp32", *extra]
    return run_child(cmd, 0, timeout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prefix", type=int, default=32, help="codes per grid timed for the faceshq uncached sampler")
    p.add_argument("--skip-window", action="store_true")
    p.add_argument("--timeout", type=int, default=3600)
    a = p.parse_args(argv)
    rw = ["--repeats", str(a.repeats), "--warmup", str(a.warmup)]
    cases = {"gpt12": profile("gpt12", ["--batch-sizes", "1,8", *rw], a.timeout),
             "faceshq_prefix": profile("faceshq", ["--batch-sizes", "1,8", "--tokens", str(a.prefix), *rw], a.timeout),
             "faceshq_cached": profile("faceshq", ["--batch-sizes", "1,8", "--no-uncached", *rw], a.timeout)}
    if not a.skip_window:
        cases["gpt12_window_512px"] = profile("gpt12", ["--batch-sizes", "1", "--grid", "32,32", *rw], a.timeout)
    table = []
    for name, r in cases.items():
        if "error" in r:
            table.append({"case": name, "error": r["error"]})
            continue
        arch = name.split("_")[0]
        for row in r["results"]:
            b = row["batch"]
            t = TAMING.get((arch, b), {}) if not r["window"] else {}
            entry = {"case": name, "batch": b, "path": row["path"], "timed_codes": r["timed_tokens"],
                     "tokens_per_s": round(row["tokens_per_s"], 2), "ms_per_image": round(row["ms_per_image"], 1)
                     if r["decode"] else None}
            if row["path"] == "cached":
                entry["vs_our_uncached"] = round(r["speedup_cached_vs_uncached"].get(str(b), 0) or
                                                 r["speedup_cached_vs_uncached"].get(b, 0), 2) or None
                for k, v in t.items():
                    entry[f"vs_taming_{k}"] = round(row["tokens_per_s"] / v, 2)
            table.append(entry)
    meta = {k: cases["gpt12"].get(k) for k in ("device_name", "threads", "torch", "precision", "top_k", "temperature")}
    print(json.dumps({"benchmark": "prior_sampling", **meta, "repeats": a.repeats, "warmup": a.warmup,
                      "taming_tokens_per_s": {f"{k[0]} b{k[1]}": v for k, v in TAMING.items()}, "rows": table,
                      "cases": cases}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
