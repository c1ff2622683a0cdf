"""Teachers: frozen networks with their label spaces, stacked to run as one.

A teacher is a Flax module `module(x, train: bool) -> Outputs(logits, feats)`, its
variables and its label space. Teachers of one architecture are stacked: their
variables get a leading K axis and `map_stacked` runs them all in one program. A pool
of heterogeneous teachers is a list of such stacks, one per architecture.
Teachers always run in eval mode (running batch statistics) and never enter an
optimizer; those that come without weights are trained first (`supervised`).
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kamal_jax import ambiguity, models, tasks
from kamal_jax.models import Outputs

__all__ = ["atypicality", "imported", "map_stacked", "scan_stacked", "stack", "stack_order",
           "stack_variables", "stack_way", "stacked_apply", "sub_stacks", "take", "Teacher",
           "TeacherStack", "WAYS"]


@dataclasses.dataclass(frozen=True)
class Teacher:
  name: str
  module: nn.Module
  variables: Any  # {'params': ..., 'batch_stats': ...}; None for one still to train
  label_space: tasks.LabelSpace


def imported(name: str, path: str, space: tasks.LabelSpace, dtype: str) -> Teacher:
  """A teacher from a PyTorch ResNet checkpoint (torchvision names; .pth or
  .safetensors), whose logits must be its label space in order."""
  from kamal_jax.third_party import torch_resnet  # pylint: disable=g-import-not-at-top
  try:
    module, variables = torch_resnet.load(path, dtype)
  except ValueError as error:
    source = "" if path in str(error) else f" from {path}"
    raise ValueError(f"Teacher {name!r}{source}: {error}") from error
  if module.num_outputs != space.num_outputs:
    raise ValueError(
        f"Teacher {name!r} from {path} has {module.num_outputs} logits but its label set "
        f"has {space.num_outputs} classes: list its classes in the order of its logits.")
  return Teacher(name, module, variables, space)


def stack_order(keys: dict[str, Any]) -> list[tuple[str, ...]]:
  """Names with equal keys (e.g. architectures) grouped into stacks, in order of
  first appearance."""
  stacks = {}
  for name, key in keys.items():
    stacks.setdefault(key, []).append(name)
  return [tuple(names) for names in stacks.values()]


@dataclasses.dataclass(frozen=True)
class TeacherStack:
  names: tuple[str, ...]
  module: nn.Module
  variables: Any  # every leaf [K, ...]


def stack(teachers: list[Teacher]) -> TeacherStack:
  """Stacks teachers of one architecture along a new leading axis."""
  modules = {t.module for t in teachers}
  if len(modules) != 1:
    raise ValueError(
        f"Teachers {[t.name for t in teachers]} have different architectures; a "
        "stack needs one architecture: give them the same model.")
  shapes = {jax.tree.structure(t.variables) for t in teachers}
  if len(shapes) != 1:
    raise ValueError(f"Teachers {[t.name for t in teachers]} have different variable "
                     "trees: load checkpoints of the same architecture.")
  return TeacherStack(tuple(t.name for t in teachers), modules.pop(),
                      stack_variables([t.variables for t in teachers]))


def stack_variables(variables: list) -> Any:
  """Variable trees of one architecture -> one host tree with a leading [K] axis
  (NumPy: stacking on the host compiles nothing)."""
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *variables)


def sub_stacks(pool: list["TeacherStack"], names) -> list["TeacherStack"]:
  """The named teachers as sub-stacks of the pool's stacks. `names` must follow the
  pool's order (stack by stack), so joining the sub-stacks along K gives `names`."""
  subs = []
  for stack_ in pool:
    members = [n for n in names if n in stack_.names]
    if members:
      subs.append(TeacherStack(tuple(members), stack_.module, take(
          stack_.variables, [stack_.names.index(n) for n in members])))
  if [n for s in subs for n in s.names] != list(names):
    raise ValueError(f"Teachers {list(names)} are not in the pool's stack order "
                     f"{[s.names for s in pool]}.")
  return subs


def take(stack_variables, indices) -> Any:
  """The sub-stack of the given teachers (indices into the leading axis), on the host."""
  return jax.tree.map(lambda leaf: np.asarray(leaf)[np.asarray(indices)], stack_variables)


WAYS = ("vmap", "unroll", "loop")


def stack_way(in_step: bool) -> str:
  """How `map_stacked` runs K networks on this backend, as measured
  (benchmarks/stack_strategy.py, RESULTS.md). `in_step`: the networks run in every
  train step (under gradients or beside them), not once over a dataset (predictions).

  On GPU, `jax.vmap` ran a K=4 ResNet-18 training step in 0.75x the time of K
  separate calls. On CPU, XLA lowers vmapped convolutions over stacked weights to
  grouped ones (digits nets: training steps 7-15x slower than unrolled at K = 2-4),
  and runs a convolution's gradient inside a loop body far slower than outside one
  (looped training steps 11-17x slower). So a CPU unrolls what runs in a step, and
  loops (`lax.map`) over predictions: bit-identical outputs from one compiled body
  whatever K is (digits teachers at K=4: 1.1 s against 3.2 s), for 2-16% more time
  (digits nets at batch 64, K = 1-4), which a single pass over a dataset repays.
  """
  if jax.default_backend() != "cpu":
    return "vmap"
  return "unroll" if in_step else "loop"


def map_stacked(fn: Callable, *stacked, in_step: bool, way: str | None = None,
                chunk: int = 0) -> Any:
  """`fn` over the K slices of stacked arguments (every leaf [K, ...]), outputs
  stacked back to [K, ...]: `jax.vmap(fn)` in meaning, however it runs.

  `in_step`: whether `fn` runs in every train step (it picks the way; see
  `stack_way`). `way` overrides the pick: 'vmap', 'unroll' (K calls at trace time)
  or 'loop' (`lax.map`). Every way is one program, compiled once.

  `chunk` > 0 with K > chunk: the K slices run `chunk` at a time, each chunk in the
  way picked (`scan_stacked`).
  """
  way = way or stack_way(in_step)
  count = jax.tree.leaves(stacked)[0].shape[0]
  if 0 < chunk < count:
    return scan_stacked(lambda carry, *args: (carry, map_stacked(fn, *args, in_step=in_step,
                                                                 way=way)),
                        (), *stacked, chunk=chunk)[1]
  if way == "vmap":
    return jax.vmap(fn)(*stacked)
  if way == "loop":
    return jax.lax.map(lambda args: fn(*args), stacked)
  outputs = [fn(*jax.tree.map(lambda leaf: leaf[k], stacked)) for k in range(count)]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)


def scan_stacked(fn: Callable, carry, *stacked, chunk: int) -> tuple:
  """`fn(carry, *slices) -> (carry, outputs [c, ...])` over the K slices of stacked
  arguments (every leaf [K, ...]) `chunk` at a time, in a `lax.scan` over chunks, the
  K % chunk left after them as one more call (chunk 0 or >= K: one call over all K),
  so the program holds the work of at most two chunks whatever K is: its compile time
  and its live memory follow the chunk, not K. Returns (carry, outputs [K, ...])."""
  count = jax.tree.leaves(stacked)[0].shape[0]
  if not 0 < chunk < count:
    return fn(carry, *stacked)
  looped = count // chunk * chunk
  head = jax.tree.map(lambda leaf: leaf[:looped].reshape(
      (count // chunk, chunk) + leaf.shape[1:]), stacked)  # [K // chunk, chunk, ...]
  carry, outputs = jax.lax.scan(lambda c, args: fn(c, *args), carry, head)
  outputs = jax.tree.map(lambda leaf: leaf.reshape((looped,) + leaf.shape[2:]), outputs)
  if looped == count:
    return carry, outputs
  carry, tail = fn(carry, *jax.tree.map(lambda leaf: leaf[looped:], stacked))
  return carry, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outputs, tail)


def stacked_apply(module: nn.Module, variables, x: jnp.ndarray, in_step: bool,
                  chunk: int = 0) -> Outputs:
  """Eval-mode outputs of K stacked networks on one batch: logits [K, B, C] and
  feats ([K, B, H, W, D] per tap). `in_step`, `chunk`: see `map_stacked`."""
  return map_stacked(lambda v: module.apply(v, x, train=False), variables, in_step=in_step,
                     chunk=chunk)


def atypicality(variables, outputs: Outputs) -> jnp.ndarray:
  """[K, B]: how unlike each stacked network's training images each image is
  (`ambiguity.atypicality`), from their outputs on the batch ([K, B, ...]); zeros for
  networks without a stem batch norm (`models.stem_statistics`)."""
  stats = models.stem_statistics(variables)
  if stats is None:
    return jnp.zeros(outputs.logits.shape[:2])
  return ambiguity.atypicality(outputs.feats[0], *stats)
