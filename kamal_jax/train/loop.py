"""The training loop shared by every stage: resume, step, log, checkpoint.

A stage's checkpoints live in their own orbax CheckpointManager directory. A stage
whose latest checkpoint is at its last step is finished: it is restored, never
trained again.
"""
import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
import tqdm
from absl import logging

from kamal_jax import files
from kamal_jax.train.state import TrainState
from kamal_jax.train.step import replicate, train_step, unreplicate

__all__ = ["CHECKSUMS", "fit", "MetricLog", "NonFiniteLossError", "restore_finished",
           "Schedule"]


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


def _manager(directory: Path, clean_up: bool = False) -> ocp.CheckpointManager:
  """`clean_up`: delete the temporary directories of saves cut short. Orbax does it in
  a thread that closing the manager does not wait for, so only the manager that
  trains asks for it: two managers of one directory in one process raced to delete
  the same directory (FileNotFoundError), after a kill landed while saving."""
  return ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           cleanup_tmp_directories=clean_up))


# Each finished checkpoint gets the SHA-256 of its files: orbax's atomic rename
# guards against a kill while saving, but a file garbled later restores silently as
# wrong numbers (tried: a flipped byte in an array chunk), so every restore checks.
CHECKSUMS = "kamal_jax_sha256.json"


def _digests(step_dir: Path) -> dict[str, str]:
  return {str(p.relative_to(step_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != CHECKSUMS}


class _Checkpoints:
  """Saves in the background: orbax writes a checkpoint while training goes on (a
  digits stage-1 state: ~40 ms to hand over, ~110 ms of writing). Each checkpoint is
  sealed with its checksums once orbax has finalised it: at the first step after
  (`seal_if_written`), and at the latest before the next save starts and when the
  stage ends, however it ends (`seal`). A checkpoint without them, from a kill in
  between, is never trusted."""

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self.unsealed = None  # the step being written

  def save(self, step: int, state: TrainState):
    """`state`: host arrays of its own (the device buffers are donated to the next step)."""
    self.seal()
    self.manager.save(step, args=ocp.args.StandardSave(state))
    self.unsealed = step

  def seal_if_written(self):
    """Seals the checkpoint being written if orbax has finished it (never waits)."""
    if self.unsealed is not None and not self.manager.is_saving_in_progress():
      self.seal()

  def seal(self):
    if self.unsealed is None:
      return
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      step_dir = Path(self.manager.directory) / str(self.unsealed)
      files.write_atomic(step_dir / CHECKSUMS, json.dumps(_digests(step_dir), indent=0))
    self.unsealed = None


def _damage(step_dir: Path) -> str | None:
  """Why a checkpoint cannot be trusted, or None."""
  try:
    expected = json.loads((step_dir / CHECKSUMS).read_text())
  except (OSError, ValueError):
    return "no readable checksums: it was cut short"
  changed = sorted(set(expected.items()) ^ set(_digests(step_dir).items()))
  return f"{changed[0][0]} is missing or changed" if changed else None


def _latest_good(manager: ocp.CheckpointManager) -> int:
  """The newest checkpoint whose files match their checksums (0: none). Damaged
  newer ones are moved aside to DIRECTORY.damaged/STEP, reported in one line each,
  so the run goes on from the previous good one and never saves over them."""
  directory = Path(manager.directory)
  damaged, good = [], 0
  for step in sorted(manager.all_steps(), reverse=True):
    reason = _damage(directory / str(step))
    if reason is None:
      good = step
      break
    damaged.append((step, reason))
  if damaged:
    _sync("checked checkpoints")  # every process has read them before any moves
    for step, reason in damaged:
      aside = directory.with_name(f"{directory.name}.damaged") / str(step)
      if jax.process_index() == 0:
        aside.parent.mkdir(exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        shutil.move(directory / str(step), aside)
        logging.warning("Checkpoint %s is damaged (%s): moved to %s; going on from the "
                        "one before.", directory / str(step), reason, aside)
    _sync("moved damaged checkpoints")
    manager.reload()
  return good


def _sync(name: str):
  """A barrier across the processes of a multi-process run (nothing in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _on_first_device(abstract):
  """Target of a restore: every array on the first local device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


def _restore(manager: ocp.CheckpointManager, step: int, make_state, key) -> TrainState:
  abstract = _on_first_device(jax.eval_shape(make_state, key))
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_finished(directory: Path, make_state: Callable[[jax.Array], TrainState], key,
                     num_steps: int) -> TrainState | None:
  """The final state of a finished stage, or None if the stage has not finished
  (or its final checkpoint is damaged: then it resumes from the one before)."""
  with _manager(directory) as manager:
    if _latest_good(manager) != num_steps:
      return None
    return _restore(manager, num_steps, make_state, key)


def _kept(line: str, stage: str, step: int) -> bool:
  """Whether a metrics.jsonl line stays when `stage` resumes at `step` (a line cut
  short by a kill never does)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return False
  return record["stage"] != stage or record["step"] <= step


def _summary_writer(logdir: Path):
  """tensorboardX's SummaryWriter. Its module imports torch wherever torch is
  installed, for a type check that the floats written here never reach: 1.2 s of
  every run. Where torch is not imported yet, the import is hidden from it."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  else:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    finally:
      del sys.modules["torch"]
  return SummaryWriter(str(logdir))


class MetricLog:
  """Metric means per stage and step, to TensorBoard event files (tensorboardX) and
  to metrics.jsonl, which the report's plots read.

  A vector metric ([K], one entry per teacher or component) named 'prefix/name' is
  written per entry, under the names `labels[prefix]`.
  """

  def __init__(self, workdir: Path):
    self.primary = jax.process_index() == 0  # the only process that writes
    self.tensorboard = _summary_writer(workdir / "tensorboard") if self.primary else None
    self.path = workdir / "metrics.jsonl"

  def resume(self, stage: str, step: int):
    """Drops the stage's records after `step` (logged by a run killed before its next
    checkpoint), which the resumed run logs again."""
    if not self.primary or not self.path.exists():
      return
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _kept(line, stage, step)]
    if len(kept) < len(lines):
      files.write_atomic(self.path, "".join(kept))

  def write(self, stage: str, step: int, means: dict, labels: Mapping[str, Sequence[str]]):
    if not self.primary:
      return
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
    if self.primary:
      self.tensorboard.close()


def _log(log: MetricLog, name: str, step: int, history: list, labels):
  """Writes the means of the metrics of the steps up to `step` since the last log,
  once every step's loss and gradient norm are checked to be finite."""
  history = jax.device_get(history)  # replicated: [devices, ...] per metric
  for offset, metrics in enumerate(history):
    bad = {k: float(metrics[k][0]) for k in ("loss", "grad_norm")
           if not np.isfinite(metrics[k][0])}
    if bad:
      raise NonFiniteLossError(
          f"Stage {name!r}: non-finite {', '.join(f'{k} {v}' for k, v in bad.items())} "
          f"at step {step - len(history) + offset + 1}; no checkpoint was written after "
          "the last good one. Lower the learning rate or check the inputs, then run "
          "again to resume from the last checkpoint.")
  means = jax.tree.map(lambda *xs: np.mean(np.stack(xs)[:, 0], axis=0), *history)
  log.write(name, step, means, labels)
  return means


def _initial_state(make_state: Callable[[jax.Array], TrainState], key) -> TrainState:
  """`make_state(key)`, compiled on CPU without LLVM's optimisations: the program runs
  once, and compiling its per-parameter random draws was most of its cost (a digits
  stage-1 state: 2.5 s against 3.0 s; stage 2: 2.3 against 3.2). The state differs
  from an optimised program's by at most one float32 ulp, the same on every run."""
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(make_state).lower(key).compile(options)(key)


def fit(name: str, directory: Path, make_state: Callable[[jax.Array], TrainState], key,
        loss_fn: Callable, spec: Hashable, frozen, batch_fn: Callable[[int], dict],
        schedule: Schedule, log: MetricLog, labels: Mapping[str, Sequence[str]],
        warm_start: Callable[[TrainState], TrainState] | None = None) -> TrainState:
  """Trains a stage to `schedule.num_steps` and returns its final (host) state.

  Resumes from the latest checkpoint in `directory`; `batch_fn(step)` must be a pure
  function of the step (sharded for the local devices), so a resumed run sees the
  same batches as an uninterrupted one. `labels` names the entries of vector metrics
  (see MetricLog). A fresh stage starts from `make_state(key)`, passed through
  `warm_start` where given (pretrained weights: host arrays, kept out of the jitted
  init, which would embed them as constants). The key is an argument of the init
  program, not a constant in it, so stages of equal shapes share one program.
  """
  with _manager(directory, clean_up=True) as manager:
    start = _latest_good(manager)
    if start:
      state = _restore(manager, start, make_state, key)
    else:
      state = _initial_state(make_state, key)
      state = warm_start(state) if warm_start else state
    if start == schedule.num_steps:
      return state
    log.resume(name, start)
    step_fn = train_step(loss_fn, spec)
    state = replicate(state)
    frozen = replicate(frozen)
    history = []
    bar = tqdm.trange(start, schedule.num_steps, desc=name, initial=start,
                      disable=jax.process_index() != 0,
                      total=schedule.num_steps)
    checkpoints = _Checkpoints(manager)
    try:
      for step in bar:
        state, metrics = step_fn(state, frozen, batch_fn(step))
        checkpoints.seal_if_written()
        history.append(metrics)
        done = step + 1
        last = done == schedule.num_steps
        if done % schedule.log_every == 0 or last:
          means = _log(log, name, done, history, labels)
          bar.set_postfix(loss=f"{means['loss']:.4f}")
          history = []
        if done % schedule.checkpoint_every == 0 or last:
          checkpoints.save(done, unreplicate(state))
    finally:
      checkpoints.seal()
    return unreplicate(state)
