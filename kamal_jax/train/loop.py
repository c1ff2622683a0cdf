"""The training loop shared by every stage: resume, step, log, checkpoint.

A stage's checkpoints live in their own orbax CheckpointManager directory. A stage
whose latest checkpoint is at its last step is finished: it is restored, never
trained again.
"""
import dataclasses
import json
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from tensorboardX import SummaryWriter

from kamal_jax.train.state import TrainState
from kamal_jax.train.step import replicate, train_step, unreplicate


class NonFiniteLossError(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Schedule:
  num_steps: int
  log_every: int
  checkpoint_every: int  # a multiple of log_every: metrics are checked before a save

  def __post_init__(self):
    if self.checkpoint_every % self.log_every:
      raise ValueError(
          f"checkpoint_every={self.checkpoint_every} is not a multiple of "
          f"log_every={self.log_every}: make it one, so every checkpoint follows a "
          "check that the loss is finite.")


def _manager(directory: Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def _on_first_device(abstract):
  """Target of a restore: every array on the first local device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


def _restore(manager: ocp.CheckpointManager, step: int, make_state) -> TrainState:
  abstract = _on_first_device(jax.eval_shape(make_state))
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_finished(directory: Path, make_state: Callable[[], TrainState],
                     num_steps: int) -> TrainState | None:
  """The final state of a finished stage, or None if the stage has not finished."""
  with _manager(directory) as manager:
    if manager.latest_step() != num_steps:
      return None
    return _restore(manager, num_steps, make_state)


class MetricLog:
  """Metric means per stage and step, to TensorBoard event files (tensorboardX) and
  to metrics.jsonl, which the report's plots read.

  A vector metric ([K], one entry per teacher or component) named 'prefix/name' is
  written per entry, under the names `labels[prefix]`.
  """

  def __init__(self, workdir: Path):
    self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))
    self.path = workdir / "metrics.jsonl"

  def write(self, stage: str, step: int, means: dict, labels: Mapping[str, Sequence[str]]):
    record = {"stage": stage, "step": step}
    for key, value in means.items():
      if np.ndim(value) == 0:
        record[key] = float(value)
        self.tensorboard.add_scalar(f"{stage}/{key}", record[key], step)
      else:
        record[key] = dict(zip(labels[key.rpartition("/")[0]], map(float, value)))
        for label, v in record[key].items():
          self.tensorboard.add_scalar(f"{stage}/{key}/{label}", v, step)
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def close(self):
    self.tensorboard.close()


def _log(log: MetricLog, name: str, step: int, history: list, labels):
  """Writes the means of the metrics since the last log, once they are checked."""
  history = jax.device_get(history)  # replicated: [devices, ...] per metric
  means = jax.tree.map(lambda *xs: np.mean(np.stack(xs)[:, 0], axis=0), *history)
  if not np.isfinite(means["loss"]):
    raise NonFiniteLossError(
        f"Stage {name!r}: non-finite loss {means['loss']} at step {step}; no "
        "checkpoint was written after the last good one. Lower the learning rate "
        "or check the inputs, then run again to resume from the last checkpoint.")
  log.write(name, step, means, labels)
  return means


def fit(name: str, directory: Path, make_state: Callable[[], TrainState],
        loss_fn: Callable, spec: Hashable, frozen, batch_fn: Callable[[int], dict],
        schedule: Schedule, log: MetricLog, labels: Mapping[str, Sequence[str]],
        warm_start: Callable[[TrainState], TrainState] | None = None) -> TrainState:
  """Trains a stage to `schedule.num_steps` and returns its final (host) state.

  Resumes from the latest checkpoint in `directory`; `batch_fn(step)` must be a pure
  function of the step (sharded for the local devices), so a resumed run sees the
  same batches as an uninterrupted one. `labels` names the entries of vector metrics
  (see MetricLog). A fresh stage starts from `make_state()`, passed through
  `warm_start` where given (pretrained weights: host arrays, kept out of the jitted
  init, which would embed them as constants).
  """
  with _manager(directory) as manager:
    start = manager.latest_step() or 0
    if start:
      state = _restore(manager, start, make_state)
    else:
      state = jax.jit(make_state)()
      state = warm_start(state) if warm_start else state
    if start == schedule.num_steps:
      return state
    step_fn = train_step(loss_fn, spec)
    state = replicate(state)
    frozen = replicate(frozen)
    history = []
    bar = tqdm.trange(start, schedule.num_steps, desc=name, initial=start,
                      total=schedule.num_steps)
    for step in bar:
      state, metrics = step_fn(state, frozen, batch_fn(step))
      history.append(metrics)
      done = step + 1
      last = done == schedule.num_steps
      if done % schedule.log_every == 0 or last:
        means = _log(log, name, done, history, labels)
        bar.set_postfix(loss=f"{means['loss']:.4f}")
        history = []
      if done % schedule.checkpoint_every == 0 or last:
        manager.save(done, args=ocp.args.StandardSave(unreplicate(state)))
    manager.wait_until_finished()
    return unreplicate(state)
