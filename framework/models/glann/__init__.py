"""GLANN (Hoshen, Li & Malik 2019; official code yedidh/glann), in progress (issue 15): the GLO
generator, latent table and IMLE mapping (networks.py), the official VGG distance (perceptual.py)
IMLE's exact nearest-neighbour search over ranks (search.py) and the task's GLO stage (task.py).
The IMLE stages, the recipes and the tools come with the rest of the issue, so the family is not
registered in framework/models/__init__.py yet (the tests register it with FRAMEWORK_FAMILIES)."""
from .task import RANGES, ModelConfig, Task

__all__ = ["ModelConfig", "RANGES", "Task"]
