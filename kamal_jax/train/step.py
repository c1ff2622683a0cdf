"""The one data-parallel train step that every stage uses.

A loss function has the signature
  loss_fn(spec, params, batch_stats, frozen, batch) -> (loss, (metrics, new_batch_stats))
where `spec` is a hashable description of the networks (static), `frozen` holds the
networks that only give targets (teachers, components) and `batch` is this device's
rows of the global batch. The step runs on every device of the run at once
(`parallel.data_parallel`: jit of shard_map, the batch axis named AXIS); gradients
and metrics are averaged across devices with `lax.pmean`. Batch statistics need no
averaging: the networks the project trains are built with AXIS as their BatchNorm
axis (`models.create(..., axis_name=AXIS)`), so each normalises over the global
batch and the statistics already agree on all devices. The losses themselves name
no axis: under a caller's plain `jit` they run on one device as they are.
"""
import functools
from typing import Callable, Hashable

import jax
import optax

from kamal_jax.parallel import AXIS, REPLICATED, SPLIT, data_parallel
from kamal_jax.train.state import TrainState

__all__ = ["AXIS", "device_step", "train_step"]


def device_step(loss_fn: Callable, spec: Hashable, state: TrainState, frozen, batch):
  """One device's part of a step on its rows of the batch: `(state, metrics)`, the
  gradients and metrics averaged over the axis AXIS."""
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, spec), has_aux=True)
  (loss, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats,
                                                  frozen, batch)
  grads, metrics = jax.lax.pmean((grads, dict(metrics, loss=loss)), AXIS)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


@functools.cache
def train_step(loss_fn: Callable, spec: Hashable, devices: tuple | None = None) -> Callable:
  """`(state, frozen, batch) -> (state, metrics)` over `devices` (default: every
  device of the run): state and frozen replicated, the batch split by rows
  (`parallel.replicated`, `parallel.split`); the state is donated.

  Cached on its arguments, so every group of a stage reuses one compiled program
  when their shapes agree.
  """
  return data_parallel(functools.partial(device_step, loss_fn, spec),
                       (REPLICATED, REPLICATED, SPLIT), (REPLICATED, REPLICATED),
                       devices, donate_argnums=(0,))
