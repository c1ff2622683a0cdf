"""TrainState and optimizers with one learning rate per parameter group."""
import functools
import json
import re
from typing import Any

import jax
import ml_collections
import optax
from flax.training import train_state

__all__ = ["count_params", "create_state", "make_optimizer", "OPTIMIZERS", "param_group",
           "TrainState"]


class TrainState(train_state.TrainState):
  batch_stats: Any


def param_group(path: tuple[str, ...], taps: int) -> str:
  """The learning-rate group of the parameter at `path` (its dict keys): 'net' for
  the network being trained; 'tap{l}' for a bridge on feature tap l when the
  optimizer gives `taps` per-tap rates; 'bridges' for the rest (bridges, logit
  scales)."""
  if path[0] == "net":
    return "net"
  for key in path:
    if re.fullmatch(r"tap\d+", key) and int(key[3:]) < taps:
      return key
  return "bridges"


def _schedule(cfg: ml_collections.ConfigDict, base_lr: float, num_steps: int):
  """Step decay (MultiStepLR): times `decay_factor` at each fraction of training in
  `decay_at`."""
  boundaries = {int(f * num_steps): cfg.decay_factor for f in cfg.decay_at}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def _adam(cfg: ml_collections.ConfigDict, learning_rate) -> optax.GradientTransformation:
  return (optax.adamw(learning_rate, weight_decay=cfg.weight_decay) if cfg.weight_decay
          else optax.adam(learning_rate))


def _sgd(cfg: ml_collections.ConfigDict, learning_rate) -> optax.GradientTransformation:
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(learning_rate, momentum=cfg.momentum))


# An optimizer's name -> (its settings, the learning rate) -> the transformation.
OPTIMIZERS = {"adam": _adam, "sgd": _sgd}


def _optimizer(cfg: ml_collections.ConfigDict, learning_rate) -> optax.GradientTransformation:
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {cfg.name!r}: use one of {sorted(OPTIMIZERS)}.")
  return OPTIMIZERS[cfg.name](cfg, learning_rate)


def make_optimizer(cfg: ml_collections.ConfigDict,
                   num_steps: int) -> optax.GradientTransformation:
  """optax.multi_transform over `param_group`s: the network at `cfg.learning_rate`,
  bridges and logit scales at `cfg.bridge_learning_rate`, except the bridges of tap
  l at `cfg.tap_learning_rates[l]` where that tuple is not empty (the reference
  gives its last tap's bridges a lower rate)."""
  return _cached_optimizer(cfg.to_json(sort_keys=True), num_steps)


@functools.cache
def _cached_optimizer(cfg_json: str, num_steps: int):
  """One optax object per setting. A TrainState carries its optimizer as static
  pytree data, so states built with equal settings must share the object to share
  a pytree structure, and so a compiled step (one per stage, not one per group)."""
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  taps = tuple(cfg.get("tap_learning_rates", ()))
  rates = {"net": cfg.learning_rate, "bridges": cfg.get("bridge_learning_rate",
                                                       cfg.learning_rate),
           **{f"tap{l}": rate for l, rate in enumerate(taps)}}
  transforms = {group: _optimizer(cfg, _schedule(cfg, rate, num_steps))
                for group, rate in rates.items()}
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: param_group(tuple(str(getattr(k, "key", k)) for k in path),
                                  len(taps)), params)
  return optax.multi_transform(transforms, labels)


def create_state(variables: dict, cfg: ml_collections.ConfigDict,
                 num_steps: int) -> TrainState:
  """A TrainState from {'params': {...}, 'batch_stats': {...}}; `apply_fn` is unused
  (loss functions carry their modules), so it is None."""
  params = variables["params"]
  return TrainState.create(apply_fn=None, params=params,
                           batch_stats=variables.get("batch_stats", {}),
                           tx=make_optimizer(cfg, num_steps))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
