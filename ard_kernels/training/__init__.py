"""ARD training: the trajectory dataset, the ARD loss, the EMA, the step as one CUDA graph; the loop is
:mod:`ard_kernels.train`."""

from .data import TrajectoryDataset, teacher_forced_states
from .ema import ModelEMA, ShardedEMA
from .graphed_step import GraphedStep
from .loss import ard_loss

__all__ = ["GraphedStep", "ModelEMA", "ShardedEMA", "TrajectoryDataset", "ard_loss", "teacher_forced_states"]
