"""NVAE's distributions, with the reference's clamps and edge handling (NVlabs/NVAE
`distributions.py`, re-written; pixels in [-1, 1] as the framework feeds them).

Normal: mu = 5 tanh(mu / 5), sigma = exp(5 tanh(log_sigma / 5)) + 0.01, times the temperature.
DiscMixLogistic: 10 parameters per component for RGB (logit, and per channel mean, log-scale
>= -7, tanh coefficient), channel-autoregressive means, bins of half-width 1 / (2^b - 1), the
lowest level owning the left tail (x < -0.999) and the highest the right tail (x > 0.99).
One change of numerics, not of value: a bin above the mean takes its mass from the upper tails,
sigma(-lo) - sigma(-hi), where the reference's sigma(hi) - sigma(lo) cancels in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from ..distributions import DiscMixLogistic as SharedDiscMixLogistic
from ..distributions import uniform_on


def soft_clamp5(x: torch.Tensor) -> torch.Tensor:
    return 5.0 * torch.tanh(x / 5.0)


class Normal:
    def __init__(self, mu: torch.Tensor, log_sigma: torch.Tensor, temperature: float = 1.0):
        self.mu = soft_clamp5(mu)
        self.sigma = torch.exp(soft_clamp5(log_sigma)) + 1e-2
        if temperature != 1.0:
            self.sigma = self.sigma * temperature

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        return self.mu + self.sigma * eps

    def log_p(self, z: torch.Tensor) -> torch.Tensor:
        u = (z - self.mu) / self.sigma
        return -0.5 * u * u - 0.5 * math.log(2 * math.pi) - torch.log(self.sigma)

    def kl(self, p: "Normal") -> torch.Tensor:
        """KL(self || p) per variable, in closed form."""
        t1 = (self.mu - p.mu) / p.sigma
        t2 = self.sigma / p.sigma
        return 0.5 * (t1 * t1 + t2 * t2) - 0.5 - torch.log(t2)


class DiscMixLogistic(SharedDiscMixLogistic):
    """params (B, 10 M, H, W) in the reference's order -> a distribution over RGB images (B, 3, H, W)
    in [-1, 1]: the framework's one mixture (framework/models/distributions.py) with the
    reference's layout and edges; log_prob per pixel (B, H, W), samples not quantised."""

    def __init__(self, params: torch.Tensor, num_mix: int = 10, num_bits: int = 8):
        super().__init__(params, 3, num_mix, num_bits, layout="nvae", edges="reference")
        self.num_mix = num_mix

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob_pixels(x)

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None,
               rule: str = "scale") -> torch.Tensor:
        return super().sample(temperature, generator, rule, quantize=False)


class Bernoulli:
    """For binarised data (MNIST): x in {-1, 1} <-> {0, 1}."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits.float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in {-1, 1} -> (B, 1, H, W) log-probabilities."""
        target = (x.float() > 0).float()
        return -F.binary_cross_entropy_with_logits(self.logits, target, reduction="none")

    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits) * 2 - 1

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        u = uniform_on(self.logits.shape, generator, self.logits.device)
        return (u < torch.sigmoid(self.logits)).float() * 2 - 1
