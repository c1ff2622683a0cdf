"""A stage as a value, its train state, the data-parallel step, the resumable loop,
checkpoints and the metric log."""
from kamal_jax.train.checkpoints import CHECKSUMS
from kamal_jax.train.loop import NonFiniteLossError, Schedule, Stage, fit, restore_finished
from kamal_jax.train.metrics import MetricLog
from kamal_jax.train.state import TrainState, count_params, create_state, make_optimizer
from kamal_jax.train.step import AXIS, train_step

__all__ = ["AXIS", "CHECKSUMS", "count_params", "create_state", "fit", "make_optimizer",
           "MetricLog", "NonFiniteLossError", "restore_finished", "Schedule", "Stage",
           "train_step", "TrainState"]
