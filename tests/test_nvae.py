"""NVAE: each a specification with a known answer (issue 5)."""
import itertools
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import MNIST_BETON, NVAE, REPO, TINY_NVAE, metrics, run_train, train_losses
from framework.models.nvae.distributions import DiscMixLogistic, Normal
from framework.models.nvae.model import AutoEncoder, kl_balancer_alpha
from framework.models.nvae.ops import Conv2D
from framework.models.nvae.task import ModelConfig


# -- the likelihood ----------------------------------------------------------------------------

def brute_force_dmol(params, x, num_mix, num_bits):
    """log p(x) of each pixel by the definition: sum over components of pi_k times, per channel,
    the logistic mass of x's bin (the edge levels take the tails), means shifted by the image's
    own red (and green) values."""
    b, _, h, w = params.shape
    levels = 2**num_bits - 1
    out = torch.zeros(b, h, w, dtype=torch.float64)
    p = params.double()
    logit = p[:, :num_mix]
    rest = p[:, num_mix:].reshape(b, 3, 3 * num_mix, h, w)
    log_pi = torch.log_softmax(logit, dim=1)
    for n, i, j in itertools.product(range(b), range(h), range(w)):
        xs = x[n, :, i, j].double()
        total = 0.0
        for k in range(num_mix):
            mean = rest[n, :, k, i, j]
            log_s = rest[n, :, num_mix + k, i, j].clamp(min=-7)
            a = torch.tanh(rest[n, :, 2 * num_mix + k, i, j])
            mus = [mean[0], mean[1] + a[0] * xs[0], mean[2] + a[1] * xs[0] + a[2] * xs[1]]
            prob = math.exp(log_pi[n, k, i, j])
            for c in range(3):
                cdf = lambda v: torch.sigmoid((v - mus[c]) / torch.exp(log_s[c]))  # noqa: E731
                lo, hi = xs[c] - 1 / levels, xs[c] + 1 / levels
                if xs[c] < -0.999:
                    mass = cdf(hi)
                elif xs[c] > 0.99:
                    mass = 1 - cdf(lo)
                else:
                    mass = cdf(hi) - cdf(lo)
                prob *= float(mass)
            total += prob
        out[n, i, j] = math.log(total)
    return out


@pytest.mark.parametrize("num_bits", [8, 5])
def test_dmol_log_likelihood_equals_brute_force(num_bits):
    g = torch.Generator().manual_seed(num_bits)
    m, b, h, w = 3, 2, 3, 3
    # parameters under which every bin holds more than 1e-5 of each logistic: there the reference's
    # pdf-times-width fallback never applies and the definition is the exact answer
    params = torch.randn(b, 10 * m, h, w, generator=g) * 0.5
    params[:, m:].view(b, 3, 3 * m, h, w)[:, :, m:2 * m] = torch.rand(b, 3, m, h, w, generator=g) - 0.5
    levels = 2**num_bits - 1
    x = torch.randint(0, levels + 1, (b, 3, h, w), generator=g).float() / levels * 2 - 1
    x[0, :, 0, 0] = -1.0  # both edges
    x[0, :, 0, 1] = 1.0
    got = DiscMixLogistic(params, m, num_bits).log_prob(x).double()
    assert torch.allclose(got, brute_force_dmol(params, x, m, num_bits), atol=1e-4, rtol=0)


def test_dmol_sample_lies_in_the_bins_of_a_sharp_component():
    m, levels = 2, 31
    params = torch.zeros(1, 10 * m, 4, 4)
    params[:, 0] = 20.0  # component 0 almost surely
    rest = params[:, m:].view(1, 3, 3 * m, 4, 4)
    targets = torch.tensor([-1.0, 3 / levels * 2 - 1, 1.0])
    for c in range(3):
        rest[:, c, 0] = targets[c]
        rest[:, c, m] = -7.0  # the narrowest logistic allowed
        rest[:, c, 2 * m] = 0.0  # no channel dependence
    x = DiscMixLogistic(params, m, 5).sample(1.0, torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() <= 1
    level = torch.round((x + 1) / 2 * levels)
    assert torch.equal(level, torch.round((targets + 1) / 2 * levels).view(1, 3, 1, 1).expand_as(level))


# -- the latent distributions -------------------------------------------------------------------

def test_residual_normal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_p, ls_p = torch.randn(8, generator=g), torch.randn(8, generator=g) * 0.5
    dmu, dls = torch.randn(8, generator=g) * 0.5, torch.randn(8, generator=g) * 0.3
    q, p = Normal(mu_p + dmu, ls_p + dls), Normal(mu_p, ls_p)
    closed = q.kl(p)
    z = q.sample(torch.randn(200000, 8, generator=g))
    samples = q.log_p(z) - p.log_p(z)
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    assert torch.all((closed - mc).abs() < 3 * se)


def test_temperature_scales_sigma_and_zero_is_deterministic():
    mu, ls = torch.randn(5), torch.randn(5)
    assert torch.allclose(Normal(mu, ls, 0.6).sigma, 0.6 * Normal(mu, ls).sigma)
    cfg = ModelConfig(num_channels_enc=8, num_channels_dec=8, num_preprocess_blocks=1, num_preprocess_cells=1,
                      num_postprocess_blocks=1, num_postprocess_cells=1, num_groups_per_scale=2,
                      num_latent_per_group=4, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1)
    torch.manual_seed(0)
    net = AutoEncoder(cfg, 3, 16, 8).eval()
    eps = lambda s: [torch.randn(2, *sh, generator=torch.Generator().manual_seed(s)) for sh in net.latent_shapes]  # noqa
    a, b = net.sample(2, 0.0, eps(1)), net.sample(2, 0.0, eps(2))
    assert torch.equal(a, b)  # t = 0: every group at its prior mean, whatever the noise
    assert not torch.equal(net.sample(2, 1.0, eps(1)), net.sample(2, 1.0, eps(2)))


def test_kl_balancing_weights_follow_the_square_scheme():
    assert kl_balancer_alpha([10, 5]).tolist() == [1.0] * 5 + [2.0] * 10
    a = kl_balancer_alpha([16, 8, 4, 4, 4])
    assert sorted(set(a.tolist())) == [1.0, 4.0, 16.0, 32.0, 64.0]


# -- spectral regularisation ----------------------------------------------------------------------

def test_spectral_norm_estimate_converges_to_the_largest_singular_value():
    torch.manual_seed(0)
    cfg = ModelConfig(num_channels_enc=8, num_channels_dec=8, num_preprocess_blocks=1, num_preprocess_cells=1,
                      num_postprocess_blocks=1, num_postprocess_cells=1, num_groups_per_scale=2,
                      num_latent_per_group=4, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1)
    net = AutoEncoder(cfg, 3, 16, 8)
    for _ in range(50):
        total = net.spectral_loss()
    exact = sum(torch.linalg.matrix_norm(c.effective_weight().detach().reshape(c.out_channels, -1), ord=2)
                for c in net.convs)
    assert abs(float(total.detach()) / float(exact) - 1) < 0.01
    conv = net.convs[3]
    sigma = float(conv.sr_u @ conv.effective_weight().detach().reshape(conv.out_channels, -1) @ conv.sr_v)
    ref = float(torch.linalg.matrix_norm(conv.effective_weight().detach().reshape(conv.out_channels, -1), ord=2))
    assert abs(sigma / ref - 1) < 0.01
    state = {k: v for k, v in net.state_dict().items() if k.endswith(("sr_u", "sr_v", "sr_ready"))}
    assert len(state) == 3 * len(net.convs)  # the vectors are saved with the weights


def test_parameter_counts_equal_the_reference():
    from framework.config import load_recipe

    expected = {"mnist": 33363134, "cifar10": 130852480, "celeba64": 153281364, "celebahq256": 330798664,
                "ffhq256": 330798664}
    for name, count in expected.items():
        r = load_recipe(REPO / "recipes" / "nvae" / f"{name}.yaml", [f"data.path={MNIST_BETON}"])
        with torch.device("meta"):
            net = AutoEncoder(r.model, r.data.channels, r.data.resolution, r.data.num_bits)
        n = sum(p.numel() for p in net.parameters())
        assert n == count, (name, n, count)


# -- memory -------------------------------------------------------------------------------------

def test_activation_checkpointing_changes_neither_loss_nor_gradients():
    cfg = ModelConfig(num_channels_enc=8, num_channels_dec=8, num_preprocess_blocks=1, num_preprocess_cells=2,
                      num_postprocess_blocks=1, num_postprocess_cells=2, num_groups_per_scale=2,
                      num_latent_per_group=4, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_nf=1)
    nets = []
    for mode in ("none", "blocks"):
        torch.manual_seed(0)
        nets.append(AutoEncoder(cfg, 3, 16, 8, mode).train())
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    eps = [torch.randn(4, *s) for s in nets[0].latent_shapes]
    losses, grads = [], []
    for net in nets:
        params, groups = net(x, eps)
        loss = -net.output_dist(params).log_prob(x).sum() + sum(kl.sum() for _, _, kl in groups)
        loss = loss + net.spectral_loss() + net.batchnorm_loss()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)
    # float32 rounding of the recomputed graph: a few ulps of the largest gradient (CPU kernels differ by machine)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6 * float(grads[0].abs().max()))
    bn = [(a.running_mean, b.running_mean) for a, b in zip(nets[0].bns, nets[1].bns)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in bn)  # recomputation does not update BN twice


# -- in the trainer -------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_zero2_match_one_process(tmp_path):
    run_train(NVAE, TINY_NVAE + [f"run.dir={tmp_path / 'one'}", "train.steps=5", "data.batch_size=8"])
    run_train(NVAE, TINY_NVAE + [f"run.dir={tmp_path / 'two'}", "train.steps=5", "data.batch_size=4"], nproc=2)
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert list(a) == list(b) == [1, 2, 3, 4, 5]
    assert np.allclose(list(a.values()), list(b.values()), rtol=1e-5, atol=0), (a, b)


@pytest.mark.slow
def test_resume_is_exact_and_keeps_the_power_iteration(tmp_path):
    run_train(NVAE, TINY_NVAE + [f"run.dir={tmp_path / 'straight'}", "train.steps=6"])
    cut = TINY_NVAE + [f"run.dir={tmp_path / 'cut'}", "train.steps=6", "train.checkpoint_every=3"]
    run_train(NVAE, cut)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000006")  # as if killed after step 3's checkpoint
    p = run_train(NVAE, cut)
    assert "resumed from" in p.stdout and "step_00000003" in p.stdout
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "cut")
    assert train_losses(tmp_path / "straight", "norm_loss") == train_losses(tmp_path / "cut", "norm_loss")


@pytest.mark.slow
def test_training_lowers_validation_bits_per_dim(tmp_path):
    # Measured here (2 cores, seed 0): this tiny model goes from 1.19 bits/dim untrained to 0.34
    # after 60 steps (a drop of 0.85); the test asks for a third of that drop.
    run_train(NVAE, TINY_NVAE + [f"run.dir={tmp_path / 'r'}", "train.steps=60", "train.eval_every=60",
                                 "data.batch_size=16"])
    val = {m["step"]: m["val/bpd"] for m in metrics(tmp_path / "r") if "val/bpd" in m}
    assert sorted(val) == [0, 60]
    assert val[60] < val[0] - 0.28, val


@pytest.mark.slow
def test_bf16_trains_with_finite_losses_close_to_fp32(tmp_path):
    common = TINY_NVAE + ["train.steps=4"]
    run_train(NVAE, common + [f"run.dir={tmp_path / 'fp32'}"])
    run_train(NVAE, common + [f"run.dir={tmp_path / 'bf16'}", "engine.precision=bf16"])
    a, b = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    assert all(math.isfinite(v) for v in b.values())
    assert abs(b[1] / a[1] - 1) < 0.02  # the same model and batch: bf16 rounding only


def test_flow_cells_are_autoregressive_and_volume_preserving():
    """d new_z / d z of a flow cell is triangular with a unit diagonal in the (row, column,
    channel) raster order; the mirrored cell's in the order with rows and columns reversed (the
    channels still ascending): log|det| = 0."""
    from framework.models.nvae.flows import CellAR

    torch.manual_seed(0)
    c, h, w = 2, 4, 4
    for mirror in (False, True):
        cell = CellAR(c, mirror=mirror)
        with torch.no_grad():  # make every masked weight matter
            for conv in cell.modules():
                if isinstance(conv, Conv2D):
                    conv.weight.normal_()
        z = torch.randn(1, c, h, w)
        jac = torch.autograd.functional.jacobian(lambda t: cell(t), z).reshape(c, h, w, c, h, w)
        def order(ch, i, j):
            if mirror:
                i, j = h - 1 - i, w - 1 - j
            return (i * w + j) * c + ch

        for co, i, j, ci, k, m in itertools.product(range(c), range(h), range(w), range(c), range(h), range(w)):
            a, b = order(co, i, j), order(ci, k, m)
            earlier = b < a
            value = float(jac[co, i, j, ci, k, m])
            if a == b:
                assert value == pytest.approx(1.0)
            elif not earlier:
                assert value == 0.0, (mirror, (co, i, j), (ci, k, m), value)
        assert torch.linalg.slogdet(jac.reshape(c * h * w, c * h * w))[1].abs() < 1e-5


def test_factorized_reduce_equals_stride_2_convolutions_on_shifted_grids():
    import torch.nn.functional as F

    from framework.models.nvae.ops import FactorizedReduce

    torch.manual_seed(0)
    fr = FactorizedReduce(6, 12)
    x = torch.randn(2, 6, 16, 16)
    a = F.silu(x)
    parts = [a, a[:, :, 1:, 1:], a[:, :, :, 1:], a[:, :, 1:, :]]  # the reference's definition
    ref = torch.cat([F.conv2d(p, c.effective_weight(), c.bias, 2) for c, p in zip(fr.convs, parts)], 1)
    assert torch.allclose(fr(x), ref, atol=1e-6)
    assert torch.allclose(fr(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-6)


@pytest.mark.slow
def test_photos256_smoke_recipe_trains(tmp_path):
    from framework.data import sources
    from framework.data.write import write_beton

    beton = tmp_path / "photos256.beton"
    write_beton(sources.photos(256, 64, 0.125, seed=0), beton, 256, "jpg", progress=False)
    run_train(str(REPO / "recipes" / "nvae" / "photos256_smoke.yaml"),
              [f"data.path={beton}", f"run.dir={tmp_path / 'r'}", "train.steps=4", "train.eval_every=4",
               "train.sample_every=4", "train.progress=false"])
    m = metrics(tmp_path / "r")
    assert [x["step"] for x in m if "loss" in x] == [1, 2, 3, 4]
    assert all(math.isfinite(x["loss"]) for x in m if "loss" in x)
    assert (tmp_path / "r" / "samples" / "step_00000004.png").is_file()


def test_model_summary_reports_the_reference_figures():
    import json
    import subprocess
    import sys

    from conftest import env

    p = subprocess.run([sys.executable, "tools/model_summary.py", "recipes/nvae/mnist.yaml", "--batch", "4", "--json"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["parameters"] == {"nvae": 33363134} and out["latent groups"] == 15
    assert out["latent groups per scale (encoder order, finest first)"] == [10, 5]
    assert out["latent dims per image"] == 14400 and out["BatchNorm layers"] == 214
    est = out["activation_estimate"]["nvae"]
    assert 0 < est["with_checkpointing_blocks"] < 0.5 * est["without_checkpointing"]


@pytest.mark.parametrize("rule,factor", [("scale", 0.5), ("reference", 2.0), ("none", 1.0)])
def test_output_temperature_acts_on_the_logistic_scale_as_named(rule, factor):
    from framework.models.nvae.distributions import DiscMixLogistic

    # one component (logits far apart), mean 0, small scale, no channel coupling: the sample's spread
    # is the logistic's scale times the rule's factor (std of a logistic = s pi / sqrt 3)
    m, h = 3, 64
    params = torch.zeros(1, m + 3 * 3 * m, h, h)
    params[:, 0] = 50.0
    l = params[:, m:].view(1, 3, 3 * m, h, h)
    l[:, :, m:2 * m] = math.log(0.05)
    d = DiscMixLogistic(params, m, 8)
    g = torch.Generator().manual_seed(0)
    ref = d.sample(1.0, g, rule).std()
    got = d.sample(0.5, torch.Generator().manual_seed(1), rule).std()
    assert float(ref) == pytest.approx(0.05 * math.pi / math.sqrt(3), rel=0.05)
    assert float(got / ref) == pytest.approx(factor, rel=0.05)
