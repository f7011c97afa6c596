"""Progressive GAN (Karras et al. 2018; official code tkarras/progressive_growing_of_gans): the
networks G_paper / D_paper (networks.py), the official schedule counted in images shown
(schedule.py), WGAN-GP with the drift term (loss.py) and the task on two engines (task.py)."""
from .loss import d_loss, g_loss, gradient_norms
from .networks import Discriminator, Generator, channel_table, minibatch_stddev, nf, pixel_norm
from .schedule import Phase, Schedule, ScheduleConfig
from .task import RANGES, ModelConfig, Task

__all__ = ["Discriminator", "Generator", "ModelConfig", "Phase", "RANGES", "Schedule", "ScheduleConfig", "Task",
           "channel_table", "d_loss", "g_loss", "gradient_norms", "minibatch_stddev", "nf", "pixel_norm"]
