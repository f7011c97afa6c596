"""The stage-1 tools on a real (tiny) VQGAN run: encode_codes writes each image's codes once, the
same file on 1 and 2 ranks; eval_recon scores every image once, the same on 1 and 2 ranks;
sample.py writes a reconstruction grid; another family's checkpoint is refused in one line."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_VAE, TINY_VQ, VAE, VQGAN, env, free_port, mnist300_beton, run_train

pytestmark = pytest.mark.slow  # real training runs and tools in real processes


def tool(name: str, *args: str, nproc: int = 1, check: bool = True, quiet: bool = True):
    cmd = ([sys.executable] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"])
    args = (*args, "--no-progress") if quiet else args
    p = subprocess.run(cmd + [str(REPO / "tools" / name), *args], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="module")
def small_beton(tmp_path_factory):
    """300 of the bundled digits (a quick file to encode twice)."""
    return mnist300_beton(tmp_path_factory.mktemp("data") / "mnist300.beton")


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, small_beton):
    d = tmp_path_factory.mktemp("vq") / "run"
    run_train(VQGAN, TINY_VQ + [f"run.dir={d}", f"data.path={small_beton}", "train.steps=3"])
    return d


def read_codes(path):
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption

    pipes = {"codes": [NDArrayDecoder()], "codes_flipped": [NDArrayDecoder()], "label": [IntDecoder()],
             "split": [IntDecoder()], "source_index": [IntDecoder()]}
    out = {k: [] for k in pipes}
    for batch in Loader(str(path), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL, pipelines=pipes,
                        drop_last=False):
        for k, v in zip(pipes, batch):
            out[k].append(np.array(v).copy())
    return {k: np.concatenate(v) for k, v in out.items()}


def test_encode_codes_stores_the_model_indices_once_and_two_ranks_write_the_same_file(vq_run, small_beton, tmp_path):
    one, two = tmp_path / "one.beton", tmp_path / "two.beton"
    tool("encode_codes.py", str(vq_run), str(small_beton), str(one), "--flip", "--batch-size", "32")
    tool("encode_codes.py", str(vq_run), str(small_beton), str(two), "--flip", "--batch-size", "32", nproc=2)
    assert one.read_bytes() == two.read_bytes()
    meta = json.loads((tmp_path / "one.beton.json").read_text())
    assert meta["codes"] == 32 and meta["grid"] == [16, 16] and meta["dtype"] == "int16" and meta["flip"]
    got = read_codes(one)
    assert got["codes"].shape == (300, 16, 16) and got["codes"].dtype == np.int16
    assert np.array_equal(got["source_index"].reshape(-1), np.arange(300))  # every image once, in order

    from framework.data import to_model_input
    from framework.data.loader import BetonInfo, EvalLoader
    from framework.data.order import EvalShard
    from framework.distributed import DistEnv
    from framework.eval.checkpoints import load

    loaded = load(vq_run, env=DistEnv(0, 0, 1, "127.0.0.1", 0, "single"), frozen=False)
    info = BetonInfo(small_beton)
    batch, n = next(iter(EvalLoader(info, EvalShard(np.arange(300), 300, 1, 0), 1, 1)))
    x = to_model_input(batch["image"], 8, torch.device("cpu"))
    want = loaded.task.encode_indices(loaded.module, x).numpy()
    assert np.array_equal(got["codes"], want)
    assert np.array_equal(got["codes_flipped"], loaded.task.encode_indices(loaded.module, x.flip(3)).numpy())
    assert np.array_equal(got["label"].reshape(-1), info.labels) and np.array_equal(got["split"].reshape(-1),
                                                                                    info.splits)


def test_eval_recon_scores_each_image_once_on_one_and_two_ranks(vq_run, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    p = tool("eval_recon.py", str(vq_run), "--out", str(a))
    tool("eval_recon.py", str(vq_run), "--out", str(b), "--batch-size", "7", nproc=2)
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    from framework.data.loader import BetonInfo

    assert ra["images"] == rb["images"] == len(BetonInfo(ra["data"]).ids("val"))
    for k in ("l1", "mse", "psnr", "lpips", "usage", "perplexity"):
        assert abs(ra[k] - rb[k]) <= 1e-5 * max(1, abs(ra[k])), k
    assert "random weights" in ra["lpips_vgg"] and "codebook usage" in p.stdout


def test_sample_writes_a_reconstruction_grid(vq_run, tmp_path):
    out = tmp_path / "recon.png"
    tool("sample.py", str(vq_run), "--n", "8", "--out", str(out), quiet=False)
    from PIL import Image

    w, h = Image.open(out).size
    assert (w, h) == (2 + 8 * 34, 2 + 2 * 34)  # 8 inputs above their 8 reconstructions, 32 px + 2 px gaps


def test_encode_codes_refuses_another_family(tmp_path, small_beton):
    d = tmp_path / "vae"
    run_train(VAE, TINY_VAE + [f"run.dir={d}", f"data.path={small_beton}", "train.steps=1"])
    out = tmp_path / "codes.beton"
    p = tool("encode_codes.py", str(d), str(small_beton), str(out), check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error:") and "cannot encode images to codes" in p.stderr
    assert "vqgan" in p.stderr.strip().splitlines()[-1] and not out.exists()
