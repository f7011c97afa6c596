"""GLANN's parts: the official GLO generator's parameter count and layer list, the latent table's
init and projection onto the sphere, IMLE's mapping T, the official VGG distance against a literal
re-run of its loop (random VGG16 weights, named as such), GLO's Laplacian-pyramid L1 against a
scipy computation, LPIPS as an L2 between vectors (against the lpips package), and the exact
nearest-neighbour searches (FAISS, the torch fallback and the streaming one against brute force,
ties, 2 ranks = 1)."""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import REPO, env, free_port
from framework.models.glann.networks import DeepGenerator, Generator, LatentTable, Mapping, unit
from framework.models.glann.perceptual import LAYER_IDS, LaplacianL1, VGGDistance, laplacian_pyramid, levels_for
from framework.models.glann.search import StreamingNearest, faiss_available, nearest


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def official_generator_count(nz: int, size: int, nc: int) -> int:
    """model._netG's layers summed by hand: lin_in, bn_in (unused), lin_im, bn_im, conv1 (+bias), bn_conv, conv2 (+bias)."""
    dim_im = 128 * (size // 4) ** 2
    return (nz * 1024 + 2 * 1024 + 1024 * dim_im + 2 * dim_im + 128 * 64 * 16 + 64 + 2 * 64
            + 64 * nc * 16 + nc)


@pytest.mark.parametrize("nz,size,nc", [(64, 28, 1), (64, 32, 3), (64, 64, 3)])
def test_the_glo_generator_has_the_official_parameters(nz, size, nc):
    g = Generator(nz, size, nc, do_bn=True)
    assert count(g) == official_generator_count(nz, size, nc)
    names = {n for n, _ in g.named_parameters()}
    assert names == {"lin_in.weight", "bn_in.weight", "bn_in.bias", "lin_im.weight", "bn_im.weight", "bn_im.bias",
                     "conv1.weight", "conv1.bias", "bn_conv.weight", "bn_conv.bias", "conv2.weight", "conv2.bias"}
    g.eval()
    out = g(torch.randn(5, nz))
    assert out.shape == (5, nc, size, size) and 0 <= out.min() and out.max() <= 1


def test_the_generator_sees_only_the_codes_direction_and_its_init_is_xavier():
    torch.manual_seed(0)
    g = Generator(64, 32, 1).eval()
    z = torch.randn(4, 64)
    assert torch.allclose(g(z), g(7.5 * z), atol=1e-6)
    w = g.lin_im.weight  # Xavier-normal, gain sqrt 2: std sqrt(2) * sqrt(2 / (fan_in + fan_out))
    assert abs(w.std().item() / (math.sqrt(2) * math.sqrt(2 / (1024 + w.shape[0]))) - 1) < 0.02
    # the norm is detached: the gradient at z is that of z / |z| with |z| a constant
    z = torch.randn(3, 64, requires_grad=True)
    (unit(z) * torch.arange(64.0)).sum().backward()
    assert torch.allclose(z.grad, torch.arange(64.0).expand(3, -1) / z.detach().norm(dim=1, keepdim=True))


def test_the_deep_generator_reaches_256_px():
    g = DeepGenerator(64, 256, 3).eval()
    assert g(torch.randn(2, 64)).shape == (2, 3, 256, 256)
    with pytest.raises(ValueError):
        DeepGenerator(64, 96, 3)


def test_the_latent_table_starts_small_and_projects_onto_the_sphere():
    torch.manual_seed(0)
    t = LatentTable(5000, 64)
    assert abs(t.emb.weight.std().item() - 0.01) < 3e-4
    rows = torch.tensor([3, 4999, 3])
    assert torch.equal(t(rows)[0], t(rows)[2]) and torch.equal(t(rows)[1], t.emb.weight[4999])
    t.project_()
    assert torch.allclose(t.emb.weight.norm(dim=1), torch.ones(5000), atol=1e-6)


def test_the_mapping_is_the_official_mlp():
    m = Mapping(32, 64)
    assert count(m) == 32 * 128 + 2 * 128 + 128 * 128 + 2 * 128 + 128 * 64
    assert m(torch.randn(10, 32)).shape == (10, 64)


# -- the perceptual loss ------------------------------------------------------------------------

def official_loop(vgg_inplace: nn.Sequential, x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """vgg_metric._netVGGFeatures.main, literally: outputs kept at the layer ids, in-place ReLUs."""
    ids = LAYER_IDS[:levels]
    out = []
    for i in range(ids[-1] + 1):
        x = vgg_inplace[i](x)
        if i in ids:
            out.append(x)
    return out


@pytest.fixture(scope="module")
def distance():
    torch.manual_seed(0)
    return VGGDistance("random", size=32)  # random VGG16 weights: no file ships here


@pytest.mark.parametrize("levels", [2, 3, 4, 5])
def test_the_features_are_what_the_official_loop_hands_back(distance, levels):
    import copy

    inplace = copy.deepcopy(distance.vgg)
    for m in inplace.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = True
    x = torch.randn(2, 3, 32, 32)
    want = official_loop(inplace, x.clone(), levels)
    got = distance.features(x, levels)
    assert len(got) == levels
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # every level but the last is a ReLU's output (the in-place ReLU overwrote the kept tensor)
    assert all((f >= 0).all() for f in got[:-1]) and (levels == 5 or (got[-1] < 0).any())


def test_the_distance_equals_a_direct_computation(distance):
    torch.manual_seed(1)
    fake, real = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)
    a, b = 2 * fake.expand(-1, 3, -1, -1) - 1, 2 * real.expand(-1, 3, -1, -1) - 1
    want = (a - b).abs().flatten(1).mean(1)
    for x, y in zip(distance.features(a, 3), distance.features(b, 3)):
        want = want + (x - y).abs().flatten(1).mean(1)
    assert torch.allclose(distance(fake, real), want, rtol=1e-6)
    assert torch.equal(distance(real, real), torch.zeros(3))
    assert [levels_for(s) for s in (16, 28, 32, 64, 128)] == [2, 3, 3, 4, 5]


def test_28_px_images_are_padded_and_above_64_px_the_multiscale_form():
    torch.manual_seed(0)
    d = VGGDistance("random", size=28)
    x = torch.rand(2, 1, 28, 28)
    assert d.prepare(x).shape == (2, 3, 32, 32) and d.prepare(x)[0, 0, 0, 0] == -1
    big = VGGDistance("random", size=128)
    a, b = torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128)
    pa, pb = 2 * a - 1, 2 * b - 1
    want = big._single(pa, pb, 5) + big._single(F.avg_pool2d(pa, 4), F.avg_pool2d(pb, 4), 4)
    assert torch.allclose(big(a, b), want) and big.multiscale


def test_missing_vgg_weights_are_one_line(tmp_path):
    from framework.errors import UserError

    with pytest.raises(UserError, match="key 'model.glo.vgg_weights': VGG16 weights not found"):
        VGGDistance(str(tmp_path / "none.pth"))


# -- nearest neighbours ----------------------------------------------------------------------------

# -- GLO's Laplacian-pyramid L1 ------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 28])
def test_the_pyramid_collapses_back_to_the_image_and_flat_images_have_no_bands(size):
    from framework.models.glann.perceptual import _expand

    g = torch.Generator().manual_seed(size)
    x = torch.rand(2, 3, size, size, generator=g, dtype=torch.float64)
    pyr = laplacian_pyramid(x, 4)
    assert [p.shape[-1] for p in pyr] == [size, size // 2, -(-size // 4), -(-size // 8)]
    y = pyr[-1]
    for band in reversed(pyr[:-1]):
        y = band + _expand(y, band.shape)
    assert torch.allclose(y, x, atol=1e-12)
    flat = laplacian_pyramid(torch.full((1, 1, size, size), 0.3, dtype=torch.float64), 4)
    assert all(b.abs().max() < 1e-12 for b in flat[:-1]) and torch.allclose(flat[-1], torch.tensor(0.3, dtype=torch.float64))


def test_lap1_equals_a_scipy_computation():
    """Burt & Adelson's REDUCE/EXPAND with scipy.ndimage (mirror = torch's reflect), weights 2^-2j."""
    import numpy as np
    from scipy import ndimage

    k = np.array([1, 4, 6, 4, 1], np.float64) / 16
    k2 = np.outer(k, k)

    def pyramid(img, levels):
        out, g = [], img
        for _ in range(levels - 1):
            down = ndimage.convolve(g, k2, mode="mirror")[::2, ::2]
            up = np.zeros((2 * down.shape[0], 2 * down.shape[1]))
            up[::2, ::2] = down
            out.append(g - (4 * ndimage.convolve(up, k2, mode="mirror"))[:g.shape[0], :g.shape[1]])
            g = down
        return out + [g]

    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 2, 32, 32, generator=gen, dtype=torch.float64), torch.rand(3, 2, 32, 32, generator=gen, dtype=torch.float64)
    got = LaplacianL1(4)(a, b)
    for i in range(3):
        want = 0.0
        for c in range(2):
            pa, pb = pyramid(2 * a[i, c].numpy() - 1, 4), pyramid(2 * b[i, c].numpy() - 1, 4)
            want += sum(4.0 ** -j * np.abs(x - y).mean() for j, (x, y) in enumerate(zip(pa, pb))) / 2
        assert abs(got[i].item() - want) < 1e-10
    assert LaplacianL1(4)(a, a).abs().max() == 0


# -- LPIPS as a distance between vectors (pixel IMLE's search) -------------------------------------

def test_lpips_is_the_squared_distance_between_its_vectors():
    """Random VGG16 weights (none ship here), LPIPS's real heads; LPIPS itself equals the lpips
    package (tests/test_vqgan.py), so nearest under these vectors is nearest under LPIPS."""
    from framework.losses.lpips import LPIPS

    torch.manual_seed(0)
    ours = LPIPS("random")
    g = torch.Generator().manual_seed(1)
    x, y = 2 * torch.rand(4, 3, 32, 32, generator=g) - 1, 2 * torch.rand(4, 3, 32, 32, generator=g) - 1
    e = ours.embed(torch.cat([x, y]))
    assert e.shape == (8, 64 * 32 * 32 + 128 * 16 * 16 + 256 * 8 * 8 + 512 * 4 * 4 + 512 * 2 * 2)
    direct = ours(x, y)
    assert torch.allclose((e[:4] - e[4:]).pow(2).sum(1), direct, rtol=1e-4)


def test_the_streaming_search_is_the_brute_force_one_with_ties_to_the_lowest_index():
    g = torch.Generator().manual_seed(3)
    q, p = torch.randn(700, 48, generator=g), torch.randn(1500, 48, generator=g)
    p[1300] = p[int(brute_force(q[:1], p)[0])]  # a duplicate of query 0's nearest, in a later chunk
    s = StreamingNearest(len(q), block=128)
    s.set_queries(lambda rows: q[rows])
    for _ in range(2):  # reset() starts a new round over the same queries
        s.reset()
        for i in range(0, len(p), 256):
            s.add(p[i:i + 256])
        idx, d2 = s.result()
        assert torch.equal(idx, brute_force(q, p))
        assert torch.allclose(d2, (q.double() - p.double()[idx]).pow(2).sum(1), rtol=1e-4)


def brute_force(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    d2 = (q.double().unsqueeze(1) - p.double().unsqueeze(0)).pow(2).sum(-1)
    return d2.argmin(1)


BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 64])
def test_the_nearest_sample_is_the_brute_force_one(backend, d):
    g = torch.Generator().manual_seed(d)
    q, p = torch.randn(700, d, generator=g), torch.randn(1400, d, generator=g)
    idx, d2 = nearest(q, p, backend, chunk=256)
    assert torch.equal(idx, brute_force(q, p))
    assert torch.allclose(d2, (q.double() - p.double()[idx]).pow(2).sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_sample_index(backend):
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    q = torch.tensor([[0.9, 0.0], [0.0, 0.0]])  # the first: samples 0 and 2 coincide; the second: all equal
    idx, _ = nearest(q, p, backend)
    assert idx.tolist() == [0, 0]


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
def test_faiss_and_torch_agree_on_near_ties():
    g = torch.Generator().manual_seed(5)
    p = torch.randn(3000, 16, generator=g)
    p = torch.cat([p, p[:500] + 1e-7 * torch.randn(500, 16, generator=g)])  # near-duplicates
    q = p[torch.randperm(len(p), generator=g)[:800]] + 1e-3 * torch.randn(800, 16, generator=g)
    a, _ = nearest(q, p, "torch", chunk=128)
    b, _ = nearest(q, p, "faiss")
    assert torch.equal(a, b) and torch.equal(a, brute_force(q, p))


SHARDED = r"""
import sys, torch
from framework import distributed as dist
from framework.models.glann.search import StreamingNearest, sharded_nearest
env = dist.init()
g = torch.Generator().manual_seed(0)
codes, samples = torch.randn(1001, 32, generator=g), torch.randn(2002, 32, generator=g)
if sys.argv[1] == "stream":
    s = StreamingNearest(len(codes), block=128)
    s.set_queries(lambda rows: codes[rows])
    s.reset()
    for i in range(0, len(samples), 300):
        s.add(samples[i:i + 300])
    idx, d2 = s.result()
else:
    idx, d2 = sharded_nearest(codes, samples, sys.argv[1], chunk=100)
if env.rank == 0:
    torch.save((idx, d2), sys.argv[2])
dist.barrier()
dist.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS + ["stream"])
def test_two_ranks_give_the_assignment_of_one(tmp_path, backend):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    out = {}
    for nproc in (1, 2):
        path = tmp_path / f"w{nproc}.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(script), backend, str(path)]
        p = subprocess.run(cmd, cwd=REPO, env={**env(), "PYTHONPATH": os.pathsep.join([str(REPO), env()["PYTHONPATH"]])},
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        out[nproc] = torch.load(path)
    g = torch.Generator().manual_seed(0)
    codes, samples = torch.randn(1001, 32, generator=g), torch.randn(2002, 32, generator=g)
    assert torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][0], brute_force(codes, samples))
    assert torch.equal(out[1][1], out[2][1])


def test_auto_picks_faiss_on_the_cpu_and_torch_on_cuda_without_a_gpu_faiss():
    """No GPU here: on a CUDA device, `auto` must not send the search through a CPU FAISS (a copy
    of everything to the host); faiss-cpu has no StandardGpuResources."""
    from framework.models.glann.search import faiss_gpu_available, pick_backend

    assert pick_backend("auto", torch.device("cpu")) == ("faiss" if faiss_available() else "torch")
    assert not faiss_gpu_available()
    assert pick_backend("auto", torch.device("cuda", 0)) == "torch"
    assert pick_backend("faiss", torch.device("cuda", 0)) == "faiss"


@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (16, 8)), ("BatchNorm2d", (4, 8, 5, 5))])
def test_batchnorm_computes_in_float32_under_bf16_parameters(cls, shape):
    """DeepSpeed's bf16 engines cast parameters, not buffers: the layer must take bf16 inputs and
    weights with float32 running statistics, and match torch's layer in float32."""
    import framework.models.layers as nets

    torch.manual_seed(0)
    ours, ref = getattr(nets, cls)(8), getattr(nn, cls)(8)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*shape)
    assert torch.equal(ours(x), ref(x))  # float32: torch's own layer
    ours.weight.data, ours.bias.data = ours.weight.data.bfloat16(), ours.bias.data.bfloat16()
    y = ours(x.bfloat16())
    want = ref(x.bfloat16().float())
    assert y.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    assert torch.allclose(y.float(), want, atol=0.05)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-2) and ours.num_batches_tracked == 2
    ours.eval(), ref.eval()
    assert torch.allclose(ours(x.bfloat16()).float(), ref(x.bfloat16().float()), atol=0.05)
