"""NVAE's sampling path compiled for inference: the same function of the noise, fewer operations.

From a model in eval mode (after BN recalibration, whose statistics are then constants):
- weight normalisation is computed once (w_eff stored; no norm, exp or mask per call) and the
  spectral-regulariser bookkeeping (buffers, last_weight) is gone;
- every BatchNorm is folded into an adjacent convolution: in an inverted-residual op the leading
  BN into the 1x1 expansion (exact for a 1x1 convolution without padding), the BNs after the
  expansion, the depthwise and the projection convolutions into those convolutions;
- the cell's 0.1 residual scale is folded into the projection, the SE gate's input rescaled;
- an up cell's nearest x2 upsampling moves after its 1x1 expansion and Swish (pointwise ops
  commute with nearest upsampling: a quarter of the expansion's work), and the skip's 1x1
  convolution runs before its bilinear upsampling (both linear, the bilinear weights sum to 1:
  a quarter of the work, half the interpolation);
- activations stay channels-last when the model's are (oneDNN's faster layout on the CPU).
Everything else (the Normal's clamps, the temperature, the output distribution) is the model's own
code, so samples from the same noise agree with the plain model's to float rounding.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...activation_checkpoint import Checkpointed
from .distributions import Normal
from .ops import Cell, Conv2D, DecCombiner, InvertedResidual, SyncBatchNorm, UpSkip


def _unwrap(m: nn.Module) -> nn.Module:
    return m.block if isinstance(m, Checkpointed) else m


def _bn_affine(bn: SyncBatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = a x + b per channel."""
    a = torch.rsqrt(bn.running_var.float() + bn.eps)
    w = bn.weight.float() if bn.affine else torch.ones_like(a)
    b = bn.bias.float() if bn.affine else torch.zeros_like(a)
    a = w * a
    return a, b - bn.running_mean.float() * a


def _weight(conv: Conv2D) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = conv.effective_weight().detach().float()
    return w, None if conv.bias is None else conv.bias.detach().float()


class _Conv(nn.Module):
    """A plain convolution with fixed weights."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, stride=1, padding=0, groups=1):
        super().__init__()
        self.register_buffer("w", w.contiguous())
        self.register_buffer("b", None if b is None else b.contiguous())
        self.stride, self.padding, self.groups = stride, padding, groups

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, self.stride, self.padding, 1, self.groups)

    @staticmethod
    def of(conv: Conv2D) -> "_Conv":
        w, b = _weight(conv)
        return _Conv(w, b, conv.stride, conv.padding, conv.groups)


class _FoldedMBConv(nn.Module):
    """[up x2] BN 1x1(BN Swish) dw(BN Swish) 1x1 BN  ->  1x1+Swish [up x2] dw+Swish 1x1, scaled by `scale`."""

    def __init__(self, op: InvertedResidual, scale: float):
        super().__init__()
        layers = list(op.conv)
        self.upsample = isinstance(layers[0], nn.UpsamplingNearest2d)
        if self.upsample:
            layers = layers[1:]
        bn0, expand, dw, proj, bn3 = layers
        a0, b0 = _bn_affine(bn0)
        w1, _ = _weight(expand.conv)  # (h, c, 1, 1), no bias
        a1, b1 = _bn_affine(expand.bn_act.bn)
        w1m = w1[:, :, 0, 0]
        self.expand = _Conv((a1[:, None] * w1m * a0[None, :])[:, :, None, None], a1 * (w1m @ b0) + b1)
        w2, _ = _weight(dw.conv)
        a2, b2 = _bn_affine(dw.bn_act.bn)
        c = dw.conv
        self.dw = _Conv(w2 * a2.view(-1, 1, 1, 1), b2, c.stride, c.padding, c.groups)
        w3, _ = _weight(proj)
        a3, b3 = _bn_affine(bn3)
        self.proj = _Conv(w3 * (scale * a3).view(-1, 1, 1, 1), scale * b3)

    def forward(self, x):
        s = F.silu(self.expand(x), inplace=True)  # in place on fresh outputs: half the time of a copy
        if self.upsample:
            s = F.interpolate(s, scale_factor=2, mode="nearest")
        return self.proj(F.silu(self.dw(s), inplace=True))


class _SE(nn.Module):
    """SE of an input that arrives already multiplied by `scale`: its gate sees the mean / scale."""

    def __init__(self, se, scale: float):
        super().__init__()
        self.se = copy.deepcopy(se.se)
        with torch.no_grad():
            self.se[0].weight.mul_(1.0 / scale)

    def gate(self, x):
        return self.se(x.mean(dim=[2, 3]))[:, :, None, None]


class _UpSkip(nn.Module):
    def __init__(self, skip: UpSkip):
        super().__init__()
        self.conv = _Conv.of(skip.conv)

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=2, mode="bilinear", align_corners=True)


class _FastCell(nn.Module):
    def __init__(self, cell: Cell):
        super().__init__()
        if len(cell.ops) != 1 or not isinstance(cell.ops[0], InvertedResidual):
            raise ValueError(f"cannot fold a {cell.cell_type} cell")
        self.skip = _UpSkip(cell.skip) if isinstance(cell.skip, UpSkip) else None
        self.op = _FoldedMBConv(cell.ops[0], 0.1)
        self.se = _SE(cell.se, 0.1) if cell.se is not None else None

    def forward(self, x):
        s = self.op(x)
        skip = x if self.skip is None else self.skip(x)
        if self.se is None:
            return skip + s
        return torch.addcmul(skip, s, self.se.gate(s))  # skip + s * gate in one pass


class _Combiner(nn.Module):
    def __init__(self, comb: DecCombiner):
        super().__init__()
        self.conv = _Conv.of(comb.conv)

    def forward(self, s, z):
        return self.conv(torch.cat([s, z], dim=1))


class FastSampler(nn.Module):
    """`sample(n, temperature, eps)` of an AutoEncoder (in eval mode), folded; same signature."""

    def __init__(self, net):
        super().__init__()
        if any(bn.training for bn in net.bns):
            raise ValueError("fold a model in eval mode (its BatchNorm statistics become constants)")
        with torch.no_grad():
            self.register_buffer("top", net.prior_ftr0.detach().float().clone())
            self.dec_kinds = list(net.dec_kinds)
            self.dec_tower = nn.ModuleList([
                _Combiner(_unwrap(m)) if kind == "combiner" else _FastCell(_unwrap(m))
                for m, kind in zip(net.dec_tower, net.dec_kinds)])
            self.dec_sampler = nn.ModuleList([_Conv.of(seq[1]) for seq in net.dec_sampler])
            self.post_process = nn.ModuleList([_FastCell(_unwrap(m)) for m in net.post_process])
            self.out = _Conv.of(net.image_conditional[1])
        self.channels_last = net.channels_last
        self.eval()

    def _fmt(self, t):
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    @torch.no_grad()
    def sample(self, n: int, temperature: float, eps: list[torch.Tensor]) -> torch.Tensor:
        dev = self.top.device
        e0 = self._fmt(eps[0].to(dev).float())
        z = Normal(torch.zeros_like(e0), torch.zeros_like(e0), temperature).sample(e0)
        s = self._fmt(self.top.unsqueeze(0).expand(n, -1, -1, -1))
        i = 0
        for cell, kind in zip(self.dec_tower, self.dec_kinds):
            if kind == "combiner":
                if i > 0:
                    mu, log_sig = self.dec_sampler[i - 1](F.elu(s)).chunk(2, dim=1)
                    z = Normal(mu, log_sig, temperature).sample(self._fmt(eps[i].to(dev).float()))
                s = cell(s, z)
                i += 1
            else:
                s = cell(s)
        for cell in self.post_process:
            s = cell(s)
        return self.out(F.elu(s))


def fold(net) -> FastSampler:
    return FastSampler(net).to(net.prior_ftr0.device)
