"""PGGAN's losses, as the official loss.py (G_wgan_acgan / D_wgangp_acgan without labels):

    D: D(fake) - D(real) + lambda / target^2 (|grad_x D(mixed)| - target)^2 + eps_drift D(real)^2
    G: -D(fake)

mixed = lerp(real, fake, u), u ~ U(0, 1) per sample; the gradient is that of the sum of the mixed
scores with respect to the mixed images (through the minibatch stddev layer, so samples of a
group enter each other's gradient, as in the official graph), its norm per sample in float32 (or wider).
The penalty's gradient reaches D's weights through a double backward (create_graph=True).

Under DeepSpeed the mixed images go through the bare module (`penalty_net`), not the engine: an
engine's outputs carry backward hooks (DeepSpeed >= 0.18's torch-style backward) that would take
the inner autograd.grad for the engine's own backward — reducing and clearing gradients at its
end, and dividing its result by the accumulation steps. The parameters are the same, so the
engine's backward of the loss still reaches them through the penalty.
"""
from __future__ import annotations

import torch

LAMBDA, TARGET, EPS_DRIFT = 10.0, 1.0, 0.001


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 / fp16 scores and gradients are upcast; float64 stays)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def gradient_norms(d, mixed: torch.Tensor, level: int, alpha: float, create_graph: bool = True) -> torch.Tensor:
    """(N,) |d sum(D(mixed)) / d mixed_i|, float32."""
    mixed = mixed.detach().requires_grad_(True)
    scores = d(mixed, level, alpha)
    (grads,) = torch.autograd.grad(_fp32(scores).sum(), mixed, create_graph=create_graph)
    return _fp32(grads).flatten(1).pow(2).sum(1).sqrt()


def d_loss(d, real: torch.Tensor, fake: torch.Tensor, u: torch.Tensor, level: int, alpha: float,
           lam: float = LAMBDA, target: float = TARGET, eps_drift: float = EPS_DRIFT, penalty_net=None):
    """The discriminator's loss (mean over the batch) and its terms (per sample means);
    `penalty_net`: the module the gradient penalty differentiates (default d)."""
    fake = fake.detach()
    real_s = _fp32(d(real, level, alpha))
    fake_s = _fp32(d(fake, level, alpha))
    mixed = torch.lerp(real, fake, u.to(real.dtype).view(-1, 1, 1, 1))
    norms = gradient_norms(d if penalty_net is None else penalty_net, mixed, level, alpha)
    gp = (norms - target).pow(2)
    loss = fake_s - real_s + gp * (lam / target ** 2) + real_s.pow(2) * eps_drift
    return loss.mean(), {"w_distance": (real_s - fake_s).mean().detach(), "gradient_penalty": gp.mean().detach(),
                         "real_score": real_s.mean().detach(), "fake_score": fake_s.mean().detach(),
                         "grad_norm_mixed": norms.mean().detach()}


def g_loss(d, fake: torch.Tensor, level: int, alpha: float):
    s = _fp32(d(fake, level, alpha))
    return (-s).mean(), {"fake_score": s.mean().detach()}
