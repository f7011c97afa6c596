"""Speed of sample-quality scoring on this machine: feature extraction and the whole of
tools/eval_fid.py, each against torch-fidelity's own way of doing it in the same run.

    features   images/s of torch-fidelity's FID Inception at --batch-size: ours on uint8 batches in
               memory (framework.eval.fid.InceptionFeatures: channels-last on the CPU) vs
               torch-fidelity's own extractor reading the same images as PNG files with its own
               loader (the usual "write samples, then score the folder" route); one warm-up batch
               each
    tool       images/s of `tools/eval_fid.py RECIPE --num-samples N` (the model's random weights; the
               reference statistics already cached, their first computation timed on its own) and
               its share of time sampling / extracting features / computing the metrics, vs the
               route it replaces: sampling the same N images to PNG files, then
               torch_fidelity.calculate_metrics(fid, kid, prc) on the folder against its cached
               statistics of the same reference images, in a fresh process as its command line
               runs (both contenders pay process start-up and the first batch's kernel set-up)

The Inception runs with seeded random weights (the same work as the real ones; no weights ship
here). One JSON object on the last line.

    python tools/bench/fid.py [--n 512] [--batch-size 64] [--recipe recipes/vae/mnist5k.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def png_folder(images, folder: Path) -> list[Path]:
    from PIL import Image

    from framework.eval.fid import as_rgb_uint8

    folder.mkdir(parents=True, exist_ok=True)
    x = as_rgb_uint8(images).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, a in enumerate(x):
        paths.append(folder / f"{i:06d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "vae" / "mnist5k.yaml"))
    p.add_argument("--split", default="val")
    a = p.parse_args(argv)
    import torch

    from framework.data.loader import BetonInfo
    from framework.eval.checkpoints import load
    from framework.eval.fid import (InceptionFeatures, as_rgb_uint8, import_torch_fidelity, split_ids,
                                    write_random_inception_weights)

    tf = import_torch_fidelity()
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.utils import get_featuresdict_from_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-fid-"))
    weights = write_random_inception_weights(work / "random-inception.pth")
    net = InceptionFeatures(str(weights))
    loaded = load(a.recipe)
    import shutil

    beton = work / Path(loaded.recipe.data.path).name  # a copy: no reference cache beside it yet
    shutil.copyfile(loaded.recipe.data.path, beton)
    info = BetonInfo(beton)
    ids = split_ids(info, a.split)
    ref_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    tool = [sys.executable, str(ROOT / "tools" / "eval_fid.py"), a.recipe, "--num-samples", str(a.n),
            "--batch-size", str(a.batch_size), "--split", a.split, "--inception-weights", str(weights),
            "--no-progress", "--data", str(info.path)]
    # the whole tool: first with the reference statistics to compute, then cached
    cache_first = json.loads(_run(tool + ["--out", str(work / "first.json")], ref_env, work / "first.json"))
    t0 = time.perf_counter()
    ours = json.loads(_run(tool + ["--out", str(work / "second.json")], ref_env, work / "second.json"))
    ours_tool = time.perf_counter() - t0
    assert ours["reference_cache"]["cached"] and not cache_first["reference_cache"]["cached"]
    draw = lambda b, g: loaded.task.sample(b, 1.0, g, loaded.ctx(b))  # noqa: E731

    # the same n samples, as tensors and as PNG files
    t0 = time.perf_counter()
    images = torch.cat([draw(min(a.batch_size, a.n - s), torch.Generator().manual_seed(s))
                        for s in range(0, a.n, a.batch_size)])
    t_draw = time.perf_counter() - t0
    x = as_rgb_uint8(images)
    t0 = time.perf_counter()
    files = png_folder(images, work / "samples")
    t_png = time.perf_counter() - t0

    # features: ours in memory vs torch-fidelity's loader over the PNG files (one warm-up batch each)
    net(x[:a.batch_size])
    t0 = time.perf_counter()
    for i in range(0, a.n, a.batch_size):
        net(x[i:i + a.batch_size])
    ours_feat = time.perf_counter() - t0
    stock = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    get_featuresdict_from_dataset(ImagesPathDataset([str(f) for f in files[:a.batch_size]]), stock, a.batch_size,
                                  cuda=False, save_cpu_ram=False, verbose=False)  # its warm-up batch
    t0 = time.perf_counter()
    theirs = get_featuresdict_from_dataset(ImagesPathDataset([str(f) for f in files]), stock, a.batch_size,
                                           cuda=False, save_cpu_ram=False, verbose=False)
    theirs_feat = time.perf_counter() - t0
    assert theirs["2048"].shape == (a.n, 2048)

    # torch-fidelity's route: the reference images as PNG files, their statistics in its cache
    ref_folder = work / "reference"
    from framework.data.loader import EvalLoader
    from framework.data.order import EvalShard

    ref_x = torch.cat([b["image"][:n] for b, n in EvalLoader(info, EvalShard(ids, a.batch_size, 1, 0), 3, 1)])
    png_folder(ref_x, ref_folder)
    kw = dict(input2=str(ref_folder), input2_cache_name="bench-fid-reference", cache_root=str(work / "tf-cache"),
              fid=True, kid=True, prc=True, kid_subset_size=min(1000, a.n, len(ids)),
              feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights), cuda=False,
              verbose=False, batch_size=a.batch_size)
    kw["input1"] = str(work / "samples")
    baseline = [sys.executable, "-c", BASELINE, json.dumps(kw)]
    _run(baseline, ref_env)  # fills torch-fidelity's cache of input2

    # sampling to PNG + torch-fidelity on the folder (its reference cached), against the tool above
    t0 = time.perf_counter()
    theirs_figures = json.loads(_run(baseline, ref_env).strip().splitlines()[-1])
    theirs_metrics = time.perf_counter() - t0
    assert "frechet_inception_distance" in theirs_figures
    theirs_tool = t_draw + t_png + theirs_metrics

    inner = ours["timing"]
    shutil.rmtree(work, ignore_errors=True)
    busy = inner["sampling_s"] + inner["features_s"] + inner["metrics_s"]
    out = {
        "settings": {"n": a.n, "batch_size": a.batch_size, "recipe": a.recipe, "reference": f"{info.path} {a.split} "
                     f"({len(ids)} images)", "device": "cpu", "threads": torch.get_num_threads(),
                     "inception": "torch-fidelity inception-v3-compat, seeded random weights", "torch": torch.__version__,
                     "torch_fidelity": tf.__version__, "precision": "fp32"},
        "features": {"ours_images_per_s": a.n / ours_feat, "torch_fidelity_png_folder_images_per_s": a.n / theirs_feat,
                     "speedup": theirs_feat / ours_feat},
        "tool": {"ours_images_per_s": a.n / ours_tool, "ours_seconds": ours_tool,
                 "ours_share_sampling": inner["sampling_s"] / busy, "ours_share_features": inner["features_s"] / busy,
                 "ours_share_metrics": inner["metrics_s"] / busy,
                 "baseline_images_per_s": a.n / theirs_tool, "baseline_seconds": theirs_tool,
                 "baseline_parts_s": {"sample": t_draw, "write_png": t_png, "torch_fidelity": theirs_metrics},
                 "speedup": theirs_tool / ours_tool},
        "reference_first_time": {"images": len(ids), "seconds": cache_first["timing"]["reference_s"],
                                 "images_per_s": len(ids) / cache_first["timing"]["reference_s"]},
        "tool_features_images_per_s": a.n / inner["features_s"],
    }
    print(json.dumps(out))
    return 0


# torch-fidelity's calculate_metrics in a fresh process, as its own command line would run it (that
# command cannot import here: beside the CPU torch, import_torch_fidelity's workaround is needed)
BASELINE = ("import json, sys; from framework.eval.fid import import_torch_fidelity; "
            "print(json.dumps(import_torch_fidelity().calculate_metrics(**json.loads(sys.argv[1]))))")


def _run(cmd, env, out: Path | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{p.stderr[-2000:]}")
    return out.read_text() if out is not None else p.stdout


if __name__ == "__main__":
    sys.exit(main())
