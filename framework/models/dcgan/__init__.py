"""DCGAN (Radford et al. 2016) with the non-saturating loss: the framework's two-engine family
(discriminator, then generator, each its own DeepSpeed engine) and the adversarial half of
VQGAN's training, kept small."""
from .model import Discriminator, Generator
from .task import RANGES, ModelConfig, Task

__all__ = ["RANGES", "Discriminator", "Generator", "ModelConfig", "Task"]
