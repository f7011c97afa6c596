"""VQGAN stage 1 pieces against brute force, hand-written autograd and the lpips package; bad
input. Random weights throughout (VGG16 included, named `random`): no weights ship here."""
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from conftest import MNIST_BETON, REPO, env
from framework.config import load_recipe
from framework.models.vqgan.loss import adaptive_weight
from framework.models.vqgan.model import VQModel
from framework.models.vqgan.modules import NLayerDiscriminator
from framework.models.vqgan.quantize import FSQ, VectorQuantizer

FACESHQ = str(REPO / "recipes" / "vqgan" / "faceshq256.yaml")
SMOKE = str(REPO / "recipes" / "vqgan" / "mnist5k_smoke.yaml")


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_faceshq_recipe_builds_taming_parameter_counts_part_by_part():
    r = load_recipe(FACESHQ, check_files=False)
    with torch.device("meta"):
        ae = VQModel(r.model, r.data.channels, r.data.resolution)
        disc = NLayerDiscriminator(r.data.channels, r.model.disc_ndf, r.model.disc_num_layers)
    parts = {n: count(getattr(ae, n)) for n in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")}
    assert parts == {"encoder": 29_298_176, "decoder": 42_449_795, "quantize": 262_144, "quant_conv": 65_792,
                     "post_quant_conv": 65_792}
    assert count(ae) == 72_141_699
    assert count(disc) == 2_765_633
    assert r.model.quantizer.legacy_beta  # taming's quantizer, to compare with taming
    from framework.losses import LPIPS

    assert count(LPIPS("random")) == 14_716_160


# -- quantizers ---------------------------------------------------------------------------------

def test_vq_picks_the_brute_force_nearest_code():
    torch.manual_seed(0)
    q = VectorQuantizer(64, 8)
    q.embedding.weight.data.normal_()
    z = torch.randn(3, 8, 5, 4)
    zq, _, idx, _ = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    book = q.codebook.detach()
    brute = torch.tensor([min(range(64), key=lambda k: float(((v - book[k]) ** 2).sum())) for v in flat])
    assert torch.equal(idx.reshape(-1), brute)
    assert torch.allclose(zq.permute(0, 2, 3, 1).reshape(-1, 8), q.codebook[brute], atol=1e-6)
    assert torch.allclose(q.lookup(idx), zq, atol=1e-6)


def test_straight_through_gradient_reaches_the_encoder_unchanged():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    zq, _, _, _ = q(z)
    g = torch.randn_like(zq)
    (zq * g).sum().backward()
    assert torch.equal(z.grad, g)


@pytest.mark.parametrize("legacy", [False, True])
def test_beta_sits_on_the_commitment_term_unless_legacy(legacy):
    torch.manual_seed(0)
    beta = 0.25
    q = VectorQuantizer(16, 4, beta=beta, legacy_beta=legacy)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, loss, idx, _ = q(z)
    loss.backward()
    n = z.numel()
    e = q.codebook.detach()[idx].permute(0, 3, 1, 2)  # each position's code
    enc_w, book_w = (1.0, beta) if legacy else (beta, 1.0)
    assert torch.allclose(z.grad, enc_w * 2 * (z.detach() - e) / n, atol=1e-6)
    want = torch.zeros_like(q.codebook)
    want.index_add_(0, idx.reshape(-1), (book_w * 2 * (e - z.detach()) / n).permute(0, 2, 3, 1).reshape(-1, 4))
    assert torch.allclose(q.embedding.weight.grad, want, atol=1e-6)


def ctx(step=0, micro=0, accum=1, seed=0):
    return types.SimpleNamespace(phase="train", step=step, micro=micro, grad_accum=accum, seed=seed)


def test_ema_update_equals_the_formula_on_a_hand_made_batch():
    g, eps, k = 0.9, 1e-5, 4
    q = VectorQuantizer(k, 2, ema=True, ema_decay=g, ema_eps=eps)
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    q.codebook.copy_(codes)
    q.ema_sum.copy_(codes)
    z = torch.tensor([[0.1, 0.0], [0.0, 0.2], [0.9, 0.1], [1.1, -0.1], [0.2, 0.9]])  # codes 0, 0, 1, 1, 2
    q.train()
    q(z.t().reshape(1, 2, 1, 5), ctx())
    n = torch.tensor([2.0, 2.0, 1.0, 0.0])
    m = torch.stack([z[:2].sum(0), z[2:4].sum(0), z[4], torch.zeros(2)])
    count = (1 - g) * n
    total = g * codes + (1 - g) * m
    smoothed = (count + eps) / (count.sum() + k * eps) * count.sum()
    assert torch.allclose(q.ema_count, count)
    assert torch.allclose(q.ema_sum, total)
    assert torch.allclose(q.codebook, total / smoothed[:, None], rtol=1e-5)


def test_ema_codebook_is_no_parameter_and_loss_is_commitment_only():
    q = VectorQuantizer(8, 4, beta=0.5, ema=True)
    assert [n for n, _ in q.named_parameters()] == []
    assert "embedding.weight" in q.state_dict()  # taming's key, as a buffer
    z = torch.randn(1, 4, 2, 2)
    _, loss, idx, _ = q(z)
    e = q.codebook[idx].permute(0, 3, 1, 2)
    assert torch.allclose(loss, 0.5 * (z - e).pow(2).mean())


def test_usage_and_perplexity_of_a_step():
    q = VectorQuantizer(4, 1, usage_window=2)
    q.codebook.data.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    q.train()
    _, _, _, m = q(torch.tensor([0.0, 0.1, 1.0, 0.9]).view(1, 1, 1, 4), ctx(step=0))
    assert float(m["usage"]) == 0.5 and abs(float(m["perplexity"]) - 2.0) < 1e-6
    _, _, _, m = q(torch.tensor([3.0, 3.0, 3.0, 3.0]).view(1, 1, 1, 4), ctx(step=1))
    assert float(m["usage"]) == 0.75  # codes 0, 1 (step 0) and 3 within the window of 2 steps
    _, _, _, m = q(torch.tensor([3.0, 3.0, 3.0, 3.0]).view(1, 1, 1, 4), ctx(step=2))
    assert float(m["usage"]) == 0.25 and abs(float(m["perplexity"]) - 1.0) < 1e-6


def test_fsq_indices_and_levels_are_a_bijection():
    f = FSQ([8, 5, 3, 2], embed_dim=4)
    assert f.n_embed == 240
    idx = torch.arange(240)
    codes = f.indices_to_codes(idx)
    assert torch.equal(f.codes_to_indices(codes), idx)
    assert len({tuple(c.tolist()) for c in codes}) == 240
    for d, lv in enumerate([8, 5, 3, 2]):  # each dim takes exactly its level count of integer values
        assert sorted(set(codes[:, d].tolist())) == [float(v - lv // 2) for v in range(lv)]
    b = f.quantize(torch.linspace(-20, 20, 4001).unsqueeze(1).expand(-1, 4))
    for d, lv in enumerate([8, 5, 3, 2]):
        assert len(set(b[:, d].tolist())) == lv  # bounding then rounding reaches every level, no more
    zq, loss, idx, _ = f(torch.randn(2, 4, 3, 3))
    assert float(loss) == 0 and idx.max() < 240 and torch.allclose(f.lookup(idx), zq, atol=1e-6)


RESTART = r"""
import os, sys, types, torch, torch.distributed as dist
from framework.models.vqgan.quantize import VectorQuantizer
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
torch.manual_seed(0)
q = VectorQuantizer(8, 2, ema=True, restart_dead=2).train()
torch.manual_seed(100 + rank)  # each rank sees other data
for step in range(4):
    z = torch.randn(1, 2, 1, 6) * 0.01 + torch.tensor([1.0, 1.0]).view(1, 2, 1, 1) * rank  # few codes hit
    q(z, types.SimpleNamespace(phase="train", step=step, micro=0, grad_accum=1, seed=3))
book = q.codebook.clone()
others = [torch.empty_like(book) for _ in range(2)]
dist.all_gather(others, book)
print("SAME" if torch.equal(others[0], others[1]) else "DIFFERENT", int((q.usage.last_used >= 2).sum()))
dist.destroy_process_group()
"""


def test_dead_codes_restart_identically_on_two_ranks():
    from conftest import free_port

    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", RESTART, str(r), port], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for out, _ in outs:
        same, restarted = out.split()
        assert same == "SAME"
        assert int(restarted) == 8  # every code was dead at step 2 or used/restarted since


# -- the adaptive weight ------------------------------------------------------------------------

def test_adaptive_weight_equals_autograd_on_the_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 3, 3, 1, 1)
    a = torch.randn(2, 6, 8, 8)
    disc = nn.Conv2d(3, 1, 4, 2, 1)
    x = torch.randn(2, 3, 8, 8)
    rec = conv(a)
    nll = (x - rec).abs().mean()
    g = -disc(rec).mean()
    gw_nll, = torch.autograd.grad(nll, conv.weight, retain_graph=True)  # taming's calculate_adaptive_weight
    gw_g, = torch.autograd.grad(g, conv.weight, retain_graph=True)
    want = torch.clamp(gw_nll.norm() / (gw_g.norm() + 1e-4), 0, 1e4)
    g_nll, = torch.autograd.grad(nll, rec, retain_graph=True)
    g_g, = torch.autograd.grad(g, rec, retain_graph=True)
    got = adaptive_weight(g_nll, g_g, a, conv)
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


# -- LPIPS ------------------------------------------------------------------------------------------

def test_lpips_equals_the_lpips_package(monkeypatch):
    """Both with the same random VGG16 weights. PyPI's torchvision does not import beside the CPU
    torch build, and lpips only takes `torchvision.models.vgg16(...).features` from it: the test
    hands lpips that trunk from framework.losses.vgg (torchvision's layout), so everything LPIPS
    computes is the package's own code."""
    from framework.losses import LPIPS
    from framework.losses.vgg import VGG16Features

    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(vgg16=lambda pretrained=False, **kw: types.SimpleNamespace(features=VGG16Features()))
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    import lpips

    torch.manual_seed(0)
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    ours = LPIPS("random")
    ours.load_state_dict({f"net.{k}": v for k, v in ref.net.state_dict().items()}, strict=False)
    for i in range(5):  # the heads: both read lpips/weights/v0.1/vgg.pth
        assert torch.equal(getattr(ours, f"lin{i}").model[1].weight, ref.lins[i].model[1].weight)
    x, y = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    assert torch.allclose(ours(x, y), ref(x, y).flatten(), rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in ours.parameters())
    ours.train()
    assert not ours.training  # always in eval mode


# -- bad input --------------------------------------------------------------------------------------

BAD = [
    (["model.quantizer.n_embed=1"], "'model.quantizer.n_embed' is 1"),
    (["model.quantizer.kind=fsq", "model.quantizer.levels=[8,2.5]"], "model.quantizer.levels"),
    (["model.quantizer.kind=fsq", "model.quantizer.levels=[8,1]"], "'model.quantizer.levels' is 1"),
    (["data.resolution=34"], "must be a multiple of 4"),
    (["model.lpips.vgg_weights=/nonexistent/vgg16.pth"], "VGG16 weights not found at /nonexistent/vgg16.pth"),
    (["model.quantizer.restart_dead=5"], "needs model.quantizer.ema: true"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, overrides, message):
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "framework.train", SMOKE, f"data.path={MNIST_BETON}",
                        f"run.dir={run}", "model.lpips.vgg_weights=random", *overrides], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert message in lines[-1] and len([ln for ln in lines if ln.startswith("error")]) == 1, p.stderr[-2000:]
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_vqvae_recipe_is_the_paper_model():
    from framework.distributed import DistEnv
    from framework.models import build_task

    r = load_recipe(REPO / "recipes" / "vqvae" / "cifar10.yaml", check_files=False)
    task = build_task(r, DistEnv(0, 0, 1, "127.0.0.1", 0, "single"))
    assert list(task.modules()) == ["ae"] and task.frozen_modules() == {}  # no GAN, no LPIPS
    ae = task.ae
    assert task.code_shape() == (512, 8, 8) and ae.quantize.codebook.shape == (512, 64)
    assert r.model.loss.rec_loss == "l2" and r.model.quantizer.beta == 0.25 and not r.model.quantizer.legacy_beta
    strided = [m for m in ae.encoder.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert [(m.kernel_size, m.out_channels) for m in strided] == [((4, 4), 256)] * 2
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = ae(x)
    assert out["rec"].shape == x.shape and out["indices"].shape == (2, 8, 8)
    assert torch.allclose(ae.decode_code(out["indices"]), out["rec"], atol=1e-5)


def test_block_checkpointing_gives_the_same_loss_and_gradients():
    """engine.activation_checkpointing: blocks recomputes every ResNet and attention block in
    backward: same values, same gradients; the module names (taming's) do not change."""
    cfg = load_recipe(SMOKE, ["model.ch_mult=[1,2]", "model.attn_resolutions=[16]"], check_files=False).model
    torch.manual_seed(0)
    plain = VQModel(cfg, 1, 32, checkpointing=False).train()
    ckpt = VQModel(cfg, 1, 32, checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    losses = []
    for m in (plain, ckpt):
        out = m(x)
        loss = (out["rec"] - x).abs().mean() + out["qloss"]
        loss.backward()
        losses.append(float(loss.detach()))
    assert abs(losses[0] - losses[1]) < 1e-6
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n
