"""The discretized logistic mixture is a distribution over the 2^b levels of each pixel."""
import itertools
import math

import pytest
import torch

from framework.models.distributions import DiscMixLogistic, gaussian_kl_standard


def levels(bits):
    return torch.arange(2**bits, dtype=torch.float32) / (2**bits - 1) * 2 - 1


def test_grey_pixel_probabilities_sum_to_one():
    torch.manual_seed(0)
    for bits in (1, 5, 8):
        params = torch.randn(1, DiscMixLogistic.num_params(1, 3), 1, 1) * 2
        d = DiscMixLogistic(params, 1, 3, bits)
        x = levels(bits).reshape(-1, 1, 1, 1)
        d_rep = DiscMixLogistic(params.expand(len(x), -1, -1, -1), 1, 3, bits)
        total = torch.logsumexp(d_rep.log_prob(x), 0)
        assert abs(float(total)) < 1e-4, (bits, float(total))
        assert d.sample().shape == (1, 1, 1, 1)


def test_rgb_pixel_probabilities_sum_to_one():
    torch.manual_seed(1)
    bits = 3
    params = torch.randn(1, DiscMixLogistic.num_params(3, 2), 1, 1)
    lv = levels(bits)
    xs = torch.tensor(list(itertools.product(lv.tolist(), repeat=3))).reshape(-1, 3, 1, 1)
    d = DiscMixLogistic(params.expand(len(xs), -1, -1, -1), 3, 2, bits)
    assert abs(float(torch.logsumexp(d.log_prob(xs), 0))) < 1e-4


def test_samples_lie_on_the_levels():
    torch.manual_seed(2)
    d = DiscMixLogistic(torch.randn(4, DiscMixLogistic.num_params(3, 5), 3, 3), 3, 5, 5)
    s = d.sample(generator=torch.Generator().manual_seed(0))
    q = (s + 1) / 2 * 31
    assert torch.allclose(q, q.round(), atol=1e-4) and s.min() >= -1 and s.max() <= 1


def test_gaussian_kl_known_values():
    assert float(gaussian_kl_standard(torch.zeros(1, 4), torch.zeros(1, 4))) == 0.0
    kl = gaussian_kl_standard(torch.ones(1, 1), torch.tensor([[math.log(2.0)]]))
    assert math.isclose(float(kl), 0.5 * (1 + 2 - 1 - math.log(2)), rel_tol=1e-6)


def test_a_sharp_component_scores_bins_above_its_mean_without_float32_cancellation():
    # one component at mean 0.5 with a small scale: for bins 8-10 scales above it both logistic CDFs
    # are within 3e-4 of 1, so sigma(hi) - sigma(lo) keeps only a few digits in float32 (relative
    # errors 4e-5 and 6e-5 at levels 196 and 197); the upper tails keep them (5e-8)
    k, c, bits = 1, 1, 8
    params = torch.zeros(1, DiscMixLogistic.num_params(c, k), 1, 1)
    params[0, 1] = 0.5  # mean
    params[0, 2] = math.log(0.004)  # log-scale
    d = DiscMixLogistic(params, c, k, bits)
    bins = 2**bits - 1
    for level in (196, 197):
        x = torch.full((1, 1, 1, 1), 2 * level / bins - 1)
        lo, hi = (float(x) - 0.5 - 1 / bins) / 0.004, (float(x) - 0.5 + 1 / bins) / 0.004
        exact = math.log(1 / (1 + math.exp(lo)) - 1 / (1 + math.exp(hi)))  # sigma(-lo) - sigma(-hi), float64
        assert float(d.log_prob(x)) == pytest.approx(exact, rel=1e-5), level
