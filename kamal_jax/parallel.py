"""Data parallelism, one way: every program runs over all devices of the run with one
named batch axis.

A program is `jax.jit` of `jax.shard_map` over a 1-D mesh of the devices, whose axis
is AXIS (`data_parallel`). Its inputs are global arrays: `replicated` ones (a state,
frozen networks: the same value on every device) and `split` ones (a batch, rows
split over the devices along its first axis). Inside, each device sees its own rows
and the collectives name AXIS (`lax.pmean(..., AXIS)`; BatchNorm's axis_name).

In a multi-process run each process holds the rows of its own devices: it reads only
`local_rows` of a global batch, `split` assembles the global array from them, and
`gathered` brings every process's rows back; only the `primary` process writes the
run's files. Device order is process order, so process p's rows are block p.
"""
import functools
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["agreed", "AXIS", "data_parallel", "gathered", "host", "in_any_process",
           "local_rows", "mesh", "primary", "REPLICATED", "replicated", "split", "SPLIT"]

AXIS = "batch"
REPLICATED = PartitionSpec()  # the same value on every device
SPLIT = PartitionSpec(AXIS)  # rows (the first axis) split over the devices


def primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


@functools.cache
def mesh(devices: tuple | None = None) -> jax.sharding.Mesh:
  """The 1-D mesh of `devices` (default: every device of the run), axis AXIS."""
  return jax.sharding.Mesh(np.array(devices or jax.devices()), (AXIS,))


def data_parallel(fn: Callable, in_specs: tuple, out_specs, devices: tuple | None = None,
                  donate_argnums: tuple = ()) -> Callable:
  """`fn` run on every device of `devices` at once: jit of shard_map over `mesh`.
  Each argument and output is REPLICATED or SPLIT (a spec per pytree).

  Without shard_map's replication checks (check_vma): `fn` averages what must agree
  itself (`lax.pmean` of the gradients, BatchNorm over AXIS), as under pmap; with
  them, the gradient of a replicated parameter would arrive summed over the devices
  and a user's network whose BatchNorm names no axis could not be trained at all.
  """
  return jax.jit(jax.shard_map(fn, mesh=mesh(devices), in_specs=in_specs,
                               out_specs=out_specs, check_vma=False),
                 donate_argnums=donate_argnums)


def local_rows(rows: np.ndarray, process: int | None = None,
               processes: int | None = None) -> np.ndarray:
  """A process's block (default: this one's) of a global batch's rows [B, ...] ->
  [B / processes, ...]: each process reads (and decodes) only its own images."""
  process = jax.process_index() if process is None else process
  processes = jax.process_count() if processes is None else processes
  if len(rows) % processes:
    raise ValueError(f"Batch of {len(rows)} does not split over {processes} processes: "
                     "use a batch size divisible by the device count.")
  return np.split(rows, processes)[process]


def _global(tree, spec: PartitionSpec, devices: tuple | None):
  sharding = NamedSharding(mesh(devices), spec)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def replicated(tree, devices: tuple | None = None):
  """Host arrays (the same in every process) as global arrays on every device. Built
  from NumPy, so no per-leaf program is compiled."""
  return _global(tree, REPLICATED, devices)


def split(tree, devices: tuple | None = None):
  """This process's rows of a global batch (host arrays, [B / processes, ...]) as
  global arrays [B, ...] split over the devices."""
  count = len(devices) if devices else jax.device_count()
  for x in jax.tree.leaves(tree):
    if (len(x) * jax.process_count()) % count:
      raise ValueError(f"Batch of {len(x) * jax.process_count()} does not split over "
                       f"{count} devices: use a batch size divisible by {count}.")
  return _global(tree, SPLIT, devices)


def host(tree):
  """Replicated global arrays as NumPy arrays of their own (valid after the device
  buffers are donated): each process reads its first shard."""
  return jax.tree.map(lambda x: np.array(x.addressable_shards[0].data), tree)


def gathered(tree):
  """Split global arrays as NumPy arrays [B, ...] holding every process's rows."""
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


def agreed(flag: bool) -> bool:
  """Process 0's `flag`, in every process: what the processes of a multi-process run
  decide together when only process 0 could look (a collective: all must call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def in_any_process(flag: bool) -> bool:
  """Whether `flag` holds in some process (a collective: all must call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
