"""GLANN (Hoshen, Li & Malik 2019; official code yedidh/glann): GLO latent embeddings under the
official perceptual loss, then IMLE from noise into that latent space; and IMLE in pixels, the
baseline. networks.py (the official generator, latent table and mapping T; a deeper generator of
ours for 128-256 px), perceptual.py (the official VGG distance, GLO's Laplacian-pyramid L1),
search.py (exact nearest neighbours over ranks: FAISS or torch), task.py (the three stages)."""
from .task import RANGES, ModelConfig, Task

__all__ = ["ModelConfig", "RANGES", "Task"]
