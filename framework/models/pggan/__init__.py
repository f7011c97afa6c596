"""Progressive GAN (Karras et al. 2018; official code tkarras/progressive_growing_of_gans), in
progress (issue 14): the networks (networks.py), the official schedule counted in images shown
(schedule.py) and WGAN-GP (loss.py). The task, the spine's per-resolution batch sizes and the
recipes are not written yet, so the family is not registered in framework/models/__init__.py."""
from .loss import d_loss, g_loss, gradient_norms
from .networks import Discriminator, Generator, channel_table, minibatch_stddev, nf, pixel_norm
from .schedule import Phase, Schedule, ScheduleConfig

__all__ = ["Discriminator", "Generator", "Phase", "Schedule", "ScheduleConfig", "channel_table", "d_loss", "g_loss",
           "gradient_norms", "minibatch_stddev", "nf", "pixel_norm"]
