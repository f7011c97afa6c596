"""The networks of Progressive GAN (Karras et al. 2018), as the official `networks.py` builds
G_paper and D_paper (its defaults: fmap_base 8192, fmap_decay 1, fmap_max 512, latent 512,
normalised latents, equalised learning rate, pixel norm, leaky ReLU 0.2, minibatch stddev with
groups of 4), in PyTorch.

Every block of the target resolution exists from the start; `forward(x, level, alpha)` runs the
blocks up to resolution 2^level, fading the newest one in: alpha = 0 is the previous resolution's
output (G: its RGB upsampled; D: the input average-pooled into the previous fromRGB), alpha = 1
the new block alone (the official code's lod = log2(target) - level + 1 - alpha).

Differences on purpose: the official code fuses upsampling into G's first convolution of a block
(a transposed convolution with the summed shifts of the 3x3 kernel) and downsampling into D's
last one (a stride-2 convolution with the averaged shifts); here they are nearest upsampling /
2x2 average pooling around a plain 3x3 convolution, with the same parameters. D's is the same
function exactly (bias and activation after the pooling, as fused); G's up to the orientation
of the fused kernel (a transposed convolution), so weights converted from an official snapshot
would have those kernels flipped. No label input (the paper's results are unconditional).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def nf(stage: int, fmap_base: int = 8192, fmap_decay: float = 1.0, fmap_max: int = 512) -> int:
    """Feature maps of a stage (stage = log2(resolution) - 1): min(base / 2^(stage decay), max)."""
    return min(int(fmap_base / (2.0 ** (stage * fmap_decay))), fmap_max)


def channel_table(resolution: int, **kw) -> dict[int, int]:
    """resolution of each block -> its feature maps: 4 .. `resolution`."""
    return {2 ** r: nf(r - 1, **kw) for r in range(2, int(math.log2(resolution)) + 1)}


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / sqrt(mean over channels of x^2 + eps), at every pixel."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Appends one feature map: the standard deviation over each group of samples, averaged over
    channels and pixels. Groups are the official ones: with M = N / G groups, sample i belongs to
    group i mod M (the batch reshaped to (G, M, ...)); N must be a multiple of min(G, N)."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g:
        raise ValueError(f"minibatch stddev: a batch of {n} is not a multiple of the group size {g}")
    y = (x if x.dtype == torch.float64 else x.float()).reshape(g, -1, c, h, w)  # fp32 at least, as official
    y = (y - y.mean(dim=0, keepdim=True)).pow(2).mean(dim=0)
    y = torch.sqrt(y + 1e-8).mean(dim=(1, 2, 3), keepdim=True).to(x.dtype)  # (M, 1, 1, 1)
    return torch.cat([x, y.repeat(g, 1, h, w)], dim=1)


def upscale2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


def downscale2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return x if factor == 1 else F.avg_pool2d(x, factor)


class EqualizedConv2d(nn.Module):
    """A convolution whose weight is stored N(0, 1) and scaled at run time by gain / sqrt(fan_in)
    (the equalised learning rate: Adam then moves every layer at the same relative speed)."""

    def __init__(self, cin: int, cout: int, kernel: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = gain / math.sqrt(cin * kernel * kernel)
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedLinear(nn.Module):
    def __init__(self, cin: int, cout: int, gain: float = math.sqrt(2), bias: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout if bias is None else bias))
        self.scale = gain / math.sqrt(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale)  # the bias is added by the caller (G's 4x4: per channel)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class Generator(nn.Module):
    """G_paper: latent (512) -> pixel norm -> dense to 4x4 x nf(1) -> 3x3 conv, then per doubling
    nearest upsampling and two 3x3 convs; pixel norm after every layer; a 1x1 toRGB per resolution."""

    def __init__(self, resolution: int = 256, channels: int = 3, latent: int = 0, fmap_base: int = 8192,
                 fmap_max: int = 512):
        super().__init__()
        self.resolution, self.channels = resolution, channels
        self.max_level = int(math.log2(resolution))
        if 2 ** self.max_level != resolution or resolution < 4:
            raise ValueError(f"resolution {resolution} is not a power of two >= 4")
        f = lambda stage: nf(stage, fmap_base, 1.0, fmap_max)  # noqa: E731
        self.latent = latent or f(0)
        self.blocks = nn.ModuleDict()
        self.torgb = nn.ModuleDict()
        for level in range(2, self.max_level + 1):
            res = f"{2 ** level}x{2 ** level}"
            if level == 2:
                self.blocks[res] = nn.ModuleDict({
                    "Dense": EqualizedLinear(self.latent, f(1) * 16, gain=math.sqrt(2) / 4, bias=f(1)),
                    "Conv": EqualizedConv2d(f(1), f(1), 3)})
            else:
                self.blocks[res] = nn.ModuleDict({"Conv0_up": EqualizedConv2d(f(level - 2), f(level - 1), 3),
                                                  "Conv1": EqualizedConv2d(f(level - 1), f(level - 1), 3)})
            self.torgb[res] = EqualizedConv2d(f(level - 1), channels, 1, gain=1.0)

    def _block(self, level: int, x: torch.Tensor) -> torch.Tensor:
        b = self.blocks[f"{2 ** level}x{2 ** level}"]
        if level == 2:
            x = pixel_norm(x)  # normalize_latents
            d = b["Dense"]
            x = d(x).reshape(x.shape[0], -1, 4, 4)
            x = pixel_norm(_act(x + d.bias.view(1, -1, 1, 1)))
            return pixel_norm(_act(b["Conv"](x)))
        x = pixel_norm(_act(b["Conv0_up"](upscale2d(x))))
        return pixel_norm(_act(b["Conv1"](x)))

    def _rgb(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return self.torgb[f"{2 ** level}x{2 ** level}"](x)

    def forward(self, z: torch.Tensor, level: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        """Images at 2^level (default: the target), the newest block faded in by alpha."""
        level = self.max_level if level is None else level
        if not 2 <= level <= self.max_level:
            raise ValueError(f"level {level} outside 2..{self.max_level}")
        x = self._block(2, z)
        for lv in range(3, level + 1):
            prev = x
            x = self._block(lv, x)
        img = self._rgb(level, x)
        if level > 2 and alpha < 1:
            img = torch.lerp(upscale2d(self._rgb(level - 1, prev)), img, float(alpha))
        return img


class Discriminator(nn.Module):
    """D_paper: a 1x1 fromRGB per resolution, per halving two 3x3 convs and 2x2 average pooling,
    then at 4x4 the minibatch stddev map, a 3x3 conv, a dense layer to nf(0) and the score."""

    def __init__(self, resolution: int = 256, channels: int = 3, fmap_base: int = 8192, fmap_max: int = 512,
                 mbstd_group_size: int = 4):
        super().__init__()
        self.resolution, self.channels, self.mbstd_group_size = resolution, channels, mbstd_group_size
        self.max_level = int(math.log2(resolution))
        if 2 ** self.max_level != resolution or resolution < 4:
            raise ValueError(f"resolution {resolution} is not a power of two >= 4")
        f = lambda stage: nf(stage, fmap_base, 1.0, fmap_max)  # noqa: E731
        self.blocks = nn.ModuleDict()
        self.fromrgb = nn.ModuleDict()
        for level in range(self.max_level, 1, -1):
            res = f"{2 ** level}x{2 ** level}"
            self.fromrgb[res] = EqualizedConv2d(channels, f(level - 1), 1)
            if level == 2:
                extra = 1 if mbstd_group_size > 1 else 0
                self.blocks[res] = nn.ModuleDict({"Conv": EqualizedConv2d(f(1) + extra, f(1), 3),
                                                  "Dense0": EqualizedLinear(f(1) * 16, f(0)),
                                                  "Dense1": EqualizedLinear(f(0), 1, gain=1.0)})
            else:
                self.blocks[res] = nn.ModuleDict({"Conv0": EqualizedConv2d(f(level - 1), f(level - 1), 3),
                                                  "Conv1_down": EqualizedConv2d(f(level - 1), f(level - 2), 3)})

    def _block(self, level: int, x: torch.Tensor) -> torch.Tensor:
        b = self.blocks[f"{2 ** level}x{2 ** level}"]
        if level == 2:
            if self.mbstd_group_size > 1:
                x = minibatch_stddev(x, self.mbstd_group_size)
            x = _act(b["Conv"](x)).flatten(1)
            d0, d1 = b["Dense0"], b["Dense1"]
            x = _act(d0(x) + d0.bias)
            return d1(x) + d1.bias
        x = _act(b["Conv0"](x))
        return _act(downscale2d(b["Conv1_down"](x)))  # fused conv + downscale: the bias and act after the pooling

    def _from(self, level: int, img: torch.Tensor) -> torch.Tensor:
        return _act(self.fromrgb[f"{2 ** level}x{2 ** level}"](img))

    def forward(self, img: torch.Tensor, level: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        """(N,) scores of images at 2^level, the newest block faded in by alpha."""
        level = self.max_level if level is None else level
        if not 2 <= level <= self.max_level:
            raise ValueError(f"level {level} outside 2..{self.max_level}")
        if img.shape[-1] != 2 ** level:
            raise ValueError(f"images of {img.shape[-1]} px at level {level} ({2 ** level} px)")
        x = self._from(level, img)
        if level > 2:
            x = self._block(level, x)
            if alpha < 1:
                x = torch.lerp(self._from(level - 1, downscale2d(img)), x, float(alpha))
            for lv in range(level - 1, 2, -1):
                x = self._block(lv, x)
        return self._block(2, x).squeeze(1)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
