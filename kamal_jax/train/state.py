"""TrainState and optimizers with one learning rate per parameter group."""
import functools
import json
from typing import Any

import jax
import ml_collections
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  batch_stats: Any


def param_group(name: str) -> str:
  """Top-level parameter collections: 'net' is the network being trained; every
  other collection (bridges, logit scales) learns at the bridge rate."""
  return "net" if name == "net" else "bridges"


def _schedule(cfg: ml_collections.ConfigDict, base_lr: float, num_steps: int):
  """Step decay (MultiStepLR): times `decay_factor` at each fraction of training in
  `decay_at`."""
  boundaries = {int(f * num_steps): cfg.decay_factor for f in cfg.decay_at}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def _optimizer(cfg: ml_collections.ConfigDict, learning_rate) -> optax.GradientTransformation:
  if cfg.name == "adam":
    return optax.adamw(learning_rate, weight_decay=cfg.weight_decay) if cfg.weight_decay \
        else optax.adam(learning_rate)
  if cfg.name == "sgd":
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(learning_rate, momentum=cfg.momentum))
  raise ValueError(f"Unknown optimizer {cfg.name!r}: use 'adam' or 'sgd'.")


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int,
                   params: dict) -> optax.GradientTransformation:
  """optax.multi_transform over the top-level collections of `params`: the network
  at `cfg.learning_rate`, the rest at `cfg.bridge_learning_rate`."""
  labels = tuple((name, param_group(name)) for name in params)
  return _cached_optimizer(cfg.to_json(sort_keys=True), num_steps, labels)


@functools.cache
def _cached_optimizer(cfg_json: str, num_steps: int, labels: tuple):
  """One optax object per setting. A TrainState carries its optimizer as static
  pytree data, so states built with equal settings must share the object to share
  a pytree structure, and so a compiled step (one per stage, not one per group)."""
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  rates = {"net": cfg.learning_rate, "bridges": cfg.get("bridge_learning_rate",
                                                       cfg.learning_rate)}
  transforms = {group: _optimizer(cfg, _schedule(cfg, rates[group], num_steps))
                for group in {group for _, group in labels}}
  return optax.multi_transform(transforms, dict(labels))


def create_state(variables: dict, cfg: ml_collections.ConfigDict,
                 num_steps: int) -> TrainState:
  """A TrainState from {'params': {...}, 'batch_stats': {...}}; `apply_fn` is unused
  (loss functions carry their modules), so it is None."""
  params = variables["params"]
  return TrainState.create(apply_fn=None, params=params,
                           batch_stats=variables.get("batch_stats", {}),
                           tx=make_optimizer(cfg, num_steps, params))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
