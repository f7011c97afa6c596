"""VQGAN's networks build exactly taming-transformers' parameter counts (faceshq configuration,
counted from taming's own classes) and map shapes as taming's do. Random weights."""
import torch
from torch import nn

from framework.models.vqgan.modules import AttnBlock, Decoder, Encoder, NLayerDiscriminator

FACESHQ = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0,
               resolution=256, z_channels=256)


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_faceshq_parameter_counts_equal_taming():
    with torch.device("meta"):
        enc = Encoder(in_channels=3, double_z=False, **FACESHQ)
        dec = Decoder(out_ch=3, **FACESHQ)
        disc = NLayerDiscriminator(3, 64, 3)
    assert count(enc) == 29_298_176
    assert count(dec) == 42_449_795
    assert count(nn.Conv2d(256, 256, 1)) == 65_792  # quant_conv and post_quant_conv (embed_dim 256)
    assert count(enc) + count(dec) + 1024 * 256 + 2 * 65_792 == 72_141_699  # + the 1024 x 256 codebook
    assert count(disc) == 2_765_633


def test_shapes_follow_the_resolution_levels():
    cfg = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=8)
    enc, dec = Encoder(in_channels=3, **cfg), Decoder(out_ch=3, **cfg)
    x = torch.randn(2, 3, 16, 16)
    z = enc(x)
    assert z.shape == (2, 8, 8, 8)  # one down-sampling: 16 -> 8
    assert dec(z).shape == x.shape
    assert NLayerDiscriminator(3, 8, 3)(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # PatchGAN logits


def test_attention_is_taming_single_head_softmax_attention():
    torch.manual_seed(0)
    a = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 4)
    n = a.norm(x)
    q, k, v = (t.reshape(2, 32, 16) for t in (a.q(n), a.k(n), a.v(n)))
    w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * 32 ** -0.5, dim=2)  # taming's bmm form
    ref = x + a.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(2, 32, 4, 4))
    assert torch.allclose(a(x), ref, atol=1e-5)
