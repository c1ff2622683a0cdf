"""The one data-parallel train step that every stage uses.

A loss function has the signature
  loss_fn(spec, params, batch_stats, frozen, batch) -> (loss, (metrics, new_batch_stats))
where `spec` is a hashable description of the networks (static), `frozen` holds the
networks that only give targets (teachers, components) and `batch` is this device's
shard. The step is `jax.pmap`ped over all local devices with the axis name AXIS;
gradients and metrics are averaged across devices with `lax.pmean`. Batch statistics
need no averaging: the networks the project trains are built with AXIS as their
BatchNorm axis (`models.create(..., axis_name=AXIS)`), so each normalises over the
global batch and the statistics already agree on all devices. The losses themselves
name no axis: under a caller's plain `jit` they run on one device as they are.
"""
import functools
from typing import Callable, Hashable

import jax
import numpy as np
import optax

from kamal_jax.train.state import TrainState

__all__ = ["AXIS", "replicate", "train_step", "unreplicate"]

AXIS = "batch"


def _step(loss_fn: Callable, spec: Hashable, state: TrainState, frozen, batch):
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, spec), has_aux=True)
  (loss, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats,
                                                  frozen, batch)
  grads, metrics = jax.lax.pmean((grads, dict(metrics, loss=loss)), AXIS)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


@functools.cache
def train_step(loss_fn: Callable, spec: Hashable, devices: tuple | None = None) -> Callable:
  """pmapped `(state, frozen, batch) -> (state, metrics)` over `devices` (default:
  all local devices); the state is donated.

  Cached on its arguments, so every group of a stage reuses one compiled program
  when their shapes agree.
  """
  return jax.pmap(functools.partial(_step, loss_fn, spec), axis_name=AXIS,
                  devices=devices, donate_argnums=(0,))


def replicate(tree, devices=None):
  """A copy of `tree` on each device ([...] -> [devices, ...]).

  Built on the host (NumPy), so no per-leaf program is compiled, and laid out as the
  step's own outputs are (a mesh axis named after the step's axis), so the second
  call of a step, on its own outputs, reuses the program compiled for the first.
  """
  devices = devices or jax.local_devices()
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                        jax.sharding.PartitionSpec(AXIS))
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def unreplicate(tree):
  """One device's copy of a pmapped tree, as NumPy arrays of its own on the host
  ([devices, ...] -> [...]): they stay valid after the device buffers are donated.

  Reads the first addressable shard, so it also works where other processes hold
  the other devices (flax.jax_utils.unreplicate returns the whole [1, ...] array
  when pmapped over a single device among several).
  """
  def first(x):
    shard = x.addressable_shards[0].data if isinstance(x, jax.Array) else x
    return np.array(np.asarray(shard)[0])
  return jax.tree.map(first, tree)
