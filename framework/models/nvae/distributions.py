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


class DiscMixLogistic:
    """params (B, 10 M, H, W) -> a distribution over RGB images (B, 3, H, W) in [-1, 1]."""

    def __init__(self, params: torch.Tensor, num_mix: int = 10, num_bits: int = 8):
        params = params.float()
        b, _, h, w = params.shape
        m = num_mix
        self.num_mix = m
        self.logit_probs = params[:, :m]  # (B, M, H, W)
        rest = params[:, m:].reshape(b, 3, 3 * m, h, w)
        self.means = rest[:, :, :m]  # (B, 3, M, H, W)
        self.log_scales = rest[:, :, m:2 * m].clamp(min=-7.0)
        self.coeffs = torch.tanh(rest[:, :, 2 * m:3 * m])
        self.max_val = 2.0**num_bits - 1

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p per pixel, summed over RGB: (B, 3, H, W) in [-1, 1] -> (B, H, W)."""
        x = x.float().unsqueeze(2)  # (B, 3, 1, H, W)
        mu, a = self.means, self.coeffs
        m1 = mu[:, 0]
        m2 = mu[:, 1] + a[:, 0] * x[:, 0]
        m3 = mu[:, 2] + a[:, 1] * x[:, 0] + a[:, 2] * x[:, 1]
        centered = x - torch.stack([m1, m2, m3], dim=1)  # (B, 3, M, H, W)
        inv_s = torch.exp(-self.log_scales)
        plus_in = inv_s * (centered + 1.0 / self.max_val)
        min_in = inv_s * (centered - 1.0 / self.max_val)
        mid_in = inv_s * centered
        # the bin's mass; above the mean both CDFs are near 1, so take it from the upper tails
        # (same value, no cancellation in float32)
        cdf_delta = torch.where(mid_in > 0, torch.sigmoid(-min_in) - torch.sigmoid(-plus_in),
                                torch.sigmoid(plus_in) - torch.sigmoid(min_in))
        log_cdf_plus = plus_in - F.softplus(plus_in)
        log_one_minus_cdf_min = -F.softplus(min_in)
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in)
        log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-10)),
                              log_pdf_mid - math.log(self.max_val / 2))
        lp = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.99, log_one_minus_cdf_min, log_mid))
        lp = lp.sum(dim=1) + F.log_softmax(self.logit_probs, dim=1)  # (B, M, H, W)
        return torch.logsumexp(lp, dim=1)

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample in [-1, 1]; the logistic scale and the component logits are divided by t."""
        dev = self.logit_probs.device
        u1 = torch.rand(self.logit_probs.shape, generator=generator).to(dev).clamp(1e-5, 1 - 1e-5)
        gumbel = -torch.log(-torch.log(u1))
        sel = F.one_hot(torch.argmax(self.logit_probs / temperature + gumbel, dim=1), self.num_mix)
        sel = sel.permute(0, 3, 1, 2).unsqueeze(1).to(self.means.dtype)  # (B, 1, M, H, W)
        means = (self.means * sel).sum(2)
        log_scales = (self.log_scales * sel).sum(2)
        coeffs = (self.coeffs * sel).sum(2)
        u = torch.rand(means.shape, generator=generator).to(dev).clamp(1e-5, 1 - 1e-5)
        x = means + torch.exp(log_scales) * temperature * (torch.log(u) - torch.log(1 - u))
        x0 = x[:, 0].clamp(-1, 1)
        x1 = (x[:, 1] + coeffs[:, 0] * x0).clamp(-1, 1)
        x2 = (x[:, 2] + coeffs[:, 1] * x0 + coeffs[:, 2] * x1).clamp(-1, 1)
        return torch.stack([x0, x1, x2], dim=1)

    def mean(self) -> torch.Tensor:
        sel = torch.softmax(self.logit_probs, dim=1).unsqueeze(1)
        means = (self.means * sel).sum(2)
        coeffs = (self.coeffs * sel).sum(2)
        x0 = means[:, 0].clamp(-1, 1)
        x1 = (means[:, 1] + coeffs[:, 0] * x0).clamp(-1, 1)
        x2 = (means[:, 2] + coeffs[:, 1] * x0 + coeffs[:, 2] * x1).clamp(-1, 1)
        return torch.stack([x0, x1, x2], dim=1)


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
        u = torch.rand(self.logits.shape, generator=generator).to(self.logits.device)
        return (u < torch.sigmoid(self.logits)).float() * 2 - 1
