"""The autoencoder of stage 1 (taming's VQModel layout): encoder, quant_conv, quantizer,
post_quant_conv, decoder — one engine, `ae`. Parameter names are taming's."""
from __future__ import annotations

import torch
from torch import nn

from .modules import Decoder, Encoder, set_checkpointing
from .quantize import FSQ, VectorQuantizer


def build_quantizer(q, embed_dim: int) -> nn.Module:
    if q.kind == "fsq":
        return FSQ(list(q.levels), embed_dim, q.usage_window)
    return VectorQuantizer(q.n_embed, embed_dim, q.beta, q.legacy_beta, q.codebook_dim, q.l2_normalize, q.ema,
                           q.ema_decay, q.ema_eps, q.restart_dead, q.usage_window)


class CodebookAutoencoder(nn.Module):
    """encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder; subclasses build the
    encoder and decoder (taming's VQGAN networks here, VQ-VAE's in framework/models/vqvae)."""

    grid: int
    channels_last: bool = False

    def _fmt(self, t: torch.Tensor) -> torch.Tensor:
        """Activations in NHWC order (model.channels_last): oneDNN's and cuDNN's faster convolutions
        (-12% of the faceshq step on 2 CPU cores, tools/bench/vqgan_step.py)."""
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    @property
    def n_codes(self) -> int:
        return self.quantize.n_embed

    def encode(self, x: torch.Tensor, ctx=None):
        """-> z_q (B, embed_dim, h, w), codebook loss, indices (B, h, w), step metrics"""
        return self.quantize(self.quant_conv(self.encoder(self._fmt(x))), ctx)

    def decode(self, zq: torch.Tensor, return_last_input: bool = False):
        return self.decoder(self.post_quant_conv(self._fmt(zq)), return_last_input)

    def decode_code(self, idx: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize.lookup(idx))

    def forward(self, x: torch.Tensor, ctx=None, return_last_input: bool = False):
        zq, qloss, idx, metrics = self.encode(x, ctx)
        out = self.decode(zq, return_last_input)
        rec, last = out if return_last_input else (out, None)
        return {"rec": rec, "qloss": qloss, "indices": idx, "metrics": metrics, "last_input": last}


class VQModel(CodebookAutoencoder):
    def __init__(self, m, channels: int, resolution: int, checkpointing: bool = False):
        super().__init__()
        arch = dict(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                    attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, resolution=resolution,
                    z_channels=m.z_channels)
        self.encoder = Encoder(in_channels=channels, double_z=False, **arch)
        self.decoder = Decoder(out_ch=channels, **arch)
        self.quantize = build_quantizer(m.quantizer, m.embed_dim)
        self.quant_conv = nn.Conv2d(m.z_channels, m.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(m.embed_dim, m.z_channels, 1)
        self.grid = resolution // 2 ** (len(m.ch_mult) - 1)
        self.channels_last = m.channels_last
        set_checkpointing(self, checkpointing)
