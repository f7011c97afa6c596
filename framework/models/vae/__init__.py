"""The Gaussian VAE of Kingma & Welling (2013): conv encoder/decoder, diagonal Gaussian
posterior, standard normal prior, discretized logistic mixture likelihood over n-bit pixels."""
from .model import VAE
from .task import RANGES, ModelConfig, Task

__all__ = ["RANGES", "VAE", "ModelConfig", "Task"]
