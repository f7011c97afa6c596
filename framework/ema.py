"""Exponential moving average of a module's weights, on every ZeRO stage.

On ZeRO-0/1/2 every rank holds whole parameters, so the average is a whole copy (the same
on every rank). On ZeRO-3 each rank averages only its own partition (`param.ds_tensor`), so
the EMA is sharded exactly like the parameters and costs 1/world of the memory.
Sampling with the averaged weights swaps them in and back (`with ema.swapped(): ...`).

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (as TensorFlow's
ExponentialMovingAverage with num_updates does): with a constant 0.999, a 600-step run would
still carry 0.999^600 = 55% of the random initial weights. `warmup=False` averages at the
constant decay from the first update (PGGAN's Gs, as the official code).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _storage(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.params = [p for p in module.parameters()]
        self.sharded = any(hasattr(p, "ds_tensor") for p in self.params)
        self.shadow = [_storage(p).detach().float().clone() for p in self.params]
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        self.num_updates += 1
        for s, p in zip(self.shadow, self.params):
            s.lerp_(_storage(p).float(), 1.0 - d)

    @contextmanager
    def swapped(self):
        backup = [_storage(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                _storage(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    _storage(p).copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "sharded": self.sharded,
                "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's parameters")
        self.num_updates = state["num_updates"]
        for s, t in zip(self.shadow, state["shadow"]):
            s.copy_(t)
