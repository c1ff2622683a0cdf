"""Train state, the data-parallel step and the resumable loop shared by all stages."""
from kamal_jax.train.loop import (CHECKSUMS, MetricLog, NonFiniteLossError, Schedule, fit,
                                  restore_finished)
from kamal_jax.train.state import TrainState, count_params, create_state, make_optimizer
from kamal_jax.train.step import AXIS, replicate, train_step, unreplicate

__all__ = ["AXIS", "CHECKSUMS", "MetricLog", "NonFiniteLossError", "Schedule", "TrainState", "count_params",
           "create_state", "fit", "make_optimizer", "replicate", "restore_finished",
           "train_step", "unreplicate"]
