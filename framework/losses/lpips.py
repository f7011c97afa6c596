"""LPIPS (Zhang et al. 2018, v0.1, VGG trunk): the perceptual distance taming-transformers'
VQGAN trains with and GLANN's perceptual loss builds on.

d(x, y) = sum_l mean_hw( w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2 ), f_l = VGG16 after
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the inputs shifted and scaled as the lpips package's
ScalingLayer, w_l the 1x1 linear heads that ship inside the `lpips` package
(lpips/weights/v0.1/vgg.pth, read from its folder without importing it). Inputs in [-1, 1].
Frozen: in eval mode, no gradient into its parameters; a family declares it a frozen module so
it is never an engine, never in the EMA or a checkpoint. 14,716,160 parameters (VGG trunk
14,714,688 + heads 1,472), as taming's LPIPS.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .vgg import load_vgg16_features

CHANNELS = (64, 128, 256, 512, 512)
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # up to relu1_2 ... relu5_3 of VGG16's trunk


def lpips_heads_path() -> Path | None:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"


class _Head(nn.Module):
    """The lpips package's NetLinLayer (dropout, then a bias-free 1x1 conv to one channel); its
    names match the package's state dict (`lin0.model.1.weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    def __init__(self, vgg_weights: str = "", heads: str = "", key: str = "model.lpips", load: bool = True):
        """load=False: the architecture alone, no file read (counting parameters on the meta device)."""
        super().__init__()
        trunk = load_vgg16_features(vgg_weights if load else "random", f"{key}.vgg_weights")
        self.net = nn.Module()  # names as the lpips package's and taming's (net.slice1.0.weight ...)
        for i, (a, b) in enumerate(SLICES):
            part = nn.Sequential()
            for j in range(a, b):
                part.add_module(str(j), trunk[j])
            setattr(self.net, f"slice{i + 1}", part)
        for i, c in enumerate(CHANNELS):
            setattr(self, f"lin{i}", _Head(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.to(memory_format=torch.channels_last)
        if load:
            self._load_heads(heads, key)

    def _load_heads(self, heads: str, key: str) -> None:
        path = Path(os.path.expanduser(heads)) if heads else lpips_heads_path()
        if path is None or not path.is_file():
            raise UserError(f"key '{key}.heads': LPIPS's linear heads not found"
                            f"{' at ' + str(path) if path else ''} (they ship in the lpips package as "
                            "lpips/weights/v0.1/vgg.pth: pip install lpips==0.1.4 --no-deps)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.load_state_dict(state, strict=False)
            missing = [f"lin{i}.model.1.weight" for i in range(5) if f"lin{i}.model.1.weight" not in state]
        except Exception as e:  # noqa: BLE001
            raise UserError(f"key '{key}.heads': {path} is not LPIPS's VGG heads ({type(e).__name__})") from None
        if missing:
            raise UserError(f"key '{key}.heads': {path} lacks {missing[0]} (not LPIPS v0.1 VGG heads)")

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: dropout in the heads stays off

    def features(self, h: torch.Tensor) -> list[torch.Tensor]:
        """The five unit-normalised feature maps of images h in [-1, 1]."""
        h = h.to(self.shift.dtype)
        if h.shape[1] == 1:  # grey images are repeated to RGB
            h = h.expand(-1, 3, -1, -1)
        h = ((h - self.shift) / self.scale).contiguous(memory_format=torch.channels_last)  # faster convolutions
        out = []
        for i in range(len(SLICES)):
            h = getattr(self.net, f"slice{i + 1}")(h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) distances between images x and y in [-1, 1]. An input that needs no gradient (the
        data, in a training loss) goes through VGG without autograd: its half of the backward
        pass, and the memory it would keep, are not spent."""
        fx, fy = ([self.features(t) for t in (x, y)] if x.requires_grad == y.requires_grad
                  else [self._maybe_no_grad(t) for t in (x, y)])
        total = 0.0
        for i in range(len(SLICES)):
            total = total + getattr(self, f"lin{i}")((fx[i] - fy[i]).pow(2)).mean((2, 3))
        return total.squeeze(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) vectors whose squared L2 distances are the LPIPS distances: the heads' weights are
        non-negative (LPIPS trains them clamped), so d(x, y) = |e(x) - e(y)|^2 with e(x) the five
        normalised maps scaled by sqrt(w_l / (H_l W_l)), flattened and concatenated (GLANN's pixel
        IMLE searches nearest neighbours under LPIPS this way). D = sum_l C_l H_l W_l."""
        parts = []
        for i, f in enumerate(self.features(x)):
            w = getattr(self, f"lin{i}").model[1].weight.view(1, -1, 1, 1)
            if (w < 0).any():
                raise ValueError("LPIPS.embed: a head has negative weights (not LPIPS's trained heads)")
            parts.append((f * (w / (f.shape[2] * f.shape[3])).sqrt()).flatten(1))
        return torch.cat(parts, 1)

    def _maybe_no_grad(self, t: torch.Tensor) -> list[torch.Tensor]:
        if t.requires_grad:
            return self.features(t)
        with torch.no_grad():
            return self.features(t)
