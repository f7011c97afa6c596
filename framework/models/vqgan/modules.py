"""VQGAN's networks (Esser, Rombach & Ommer 2021), re-written from the paper and the facts of
CompVis/taming-transformers (`taming/modules/diffusionmodules/model.py`,
`taming/modules/discriminator/model.py`): the layouts and parameter counts are taming's, so its
faceshq configuration builds exactly its 72,141,699-parameter autoencoder and 2,765,633-parameter
PatchGAN (tests/test_vqgan_modules.py).

Encoder: conv_in, then per resolution `num_res_blocks` ResNet blocks (GroupNorm(32) + swish,
two 3x3 convs, a 1x1 shortcut when the width changes), a single-head attention block after each
of them at the `attn_resolutions`, and a stride-2 3x3 convolution after padding right and bottom
by one (taming's asymmetric down-sampling) between resolutions; a middle of block, attention,
block; GroupNorm, swish and a 3x3 conv to `z_channels`. Decoder: the mirror, with
`num_res_blocks + 1` blocks per resolution and nearest up-sampling followed by a 3x3 conv.
`engine.activation_checkpointing: blocks` recomputes every ResNet and attention block in the
backward pass (`set_checkpointing`); the module names stay taming's, so its state dicts load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import BatchNorm2d


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def run_block(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One block, recomputed in backward when checkpointing is on (torch's non-reentrant form,
    which works under ZeRO-3's parameter hooks) and the model is training with gradients."""
    if getattr(block, "checkpointed", False) and block.training and torch.is_grad_enabled():
        return checkpoint(block, h, use_reentrant=False)
    return block(h)


def set_checkpointing(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, (ResnetBlock, AttnBlock)):
            m.checkpointed = on


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 q, k, v and output projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(n), self.k(n), self.v(n)))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, flash kernels on CUDA
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding: right and bottom


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ResNet blocks, each followed by its attention block where there are any."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = run_block(block, h)
            if len(self.attn):
                h = run_block(self.attn[i], h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x):
        return run_block(self.block_2, run_block(self.attn_1, run_block(self.block_1, x)))


class Encoder(nn.Module):
    def __init__(self, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2, attn_resolutions=(16,),
                 dropout: float = 0.0, in_channels: int = 3, resolution: int = 256, z_channels: int = 256,
                 double_z: bool = False):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        mult = (1, *ch_mult)
        res, self.down = resolution, nn.ModuleList()
        for i, m in enumerate(ch_mult):
            level, cin = _Level(), ch * mult[i]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * m, dropout))
                cin = ch * m
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(cin, dropout)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, ch: int = 128, out_ch: int = 3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions=(16,), dropout: float = 0.0, resolution: int = 256, z_channels: int = 256):
        super().__init__()
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = _Mid(cin, dropout)
        levels = []
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, ch * ch_mult[i], dropout))
                cin = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # indexed by resolution level, finest first, as taming's
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, out_ch, 3, 1, 1)

    def forward(self, z, return_last_input: bool = False):
        """-> the image; with return_last_input also conv_out's input (the adaptive GAN weight
        takes the gradient of conv_out's weight from it)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        a = swish(self.norm_out(h))
        out = self.conv_out(a)
        return (out, a) if return_last_input else out


class NLayerDiscriminator(nn.Module):
    """The pix2pix PatchGAN taming uses: 4x4 convs, stride 2 then 1, BatchNorm, LeakyReLU(0.2)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x):
        return self.main(x)


def weights_init(m: nn.Module) -> None:
    """taming's initialisation of the discriminator: convs N(0, 0.02), BatchNorm scale N(1, 0.02)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
