"""Amalgamation: one network learns its heads from groups of frozen networks.

One loss serves every stage. The network being trained has one head per group; the
networks of a group (K teachers, or one component) are frozen, stacked and give
targets on every image:
  stage 1       a component (one head) from its group's K teachers;
  stage 2       the student (G heads) from the G components, one per group (K = 1),
                whose own features are the targets (no bridges on their side);
  single stage  the student (G heads) from the G groups of teachers directly.

Per group, per teacher k and sample b:
  L[k, b] = feature_weight * sum_l MSE(S_k^l(F_net^l), T_k^l(F_k^l)) + D(m_k * z_net, z_k)
with z_k the teacher's logits restricted to the part, D the MSE (the method) or a KD
divergence, and the batch loss mean_b sum_k w[b, k] L[k, b] + lambda * WN(T), where the
selection rule gives the weights w (one-hot on the least ambiguous teacher for the
method; see `ambiguity.RULES`).

Trainable parameters: {'net': the network, 'groups': {str(g): {
  'net_bridges': [K] bridge sets S_k on the network's features,
  'frozen_bridges': [K] bridge sets T_k on the frozen networks' features (if any),
  'logit_scale': [K] learnable scalars m_k}}}.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kamal_jax import ambiguity, losses
from kamal_jax.models import Bridges
from kamal_jax.teachers import map_stacked, stacked_apply


@dataclasses.dataclass(frozen=True)
class Amalgamation:
  """What a stage trains and how (static, hashable: one compiled step per value)."""
  net: nn.Module
  frozen_nets: tuple[nn.Module, ...]  # the architecture of each group's frozen stack
  head_sizes: tuple[int, ...]  # the network's heads, one per group
  bridge_widths: tuple[int, ...]  # outputs of the network-side bridges, per tap
  frozen_bridges: bool = True  # False: compare with the frozen features themselves
  selection: str = "least"
  ambiguity: str = "entropy"
  temperature: float = 1.0  # of the 'soft' rule
  weight_norm: float = 1.0  # weight of the frozen-side bridges' weight-norm penalty
  feature_weight: float = 1.0  # 0 leaves logit distillation alone
  logit_loss: str = "mse"  # 'mse' (the method) or 'kd'
  kd_temperature: float = 4.0


LOGIT_LOSSES = {
    "mse": lambda predicted, target, temperature: losses.mse(predicted, target, batch_dims=2),
    "kd": lambda predicted, target, temperature: losses.kd_kl(predicted, target, temperature),
}


def _train_apply(module: nn.Module, params, batch_stats, x):
  outputs, updates = module.apply({"params": params, "batch_stats": batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
  return outputs, updates["batch_stats"]


def _bridge(widths, bridge_params, feats, stacked_feats: bool) -> tuple:
  """K bridge sets on features: stacked feats [K, B, ...] map one to one; shared
  feats [B, ...] go through every set. Returns ([K, B, H, W, c] per tap)."""
  apply = lambda p, f: Bridges(widths).apply({"params": p}, f)
  if stacked_feats:
    return map_stacked(apply, bridge_params, feats)
  return map_stacked(lambda p: apply(p, feats), bridge_params)


def _feature_mse(predicted: tuple, target: tuple) -> jnp.ndarray:
  """Sum over taps of the per-sample MSE: ([K, B, H, W, D] per tap) -> [K, B]."""
  return sum(losses.mse(p, t, batch_dims=2) for p, t in zip(predicted, target))


def _group_loss(spec: Amalgamation, g: int, params, frozen, x, logits, feats, key,
                labels):
  """Group g's term: logits [B, P] and feats of the network; labels [B] (positions
  in the part, -1 outside it) only for the oracle rule. Returns (loss, metrics)."""
  teacher = jax.lax.stop_gradient(stacked_apply(spec.frozen_nets[g], frozen["nets"], x))
  target = jnp.take_along_axis(teacher.logits, frozen["index"][:, None, :], axis=-1)  # [K, B, P]
  amb = ambiguity.get(spec.ambiguity)(target)  # [K, B]
  correct = None if labels is None else jnp.argmax(target, axis=-1) == labels[None]  # [K, B]
  weights = ambiguity.weights(spec.selection, amb, key=key, correct=correct,
                              temperature=spec.temperature)  # [B, K]

  predicted = _bridge(spec.bridge_widths, params["net_bridges"], feats, False)
  if spec.frozen_bridges:
    targets = _bridge(spec.bridge_widths, params["frozen_bridges"], teacher.feats, True)
    kernels = jax.tree.leaves(params["frozen_bridges"])  # per tap [K, 1, 1, D, c]
    weight_norm = sum(jnp.sum(jax.vmap(losses.weight_norm_penalty)(k)) for k in kernels)
  else:
    targets, weight_norm = teacher.feats, jnp.zeros(())
  feature = _feature_mse(predicted, targets)  # [K, B]
  scaled = params["logit_scale"][:, None, None] * logits[None]  # [K, B, P]
  logit = LOGIT_LOSSES[spec.logit_loss](scaled, target, spec.kd_temperature)  # [K, B]

  loss = (losses.masked_mean(spec.feature_weight * feature + logit, weights)
          + spec.weight_norm * weight_norm)
  metrics = {
      "feature_loss": losses.masked_mean(feature, weights),
      "logit_loss": losses.masked_mean(logit, weights),
      "weight_norm": weight_norm,
      "selected_fraction": jnp.mean(weights, axis=0),  # [K]
      "ambiguity": jnp.mean(amb, axis=1),  # [K]
  }
  return loss, metrics


def amalgamation_loss(spec: Amalgamation, params, batch_stats, frozen, batch):
  """The loss of one step.

  frozen: {'groups': {str(g): {'nets': stacked variables [K, ...], 'index': [K, P]
  logit positions of the part in each frozen network}}}.
  batch: {'image': [B, H, W, C]}, plus 'key' (raw PRNG key data) for the random
  rule and 'label' ([B] positions in the network's concatenated heads, -1 outside
  them) for the oracle rule; no other stage-1 or stage-2 batch carries labels.
  """
  x = batch["image"]
  net, batch_stats = _train_apply(spec.net, params["net"], batch_stats, x)
  key = jax.random.wrap_key_data(batch["key"]) if "key" in batch else None
  bounds = np.cumsum((0,) + spec.head_sizes)
  total, metrics = 0.0, {}
  for g, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
    labels = None
    if "label" in batch:
      inside = (batch["label"] >= start) & (batch["label"] < stop)
      labels = jnp.where(inside, batch["label"] - start, -1)
    loss, group_metrics = _group_loss(
        spec, g, params["groups"][str(g)], frozen["groups"][str(g)], x,
        net.logits[:, start:stop], net.feats,
        None if key is None else jax.random.fold_in(key, g), labels)
    total = total + loss
    metrics.update({f"{g}/{name}": value for name, value in group_metrics.items()})
  return total, (metrics, batch_stats)


def _tap_widths(module: nn.Module, variables, x) -> tuple[int, ...]:
  shapes = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
  return tuple(f.shape[-1] for f in shapes.feats)


def _init_bridges(key, widths, in_widths, count: int):
  """`count` bridge sets from in_widths to widths, stacked: leaves [count, ...]."""
  feats = tuple(jnp.zeros((1, 1, 1, d)) for d in in_widths)
  init = lambda k: Bridges(widths).init(k, feats)["params"]
  return jax.vmap(init)(jax.random.split(key, count))


def init(spec: Amalgamation, key, frozen_shapes, x) -> dict:
  """Initial {'params', 'batch_stats'}. frozen_shapes: the structure of `frozen`
  (shapes suffice: `jax.eval_shape` reads the frozen networks' tap widths); x is an
  example batch [1, H, W, C]."""
  k_net, k_groups = jax.random.split(key)
  variables = spec.net.init(k_net, x, train=False)
  net_widths = _tap_widths(spec.net, variables, x)
  groups = {}
  for g, k_group in enumerate(jax.random.split(k_groups, len(spec.head_sizes))):
    nets = frozen_shapes["groups"][str(g)]["nets"]
    count = jax.tree.leaves(nets)[0].shape[0]
    one = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), nets)
    k_net_side, k_frozen_side = jax.random.split(k_group)
    groups[str(g)] = {"net_bridges": _init_bridges(k_net_side, spec.bridge_widths,
                                                   net_widths, count),
                      "logit_scale": jnp.ones((count,))}
    if spec.frozen_bridges:
      groups[str(g)]["frozen_bridges"] = _init_bridges(
          k_frozen_side, spec.bridge_widths, _tap_widths(spec.frozen_nets[g], one, x),
          count)
  return {"params": {"net": variables["params"], "groups": groups},
          "batch_stats": variables["batch_stats"]}
