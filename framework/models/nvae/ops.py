"""NVAE's building blocks (Vahdat & Kautz 2020, NVlabs/NVAE `neural_operations.py`, re-written).

Shapes in comments are (B, C, H, W). Every convolution is a `Conv2D`: weight-normalised unless
told otherwise (w_eff = exp(log_weight_norm) * w / (||w|| + 1e-5), log_weight_norm initialised to
log(||w|| + 0.01)), optionally masked (the autoregressive convolutions of the flows), and
carrying the power-iteration vectors of the spectral regulariser as buffers so that they are
saved in checkpoints and restored on resume.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed as dist

BN_EPS = 1e-5
BN_MOMENTUM = 0.05
CHANNEL_MULT = 2


class Conv2D(nn.Conv2d):
    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=False,
                 weight_norm=True, mask: torch.Tensor | None = None):
        super().__init__(c_in, c_out, kernel_size, stride, padding, dilation, groups, bias)
        if mask is not None:
            self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)
        else:
            self.mask = None
        self.log_weight_norm = None
        if weight_norm:
            w = self.weight if mask is None else self.weight * self.mask
            init = torch.log(w.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-2)
            self.log_weight_norm = nn.Parameter(init)
        # spectral regulariser: left/right singular vector estimates of w_eff.reshape(C_out, -1)
        fan_in = self.weight[0].numel()
        self.register_buffer("sr_u", torch.zeros(c_out))
        self.register_buffer("sr_v", torch.zeros(fan_in))
        self.register_buffer("sr_ready", torch.zeros((), dtype=torch.bool))

        self.last_weight = None  # w_eff of the last forward, for the spectral regulariser
        self.keep_weight = True  # off under activation checkpointing: keeping every w_eff to the
        # end of the forward would cost a copy of the weights at the memory peak

    def effective_weight(self) -> torch.Tensor:
        w = self.weight if self.mask is None else self.weight * self.mask
        if self.log_weight_norm is None:
            return w
        norm = torch.sqrt(torch.sum(w * w, dim=[1, 2, 3])).view(-1, 1, 1, 1)
        return w * (torch.exp(self.log_weight_norm) / (norm + 1e-5))  # one full-size op (and backward)

    def forward(self, x):
        w = self.effective_weight()
        # through __dict__: without weight norm w is the Parameter itself, which nn.Module's
        # __setattr__ would register as a second parameter (and put into the state dict)
        self.__dict__["last_weight"] = w if self.keep_weight else None
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. when activation checkpointing recomputes."""
    return torch._C._current_graph_task_id() != -1


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch: the per-channel sums are
    all-reduced (with gradients) over the ranks, so 2 processes with batch B normalise exactly
    like 1 process with batch 2B (NVAE uses SyncBN for the same reason). One rank: plain BN.
    A forward recomputed by activation checkpointing does not update the running statistics
    a second time.

    Re-estimation (framework/eval/recalibrate.py) sets `moments` to a `Moments`: in train mode
    the layer then normalises with its local batch statistics and adds them to `moments` instead
    of touching the running statistics."""

    moments = None

    def _affine(self):
        return (self.weight.float() if self.weight is not None else None,
                self.bias.float() if self.bias is not None else None)

    def forward(self, x):
        # computed in float32 whatever the precision (DeepSpeed's bf16/fp16 engines cast the
        # parameters but keep the buffers in fp32), returned in the input's dtype
        w, b = self._affine()
        if not self.training:
            return F.batch_norm(x.float(), self.running_mean.float(), self.running_var.float(), w, b, False, 0.0,
                                self.eps).to(x.dtype)
        if self.moments is not None:
            xf = x.float()
            var, mean = torch.var_mean(xf, dim=[0, 2, 3], correction=0)
            self.moments.add(x.numel() // x.shape[1], mean, var)
            y = F.batch_norm(xf, None, None, w, b, True, 0.0, self.eps)
            return y.to(x.dtype)
        recompute = _in_backward()
        world = dist.world_size()
        if world == 1:
            rm, rv = self.running_mean, self.running_var
            if recompute or rm.dtype != torch.float32:  # throw-away (recompute) or float copies
                rm, rv = rm.float().clone(), rv.float().clone()
            y = F.batch_norm(x.float(), rm, rv, w, b, True, self.momentum, self.eps)
            if not recompute:
                self.num_batches_tracked += 1
                if rm is not self.running_mean:
                    self.running_mean.copy_(rm)
                    self.running_var.copy_(rv)
            return y.to(x.dtype)
        from torch.distributed.nn.functional import all_reduce

        # every rank's (mean, biased var, count), gathered with an all-reduce of one row per
        # rank (all_reduce has an exact backward on every backend), then combined exactly
        c = x.shape[1]
        xf = x.float()
        var_l, mean_l = torch.var_mean(xf, dim=[0, 2, 3], correction=0)
        n_l = torch.full((1,), float(x.numel() // c), device=x.device)
        rows = xf.new_zeros(world, 2 * c + 1)
        rows = rows.index_copy(0, torch.tensor([dist.rank()], device=x.device),
                               torch.cat([mean_l, var_l, n_l]).unsqueeze(0))
        g = all_reduce(rows)
        n = g[:, -1:]
        count = n.sum()
        mean = (g[:, :c] * n).sum(0) / count
        var = ((g[:, c:2 * c] + (g[:, :c] - mean) ** 2) * n).sum(0) / count
        if not recompute:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp(min=1), alpha=m)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * w.view(1, c, 1, 1) + b.view(1, c, 1, 1)
        return y.to(x.dtype)


class Moments:
    """Exact pooled per-channel count, mean and sum of squared deviations (M2) of every batch
    added, in float64 (Chan et al.'s pairwise update: no E[x^2] - E[x]^2 cancellation)."""

    def __init__(self, channels: int):
        self.n = 0.0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def add(self, n_b: int, mean_b: torch.Tensor, var_b: torch.Tensor) -> None:
        mean_b, var_b = mean_b.detach().double().cpu(), var_b.detach().double().cpu()
        self.combine(float(n_b), mean_b, var_b * n_b)

    def combine(self, n_b: float, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if n_b == 0:
            return
        total = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / total)
        self.n = total

    def as_row(self) -> torch.Tensor:
        return torch.cat([torch.tensor([self.n], dtype=torch.float64), self.mean, self.m2])

    @staticmethod
    def from_rows(rows: torch.Tensor, channels: int) -> "Moments":
        out = Moments(channels)
        for r in rows:
            out.combine(float(r[0]), r[1:1 + channels], r[1 + channels:])
        return out

    def unbiased_var(self) -> torch.Tensor:
        return self.m2 / max(self.n - 1.0, 1.0)


def batchnorm(c: int, eps: float = BN_EPS) -> SyncBatchNorm:
    return SyncBatchNorm(c, eps=eps, momentum=BN_MOMENTUM)


class BNSwish(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn = batchnorm(c)

    def forward(self, x):
        return F.silu(self.bn(x))


class BNSwishConv(nn.Module):
    """'res_bnswish': BN -> Swish -> [nearest x2 if stride -1] -> WN conv 3x3 (bias)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.upsample = stride == -1
        self.bn_act = BNSwish(c_in)
        self.conv = Conv2D(c_in, c_out, 3, stride=abs(stride), padding=1, bias=True)

    def forward(self, x):
        x = self.bn_act(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x)


class ConvBNSwish(nn.Module):
    def __init__(self, c_in, c_out, k=1, stride=1, groups=1, dilation=1):
        super().__init__()
        self.conv = Conv2D(c_in, c_out, k, stride, dilation * (k - 1) // 2, dilation, groups, bias=False,
                           weight_norm=False)
        self.bn_act = BNSwish(c_out)

    def forward(self, x):
        return self.bn_act(self.conv(x))


class InvertedResidual(nn.Module):
    """'mconv_e{ex}k{k}g0': [nearest x2] -> BN -> 1x1 expand (BN, Swish) -> depthwise kxk (BN, Swish)
    -> 1x1 project -> BN. The projection is not weight-normalised (but spectrally regularised)."""

    def __init__(self, c_in, c_out, stride, ex, k=5, dilation=1):
        super().__init__()
        hidden = int(round(c_in * ex))
        layers = [nn.UpsamplingNearest2d(scale_factor=2)] if stride == -1 else []
        layers += [batchnorm(c_in), ConvBNSwish(c_in, hidden, k=1),
                   ConvBNSwish(hidden, hidden, k=k, stride=abs(stride), groups=hidden, dilation=dilation),
                   Conv2D(hidden, c_out, 1, bias=False, weight_norm=False), batchnorm(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return self.conv(x)


class SE(nn.Module):
    """Squeeze and excitation: x * sigmoid(MLP(mean_hw(x)))."""

    def __init__(self, c_in, c_out):
        super().__init__()
        hidden = max(c_out // 16, 4)
        self.se = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c_out), nn.Sigmoid())

    def forward(self, x):
        return x * self.se(x.mean(dim=[2, 3]))[:, :, None, None]


class FactorizedReduce(nn.Module):
    """The skip of a down cell: Swish, then four 1x1 stride-2 convs on shifted grids, concatenated.

    A 1x1 convolution of stride 2 is computed as a stride-1 one on the subsampled grid (the same
    numbers, a quarter of the work): torch 2.13's CPU backward of a channels-last 1x1 stride-2
    convolution with few channels corrupts the heap (reproduced with 8 -> 4 or 16 channels at
    128 x 128)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        q = c_out // 4
        self.convs = nn.ModuleList([Conv2D(c_in, q, 1, bias=True) for _ in range(3)] +
                                   [Conv2D(c_in, c_out - 3 * q, 1, bias=True)])

    def forward(self, x):
        x = F.silu(x)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        grids = [x[:, :, ::2, ::2], x[:, :, 1::2, 1::2], x[:, :, ::2, 1::2], x[:, :, 1::2, ::2]]
        return torch.cat([conv(g.contiguous(memory_format=fmt)) for conv, g in zip(self.convs, grids)], dim=1)


class UpSkip(nn.Module):
    """The skip of an up cell: bilinear x2 (align_corners), then a 1x1 WN conv halving channels."""

    def __init__(self, c_in):
        super().__init__()
        self.conv = Conv2D(c_in, c_in // CHANNEL_MULT, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


# The res_mbconv architecture of the reference: which operations each kind of cell holds.
ARCH = {
    "normal_pre": ("res_bnswish", "res_bnswish"), "down_pre": ("res_bnswish", "res_bnswish"),
    "normal_enc": ("res_bnswish", "res_bnswish"), "down_enc": ("res_bnswish", "res_bnswish"),
    "normal_dec": ("mconv_e6k5g0",), "up_dec": ("mconv_e6k5g0",),
    "normal_post": ("mconv_e3k5g0",), "up_post": ("mconv_e3k5g0",),
}


def _op(name: str, c_in: int, c_out: int, stride: int) -> nn.Module:
    if name == "res_bnswish":
        return BNSwishConv(c_in, c_out, stride)
    if name == "mconv_e6k5g0":
        return InvertedResidual(c_in, c_out, stride, ex=6, k=5)
    if name == "mconv_e3k5g0":
        return InvertedResidual(c_in, c_out, stride, ex=3, k=5)
    raise ValueError(name)


def _stride(cell_type: str) -> int:
    return 2 if cell_type.startswith("down") else -1 if cell_type.startswith("up") else 1


class Cell(nn.Module):
    """skip(x) + 0.1 * SE(ops(x)); down cells halve H, W and double C, up cells the reverse."""

    def __init__(self, c_in, c_out, cell_type, use_se=True):
        super().__init__()
        self.cell_type = cell_type
        stride = _stride(cell_type)
        self.skip = (nn.Identity() if stride == 1 else FactorizedReduce(c_in, CHANNEL_MULT * c_in) if stride == 2
                     else UpSkip(c_in))
        ops = ARCH[cell_type]
        self.ops = nn.ModuleList([_op(p, c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                  for i, p in enumerate(ops)])
        self.se = SE(c_out, c_out) if use_se else None

    def forward(self, x):
        s = x
        for op in self.ops:
            s = op(s)
        if self.se is not None:
            s = self.se(s)
        return self.skip(x) + 0.1 * s


class EncCombiner(nn.Module):
    """Encoder feature + 1x1 WN conv of the decoder's state at the same group."""

    def __init__(self, c_enc, c_dec):
        super().__init__()
        self.conv = Conv2D(c_dec, c_enc, 1, bias=True)

    def forward(self, x_enc, s_dec):
        return x_enc + self.conv(s_dec)


class DecCombiner(nn.Module):
    """1x1 WN conv of [decoder state, z] concatenated."""

    def __init__(self, c, num_z):
        super().__init__()
        self.conv = Conv2D(c + num_z, c, 1, bias=True)

    def forward(self, s, z):
        return self.conv(torch.cat([s, z], dim=1))
