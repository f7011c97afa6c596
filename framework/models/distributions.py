"""Output distributions over n-bit pixels, shared by the families.

`DiscMixLogistic` is the discretized mixture of logistics of PixelCNN++ (Salimans et al.
2017) as NVAE uses it: pixels live in [-1, 1] on 2^b levels, each level owns the logistic
mass of its bin, the two edge levels own the tails, and for RGB the means of green and blue
depend linearly on the red (and green) values of the same pixel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class DiscMixLogistic:
    """params: (B, K * (1 + 2C) [+ 3K if C == 3], H, W) -> a distribution over (B, C, H, W)."""

    LOG_SCALE_MIN = -7.0  # NVAE/PixelCNN++'s floor on the log-scale: keeps bf16/fp16 stable

    def __init__(self, params: torch.Tensor, channels: int, num_mix: int, num_bits: int = 8):
        params = params.float()
        b, _, h, w = params.shape
        k, c = num_mix, channels
        self.C, self.K, self.num_bits = c, k, num_bits
        self.bins = 2**num_bits - 1
        self.logits = params[:, :k]  # (B, K, H, W)
        rest = params[:, k:]
        self.means = rest[:, :k * c].reshape(b, k, c, h, w)
        self.log_scales = rest[:, k * c:2 * k * c].reshape(b, k, c, h, w).clamp(min=self.LOG_SCALE_MIN)
        self.coeffs = torch.tanh(rest[:, 2 * k * c:].reshape(b, k, 3, h, w)) if c == 3 else None

    @staticmethod
    def num_params(channels: int, num_mix: int) -> int:
        return num_mix * (1 + 2 * channels) + (3 * num_mix if channels == 3 else 0)

    def _means_given(self, x: torch.Tensor) -> torch.Tensor:
        """Means with the channel-autoregressive shift for RGB: (B, K, C, H, W)."""
        if self.C != 3:
            return self.means
        x = x.unsqueeze(1)  # (B, 1, 3, H, W)
        m, a = self.means, self.coeffs
        g = m[:, :, 1] + a[:, :, 0] * x[:, :, 0]
        bl = m[:, :, 2] + a[:, :, 1] * x[:, :, 0] + a[:, :, 2] * x[:, :, 1]
        return torch.stack([m[:, :, 0], g, bl], dim=2)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats, summed over C, H, W: (B, C, H, W) in [-1, 1] -> (B,)."""
        x = x.float()
        centered = x.unsqueeze(1) - self._means_given(x)  # (B, K, C, H, W)
        inv_s = torch.exp(-self.log_scales)
        half_bin = 1.0 / self.bins
        plus_in = inv_s * (centered + half_bin)
        min_in = inv_s * (centered - half_bin)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log CDF at the upper edge: the x = -1 bin
        log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - CDF) at the lower edge: the x = 1 bin
        mid_in = inv_s * centered
        # where the bin's mass underflows, use the density at its centre times the bin width
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in) + math.log(2.0 / self.bins)
        log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
        xe = x.unsqueeze(1)
        edge = 1.0 - half_bin  # strictly between the last two levels for every num_bits <= 8
        log_probs = torch.where(xe < -edge, log_cdf_plus, torch.where(xe > edge, log_one_minus_cdf_min, log_mid))
        per_mix = log_probs.sum(dim=2) + F.log_softmax(self.logits, dim=1)  # (B, K, H, W)
        return torch.logsumexp(per_mix, dim=1).flatten(1).sum(dim=1)

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1], quantised to the distribution's 2^b levels."""
        b, k, c, h, w = self.means.shape
        dev = self.logits.device

        def uniform(*shape):
            return torch.rand(shape, generator=generator).to(dev).clamp(1e-5, 1 - 1e-5)

        gumbel = -torch.log(-torch.log(uniform(b, k, h, w)))
        pick = F.one_hot((self.logits + gumbel).argmax(1), k).permute(0, 3, 1, 2).float().unsqueeze(2)
        means = (self.means * pick).sum(1)  # (B, C, H, W)
        log_s = (self.log_scales * pick).sum(1)
        u = uniform(b, c, h, w)
        x = means + torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))
        if c == 3:
            a = (self.coeffs * pick).sum(1)
            r = x[:, 0].clamp(-1, 1)
            g = (x[:, 1] + a[:, 0] * r).clamp(-1, 1)
            bl = (x[:, 2] + a[:, 1] * r + a[:, 2] * g).clamp(-1, 1)
            x = torch.stack([r, g, bl], 1)
        x = x.clamp(-1, 1)
        return torch.round((x + 1) / 2 * self.bins) / self.bins * 2 - 1


def gaussian_kl_standard(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in nats, summed over all but the batch dim: (B,)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
