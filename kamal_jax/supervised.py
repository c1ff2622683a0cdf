"""Networks trained from labels: the teachers of a pool that come without weights
(the source nets of the embedded default and of the paper's setups), and the
supervised student (an upper bound).

Each network is a stage of its own, on every backend: it learns a softmax
cross-entropy per head on the training images labelled in all of its heads, in its
domain, and is saved as it is. The networks of one architecture share one compiled
step; the pool stacks them afterwards (`teachers.stack_variables`).
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import optax

from kamal_jax import data, joint, train
from kamal_jax.examples import Examples

__all__ = ["stage", "Supervised", "supervised_loss"]


@dataclasses.dataclass(frozen=True)
class Supervised:
  """A network trained from labels: a softmax cross-entropy per head of its logits."""
  module: nn.Module
  head_sizes: tuple[int, ...]


def supervised_loss(spec: Supervised, params, batch_stats, frozen, batch):
  """The mean over samples of the summed per-head cross-entropies.

  batch: {'image': [B, H, W, C], 'label': [B, heads]}, labels local to each head.
  """
  del frozen
  outputs, updates = spec.module.apply({"params": params["net"], "batch_stats": batch_stats},
                                       batch["image"], train=True, mutable=["batch_stats"])
  heads = joint.split_heads(outputs.logits, spec.head_sizes)
  ce = sum(optax.softmax_cross_entropy_with_integer_labels(z, batch["label"][:, h])
           for h, z in enumerate(heads))
  accuracy = jnp.mean(jnp.stack([jnp.argmax(z, -1) == batch["label"][:, h]
                                 for h, z in enumerate(heads)]))
  return jnp.mean(ce), ({"cross_entropy": jnp.mean(ce), "accuracy": accuracy},
                        updates.get("batch_stats", {}))


def stage(name: str, module: nn.Module, head_sizes: tuple[int, ...], examples: Examples,
          cfg: ml_collections.ConfigDict, seed: int, rng_impl: str,
          warm_start=None) -> train.Stage:
  """The stage training `module` on `examples` (their labels [N, heads], every one
  >= 0) by `cfg` (a config section: steps, batch_size, optimizer); its name draws its
  initial weights' key and its batches."""

  def batches(step):
    rows = examples.rows(cfg.batch_size, seed, name, step)
    return {"image": examples.read(examples.indices[rows], name, step),
            "label": examples.labels[rows]}

  x = examples.example()

  def init(key):
    variables = module.init(key, x, train=False)
    return {"params": {"net": variables["params"]}, "batch_stats": variables["batch_stats"]}

  return train.Stage(name, supervised_loss, Supervised(module, tuple(head_sizes)), None,
                     batches, init, data.stream_key(seed, rng_impl, name), cfg.optimizer,
                     cfg.steps, warm_start=warm_start)
