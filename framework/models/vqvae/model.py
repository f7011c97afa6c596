"""The paper's networks (Sec. 4.1): an encoder of `downsample` strided 4x4 convolutions (stride 2)
followed by `num_res_blocks` residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv), all `hidden`
channels wide; a 1x1 convolution to the codes' `embed_dim`; the decoder mirrors it: a 3x3
convolution, the residual blocks, then `downsample` transposed 4x4 convolutions (stride 2)."""
from __future__ import annotations

import torch
from torch import nn

from ..vqgan.model import CodebookAutoencoder, build_quantizer
from ..vqgan.modules import run_block


class Residual(nn.Module):
    def __init__(self, ch: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, hidden, 3, 1, 1)
        self.conv2 = nn.Conv2d(hidden, ch, 1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class Encoder(nn.Module):
    def __init__(self, channels: int, hidden: int, res_hidden: int, num_res_blocks: int, downsample: int):
        super().__init__()
        layers, c = [], channels
        for i in range(downsample):
            layers += [nn.Conv2d(c, hidden, 4, 2, 1)] + ([nn.ReLU()] if i < downsample - 1 else [])
            c = hidden
        self.down = nn.Sequential(*layers)
        self.res = nn.ModuleList([Residual(hidden, res_hidden) for _ in range(num_res_blocks)])

    def forward(self, x):
        h = self.down(x)
        for block in self.res:
            h = run_block(block, h)
        return torch.relu(h)


class Decoder(nn.Module):
    def __init__(self, channels: int, hidden: int, res_hidden: int, num_res_blocks: int, upsample: int):
        super().__init__()
        self.conv_in = nn.Conv2d(hidden, hidden, 3, 1, 1)
        self.res = nn.ModuleList([Residual(hidden, res_hidden) for _ in range(num_res_blocks)])
        layers = []
        for i in range(upsample):
            last = i == upsample - 1
            layers += [nn.ReLU(), nn.ConvTranspose2d(hidden, channels if last else hidden, 4, 2, 1)]
        self.up = nn.Sequential(*layers)

    def forward(self, z, return_last_input: bool = False):
        if return_last_input:
            raise ValueError("the VQ-VAE decoder ends in a transposed convolution: no adaptive GAN weight")
        h = self.conv_in(z)
        for block in self.res:
            h = run_block(block, h)
        return self.up(h)


class VQVAE(CodebookAutoencoder):
    def __init__(self, m, channels: int, resolution: int, checkpointing: bool = False):
        super().__init__()
        self.encoder = Encoder(channels, m.hidden, m.res_hidden, m.num_res_blocks, m.downsample)
        self.quant_conv = nn.Conv2d(m.hidden, m.embed_dim, 1)
        self.quantize = build_quantizer(m.quantizer, m.embed_dim)
        self.post_quant_conv = nn.Conv2d(m.embed_dim, m.hidden, 1)
        self.decoder = Decoder(channels, m.hidden, m.res_hidden, m.num_res_blocks, m.downsample)
        self.grid = resolution // 2 ** m.downsample
        self.channels_last = m.channels_last
        for mod in self.modules():
            if isinstance(mod, Residual):
                mod.checkpointed = checkpointing
