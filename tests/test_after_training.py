"""After training (issue 6): BN re-estimation, importance-weighted bits/dim, the fast sampling path,
sample grids, each against a known answer, on real checkpoints written by the trainer."""
import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import MNIST_BETON, NVAE, REPO, TINY_NVAE, TINY_VAE, VAE, env, free_port, run_train
from framework.eval.bpd import evaluate_bpd, image_log_weights
from framework.eval.checkpoints import load
from framework.eval.recalibrate import recalibrate
from framework.models.nvae.fast import fold

pytestmark = pytest.mark.slow  # real training runs in real processes: minutes



def tool(name: str, *args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    script = str(REPO / "tools" / name)
    cmd = [sys.executable, script, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        script, *args]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}")
    return p


def tree_hash(folder) -> dict:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def nvae_run(tmp_path_factory):
    """A tiny NVAE trained for 40 steps (ZeRO-2, with an EMA): a real run folder."""
    d = tmp_path_factory.mktemp("nvae") / "run"
    run_train(NVAE, TINY_NVAE + [f"run.dir={d}", "train.steps=40", "engine.zero_stage=2", "train.ema=0.9"])
    return d


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory):
    """The same VAE training on 1 process (ZeRO-0) and on 2 (ZeRO-3, EMA sharded over the ranks)."""
    root = tmp_path_factory.mktemp("vae")
    run_train(VAE, TINY_VAE + [f"run.dir={root / 'z0'}", "train.steps=6", "engine.zero_stage=0", "data.batch_size=16"])
    run_train(VAE, TINY_VAE + [f"run.dir={root / 'z3'}", "train.steps=6", "engine.zero_stage=3", "data.batch_size=8"],
              nproc=2)
    return root / "z0", root / "z3"


class UniformLevels:
    """p(x) uniform over the 2^b levels of every pixel."""

    def __init__(self, params, num_bits):
        self.shape, self.b = params.shape, num_bits

    def log_prob(self, x):
        return torch.full(x.shape, -self.b * math.log(2.0), dtype=torch.float32)


@pytest.mark.parametrize("num_bits", [8, 5])
def test_a_uniform_decoder_scores_exactly_b_bits_per_dim(num_bits):
    loaded = load(NVAE, overrides=TINY_NVAE + [f"data.num_bits={num_bits}", "data.eval_batch_size=128"])
    net = loaded.module
    with torch.no_grad():  # posterior = prior exactly: every group's KL is 0
        for conv in net.enc_sampler:
            conv.weight.zero_()
            conv.bias.zero_()
    net.output_dist = lambda params: UniformLevels(params, net.num_bits)
    r = evaluate_bpd(loaded, "val", iw_samples=8, progress=False)
    assert r["images"] == 500 and r["dims"] == 28 * 28 and r["num_bits"] == num_bits
    # exact up to float32 summation of the 784 pixel terms (a missing log K would be off by 4e-3)
    assert r["bpd"] == pytest.approx(num_bits, rel=1e-6)
    assert r["elbo_bpd"] == pytest.approx(num_bits, rel=1e-6)
    assert r["bpd_se"] == pytest.approx(0.0, abs=1e-6)


def test_importance_weighting_bounds_the_elbo_and_tightens_with_k(nvae_run):
    loaded = load(nvae_run)
    from framework.data import to_model_input
    from framework.data.loader import BetonInfo, EvalLoader
    from framework.data.order import EvalShard

    info = BetonInfo(str(MNIST_BETON))
    shard = EvalShard(info.ids("val"), 48, 1, 0)
    xb, n = next(iter(EvalLoader(info, shard, 1, 1)))
    x, ids = to_model_input(xb["image"], 8, "cpu"), shard.padded()[:48]
    lw = image_log_weights(loaded, x, ids, 64, 16, seed=0)  # (48, 64)
    nll = {k: -(torch.logsumexp(lw[:, :k], dim=1) - math.log(k)) for k in (1, 4, 16, 64)}
    nelbo = -lw.mean(dim=1)
    assert bool((nll[64] <= nelbo + 1e-9).all())  # IW >= ELBO on every image
    means = [float(nll[k].mean()) for k in (1, 4, 16, 64)]
    assert means == sorted(means, reverse=True) and means[0] - means[-1] > 0.1, means


def test_two_ranks_give_the_bits_per_dim_of_one(nvae_run, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    common = ["--iw-samples", "3", "--chunk", "2", "--batch-size", "48", "--no-progress"]
    tool("eval_bpd.py", str(nvae_run), *common, "--out", str(one))
    p = tool("eval_bpd.py", str(nvae_run), *common, "--out", str(two), nproc=2)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["images"], b["images"], a["world_size"], b["world_size"]) == (500, 500, 1, 2)
    assert b["bpd"] == pytest.approx(a["bpd"], rel=1e-6) and b["elbo_bpd"] == pytest.approx(a["elbo_bpd"], rel=1e-6)
    assert a["bpd"] <= a["elbo_bpd"] and a["weights"] == "ema" and not a["bn_recalibrated"]
    assert "NLL" in p.stdout and "500 images" in p.stdout


def test_recalibrated_statistics_are_the_plain_moments_of_the_bn_inputs(nvae_run):
    loaded = load(nvae_run)
    bns = loaded.task.bn_layers(loaded.module)
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    seen = {i: [] for i in range(len(bns))}
    hooks = [bn.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().double()))
             for i, bn in enumerate(bns)]
    rec = recalibrate(loaded, temperature=0.7, batch_size=5, iters=3, progress=False)
    for h in hooks:
        h.remove()
    reached = [i for i in seen if seen[i]]
    assert rec["layers_recalibrated"] == len(reached) > 0 and rec["samples"] == 15
    for i, bn in enumerate(bns):
        if not seen[i]:  # the encoder's: sampling never reaches them, they keep their statistics
            assert torch.equal(bn.running_mean, before[i][0]) and torch.equal(bn.running_var, before[i][1])
            continue
        xs = torch.cat(seen[i])  # every input of the 3 x 5 samples
        assert len(seen[i]) == 3 and xs.shape[0] == 15
        flat = xs.transpose(0, 1).reshape(xs.shape[1], -1)
        torch.testing.assert_close(bn.running_mean.double(), flat.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), flat.var(1, correction=1), rtol=1e-5, atol=1e-6)


def test_recalibration_writes_a_new_checkpoint_and_leaves_the_source_alone(nvae_run):
    src = sorted((nvae_run / "checkpoints").glob("step_*"))[-1]
    before = tree_hash(src)
    p = tool("recalibrate_bn.py", str(nvae_run), "--iters", "4", "--batch-size", "6", "--no-progress")
    out = src.with_name(f"{src.name}_bn-t0.7")
    assert f"wrote {out}" in p.stdout
    assert tree_hash(src) == before
    rec = json.loads((out / "eval.json").read_text())
    assert rec["bn"]["iters"] == 4 and rec["bn"]["batch_size"] == 6 and rec["bn"]["temperature"] == 0.7
    assert rec["weights"] == "ema" and rec["source"] == str(src)
    # the tools take it, and say the statistics were recalibrated
    p = tool("eval_bpd.py", str(out), "--iw-samples", "1", "--no-progress")
    assert "BN recalibrated" in p.stdout
    r = json.loads(out.with_name(f"{out.name}.bpd-val-k1.json").read_text())
    assert r["bn_recalibrated"] and r["images"] == 500
    p = tool("sample.py", str(out), "--n", "9", "--temperatures", "0.6,1.0")
    grids = [nvae_run / "samples" / f"{out.name}_t{t}.png" for t in ("0.6", "1")]
    assert all(g.is_file() for g in grids)
    from PIL import Image

    assert Image.open(grids[0]).size == (3 * 34 + 2, 3 * 34 + 2)
    # a second recalibration does not silently replace the first (nor leave its figures stale)
    bpd_file = out.with_name(f"{out.name}.bpd-val-k1.json")
    first = tree_hash(out)
    p = tool("recalibrate_bn.py", str(nvae_run), "--iters", "2", "--batch-size", "6", "--no-progress", check=False)
    assert p.returncode == 2 and "pass --overwrite" in p.stderr.strip().splitlines()[-1]
    assert tree_hash(out) == first and bpd_file.is_file()
    p = tool("recalibrate_bn.py", str(nvae_run), "--iters", "2", "--batch-size", "6", "--no-progress", "--overwrite")
    assert json.loads((out / "eval.json").read_text())["bn"]["iters"] == 2 and not bpd_file.exists()


@pytest.mark.parametrize("which", ["trained", "cifar10"])
def test_the_folded_fast_path_samples_what_the_plain_model_samples(nvae_run, which):
    if which == "trained":
        loaded = load(nvae_run)
        recalibrate(loaded, batch_size=4, iters=2, progress=False)
    else:  # the paper's RGB architecture, random weights and BN statistics, the mixture likelihood
        loaded = load(str(REPO / "recipes" / "nvae" / "cifar10.yaml"))
        with torch.no_grad():
            for bn in loaded.module.bns:
                bn.running_mean.normal_(0, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.2)
    task, net = loaded.task, loaded.module
    fast = fold(net)
    for t in (0.8, 1.0):
        eps = task.prior_noise(net, 3, torch.Generator().manual_seed(1), "cpu")
        with torch.no_grad():
            plain_p, fast_p = net.sample(3, t, eps), fast.sample(3, t, eps)
        torch.testing.assert_close(fast_p, plain_p, rtol=0, atol=1e-4)
        a = task.images(net, plain_p, t, torch.Generator().manual_seed(2))
        b = task.images(net, fast_p, t, torch.Generator().manual_seed(2))
        assert float((a - b).abs().max()) <= 1e-4


def test_every_zero_stage_loads_the_same_ema_weights(vae_runs):
    z0, z3 = (load(d) for d in vae_runs)
    assert z0.info["weights"] == z3.info["weights"] == "ema"
    for (n0, p0), (n3, p3) in zip(z0.module.named_parameters(), z3.module.named_parameters()):
        assert n0 == n3 and p0.shape == p3.shape
        torch.testing.assert_close(p3, p0, rtol=1e-4, atol=1e-5)
    raw0, raw3 = load(vae_runs[0], ema=False), load(vae_runs[1], ema=False)
    assert raw3.info["weights"] == "model"
    for p0, p3 in zip(raw0.module.parameters(), raw3.module.parameters()):
        torch.testing.assert_close(p3, p0, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(raw0.module.parameters(), z0.module.parameters()))
    p = tool("sample.py", str(vae_runs[1]), "--n", "4", "--temperatures", "1.0", "--out", str(vae_runs[1] / "g.png"))
    assert (vae_runs[1] / "g.png").is_file() and "weights ema" in p.stdout


def test_bad_input_is_one_line_and_exit_2(vae_runs, nvae_run, tmp_path):
    cases = [
        (("eval_bpd.py", str(tmp_path / "nowhere")), "no such run or checkpoint folder"),
        (("recalibrate_bn.py", str(tmp_path)), "no complete checkpoint"),
        (("recalibrate_bn.py", str(vae_runs[0])), "family 'vae' cannot recalibrate BatchNorm"),
        (("eval_bpd.py", str(vae_runs[0])), "family 'vae' cannot give importance weights"),
        (("recalibrate_bn.py", str(nvae_run), "--temperature", "0"), "--temperature is 0.0; it must be > 0"),
        (("sample.py", str(nvae_run), "--temperatures", "0.5,-1"), "temperature must be > 0"),
        (("profile_sampling.py", str(nvae_run), "--temperature", "0"), "--temperature is 0.0; it must be > 0"),
        (("eval_bpd.py", str(nvae_run), "--iw-samples", "0"), "--iw-samples is 0; it must be >= 1"),
    ]
    for args, message in cases:
        p = tool(*args, check=False)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and message in err[0], (args, p.stderr[-2000:])
