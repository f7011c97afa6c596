"""Helpers shared by the tests: run the real trainer in real processes and read what it wrote."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# the toy family of the tests (tests/toy_family.py), registered as an out-of-tree family would be
os.environ.setdefault("FRAMEWORK_FAMILIES", "toy=toy_family")
VAE = str(REPO / "recipes" / "vae" / "mnist5k.yaml")
DCGAN = str(REPO / "recipes" / "dcgan" / "mnist5k.yaml")
NVAE = str(REPO / "recipes" / "nvae" / "mnist5k.yaml")
TOY = str(REPO / "tests" / "toy.yaml")
VQGAN = str(REPO / "recipes" / "vqgan" / "mnist5k_smoke.yaml")

# The bundled MNIST digits as a real .beton, written once per machine (content is deterministic).
MNIST_BETON = REPO / ".cache" / "test_data" / "mnist5k.beton"


def pytest_configure(config):
    if not MNIST_BETON.exists():
        from framework.data import sources
        from framework.data.write import write_beton

        MNIST_BETON.parent.mkdir(parents=True, exist_ok=True)
        write_beton(sources.mnist5k(0.1), MNIST_BETON, 32, "raw", progress=False)


# Small enough for 2 CPU cores, same code paths as the real recipe.
TINY_VAE = [f"data.path={MNIST_BETON}", "model.width=8", "model.latent_dim=8", "model.num_mix=2", "data.batch_size=8",
            "data.eval_batch_size=64", "train.progress=false", "train.eval_every=0", "train.sample_every=0",
            "train.num_samples=4", "engine.schedule.warmup_steps=2", "train.ema=0.99"]
TINY_NVAE = [f"data.path={MNIST_BETON}", "model.num_channels_enc=8", "model.num_channels_dec=8",
             "model.num_groups_per_scale=2", "model.num_latent_per_group=4", "data.batch_size=8",
             "data.eval_batch_size=64", "train.progress=false", "train.eval_every=0", "train.sample_every=0",
             "train.num_samples=4", "engine.schedule.warmup_steps=2"]
TINY_TOY = [f"data.path={MNIST_BETON}", "data.batch_size=8", "data.eval_batch_size=64", "train.progress=false",
            "train.num_samples=4", "engine.schedule.warmup_steps=0", "engine.optimizer.lr=0.01"]
# LPIPS with random VGG16 weights: no weights ship here
TINY_VQ = [f"data.path={MNIST_BETON}", "model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
           "model.attn_resolutions=[16]", "model.z_channels=8", "model.embed_dim=8", "model.quantizer.n_embed=32",
           "model.disc_ndf=8", "model.disc_num_layers=2", "model.lpips.vgg_weights=random",
           "model.loss.perceptual_weight=0.5", "model.loss.disc_weight=0.8", "model.loss.disc_start=1",
           "data.batch_size=4", "data.eval_batch_size=64", "train.progress=false", "train.eval_every=0",
           "train.sample_every=0", "train.num_samples=4", "train.log_every=1"]
TINY_GAN = [f"data.path={MNIST_BETON}", "model.width=8", "model.z_dim=8", "data.batch_size=8",
            "train.progress=false", "train.num_samples=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e["OMP_NUM_THREADS"] = "1"
    e["FRAMEWORK_FAMILIES"] = "toy=toy_family"
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), e.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        e.pop(k, None)
    return e


def train_cmd(recipe: str, overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "framework.train", recipe, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "framework.train", recipe, *overrides]


def run_train(recipe: str, overrides: list[str], nproc: int = 1, timeout: int = 600, check: bool = True,
              extra_env: dict | None = None):
    p = subprocess.run(train_cmd(recipe, overrides, nproc), cwd=REPO, env={**env(), **(extra_env or {})},
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def start_train(recipe: str, overrides: list[str], nproc: int = 1, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(recipe, overrides, nproc), cwd=REPO, env={**env(), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group of a run started with start_train (torchrun's workers too)."""
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def wait_for(predicate, proc, timeout=300):
    """Polls `predicate` while `proc` runs (a condition on files it writes, not on time); fails if the
    process ends first or nothing happens within `timeout` seconds."""
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended ({proc.returncode}) before the condition:\n{out[-2000:]}\n{err[-4000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def train_losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics(run_dir) if key in m}


def assert_same_losses(ref: Path, got: Path, keys, tol: float = 1e-5) -> None:
    """Every logged step of every key in `keys` equal in two runs, to `tol` relative (0: bit for bit)."""
    for key in keys:
        a, b = train_losses(ref, key), train_losses(got, key)
        assert a and sorted(a) == sorted(b), (key, a, b)
        for s in a:
            assert abs(a[s] - b[s]) <= tol * max(1.0, abs(a[s])), (key, s, a[s], b[s])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


def mnist300_beton(path: Path, val_every: int = 0) -> Path:
    """300 of the bundled digits (every class: they are sorted by label), at 32 px, raw; their own
    split, or every val_every-th one validation."""
    import numpy as np

    from framework.data import sources
    from framework.data.write import write_beton

    src = sources.mnist5k(0.1)
    keep = np.arange(0, 5000, 16)[:300]
    splits = src.splits[keep]
    if val_every:
        splits = np.zeros(300, np.int64)
        splits[::val_every] = 1
    write_beton(sources.Source("mnist300", src.labels[keep], splits, arrays=src.arrays[keep]), path, 32, "raw",
                progress=False)
    return path


def digit_classifier(seed: int = 0, epochs: int = 3):
    """A small CNN trained here on the bundled digits' training split (32 px, [0, 1]); -> (net, val accuracy).
    The priors' samples are classified with it; its penultimate layer stands in for Inception in the
    FID test."""
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F

    from framework.data import sources

    torch.manual_seed(seed)
    src = sources.mnist5k(0.1)
    x = torch.from_numpy(np.stack([src.load(i, 32)[..., 0] for i in range(len(src))])).float().div(255).unsqueeze(1)
    y = torch.from_numpy(np.asarray(src.labels)).long()
    tr, va = torch.from_numpy(np.flatnonzero(src.splits == 0)), torch.from_numpy(np.flatnonzero(src.splits == 1))
    net = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                        nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 16, 10))
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in torch.randperm(len(tr), generator=g).split(64):
            i = tr[b]
            loss = F.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return net, float((net(x[va]).argmax(1) == y[va]).float().mean())


def digit_features():
    """A stand-in for Inception (none ships here): a FeatureNet giving the 1024-d penultimate layer of
    digit_classifier(); its `accuracy` is the classifier's on the validation split."""
    import torch

    from framework.eval.fid import FeatureNet

    class DigitFeatures(FeatureNet):
        name, dims, label = "test-digit-classifier", 1024, "digit-classifier features (a test stand-in)"

        def __init__(self):
            net, self.accuracy = digit_classifier()
            self.body = net[:-1]

        @torch.no_grad()
        def __call__(self, x):
            return self.body(x[:, :1].float() / 255)

    return DigitFeatures()


def digit_frechet(models: dict, n: int = 500, on_load=None) -> dict:
    """name -> (run, checkpoint or recipe, its overrides): the Fréchet distance of n samples (t = 1)
    against the bundled digits' training split, in digit_features()'s space (the tests' stand-in for
    Inception); on_load(name, loaded) may check each loaded model first."""
    from framework.data.loader import BetonInfo
    from framework.distributed import detect
    from framework.eval import fid as F
    from framework.eval.checkpoints import load

    net, e, info = digit_features(), detect({}), BetonInfo(MNIST_BETON)
    ref = F.stats_of(F.image_features(info, info.ids("train"), net, e, 1, 250, progress=False))
    scores = {}
    for name, (path, overrides) in models.items():
        loaded = load(path, overrides=list(overrides))
        if on_load is not None:
            on_load(name, loaded)
        fake, _ = F.sample_features(n, lambda b, g: loaded.task.sample(b, 1.0, g, loaded.ctx(b)), net, e, 100,
                                    progress=False)
        s = F.stats_of(fake)
        scores[name] = F.frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)
    print("digit-classifier Frechet distances:", scores)
    return scores
