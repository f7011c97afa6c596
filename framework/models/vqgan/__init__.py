"""VQGAN stage 1 (Esser, Rombach & Ommer 2021) and VQ-VAE (van den Oord et al. 2017): a codebook
autoencoder trained with L1/L2, LPIPS and a PatchGAN on two engines (`ae`, `disc`)."""
from .model import VQModel
from .task import RANGES, ModelConfig, Task

__all__ = ["RANGES", "ModelConfig", "Task", "VQModel"]
