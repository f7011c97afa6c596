"""Priors over a stage-1 model's code grids (stage 2 of VQGAN / VQ-VAE): taming-transformers' GPT
(static KV cache, sliding window for larger grids) and the gated PixelCNN of VQ-VAE."""
from .gpt import GPT, KVCache
from .pixelcnn import GatedPixelCNN
from .task import RANGES, ModelConfig, Task

__all__ = ["GPT", "GatedPixelCNN", "KVCache", "RANGES", "ModelConfig", "Task"]
