"""VQGAN / VQ-VAE (issue 11), in progress: the networks (`modules.py`) exist and build taming's
parameter counts; the quantizers, losses, task and recipes come next, then the registry line."""
