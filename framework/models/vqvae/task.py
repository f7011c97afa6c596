"""VQ-VAE as a task: the vqgan family's task (one engine `ae`; a `disc` only if a recipe asks for
loss.disc_weight > 0) over the paper's networks, with the paper's defaults: L2 reconstruction,
K = 512 codes of D = 64, beta = 0.25 on the commitment term, no perceptual or GAN term."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import AT_LEAST_0, AT_LEAST_1
from ...errors import UserError
from ..vqgan.task import RANGES as VQGAN_RANGES
from ..vqgan.task import LossConfig, LPIPSConfig, QuantizerConfig
from ..vqgan.task import Task as VQGANTask
from .model import VQVAE


@dataclass
class ModelConfig:
    family: str = "vqvae"
    hidden: int = 256  # the paper: "all having 256 hidden units"
    res_hidden: int = 256
    num_res_blocks: int = 2
    downsample: int = 2  # strided 4x4 convolutions: 32 px -> an 8 x 8 grid
    embed_dim: int = 64  # D
    disc_num_layers: int = 3  # only with loss.disc_weight > 0
    disc_ndf: int = 64
    channels_last: bool = True  # activations in NHWC memory order (faster convolutions)
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(n_embed=512, beta=0.25))
    loss: LossConfig = field(default_factory=lambda: LossConfig(rec_loss="l2", perceptual_weight=0.0,
                                                                disc_weight=0.0))
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)


RANGES = {
    "hidden": AT_LEAST_1, "res_hidden": AT_LEAST_1, "num_res_blocks": AT_LEAST_0, "downsample": AT_LEAST_1,
    **{k: v for k, v in VQGAN_RANGES.items() if k.startswith(("quantizer.", "loss.")) or k in
       ("embed_dim", "disc_num_layers", "disc_ndf")},
}


class Task(VQGANTask):
    def build_autoencoder(self, m, d, checkpointing: bool):
        down = 2 ** m.downsample
        if d.resolution % down:
            raise UserError(f"key 'data.resolution' is {d.resolution}; model.downsample = {m.downsample} strided "
                            f"convolutions need a multiple of {down}")
        if m.loss.disc_weight > 0 and m.loss.adaptive_weight:
            raise UserError("key 'model.loss.adaptive_weight': the VQ-VAE decoder ends in a transposed convolution; "
                            "set it false (a constant disc_weight) or use the vqgan family")
        return VQVAE(m, d.channels, d.resolution, checkpointing)
