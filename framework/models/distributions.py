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
    """params: (B, K * (1 + 2C) [+ 3K if C == 3], H, W) -> a distribution over (B, C, H, W).

    The one implementation of the framework (the VAE's and NVAE's). `layout` says how params are
    ordered after the K logits: "grouped" (the VAE's: K x C means, K x C log-scales, K x 3
    coefficients) or "nvae" (NVlabs/NVAE's: per channel 3 K values, means, log-scales,
    coefficients). `edges` says which values own the tails: "exact" (the lowest and highest of
    the 2^b levels) or "reference" (x < -0.999 and x > 0.99, as NVlabs/NVAE and PixelCNN++ do,
    so at 8 bits the second-highest level also takes the right tail). A bin above the mean takes
    its mass from the upper tails, sigma(-lo) - sigma(-hi), where sigma(hi) - sigma(lo) cancels
    in float32 (the same value, computed without the cancellation).
    """

    LOG_SCALE_MIN = -7.0  # NVAE/PixelCNN++'s floor on the log-scale: keeps bf16/fp16 stable

    def __init__(self, params: torch.Tensor, channels: int, num_mix: int, num_bits: int = 8,
                 layout: str = "grouped", edges: str = "exact"):
        params = params.float()
        b, _, h, w = params.shape
        k, c = num_mix, channels
        self.C, self.K, self.num_bits, self.edges = c, k, num_bits, edges
        self.bins = 2**num_bits - 1
        self.logits = params[:, :k]  # (B, K, H, W)
        rest = params[:, k:]
        if layout == "grouped":
            means = rest[:, :k * c].reshape(b, k, c, h, w)
            log_scales = rest[:, k * c:2 * k * c].reshape(b, k, c, h, w)
            coeffs = rest[:, 2 * k * c:].reshape(b, k, 3, h, w) if c == 3 else None
        elif layout == "nvae":
            if c != 3:
                raise ValueError("the nvae layout is RGB only")
            r = rest.reshape(b, 3, 3 * k, h, w).transpose(1, 2)  # (B, 3K, 3, H, W)
            means, log_scales, coeffs = r[:, :k], r[:, k:2 * k], r[:, 2 * k:3 * k]
        else:
            raise ValueError(f"layout {layout!r}")
        self.means = means  # (B, K, C, H, W)
        self.log_scales = log_scales.clamp(min=self.LOG_SCALE_MIN)
        self.coeffs = torch.tanh(coeffs) if coeffs is not None else None  # (B, K, 3, H, W)

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

    def log_prob_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """log p of each pixel in nats, summed over its channels: (B, C, H, W) in [-1, 1] -> (B, H, W)."""
        x = x.float()
        centered = x.unsqueeze(1) - self._means_given(x)  # (B, K, C, H, W)
        inv_s = torch.exp(-self.log_scales)
        half_bin = 1.0 / self.bins
        plus_in = inv_s * (centered + half_bin)
        min_in = inv_s * (centered - half_bin)
        mid_in = inv_s * centered
        cdf_delta = torch.where(mid_in > 0, torch.sigmoid(-min_in) - torch.sigmoid(-plus_in),
                                torch.sigmoid(plus_in) - torch.sigmoid(min_in))
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log CDF at the upper edge: the x = -1 bin
        log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - CDF) at the lower edge: the x = 1 bin
        # where the bin's mass underflows, use the density at its centre times the bin width
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in) + math.log(2.0 / self.bins)
        log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
        xe = x.unsqueeze(1)
        lo, hi = (-0.999, 0.99) if self.edges == "reference" else (-(1.0 - half_bin), 1.0 - half_bin)
        log_probs = torch.where(xe < lo, log_cdf_plus, torch.where(xe > hi, log_one_minus_cdf_min, log_mid))
        per_mix = log_probs.sum(dim=2) + F.log_softmax(self.logits, dim=1)  # (B, K, H, W)
        return torch.logsumexp(per_mix, dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats, summed over C, H, W: (B, C, H, W) in [-1, 1] -> (B,)."""
        return self.log_prob_pixels(x).flatten(1).sum(dim=1)

    def _couple(self, x: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        """Channel coupling of a draw (RGB) and the clamp to [-1, 1], channel by channel."""
        if self.C != 3:
            return x.clamp(-1, 1)
        r = x[:, 0].clamp(-1, 1)
        g = (x[:, 1] + a[:, 0] * r).clamp(-1, 1)
        bl = (x[:, 2] + a[:, 1] * r + a[:, 2] * g).clamp(-1, 1)
        return torch.stack([r, g, bl], 1)

    @torch.no_grad()
    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None, rule: str = "scale",
               quantize: bool = True) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1]: a component by Gumbel-max over logits / t, then a logistic draw
        whose scale is multiplied by t (`rule="scale"`: t < 1 is sharper), divided by t
        (`"reference"`: NVlabs/NVAE's distributions.py at 9fc1a28; t < 1 is noisier), or left as
        trained with the logits (`"none"`). Quantised to the 2^b levels unless `quantize` is off."""
        if rule not in ("scale", "reference", "none"):
            raise ValueError(f"output temperature rule {rule!r}")
        b, k, c, h, w = self.means.shape
        dev = self.logits.device
        t_logits = 1.0 if rule == "none" else temperature
        t_scale = {"scale": temperature, "reference": 1.0 / temperature, "none": 1.0}[rule]

        def uniform(*shape):
            return uniform_on(shape, generator, dev).clamp(1e-5, 1 - 1e-5)

        gumbel = -torch.log(-torch.log(uniform(b, k, h, w)))
        pick = F.one_hot((self.logits / t_logits + gumbel).argmax(1), k).permute(0, 3, 1, 2)
        pick = pick.to(self.means.dtype).unsqueeze(2)  # (B, K, 1, H, W)
        means = (self.means * pick).sum(1)  # (B, C, H, W)
        log_s = (self.log_scales * pick).sum(1)
        u = uniform(b, c, h, w)
        x = means + torch.exp(log_s) * t_scale * (torch.log(u) - torch.log(1 - u))
        x = self._couple(x, (self.coeffs * pick).sum(1) if self.C == 3 else None)
        if not quantize:
            return x
        return torch.round((x + 1) / 2 * self.bins) / self.bins * 2 - 1

    def mean(self) -> torch.Tensor:
        """The mixture-weighted means, coupled and clamped (NVAE's `mean()`): (B, C, H, W)."""
        sel = torch.softmax(self.logits, dim=1).unsqueeze(2)
        means = (self.means * sel).sum(1)
        return self._couple(means, (self.coeffs * sel).sum(1) if self.C == 3 else None)


def uniform_on(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """U(0, 1) drawn on the generator's device (a CUDA generator draws on CUDA), then on `device`."""
    where = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=where).to(device)


def gaussian_kl_standard(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in nats, summed over all but the batch dim: (B,)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
