"""The training loop shared by every stage: a stage is a value (`Stage`) and `fit`
trains any of them, resuming from its checkpoints, logging and checkpointing.

A stage whose latest good checkpoint is at its last step is finished: it is
restored, never trained again.
"""
import dataclasses
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from kamal_jax import interrupts, parallel
from kamal_jax.train import checkpoints
from kamal_jax.train.metrics import MetricLog
from kamal_jax.train.state import TrainState, create_state
from kamal_jax.train.step import train_step

__all__ = ["fit", "NonFiniteLossError", "restore_finished", "Schedule", "Stage"]


class NonFiniteLossError(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Stage:
  """A training stage as a value: what `fit` needs to train or restore it.

  name: its identity: its checkpoint directory and its metric records are named
    after it, and its factory draws its random streams (`key`, the batches) from it.
  loss_fn, spec: `loss_fn(spec, params, batch_stats, frozen, batch)` (see
    `train.step`), spec static and hashable.
  frozen: the networks that give targets (host arrays; None where there are none).
  batches: step -> this process's rows of the step's global batch (host arrays, rows
    first); a pure function of the step, so a resumed stage sees the batches of an
    uninterrupted one.
  init: key -> the variables {'params', 'batch_stats'} it starts from (traced once).
  key: the key `init` gets.
  optimizer: its optimizer's settings (`train.make_optimizer`).
  steps: how many steps it trains.
  labels: the names of the entries of its vector metrics (see MetricLog).
  warm_start: variables -> variables, applied on the host after `init` (pretrained
    weights: host arrays, kept out of the jitted init, which would embed them).
  """
  name: str
  loss_fn: Callable
  spec: Hashable
  frozen: Any
  batches: Callable[[int], dict]
  init: Callable[[jax.Array], dict]
  key: jax.Array
  optimizer: ml_collections.ConfigDict
  steps: int
  labels: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  warm_start: Callable[[dict], dict] | None = None

  def initial_state(self, key) -> TrainState:
    return create_state(self.init(key), self.optimizer, self.steps)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How often a stage logs and checkpoints (never what it computes)."""
  log_every: int
  checkpoint_every: int  # a multiple of log_every: metrics are checked before a save

  def __post_init__(self):
    if self.checkpoint_every % self.log_every:
      raise ValueError(
          f"checkpoint_every={self.checkpoint_every} is not a multiple of "
          f"log_every={self.log_every}: make it one, so every checkpoint follows a "
          "check that the loss is finite.")


def _abstract(stage: Stage):
  return jax.eval_shape(stage.initial_state, stage.key)


def restore_finished(stage: Stage, directory: Path) -> TrainState | None:
  """The final state of a finished stage, or None if it has not finished (or its
  final checkpoint is damaged: then it resumes from the one before)."""
  return checkpoints.restore_finished(directory, _abstract(stage), stage.steps)


def _initial_state(stage: Stage) -> TrainState:
  """The stage's first state, compiled on CPU without LLVM's optimisations: the
  program runs once, and compiling its per-parameter random draws was most of its
  cost (a digits stage-1 state: 2.5 s against 3.0 s; stage 2: 2.3 against 3.2). The
  state differs from an optimised program's by at most one float32 ulp, the same on
  every run. The key is an argument, not a constant, so stages of equal shapes share
  one program."""
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  state = jax.jit(stage.initial_state).lower(stage.key).compile(options)(stage.key)
  if stage.warm_start is None:
    return state
  variables = stage.warm_start({"params": state.params, "batch_stats": state.batch_stats})
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def _log(log: MetricLog, stage: Stage, step: int, history: list) -> dict:
  """Writes the means of the metrics of the steps up to `step` since the last log,
  once every step's loss and gradient norm are checked to be finite."""
  history = jax.device_get(history)
  for offset, metrics in enumerate(history):
    bad = {k: float(metrics[k]) for k in ("loss", "grad_norm") if not np.isfinite(metrics[k])}
    if bad:
      raise NonFiniteLossError(
          f"Stage {stage.name!r}: non-finite "
          f"{', '.join(f'{k} {v}' for k, v in bad.items())} at step "
          f"{step - len(history) + offset + 1}; no checkpoint was written after the last "
          "good one. Lower the learning rate or check the inputs, then run again to "
          "resume from the last checkpoint.")
  means = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *history)
  log.write(stage.name, step, means, stage.labels)
  return means


def _stop_here(logged: bool) -> bool:
  """Whether the loop stops after this step for a SIGTERM. The processes of a
  multi-process run decide together, at the logged steps (`logged`), where they
  wait for the metrics anyway: asking at every step would make each step wait for
  the one before."""
  if jax.process_count() == 1:
    return interrupts.sigterm_received()
  return logged and parallel.in_any_process(interrupts.sigterm_received())


def fit(stage: Stage, directory: Path, schedule: Schedule, log: MetricLog) -> TrainState:
  """Trains `stage` to its last step and returns its final state (host arrays).

  Resumes from the latest good checkpoint in `directory`; a fresh stage starts from
  `stage.init(stage.key)`, warm-started where the stage says. A SIGTERM checkpoints
  the step that finished, with the metrics not yet logged, then stops the run
  (`interrupts`); a resumed stage goes on as if it had not stopped.
  """
  with checkpoints.training_manager(directory) as manager:
    start = checkpoints.latest_good(manager)
    state = (checkpoints.restore(manager, start, _abstract(stage)) if start
             else _initial_state(stage))
    if start == stage.steps:
      return state
    log.resume(stage.name, start)
    step_fn = train_step(stage.loss_fn, stage.spec)
    state, frozen = parallel.replicated(state), parallel.replicated(stage.frozen)
    history = checkpoints.pending_metrics(manager, start)
    bar = tqdm.trange(start, stage.steps, desc=stage.name, initial=start,
                      total=stage.steps, disable=not parallel.primary())
    saver, done, saved = checkpoints.Saver(manager), start, start
    try:
      with interrupts.sigterm_held():
        for step in bar:
          state, metrics = step_fn(state, frozen, parallel.split(stage.batches(step)))
          saver.seal_if_written()
          history.append(metrics)
          done = step + 1
          last = done == stage.steps
          logged = done % schedule.log_every == 0 or last
          if logged:
            means = _log(log, stage, done, history)
            bar.set_postfix(loss=f"{means['loss']:.4f}")
            history = []
          stop = _stop_here(logged)
          if done % schedule.checkpoint_every == 0 or last or stop:
            saver.save(done, parallel.host(state), history)
            saved = done
          if stop:
            raise interrupts.Interrupted("SIGTERM")
    except interrupts.Interrupted as interrupted:
      bar.close()
      newest = f"its newest checkpoint: step {saved}" if saved else "no checkpoint yet"
      raise interrupted.located(
          f"in stage {stage.name!r} after step {done} of {stage.steps} ({newest})") from None
    finally:
      saver.seal()
    return parallel.host(state)
