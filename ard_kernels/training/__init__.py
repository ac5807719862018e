"""ARD training: the trajectory dataset, the ARD loss, the EMA; the loop is :mod:`ard_kernels.train`."""

from .data import TrajectoryDataset, teacher_forced_states
from .ema import ModelEMA, ShardedEMA
from .loss import ard_loss

__all__ = ["ModelEMA", "ShardedEMA", "TrajectoryDataset", "ard_loss", "teacher_forced_states"]
