"""A family that exists only for the tests and uses every part of the family interface:

- fields: image, label and each image's index in the .beton (prepare_batch builds a dict)
- a frozen module (a fixed random conv "feature net", or one loaded from another run)
- two engines with their own settings: `enc` (the recipe's engine block) and `head`, whose
  learning rate and first step come from the family (engine_overrides), which is inactive
  on odd steps (active) and whose optimizer state can be cleared at a step (reset_optimizer)
- state it owns: the sum of the indices and the number of batches it has seen
- a set-level metric (label counts -> their entropy) besides per-image values
- no `sample`: the trainer draws no sample grid; `visualize` shows inputs and their "reconstruction"

Registered by FRAMEWORK_FAMILIES=toy=toy_family (tests/conftest.py puts tests/ on PYTHONPATH).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from framework.checkpoint import load_module_weights
from framework.config import AT_LEAST_0, AT_LEAST_1, POSITIVE, Range
from framework.data import to_model_input
from framework.task import Sum
from framework.task import Task as BaseTask


@dataclass
class ModelConfig:
    family: str = "toy"
    width: int = 4
    head_lr: float = 0.01
    head_start: int = 2
    features_from: str = ""  # a run whose engine `enc` becomes the frozen feature net
    head_reset_at: int = -1  # the step before which head's optimizer state is cleared (PGGAN-like)


RANGES = {"width": AT_LEAST_1, "head_lr": POSITIVE, "head_start": AT_LEAST_0, "head_reset_at": Range(-1)}


class Features(nn.Module):
    def __init__(self, channels: int, width: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class Head(nn.Module):
    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, f):
        return self.fc(f.mean((2, 3)))


class Task(BaseTask):
    main = "enc"
    fields = ("image", "label", "index")

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        m, d = recipe.model, recipe.data
        self.enc = Features(d.channels, m.width)
        self.dec = nn.Conv2d(m.width, d.channels, 1)
        self.head = Head(m.width)
        self.features = Features(d.channels, m.width)
        if m.features_from:
            holder = nn.ModuleDict({"enc": self.features, "dec": nn.Conv2d(m.width, d.channels, 1)})
            load_module_weights(m.features_from, "enc", holder, ema=False)  # the same layout as engine enc
        self.index_sum = 0
        self.batches_seen = 0

    def modules(self):
        return {"enc": nn.ModuleDict({"enc": self.enc, "dec": self.dec}), "head": self.head}

    def frozen_modules(self):
        return {"features": self.features}

    def engine_overrides(self, name):
        if name == "head":
            m = self.recipe.model
            return {"optimizer": {"lr": m.head_lr}, "schedule": {"warmup_steps": 0, "decay": "constant"},
                    "start_step": m.head_start}
        return {}

    def active(self, name, step):
        return name != "head" or step % 2 == 0

    def reset_optimizer(self, name, step):
        return name == "head" and step == self.recipe.model.head_reset_at

    def prepare_batch(self, batch, ctx):
        if ctx.phase == "train" and ctx.stream == "enc":
            self.index_sum += int(batch["index"].sum())
            self.batches_seen += 1
        return {"x": to_model_input(batch["image"], self.recipe.data.num_bits, ctx.device, ctx.dtype),
                "label": batch["label"].to(ctx.device), "index": batch["index"]}

    def loss(self, name, b, ctx):
        if name == "enc":
            net = ctx.model("enc")
            with torch.no_grad():
                target = ctx.module("features")(b["x"])
            f = net.module["enc"](b["x"])
            recon = net.module["dec"](f)
            loss = (recon - b["x"]).pow(2).mean() + 0.1 * (f - target).pow(2).mean()
            return loss, {"index_sum": torch.tensor(float(self.index_sum)),
                          "batches_seen": torch.tensor(float(self.batches_seen))}
        with torch.no_grad():
            f = ctx.module("enc")["enc"](b["x"])
        logits = ctx.model("head")(f)
        return nn.functional.cross_entropy(logits, b["label"]), {}

    def evaluate(self, b, ctx):
        f = ctx.module("enc")["enc"](b["x"])
        err = (ctx.module("enc")["dec"](f) - b["x"]).pow(2).flatten(1).mean(1)
        counts = torch.bincount(b["label"][:ctx.valid].cpu(), minlength=10).double()
        return {"mse": err, "index": b["index"].double(), "label_counts": Sum(counts)}

    def finish_eval(self, sums, images):
        p = sums["label_counts"] / images
        entropy = -sum(float(q) * math.log(float(q)) for q in p if q > 0)
        return {"label_entropy": entropy, "images_counted": float(sums["label_counts"].sum())}

    def visualize(self, b, ctx):
        x = b["x"][:4]
        recon = ctx.module("enc")["dec"](ctx.module("enc")["enc"](x))
        return (torch.cat([x, recon]).clamp(-1, 1) + 1) / 2

    def state_dict(self):
        return {"index_sum": self.index_sum, "batches_seen": self.batches_seen}

    def load_state_dict(self, state):
        self.index_sum = state["index_sum"]
        self.batches_seen = state["batches_seen"]

