"""Progressive GAN (Karras et al. 2018; official code tkarras/progressive_growing_of_gans): the
networks so far (issue 14 is in progress: the task, schedule and recipes are not written yet, so
the family is not registered in framework/models/__init__.py)."""
from .networks import Discriminator, Generator, channel_table, minibatch_stddev, nf, pixel_norm

__all__ = ["Discriminator", "Generator", "channel_table", "minibatch_stddev", "nf", "pixel_norm"]
