"""PGGAN's networks (issue 14, first part): the official G_paper / D_paper parameter counts and
channel table, the equalised learning rate, pixel norm, minibatch stddev against a direct
computation, and the fade-in at alpha = 0 and 1."""
import math

import pytest
import torch
from torch.nn import functional as F

from framework.models.pggan.networks import (Discriminator, EqualizedConv2d, Generator, channel_table,
                                             downscale2d, minibatch_stddev, parameter_count, pixel_norm,
                                             upscale2d)


def official_counts(resolution: int, channels: int = 3) -> tuple[int, int]:
    """The parameters of G_paper and D_paper by their layer lists (official networks.py), summed by
    hand: weights and one bias per output channel (G's 4x4 dense: per feature map)."""
    nf = lambda s: min(8192 // 2 ** s, 512)  # noqa: E731
    top = int(math.log2(resolution))
    conv = lambda i, o, k=3: i * o * k * k + o  # noqa: E731
    g = 512 * nf(1) * 16 + nf(1) + conv(nf(1), nf(1))
    d = conv(nf(1) + 1, nf(1)) + nf(1) * 16 * nf(0) + nf(0) + nf(0) + 1
    for r in range(2, top + 1):
        g += conv(nf(r - 1), channels, 1)  # toRGB
        d += conv(channels, nf(r - 1), 1)  # fromRGB
        if r > 2:
            g += conv(nf(r - 2), nf(r - 1)) + conv(nf(r - 1), nf(r - 1))
            d += conv(nf(r - 1), nf(r - 1)) + conv(nf(r - 1), nf(r - 2))
    return g, d


def test_the_1024_px_networks_have_the_papers_23_1_million_parameters():
    g, d = Generator(1024), Discriminator(1024)
    assert (parameter_count(g), parameter_count(d)) == official_counts(1024) == (23_079_115, 23_087_249)
    for n in (parameter_count(g), parameter_count(d)):
        assert abs(n - 23.1e6) <= 0.05e6  # the paper's Table 2: 23.1 M each
    assert g.latent == 512


@pytest.mark.parametrize("resolution", [32, 256])
def test_smaller_targets_have_the_counts_of_their_layer_lists(resolution):
    assert (parameter_count(Generator(resolution)), parameter_count(Discriminator(resolution))) == \
        official_counts(resolution)


def test_the_channel_table():
    assert channel_table(256) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64}
    assert channel_table(1024)[512] == 32 and channel_table(1024)[1024] == 16
    g = Generator(256)
    assert g.blocks["64x64"]["Conv1"].weight.shape[0] == 256 and g.torgb["256x256"].weight.shape[1] == 64


def test_weights_are_unit_normal_and_scaled_at_run_time():
    torch.manual_seed(0)
    conv = EqualizedConv2d(64, 32, 3)
    assert abs(float(conv.weight.detach().std()) - 1) < 0.02 and float(conv.bias.detach().abs().max()) == 0
    assert conv.scale == pytest.approx(math.sqrt(2) / math.sqrt(64 * 9), rel=1e-12)  # He's std, at run time
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight * conv.scale, conv.bias, padding=1), rtol=0, atol=0)
    g = Generator(32)
    assert g.blocks["4x4"]["Dense"].scale == pytest.approx(math.sqrt(2) / 4 / math.sqrt(512))
    assert g.torgb["32x32"].scale == pytest.approx(1 / math.sqrt(512))


def test_pixel_norm_gives_unit_mean_square_over_channels():
    y = pixel_norm(torch.randn(3, 16, 5, 5) * 7)
    torch.testing.assert_close(y.pow(2).mean(1), torch.ones(3, 5, 5), rtol=1e-5, atol=1e-5)


def test_minibatch_stddev_equals_a_direct_computation():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 2, 2)
    out = minibatch_stddev(x, 4)
    assert out.shape == (8, 4, 2, 2)
    torch.testing.assert_close(out[:, :3], x)
    for i in range(8):
        group = [j for j in range(8) if j % 2 == i % 2]  # 2 groups of 4: sample i in group i mod 2
        s = x[group]
        std = torch.sqrt(((s - s.mean(0)) ** 2).mean(0) + 1e-8).mean()
        torch.testing.assert_close(out[i, 3], torch.full((2, 2), float(std)))
    assert torch.equal(minibatch_stddev(x[:3], 4)[:, 3], minibatch_stddev(x[:3], 3)[:, 3])  # a batch below G
    with pytest.raises(ValueError, match="not a multiple"):
        minibatch_stddev(x[:6], 4)


@pytest.mark.parametrize("level", [3, 5])
def test_fading_in_starts_at_the_previous_resolution_and_ends_at_the_new_block(level):
    torch.manual_seed(2)
    g, d = Generator(32), Discriminator(32)
    z = torch.randn(4, 512)
    with torch.no_grad():
        # alpha = 0: the previous resolution's output upsampled (G), the input pooled into it (D)
        torch.testing.assert_close(g(z, level, 0.0), upscale2d(g(z, level - 1, 1.0)), rtol=0, atol=0)
        img = torch.randn(4, 3, 2 ** level, 2 ** level)
        torch.testing.assert_close(d(img, level, 0.0), d(downscale2d(img), level - 1, 1.0), rtol=0, atol=0)
        # alpha = 1: the new block alone (the previous RGB layers do not matter)
        before_g, before_d = g(z, level, 1.0), d(img, level, 1.0)
        mid_g, mid_d = g(z, level, 0.3), d(img, level, 0.3)
        g.torgb[f"{2 ** (level - 1)}x{2 ** (level - 1)}"].weight.add_(1.0)
        d.fromrgb[f"{2 ** (level - 1)}x{2 ** (level - 1)}"].weight.add_(1.0)
        torch.testing.assert_close(g(z, level, 1.0), before_g, rtol=0, atol=0)
        torch.testing.assert_close(d(img, level, 1.0), before_d, rtol=0, atol=0)
        assert not torch.allclose(g(z, level, 0.3), mid_g) and not torch.allclose(d(img, level, 0.3), mid_d)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        Generator(100)
    with pytest.raises(ValueError, match="16 px at level 3"):
        Discriminator(32)(torch.randn(4, 3, 16, 16), 3)
