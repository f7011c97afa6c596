"""Sample quality (issue 13): the Frechet distance against its closed form, KID and precision/recall
against torch-fidelity's own functions, the whole feature pipeline against
torch_fidelity.calculate_metrics on two image folders (random Inception weights, named as such: no
weights ship here), the tool on 1 and 2 ranks, the reference cache, FID during training, and, with
a digit classifier trained here as a stand-in for Inception, that the metric orders real digits,
a trained NVAE's samples and an untrained one's."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (MNIST_BETON, NVAE, REPO, TINY_NVAE, TINY_VAE, TINY_VQ, VAE, VQGAN, digit_features, env,
                      free_port, mnist300_beton, run_train)
from framework.eval import fid as F


def spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_equals_the_closed_form():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), spd(rng, d), spd(rng, d)
    closed = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real))
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)
    # diagonal covariances: sum (sigma1 - sigma2)^2 exactly
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    want = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert F.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
    # a swapped pair is 1 (means 0 and 1 along one axis)
    assert F.frechet_distance(np.zeros(d), np.eye(d), np.eye(d)[0], np.eye(d)) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("n,d", [(400, 16), (60, 128)])  # full-rank and singular covariances
def test_the_frechet_distance_of_a_set_with_itself_is_zero(n, d):
    f = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32) * 3
    s = F.stats_of(f)
    assert abs(F.frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-6


def test_metrics_equal_torch_fidelitys_own_functions_on_the_same_features():
    tf = F.import_torch_fidelity()
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    assert tf.__version__ == "0.4.0"
    rng = np.random.default_rng(2)
    fake = torch.from_numpy(rng.normal(size=(300, 32)).astype(np.float32))
    real = torch.from_numpy((rng.normal(size=(260, 32)) * 1.3 + 0.4).astype(np.float32))
    ref = F.stats_of(real.numpy())
    ours = F.score(fake.numpy(), ref, kid_subset_size=100)
    theirs_fid = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real), False)
    assert ours["fid"] == pytest.approx(theirs_fid["frechet_inception_distance"], rel=1e-6)
    kid = kid_features_to_metric(fake, real, kid_subset_size=100, verbose=False)
    assert ours["kid"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["kid_std"] == pytest.approx(kid["kernel_inception_distance_std"], rel=1e-6)
    pr = prc_features_to_metric(fake, real, verbose=False)
    assert (ours["precision"], ours["recall"]) == pytest.approx((pr["precision"], pr["recall"]), abs=1e-9)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1  # neither side covers the other wholly


def test_precision_and_recall_of_a_set_against_itself_are_one():
    f = np.random.default_rng(3).normal(size=(200, 24)).astype(np.float32)
    assert F.precision_recall(f, f) == (1.0, 1.0)
    assert F.precision_recall(f, f, chunk=7) == (1.0, 1.0)  # chunked distances: the same


def test_the_inception_weights_file_is_checked_in_one_line(tmp_path):
    from framework.errors import UserError

    with pytest.raises(UserError, match="Inception weights not found: .*weights-inception-2015-12-05"):
        F.inception_setting(str(tmp_path / F.INCEPTION_FILE))
    assert F.default_inception_path().name == F.INCEPTION_FILE
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not torch-fidelity's Inception weights"):
        F.InceptionFeatures(str(bad))


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_draw_the_samples_of_one_process_between_them(world):
    """Block k is seeded by (seed, k) and drawn by rank k mod world: the ranks' shares, put in
    order as the gather does, are the features of one process (the 2-process run: the tool test)."""
    class Mean(F.FeatureNet):
        name, dims = "mean", 3

        def __call__(self, x):
            return x.float().mean((2, 3))

    draw = lambda b, g: torch.rand(b, 3, 4, 4, generator=g)  # noqa: E731
    one, rows, _ = F.local_sample_features(21, draw, Mean(), 4, 1, 0, seed=5)
    assert rows.tolist() == list(range(21))
    parts = [F.local_sample_features(21, draw, Mean(), 4, world, r, seed=5) for r in range(world)]
    got = torch.full((21, 3), float("nan"))
    for feats, rows, _ in parts:
        assert len(feats) == len(rows)
        got[torch.from_numpy(rows)] = feats
    torch.testing.assert_close(got, one, rtol=0, atol=0)
    other, _, _ = F.local_sample_features(21, draw, Mean(), 4, 1, 0, seed=6)
    assert not torch.equal(other, one)


# -- the whole pipeline against torch_fidelity.calculate_metrics -----------------------------------

@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    return F.write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.fixture(scope="module")
def small_beton(tmp_path_factory):
    """300 of the bundled digits, 30 of them validation."""
    return mnist300_beton(tmp_path_factory.mktemp("data") / "mnist300.beton", val_every=10)


@pytest.mark.slow
def test_fid_and_kid_equal_torch_fidelity_on_two_image_folders(tmp_path, random_inception):
    """Random Inception weights (named as such): the figures are not FID, but both sides compute them
    with the same network on the same images, so they must agree."""
    from PIL import Image

    from framework.data import sources
    from framework.data.loader import BetonInfo
    from framework.data.write import write_beton
    from framework.distributed import detect

    digits = sources.mnist5k(0.1).arrays
    rng = np.random.default_rng(4)
    folders = {}
    for name, start, noise in (("a", 0, 0), ("b", 2500, 40)):
        d = tmp_path / name
        d.mkdir()
        for i in range(40):
            a = digits[start + i * 50].astype(np.int16) + rng.integers(-noise, noise + 1, digits[0].shape)
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB").resize((32, 32)).save(
                d / f"{i:03d}.png")
        folders[name] = d
    tf = F.import_torch_fidelity()
    theirs = tf.calculate_metrics(input1=str(folders["a"]), input2=str(folders["b"]), fid=True, kid=True,
                                  kid_subset_size=20, feature_extractor="inception-v3-compat",
                                  feature_extractor_weights_path=str(random_inception), cuda=False, cache=False,
                                  verbose=False, batch_size=16, save_cpu_ram=True)
    net = F.InceptionFeatures(str(random_inception))
    assert net.label.startswith("FID")  # a weights file is taken for what it says it is
    feats = {}
    for name, d in folders.items():
        beton = tmp_path / f"{name}.beton"
        write_beton(sources.image_folder(str(d), 0.0), beton, 32, "raw", progress=False)
        info = BetonInfo(beton)
        feats[name] = F.image_features(info, F.split_ids(info, "all"), net, detect({}), 3, 16, progress=False)
    ours = F.score(feats["a"], F.stats_of(feats["b"]), ("fid", "kid"), kid_subset_size=20)
    assert ours["fid"] > 0
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)


# -- the tool ------------------------------------------------------------------------------------

def tool(*args: str, nproc: int = 1, check: bool = True):
    cmd = ([sys.executable] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"])
    p = subprocess.run(cmd + [str(REPO / "tools" / "eval_fid.py"), *args, "--no-progress"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"eval_fid.py failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, small_beton):
    d = tmp_path_factory.mktemp("vae") / "run"
    run_train(VAE, TINY_VAE + [f"run.dir={d}", f"data.path={small_beton}", "train.steps=4"])
    return d


@pytest.mark.slow
def test_two_ranks_score_what_one_does_and_the_reference_is_cached(vae_run, small_beton, random_inception, tmp_path):
    common = ["--num-samples", "21", "--batch-size", "4", "--split", "val", "--inception-weights", str(random_inception)]
    one = tool(str(vae_run), *common, "--out", str(tmp_path / "one.json"))
    r1 = json.loads((tmp_path / "one.json").read_text())
    cache = F.cache_path(small_beton, "val", F.InceptionFeatures(str(random_inception)))
    assert r1["reference_cache"] == {"cache": str(cache), "cached": False} and cache.is_file()
    assert r1["n"] == 21 and r1["reference_images"] == 30 and r1["weights"] == "ema"
    assert "FID " in one.stdout and "biased upwards" in one.stdout
    stamp = cache.stat().st_mtime_ns
    tool(str(vae_run), *common, "--out", str(tmp_path / "two.json"), nproc=2)
    r2 = json.loads((tmp_path / "two.json").read_text())
    assert r2["world_size"] == 2 and r2["reference_cache"]["cached"] is True and cache.stat().st_mtime_ns == stamp
    for k in ("fid", "kid", "kid_std", "precision", "recall"):
        assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-9), k
    # a changed .beton (same bytes, new modification time) is scored again
    os.utime(small_beton, ns=(stamp, stamp + 10**9))
    tool(str(vae_run), *common, "--metrics", "fid", "--out", str(tmp_path / "three.json"))
    r3 = json.loads((tmp_path / "three.json").read_text())
    assert r3["reference_cache"]["cached"] is False and r3["fid"] == pytest.approx(r1["fid"], rel=1e-5)
    assert "kid" not in r3


@pytest.mark.slow
def test_rfid_of_a_vqgan_and_bad_input_are_one_line(vae_run, small_beton, random_inception, tmp_path):
    vq = tmp_path / "vq"
    run_train(VQGAN, TINY_VQ + [f"run.dir={vq}", f"data.path={small_beton}", "train.steps=2"])
    w = ["--inception-weights", str(random_inception)]
    bare = tool(str(vq), "--n", "8", *w, check=False)
    assert bare.returncode == 2 and "cannot draw samples (--recon scores its reconstructions" in bare.stderr
    tool(str(vq), "--recon", "--split", "val", "--metrics", "fid,kid", *w, "--out", str(tmp_path / "r.json"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["recon"] and r["n"] == 30 and r["fid"] > 0 and r["temperature"] is None
    for args, message in (
        (["--n", "1", *w], "--n is 1; it must be >= 2"),
        (["--n", "4", "--inception-weights", str(tmp_path / "none.pth")], "Inception weights not found"),
        (["--n", "4", "--metrics", "fid,is", *w], "--metrics: 'is' is not one of fid, kid, pr"),
        (["--n", "4", "--split", "test", *w], "--split is 'test'"),
    ):
        p = tool(str(vae_run), *args, check=False)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
        assert len(lines) == 1 and message in lines[0], (args, p.stderr[-2000:])


@pytest.mark.slow
def test_fid_during_training_is_logged_and_missing_weights_write_nothing(small_beton, random_inception, tmp_path):
    d = tmp_path / "run"
    run_train(VAE, TINY_VAE + [f"run.dir={d}", f"data.path={small_beton}", "train.steps=4", "train.fid_every=2",
                               "train.fid_samples=8", f"eval.inception_weights={random_inception}"])
    fids = {r["step"]: r["val/fid"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
            if "val/fid" in r}
    assert sorted(fids) == [2, 4] and all(v > 0 for v in fids.values())
    missing = tmp_path / "missing"
    p = run_train(VAE, TINY_VAE + [f"run.dir={missing}", f"data.path={small_beton}", "train.fid_every=2",
                                   f"eval.inception_weights={tmp_path / 'none.pth'}"], check=False)
    assert p.returncode == 2 and "Inception weights not found" in p.stderr and not missing.exists()


# -- the metric orders what it should ---------------------------------------------------------------

@pytest.mark.slow
def test_the_score_orders_real_digits_a_trained_nvae_and_an_untrained_one(tmp_path):
    from framework.data.loader import BetonInfo
    from framework.distributed import detect
    from framework.eval.checkpoints import load

    info = BetonInfo(MNIST_BETON)
    net = digit_features()
    assert net.accuracy > 0.85
    e = detect({})
    ref = F.stats_of(F.image_features(info, info.ids("train"), net, e, 1, 250, progress=False))  # not cached:
    real = F.stats_of(F.image_features(info, info.ids("val"), net, e, 1, 250, progress=False))  # a test's net
    d = tmp_path / "nvae"
    run_train(NVAE, TINY_NVAE + [f"run.dir={d}", "train.steps=150", "train.ema=0.9"])
    scores = {"real": F.frechet_distance(real.mu, real.sigma, ref.mu, ref.sigma)}
    for name, path in (("trained", d), ("untrained", NVAE)):
        loaded = load(path, overrides=TINY_NVAE if name == "untrained" else ())
        fake, _ = F.sample_features(500, lambda b, g: loaded.task.sample(b, 1.0, g, loaded.ctx(b)), net, e, 100,
                                    progress=False)
        s = F.stats_of(fake)
        scores[name] = F.frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)
    print("digit-classifier Frechet distances:", scores)
    assert scores["real"] < scores["trained"] < scores["untrained"], scores
