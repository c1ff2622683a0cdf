"""A stage's checkpoints: one orbax CheckpointManager directory per stage, each
checkpoint sealed with the SHA-256 of its files and checked on every restore.

The layout is the same on every backend: a stage saves its TrainState as it is
(stacked networks with their leading [K] axis), however its step runs them.
"""
import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from kamal_jax import files, interrupts, parallel
from kamal_jax.train.state import TrainState

__all__ = ["CHECKSUMS", "latest_good", "manager", "PENDING", "pending_metrics", "restore",
           "restore_finished", "Saver", "training_manager"]


@contextlib.contextmanager
def training_manager(directory: Path):
  """The manager a stage trains with (it cleans up, see `manager`); its closing,
  which waits for the save in flight, reports a failed write as a WriteError."""
  checkpoints = manager(directory, clean_up=True)
  try:
    yield checkpoints
  finally:
    with interrupts.deferred(), files.writing(directory):
      checkpoints.close()


def manager(directory: Path, clean_up: bool = False) -> ocp.CheckpointManager:
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
PENDING = "kamal_jax_pending_metrics.npz"  # see Saver.save


def _digests(step_dir: Path) -> dict[str, str]:
  return {str(p.relative_to(step_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != CHECKSUMS}


class Saver:
  """Saves in the background: orbax writes a checkpoint while training goes on (a
  digits stage-1 state: ~40 ms to hand over, ~110 ms of writing). Each checkpoint is
  sealed with its checksums once orbax has finalised it: at the first step after
  (`seal_if_written`), and at the latest before the next save starts and when the
  stage ends, however it ends (`seal`). A checkpoint without them, from a kill in
  between, is never trusted; nor is one the file system refused (a WriteError).
  A signal that comes while a save is handed over or sealed stops the run right
  after (`interrupts.deferred`), never halfway."""

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self.unsealed = None  # the step being written
    self.pending = []  # its metrics not yet logged

  def save(self, step: int, state: TrainState, pending: list | None = None):
    """`state`: host arrays of its own (the device buffers are donated to the next
    step); `pending`: the metrics of the steps since the last log, kept beside the
    state for the resumed stage to log (`pending_metrics`): a stage stopped by
    SIGTERM saves between logs."""
    with interrupts.deferred():
      self.seal()
      with files.writing(self._step_dir(step)):
        self.manager.save(step, args=ocp.args.StandardSave(state))
      self.unsealed, self.pending = step, jax.device_get(pending or [])

  def seal_if_written(self):
    """Seals the checkpoint being written if orbax has finished it (never waits)."""
    if self.unsealed is not None and not self.manager.is_saving_in_progress():
      self.seal()

  def seal(self):
    if self.unsealed is None:
      return
    step_dir, pending = self._step_dir(self.unsealed), self.pending
    self.unsealed, self.pending = None, []  # sealed now, or never
    with interrupts.deferred(), files.writing(step_dir):
      self.manager.wait_until_finished()
      if parallel.primary():
        if pending:
          np.savez(step_dir / PENDING, **jax.tree.map(lambda *xs: np.stack(xs), *pending))
        files.write_atomic(step_dir / CHECKSUMS, json.dumps(_digests(step_dir), indent=0))

  def _step_dir(self, step: int) -> Path:
    return Path(self.manager.directory) / str(step)


def pending_metrics(manager: ocp.CheckpointManager, step: int) -> list[dict]:
  """The metrics of the steps up to `step` that its checkpoint kept unlogged (see
  `Saver.save`), in step order: [] for a checkpoint at a logged step."""
  path = Path(manager.directory) / str(step) / PENDING
  if not step or not path.exists():
    return []
  with np.load(path) as saved:
    stacked = {name: saved[name] for name in saved.files}  # name -> [steps, ...]
  return [{name: values[i] for name, values in stacked.items()}
          for i in range(len(next(iter(stacked.values()))))]


def _damage(step_dir: Path) -> str | None:
  """Why a checkpoint cannot be trusted, or None."""
  try:
    expected = json.loads((step_dir / CHECKSUMS).read_text())
  except (OSError, ValueError):
    return "no readable checksums: it was cut short"
  changed = sorted(set(expected.items()) ^ set(_digests(step_dir).items()))
  return f"{changed[0][0]} is missing or changed" if changed else None


def latest_good(manager: ocp.CheckpointManager) -> int:
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
      if parallel.primary():
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


def restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> TrainState:
  """The state saved at `step`, its arrays on the first local device; `abstract_state`:
  its structure, shapes and dtypes (`jax.eval_shape` of the stage's first state)."""
  return manager.restore(step, args=ocp.args.StandardRestore(_on_first_device(abstract_state)))


def restore_finished(directory: Path, abstract_state, num_steps: int) -> TrainState | None:
  """The final state of a finished stage, or None if the stage has not finished
  (or its final checkpoint is damaged: then it resumes from the one before)."""
  with manager(directory) as checkpoints:
    if latest_good(checkpoints) != num_steps:
      return None
    return restore(checkpoints, num_steps, abstract_state)
