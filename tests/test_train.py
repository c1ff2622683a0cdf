"""The shared loop: exact resume (after a kill, SIGTERM or a full disk), refusal to
checkpoint non-finite losses, optimizers."""
import dataclasses
import errno
import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kamal_jax import files, interrupts, models, supervised, train
from kamal_jax.train import tensorboard
from conftest import fill
from kamal_jax.examples import Examples

BATCH = 16  # the batch of the shrunk pipeline's teacher stages


@pytest.fixture(scope="module")
def stage(tiny):
  """A teacher's stage from labels on 64 random images (4 batches per epoch)."""
  module = models.create(tiny.models.teacher, 4, tiny.models.teacher_width_scale,
                         axis_name=train.AXIS)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(64, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 4, size=(64, 1)).astype(np.int32)
  examples = Examples(np.arange(64), lambda at, stream, step: images[at], False, labels)
  cfg = ml_collections.ConfigDict(dict(steps=6, batch_size=BATCH,
                                       optimizer=tiny.teacher_training.optimizer))
  return supervised.stage("teachers", module, (4,), examples, cfg, seed=0, rng_impl="rbg")


def _fit(stage, directory, batches=None, steps=6, schedule=train.Schedule(1, 2)):
  stage = dataclasses.replace(stage, batches=batches or stage.batches, steps=steps)
  directory.mkdir(parents=True, exist_ok=True)
  log = train.MetricLog(directory)
  try:
    return train.fit(stage, directory / "ckpt", schedule, log)
  finally:
    log.close()


def _assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                  jax.tree.leaves((b.params, b.batch_stats, b.opt_state)), strict=True):
    np.testing.assert_array_equal(x, y)


def _logged(directory) -> list[dict]:
  return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_checkpoints_the_finished_step_and_the_resume_is_bit_identical(stage, tmp_path):
  """Between logs: the checkpoint of step 3 keeps step 3's metrics, which the resumed
  stage logs in step 4's mean, as the uninterrupted stage does."""
  schedule = train.Schedule(log_every=2, checkpoint_every=4)
  whole = _fit(stage, tmp_path / "whole", schedule=schedule)
  batch_fn = stage.batches

  def terminated_in_3(step):  # the batch of step 3: the signal comes while it runs
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch_fn(step)

  with interrupts.handled(), pytest.raises(interrupts.Interrupted) as stopped:
    _fit(stage, tmp_path / "resumed", terminated_in_3, schedule=schedule)
  assert stopped.value.signal_name == "SIGTERM"
  assert stopped.value.where == ("in stage 'teachers' after step 3 of 6 (its newest "
                                 "checkpoint: step 3)")
  saved = tmp_path / "resumed" / "ckpt" / "3"
  assert sorted(p.name for p in saved.parent.iterdir()) == ["3"]
  assert (saved / train.checkpoints.PENDING).is_file()
  resumed = _fit(stage, tmp_path / "resumed", schedule=schedule)
  _assert_same_state(whole, resumed)
  assert _logged(tmp_path / "resumed") == _logged(tmp_path / "whole")  # steps 2, 4, 6


def _wait_for(path: Path):
  deadline = time.monotonic() + 60
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} was never written"
    time.sleep(0.01)


def test_a_full_disk_at_a_save_names_the_path_and_is_never_the_resume_point(
    stage, tmp_path, small_disk, monkeypatch):
  """The disk fills as orbax starts to write checkpoint 4 (2 is sealed by then): a
  real full file system where the test can mount one, else an injected ENOSPC."""
  whole = _fit(stage, tmp_path / "whole")
  directory = small_disk or tmp_path / "run"
  start_save = train.checkpoints.ocp.CheckpointManager.save
  ballast = []

  def save_on_a_full_disk(manager, step, *args, **kwargs):
    if step == 4:
      if small_disk is None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      ballast.append(fill(small_disk))
    return start_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(train.checkpoints.ocp.CheckpointManager, "save", save_on_a_full_disk)
  with pytest.raises(files.WriteError, match="No space left on device") as refused:
    _fit(stage, directory)
  assert str(refused.value).startswith(str(directory))
  for path in ballast:
    path.unlink()
  monkeypatch.undo()
  assert train.checkpoints.latest_good(train.checkpoints.manager(directory / "ckpt")) == 2
  _assert_same_state(whole, _fit(stage, directory))


def test_ctrl_c_while_a_checkpoint_is_handed_to_orbax_stops_after_it_is_sealed(
    stage, tmp_path, monkeypatch):
  """orbax builds the save's coroutines in this thread: a SIGINT in between once left
  one never awaited. Now the save finishes, is sealed, and the run stops right after."""
  whole = _fit(stage, tmp_path / "whole")
  start_save = train.checkpoints.ocp.CheckpointManager.save

  def save_as_ctrl_c_comes(manager, step, *args, **kwargs):
    if step == 4:
      os.kill(os.getpid(), signal.SIGINT)
    return start_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(train.checkpoints.ocp.CheckpointManager, "save", save_as_ctrl_c_comes)
  with interrupts.handled(), pytest.raises(interrupts.Interrupted) as stopped:
    _fit(stage, tmp_path / "run")
  monkeypatch.undo()
  assert stopped.value.signal_name == "SIGINT"
  assert (tmp_path / "run" / "ckpt" / "4" / train.CHECKSUMS).is_file()
  _assert_same_state(whole, _fit(stage, tmp_path / "run"))


def test_a_signal_while_deferred_stops_as_the_block_leaves_not_inside_it():
  ran_on = []
  with interrupts.handled(), pytest.raises(interrupts.Interrupted) as stopped:
    with interrupts.deferred():
      os.kill(os.getpid(), signal.SIGINT)
      with interrupts.deferred():  # nested: still the outer one that stops
        os.kill(os.getpid(), signal.SIGTERM)
      ran_on.append(True)
  assert ran_on == [True] and stopped.value.signal_name == "SIGINT"


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(stage, tmp_path):
  whole = _fit(stage, tmp_path / "whole")
  batch_fn = stage.batches

  def killed_at_3(step):
    if step == 3:
      raise KeyboardInterrupt  # stands in for a kill after the step-2 checkpoint
    return batch_fn(step)

  with pytest.raises(KeyboardInterrupt):
    _fit(stage, tmp_path / "resumed", killed_at_3)
  assert sorted(p.name for p in (tmp_path / "resumed" / "ckpt").iterdir()) == ["2"]
  resumed = _fit(stage, tmp_path / "resumed")
  assert int(resumed.step) == int(whole.step) == 6
  _assert_same_state(whole, resumed)


def _damage(step_dir, how):
  """Garbles a byte run in, or cuts in half, the checkpoint's largest array file; or
  removes its checksums, as a kill between orbax's finalisation and the seal does."""
  if how == "unsealed":
    (step_dir / train.CHECKSUMS).unlink()
    return
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  content = bytearray(largest.read_bytes())
  if how == "garbled":
    content[len(content) // 3:len(content) // 3 + 8] = bytes(8)
  else:
    del content[len(content) // 2:]
  largest.write_bytes(bytes(content))


@pytest.mark.parametrize("how", ["garbled", "truncated", "unsealed"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_before_it(
    stage, tmp_path, how, caplog):
  whole = _fit(stage, tmp_path / "whole")
  _fit(stage, tmp_path / "run")
  _damage(tmp_path / "run" / "ckpt" / "6", how)
  resumed = _fit(stage, tmp_path / "run")  # the final checkpoint is bad: steps 5-6 again
  assert "Checkpoint" in caplog.text and "is damaged" in caplog.text
  assert sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir()) == ["4", "6"]
  assert [p.name for p in (tmp_path / "run" / "ckpt.damaged").iterdir()] == ["6"]
  for a, b in zip(jax.tree.leaves((whole.params, whole.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(a, b)
  logged = [json.loads(line)["step"]
            for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert logged == [1, 2, 3, 4, 5, 6]  # steps 5-6 are logged once, by the resumed run


def test_a_save_cut_short_is_cleaned_up_by_one_manager_alone(stage, tmp_path, monkeypatch):
  """Orbax deletes the temporary directories of cut-short saves in a thread that
  closing its manager does not wait for; when the finished-stage check and the
  training both asked, two threads deleted one directory (FileNotFoundError)."""
  _fit(stage, tmp_path, steps=4)
  checkpoints = tmp_path / "ckpt"
  shutil.copytree(checkpoints / "4", checkpoints / "6.orbax-checkpoint-tmp")  # killed saving 6
  cleaning = []
  opened = train.checkpoints.ocp.CheckpointManager

  def spy(directory, options):
    cleaning.append(options.cleanup_tmp_directories)
    return opened(directory, options=options)

  monkeypatch.setattr(train.checkpoints.ocp, "CheckpointManager", spy)
  assert train.restore_finished(stage, checkpoints) is None
  _fit(stage, tmp_path)
  assert len(cleaning) == 2 and sum(cleaning) == 1
  assert sorted(p.name for p in checkpoints.iterdir()) == ["4", "6"]


def test_a_checkpoint_is_sealed_soon_after_it_is_written(stage, tmp_path):
  """Not only when the next save starts: a kill between the two would lose it."""
  batch_fn = stage.batches
  written = tmp_path / "ckpt" / "2"

  def checked(step):  # the batch of step `step + 1`
    if step == 2:
      _wait_for(written)  # orbax renames the finished checkpoint into place
      time.sleep(0.2)
    if step == 3:  # before the next save
      assert (written / train.CHECKSUMS).is_file(), "checkpoint 2 unsealed at step 4"
    return batch_fn(step)

  _fit(stage, tmp_path, checked)


def test_finished_stage_is_restored_not_retrained(stage, tmp_path):
  assert train.restore_finished(stage, tmp_path / "ckpt") is None
  trained = _fit(stage, tmp_path)

  def no_more_steps(step):
    raise AssertionError(f"step {step} ran again")

  again = _fit(stage, tmp_path, no_more_steps)
  restored = train.restore_finished(stage, tmp_path / "ckpt")
  for a, b, c in zip(jax.tree.leaves(trained.params), jax.tree.leaves(again.params),
                     jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(stage, tmp_path):
  batch_fn = stage.batches

  def nan_from_3(step):
    batch = batch_fn(step)
    if step >= 3:
      batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  with pytest.raises(train.NonFiniteLossError, match="'teachers'.*step 4"):
    _fit(stage, tmp_path, nan_from_3)
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2"]
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == [1, 2, 3]  # the bad step is not logged
  assert 0 <= logged[0]["accuracy"] <= 1


def test_checkpoints_must_follow_a_finiteness_check():
  with pytest.raises(ValueError, match="multiple of log_every"):
    train.Schedule(log_every=4, checkpoint_every=6)


@pytest.mark.parametrize("tap_rates", [(), (0.02, 0.008)])
def test_bridges_and_network_learn_at_their_own_rates(tap_rates):
  cfg = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1, bridge_learning_rate=0.01, momentum=0.0,
      weight_decay=0.0, decay_at=(0.5,), decay_factor=0.5, tap_learning_rates=tap_rates))
  bridges = {"tap0": {"kernel": jnp.ones(2)}, "tap1": {"kernel": jnp.ones(2)}}
  params = {"net": {"tap0": jnp.ones(3)},  # a network's own layer is never a bridge
            "groups": {"0": {"net_bridges": bridges, "frozen_bridges": [bridges],
                             "logit_scale": jnp.ones(1)}}}
  tx = train.make_optimizer(cfg, num_steps=10)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  bridge_rates = tap_rates or (0.01, 0.01)
  for step in range(6):
    decay = 0.5 if step == 5 else 1.0
    updates, state = tx.update(grads, state, params)
    group = updates["groups"]["0"]
    np.testing.assert_allclose(updates["net"]["tap0"], -0.1 * decay, rtol=1e-6)
    np.testing.assert_allclose(group["logit_scale"], -0.01 * decay, rtol=1e-6)
    for tap, rate in zip(("tap0", "tap1"), bridge_rates):
      for side in (group["net_bridges"], group["frozen_bridges"][0]):
        np.testing.assert_allclose(side[tap]["kernel"], -rate * decay, rtol=1e-6,
                                   err_msg=f"{step} {tap}")


def test_unknown_optimizer_names_the_choices():
  cfg = ml_collections.ConfigDict(dict(name="lamb", learning_rate=0.1, decay_at=(),
                                       decay_factor=0.5))
  with pytest.raises(ValueError, match=r"use one of \['adam', 'sgd'\]"):
    train.make_optimizer(cfg, 10).init({"net": jnp.ones(1)})


def _records(path):
  """The data of a TFRecord file's records, each CRC checked."""
  content, records = path.read_bytes(), []
  while content:
    (length,), (length_crc,) = struct.unpack("<Q", content[:8]), struct.unpack("<I", content[8:12])
    data, (data_crc,) = content[12:12 + length], struct.unpack("<I", content[12 + length:16 + length])
    masked = lambda crc: (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert (length_crc, data_crc) == (masked(tensorboard.crc32c(content[:8])),
                                      masked(tensorboard.crc32c(data)))
    records.append(data)
    content = content[16 + length:]
  return records


def test_metric_log_writes_tensorboard_events_that_tensorboards_protos_read(tmp_path):
  """Read back with tensorboardX's copy of TensorBoard's Event proto."""
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  log = train.MetricLog(tmp_path)
  log.write("stage1_part1", 7, {"loss": 0.5, "0/selected_fraction": np.array([0.25, 0.75])},
            {"0/selected_fraction": ("t1", "t2")})
  log.close()
  (events,) = (tmp_path / "tensorboard").iterdir()
  first, *scalars = [event_pb2.Event.FromString(r) for r in _records(events)]
  assert first.file_version == "brain.Event:2"
  assert [(e.step, v.tag, v.simple_value) for e in scalars for v in e.summary.value] == [
      (7, "stage1_part1/loss", 0.5), (7, "stage1_part1/0/selected_fraction/t1", 0.25),
      (7, "stage1_part1/0/selected_fraction/t2", 0.75)]
