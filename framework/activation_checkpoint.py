"""One helper through which every model honours `engine.activation_checkpointing`.

`blocks` recomputes each block's activations in the backward pass instead of storing them
(torch's non-reentrant checkpoint: works with ZeRO-3 parameter hooks, keyword arguments and
blocks whose inputs do not require grad). RNG state is restored for the recomputation.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


class Checkpointed(torch.nn.Module):
    """Wraps a block; when enabled and training, its forward is recomputed in backward."""

    def __init__(self, block: torch.nn.Module, enabled: bool):
        super().__init__()
        self.block = block
        self.enabled = enabled

    def forward(self, *args, **kwargs):
        if self.enabled and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, *args, use_reentrant=False, **kwargs)
        return self.block(*args, **kwargs)


def maybe_checkpoint(block: torch.nn.Module, mode: str) -> torch.nn.Module:
    """`mode` is the recipe's engine.activation_checkpointing: none | blocks."""
    return Checkpointed(block, mode == "blocks")
