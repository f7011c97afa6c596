"""VQGAN's objective (taming's VQLPIPSWithDiscriminator, re-derived):

autoencoder  nll + lambda * disc_factor * g + codebook_weight * q     (g terms from step disc_start)
             nll = mean |x - x^| (or squared, rec_loss: l2) + perceptual_weight * mean LPIPS(x, x^)
             g   = -mean D(x^)                       (D's parameters frozen in this step)
             lambda = clamp(|dnll/dw| / (|dg/dw| + 1e-4), 0, 1e4) * disc_weight, detached, with w
                      the decoder's last convolution (or disc_weight alone: adaptive_weight false)
discriminator disc_factor * hinge or vanilla loss on D(x) and D(sg[x^])

The adaptive weight needs two weight gradients of conv_out. They are computed from the gradient
at the reconstruction and conv_out's input (torch.nn.grad.conv2d_weight, the exact gradient of
a convolution's weight), never from the parameter itself: on ZeRO-3, where the parameter is a
partitioned placeholder outside its module's forward, the figure is the one ZeRO-0 gives, with
nothing gathered. The same two gradients at x^ give the autoencoder's backward: the loss handed
to the engine has the value above and the gradient of x^ . sg[dnll/dx^ + lambda dg/dx^] +
codebook_weight * q, so LPIPS and the discriminator are back-propagated once each (taming: twice).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def vanilla_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def conv_weight_grad(grad_out: torch.Tensor, conv_input: torch.Tensor, weight_shape, conv) -> torch.Tensor:
    """The gradient of a convolution's weight from its input and the gradient at its output."""
    return torch.nn.grad.conv2d_weight(conv_input.float(), tuple(weight_shape), grad_out.float(),
                                       stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                       groups=conv.groups)


def adaptive_weight(g_nll: torch.Tensor, g_gan: torch.Tensor, conv_input: torch.Tensor, conv) -> torch.Tensor:
    """|dnll/dw| / (|dg/dw| + 1e-4), clamped to [0, 1e4], from the gradients at conv's output."""
    shape = getattr(conv.weight, "ds_shape", conv.weight.shape)  # ZeRO-3 keeps the full shape here
    w_nll = conv_weight_grad(g_nll, conv_input, shape, conv)
    w_gan = conv_weight_grad(g_gan, conv_input, shape, conv)
    return torch.clamp(w_nll.norm() / (w_gan.norm() + 1e-4), 0.0, 1e4).detach()


class VQGANLoss:
    def __init__(self, cfg, lpips=None):
        self.cfg = cfg
        self.lpips = lpips
        self.d_loss = D_LOSSES[cfg.disc_loss]

    def reconstruction(self, x: torch.Tensor, rec: torch.Tensor) -> dict:
        """Per-image terms (B,): the pixel loss, LPIPS (when weighted), their weighted sum nll."""
        diff = x.float() - rec.float()
        pix = diff.abs().mean((1, 2, 3)) if self.cfg.rec_loss == "l1" else diff.pow(2).mean((1, 2, 3))
        out = {"rec_loss": pix, "nll": pix}
        if self.lpips is not None and self.cfg.perceptual_weight > 0:
            p = self.lpips(x.contiguous(), rec.contiguous()).float()
            out["lpips"] = p
            out["nll"] = pix + self.cfg.perceptual_weight * p
        return out

    def autoencoder(self, nll: torch.Tensor, qloss: torch.Tensor, rec: torch.Tensor, rec_in=None,
                    fake_logits=None, conv_input=None, conv=None) -> tuple[torch.Tensor, dict]:
        """The autoencoder's loss (value as taming's; gradient as described above) and metrics.

        Before disc_start: nll and qloss of `rec`, back-propagated as usual. From disc_start, nll
        and fake_logits = D(rec_in) (D frozen) are functions of rec_in, a detached leaf copy of
        the engine's output `rec`: their gradients at rec_in are taken with autograd.grad on a
        graph the engine never sees (DeepSpeed hooks the engine's outputs, and a gradient taken at
        `rec` itself would run its end-of-backward reduction), then handed to `rec`."""
        c = self.cfg
        q = c.codebook_weight * qloss.float()
        if fake_logits is None:
            return nll + q, {}
        g = -fake_logits.float().mean()
        g_nll, = torch.autograd.grad(nll, rec_in)
        g_gan, = torch.autograd.grad(g, rec_in)
        lam = (adaptive_weight(g_nll, g_gan, conv_input, conv) if c.adaptive_weight
               else torch.ones((), device=rec.device)) * c.disc_weight
        w = lam * c.disc_factor
        value = (nll + w * g + q).detach()
        surrogate = (rec.float() * (g_nll + w * g_gan).float()).sum() + q
        return value + surrogate - surrogate.detach(), {"g_loss": g.detach(), "d_weight": lam}

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return self.cfg.disc_factor * self.d_loss(real_logits.float(), fake_logits.float())
