"""VGG16's convolutional trunk with torchvision's layout (`features.0` ... `features.30`), so the
ImageNet weights torchvision keeps in the torch hub cache (`vgg16-397923af.pth`) load as they
are. Nothing is downloaded: a missing file is a one-line UserError naming the recipe key and the
file. torchvision itself is not needed (its PyPI wheel does not import beside a CPU torch)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 weights, the ones LPIPS was fitted on
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Features(nn.Sequential):
    """torchvision.models.vgg16().features: 13 3x3 convs with ReLU, 5 max-pools (31 layers)."""

    def __init__(self):
        layers, cin = [], 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        super().__init__(*layers)


def vgg16_weights_path() -> Path:
    """Where torchvision keeps the file: $TORCH_HOME/hub/checkpoints (torch.hub.get_dir())."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def load_vgg16_features(weights: str, key: str) -> VGG16Features:
    """VGG16's trunk with the weights of `weights`: a file, "" for the torch hub cache file, or
    "random" (random weights: tests only, and whatever uses them says so)."""
    net = VGG16Features()
    if weights == "random":
        return net
    path = Path(os.path.expanduser(weights)) if weights else vgg16_weights_path()
    if not path.is_file():
        raise UserError(f"key '{key}': VGG16 weights not found at {path} (torchvision's {VGG16_FILE}; "
                        f"copy it there or set {key}; nothing is downloaded at run time)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"key '{key}': {path} is not a readable torch file ({type(e).__name__})") from None
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    try:
        net.load_state_dict(feats, strict=True)
    except RuntimeError:
        raise UserError(f"key '{key}': {path} does not hold torchvision's VGG16 (features.* of "
                        f"{VGG16_FILE} expected)") from None
    return net
