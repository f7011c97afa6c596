"""The prior family's parts without training: taming's parameter counts and names, causality of the
GPT and of the PixelCNN (no blind spot), the cached and windowed samplers against the uncached
reference and taming's window rule, the logit filters against brute force, guidance, bad input.

Models here have random weights (no weights ship); the samplers' tests scale them up so that the
logits are peaked and depend on the context (with taming's N(0, 0.02) init every distribution is
nearly uniform and any sampler would pass)."""
import math

import numpy as np
import pytest
import torch

from framework.errors import UserError
from framework.models.prior.gpt import GPT, KVCache, gpt_parameters
from framework.models.prior.pixelcnn import GatedPixelCNN
from framework.models.prior.sampling import (SamplingConfig, _guided, check_sampling, condition_ids, filter_logits,
                                             sample_gpt, sample_pixelcnn, sample_window, sample_window_reference,
                                             window_offset)


def peaked(model, scale: float = 6.0):
    """Weights large enough that the logits are far from uniform and depend on every input."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, scale / math.sqrt(p.shape[-1]))
            elif "pos_emb" in name:
                p.normal_(0, 1.0)
    return model.eval()


def small_gpt(n_classes=0, block=16, vocab=32):
    torch.manual_seed(0)
    m = GPT(vocab, block, n_layer=2, n_head=2, n_embd=32, n_classes=n_classes)
    with torch.no_grad():
        m.pos_emb.normal_(0, 1.0)
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 1.5 / math.sqrt(mod.in_features))
            elif isinstance(mod, torch.nn.Embedding):
                mod.weight.normal_(0, 1.0)
    return m.eval()


# -- taming's layout ------------------------------------------------------------------------------

def test_parameter_counts_equal_taming():
    # counted from taming's own mingpt.GPT (the issue): faceshq's transformer and a 12-layer one
    with torch.device("meta"):
        faces = GPT(1024, 512, n_layer=24, n_head=16, n_embd=1024)
        small = GPT(1024, 256, n_layer=12, n_head=8, n_embd=512)
    assert sum(p.numel() for p in faces.parameters()) == 304_932_864
    assert sum(p.numel() for p in small.parameters()) == 39_009_280
    assert gpt_parameters(1024, 512, 24, 1024) == 304_932_864
    with torch.device("meta"):
        cond = GPT(1024, 256, 12, 8, 512, n_classes=10)
    assert sum(p.numel() for p in cond.parameters()) == 39_009_280 + 11 * 512 == gpt_parameters(1024, 256, 12, 512, 10)


def test_state_dict_names_are_taming():
    m = GPT(16, 8, n_layer=1, n_head=2, n_embd=8)
    names = set(m.state_dict())
    expected = {"tok_emb.weight", "pos_emb", "ln_f.weight", "ln_f.bias", "head.weight"}
    for part in ("ln1", "ln2"):
        expected |= {f"blocks.0.{part}.weight", f"blocks.0.{part}.bias"}
    for lin in ("key", "query", "value", "proj"):
        expected |= {f"blocks.0.attn.{lin}.weight", f"blocks.0.attn.{lin}.bias"}
    expected |= {"blocks.0.mlp.0.weight", "blocks.0.mlp.0.bias", "blocks.0.mlp.2.weight", "blocks.0.mlp.2.bias"}
    assert names == expected  # taming's also holds blocks.N.attn.mask, a constant buffer: dropped when loading
    assert m.head.bias is None and isinstance(m.blocks[0].mlp[1], torch.nn.GELU)


# -- causality ------------------------------------------------------------------------------------

def _embedding_grads(model, embedding: torch.nn.Module, run, select) -> torch.Tensor:
    """d select(output) / d embedding output, per position (summed over features)."""
    kept = {}

    def hook(mod, inp, out):
        leaf = out.detach().requires_grad_(True)
        kept["x"] = leaf
        return leaf

    h = embedding.register_forward_hook(hook)
    try:
        out = run()
    finally:
        h.remove()
    select(out).sum().backward()
    return kept["x"].grad.abs().sum(-1)


def test_gpt_is_causal():
    m = small_gpt()
    idx = torch.randint(0, 32, (2, 16))
    for t in (0, 5, 15):
        g = _embedding_grads(m, m.tok_emb, lambda: m(idx), lambda out: out[:, t])  # (2, 16)
        assert torch.all(g[:, t + 1:] == 0), t
        assert torch.all(g[:, :t + 1] > 0), t


def test_pixelcnn_is_causal_without_blind_spot():
    torch.manual_seed(0)
    m = GatedPixelCNN(16, dim=8, n_layers=8, first_kernel=7, kernel=3, out_hidden=16, n_classes=3).eval()
    codes = torch.randint(0, 16, (2, 6, 6))
    label = torch.tensor([0, 2])
    for i, j in [(0, 0), (0, 3), (3, 0), (2, 5), (5, 5)]:
        g = _embedding_grads(m, m.embedding, lambda: m(codes, label), lambda out: out[:, :, i, j])  # (2, 6, 6)
        flat = g.reshape(2, -1)
        t = i * 6 + j
        assert torch.all(flat[:, t:] == 0), (i, j)  # itself and everything after: unseen
        assert torch.all(flat[:, :t] > 0), (i, j)  # every earlier position reaches it (no blind spot)


# -- samplers -------------------------------------------------------------------------------------

def test_kv_cache_logits_equal_full_forward():
    m = small_gpt()
    idx = torch.randint(0, 32, (3, 16))
    full = m(idx)
    cache = KVCache.for_model(m, 3, 16)
    step = torch.cat([m(idx[:, :5], pos=0, cache=cache), m(idx[:, 5:6], pos=5, cache=cache),
                      m(idx[:, 6:11], pos=6, cache=cache)] + [m(idx[:, t:t + 1], pos=t, cache=cache)
                                                             for t in range(11, 16)], dim=1)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s", [SamplingConfig(top_k=1), SamplingConfig(), SamplingConfig(0.7, 5, 0.9)],
                         ids=["greedy", "t1", "t0.7-k5-p0.9"])
def test_cached_sampler_gives_the_uncached_tokens(s):
    m = small_gpt()
    a = sample_gpt(m, 6, (4, 4), torch.Generator().manual_seed(3), s, cached=True)
    b = sample_gpt(m, 6, (4, 4), torch.Generator().manual_seed(3), s, cached=False)
    assert torch.equal(a, b)
    if s.top_k != 1:  # the rows differ: the draws matter, so a wrong logit would show
        assert len({tuple(r) for r in a.reshape(6, -1).tolist()}) > 1
    else:  # greedy: every token is the argmax of the full forward's logits
        seq = torch.cat([torch.zeros(6, 1, dtype=torch.long), a.reshape(6, -1)[:, :-1]], 1)
        assert torch.equal(m(seq).argmax(-1), a.reshape(6, -1))


def test_cached_sampler_class_conditional_with_guidance():
    m = small_gpt(n_classes=4)
    s = SamplingConfig(guidance=3.0)
    labels = [0, 1, 2, 3, 1]
    a = sample_gpt(m, 5, (4, 4), torch.Generator().manual_seed(1), s, labels, cached=True)
    b = sample_gpt(m, 5, (4, 4), torch.Generator().manual_seed(1), s, labels, cached=False)
    assert torch.equal(a, b)
    plain = sample_gpt(m, 5, (4, 4), torch.Generator().manual_seed(1), SamplingConfig(), labels)
    assert not torch.equal(a, plain)  # guidance changes what is drawn


def test_guidance_scale_one_is_the_conditional_model():
    m = small_gpt(n_classes=4)
    labels = [0, 3, 2]
    seq = torch.randint(0, 32, (3, 7))
    ids = condition_ids(m, 3, labels, 0, SamplingConfig(guidance=2.0), "cpu")  # labels, then "no class"
    assert ids.tolist() == [0, 3, 2, 4, 4, 4]
    both = m(torch.cat([ids[:, None], torch.cat([seq, seq])], 1))[:, -1]
    cond = m(torch.cat([torch.tensor(labels)[:, None], seq], 1))[:, -1]
    torch.testing.assert_close(_guided(both, 3, SamplingConfig(guidance=1.0)), cond, atol=1e-5, rtol=0)
    assert not torch.allclose(_guided(both, 3, SamplingConfig(guidance=2.0)), cond, atol=1e-3)


def rule(i: int, size: int, local: int = 16) -> int:
    """The issue's statement of taming's window rule, for a 16-wide window: the offset is i for
    i <= 8, 16 - (H - i) within 8 of the far edge, else 8."""
    if i <= local // 2:
        return i
    if size - i < local // 2:
        return local - (size - i)
    return local // 2


def test_window_offset_is_tamings_rule():
    for size in (16, 20, 32, 33):
        for i in range(size):
            assert window_offset(i, size, 16) == rule(i, size)
            assert 0 <= i - window_offset(i, size, 16) <= size - 16


def test_window_sampler_on_the_training_grid_is_plain_sampling():
    m = small_gpt()
    s = SamplingConfig()
    plain = sample_gpt(m, 4, (4, 4), torch.Generator().manual_seed(5), s)
    win = sample_window(m, 4, (4, 4), (4, 4), torch.Generator().manual_seed(5), s)
    assert torch.equal(plain, win)


@pytest.mark.parametrize("grid", [(8, 8), (9, 6), (4, 10), (7, 4)])
def test_window_sampler_equals_tamings_window_rule(grid):
    m = small_gpt()
    s = SamplingConfig(0.9, 8)
    record = []
    ours = sample_window(m, 3, grid, (4, 4), torch.Generator().manual_seed(7), s, record=record)
    ref = sample_window_reference(m, 3, grid, (4, 4), torch.Generator().manual_seed(7), s)
    assert torch.equal(ours, ref)
    H, W = grid
    assert [(i, j) for i, j, _, _ in record] == [(i, j) for i in range(H) for j in range(W)]
    for i, j, i0, j0 in record:  # the window of every code, by a direct implementation of the rule (window 4)
        assert (i0, j0) == (i - rule(i, H, 4), j - rule(j, W, 4)), (i, j)


def test_window_sampler_class_conditional_guided():
    m = small_gpt(n_classes=3)
    s = SamplingConfig(guidance=2.0)
    ours = sample_window(m, 3, (6, 7), (4, 4), torch.Generator().manual_seed(2), s, labels=[0, 1, 2])
    ref = sample_window_reference(m, 3, (6, 7), (4, 4), torch.Generator().manual_seed(2), s, labels=[0, 1, 2])
    assert torch.equal(ours, ref)


def test_pixelcnn_sampler_is_raster_order_of_its_conditionals():
    torch.manual_seed(0)
    m = peaked(GatedPixelCNN(8, dim=8, n_layers=4, first_kernel=5, kernel=3, out_hidden=16, n_classes=2), 3.0)
    codes = sample_pixelcnn(m, 3, (4, 4), torch.Generator().manual_seed(0), SamplingConfig(top_k=1), [0, 1, 1])
    assert torch.equal(m(codes, torch.tensor([0, 1, 1])).argmax(1), codes)  # greedy: each code its argmax


# -- filters --------------------------------------------------------------------------------------

def brute_force(logits: np.ndarray, k: int, p: float) -> np.ndarray:
    out = logits.copy()
    for r in range(len(out)):
        row = out[r]
        if k:
            kth = sorted(row, reverse=True)[k - 1]
            row[row < kth] = -np.inf
        if p < 1:
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            keep, total = set(), 0.0
            for i in sorted(range(len(row)), key=lambda i: -probs[i]):
                if total >= p:
                    break
                keep.add(i)
                total += probs[i]
            for i in range(len(row)):
                if i not in keep:
                    row[i] = -np.inf
    return out


@pytest.mark.parametrize("k,p", [(1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.6), (50, 1.0)])
def test_filters_equal_brute_force(k, p):
    torch.manual_seed(k)
    logits = torch.randn(16, 50, dtype=torch.float64) * 2
    ours = filter_logits(logits, k, p).numpy()
    ref = brute_force(logits.numpy(), k, p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_array_equal(ours[~np.isinf(ours)], ref[~np.isinf(ref)])


def test_top_k_keeps_ties():
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 3.0]])
    assert torch.isfinite(filter_logits(logits, 2)).tolist() == [[True, False, True, False, True]]


@pytest.mark.parametrize("s,msg", [(SamplingConfig(temperature=0), "temperature"), (SamplingConfig(top_k=-1), "top-k"),
                                   (SamplingConfig(top_p=0), "top-p"), (SamplingConfig(top_p=1.5), "top-p"),
                                   (SamplingConfig(top_k=40), "more than"), (SamplingConfig(guidance=2), "class")])
def test_bad_sampling_settings(s, msg):
    with pytest.raises(UserError, match=msg):
        check_sampling(s, vocab=32, conditional=False)


# -- the first stage and the codes ------------------------------------------------------------------

def prior_task(*overrides):
    from framework.config import load_recipe
    from framework.distributed import DistEnv
    from framework.models.prior import Task
    from conftest import REPO

    r = load_recipe(REPO / "recipes" / "prior" / "mnist5k_gpt_smoke.yaml", list(overrides), check_files=False)
    return Task(r, DistEnv(0, 0, 1, "127.0.0.1", 0, "single"))


def test_first_stage_must_exist_and_match():
    from conftest import REPO

    with pytest.raises(UserError, match="model.first_stage.*no such run"):
        prior_task("model.first_stage=/nonexistent/run").load_first_stage()
    with pytest.raises(UserError, match="model.first_stage' is empty"):
        prior_task("model.first_stage=''").load_first_stage()
    vq = str(REPO / "recipes" / "vqgan" / "mnist5k_smoke.yaml")  # 8 x 8 grids of 128 codes, random weights
    first = prior_task(f"model.first_stage={vq}").load_first_stage()
    assert first.task.code_shape() == (128, 8, 8)
    with pytest.raises(UserError, match="makes 8x8 grids of 128 codes.*16x16 grids of 128"):
        prior_task(f"model.first_stage={vq}", "model.grid=[16,16]", "model.gpt.block_size=256").load_first_stage()
    with pytest.raises(UserError, match="8x8 grids of 128 codes.*8x8 grids of 64"):
        prior_task(f"model.first_stage={vq}", "model.vocab_size=64").load_first_stage()
    nvae = str(REPO / "recipes" / "nvae" / "mnist5k.yaml")
    with pytest.raises(UserError, match="cannot encode images to codes"):
        prior_task(f"model.first_stage={nvae}").load_first_stage()


def write_codes(path, grid=(8, 8), vocab=128, flip=False, n=20):
    import json

    from framework.eval.recon import _write_codes

    rng = np.random.default_rng(0)
    codes = rng.integers(0, vocab, (n, *grid)).astype(np.int16)
    _write_codes(path, codes, codes[:, :, ::-1].copy() if flip else None, np.arange(n) % 10, np.arange(n) % 2, False)
    path.with_name(path.name + ".json").write_text(json.dumps({"codes": vocab, "grid": list(grid)}))
    return path


def test_codes_must_match_the_prior(tmp_path):
    from conftest import MNIST_BETON

    good = write_codes(tmp_path / "good.beton")
    prior_task().check_codes(good)
    with pytest.raises(UserError, match="holds 4x4 code grids, model.grid is 8x8"):
        prior_task().check_codes(write_codes(tmp_path / "grid.beton", grid=(4, 4)))
    with pytest.raises(UserError, match="encoded with 64 codes.*model.vocab_size is 128"):
        prior_task().check_codes(write_codes(tmp_path / "vocab.beton", vocab=64))
    with pytest.raises(UserError, match="no mirrored twins"):
        prior_task("data.flip=true").check_codes(good)
    prior_task("data.flip=true").check_codes(write_codes(tmp_path / "flip.beton", flip=True))
    with pytest.raises(UserError, match="holds no code grids"):
        prior_task().check_codes(MNIST_BETON)


@pytest.mark.parametrize("override,msg", [
    ("model.arch=lstm", "model.arch"), ("model.gpt.block_size=32", "block_size"), ("model.sos_token=500", "sos_token"),
    ("model.n_classes=0", "label_dropout"), ("model.sampling.top_p=0", "top_p"), ("model.grid=[8]", "model.grid"),
    ("model.pixelcnn.kernel=4", "odd")])
def test_bad_prior_recipes(override, msg):
    over = [override] + (["model.arch=pixelcnn"] if "pixelcnn" in override else [])
    with pytest.raises(UserError, match=msg):
        prior_task(*over)
