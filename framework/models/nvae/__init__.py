"""NVAE (Vahdat & Kautz, NeurIPS 2020): a deep hierarchical VAE with residual Normal posteriors,
depthwise-separable decoder cells, IAF flows, spectral regularisation and KL balancing."""
from .model import AutoEncoder
from .task import RANGES, ModelConfig, Task

__all__ = ["RANGES", "AutoEncoder", "ModelConfig", "Task"]
