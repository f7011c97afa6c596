"""VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017, "Neural Discrete Representation Learning"):
the paper's convolutional encoder and decoder around the vqgan family's quantizers, trained with
the L2 reconstruction and the codebook terms only (no GAN, no perceptual loss). The task is the
vqgan family's, so its quantizer options, tools (eval_recon, encode_codes) and priors apply."""
from .model import VQVAE
from .task import RANGES, ModelConfig, Task

__all__ = ["RANGES", "ModelConfig", "Task", "VQVAE"]
