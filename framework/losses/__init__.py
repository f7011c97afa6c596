"""Losses shared by families: VGG16 features and LPIPS (VQGAN's perceptual loss; GLANN's next)."""
from .lpips import LPIPS, lpips_heads_path
from .vgg import VGG16_FILE, VGG16Features, load_vgg16_features, vgg16_weights_path

__all__ = ["LPIPS", "VGG16Features", "VGG16_FILE", "load_vgg16_features", "lpips_heads_path", "vgg16_weights_path"]
