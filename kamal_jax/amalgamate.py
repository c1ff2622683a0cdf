"""Stage-1 and stage-2 amalgamation losses (pure functions) and their initialisers.

Trainable parameters of a stage form one dict:
  'net'             the network being trained (component in stage 1, student in 2),
  'net_bridges'     [K] bridge sets on the trained network's features,
  'teacher_bridges' [K] bridge sets on the teachers' features (stage 1 only),
  'logit_scale'     [K] learnable scalars m_k on the trained network's logits.
K is the number of teachers of the group (stage 1) or of components (stage 2).
The frozen networks (teachers, components) come in `frozen` and are never updated.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kamal_jax import ambiguity, losses
from kamal_jax.models import Bridges
from kamal_jax.teachers import map_stacked, stacked_apply


@dataclasses.dataclass(frozen=True)
class Stage1:
  """A group's amalgamation into a component net (static, hashable)."""
  component: nn.Module
  teacher: nn.Module
  bridge_widths: tuple[int, ...]  # common widths, one per tap
  ambiguity: str = "entropy"
  weight_norm: float = 1.0  # weight of the teacher-side bridge weight-norm penalty


@dataclasses.dataclass(frozen=True)
class Stage2:
  """The components' amalgamation into the multi-head student (static, hashable)."""
  student: nn.Module
  component: nn.Module
  component_widths: tuple[int, ...]  # the components' tap widths (bridge outputs)


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


def _scaled_logit_mse(scale, logits, target) -> jnp.ndarray:
  """MSE(m_k * logits[k], target[k]) per teacher and sample: [K], [K, B, P] -> [K, B]."""
  return losses.mse(scale[:, None, None] * logits, target, batch_dims=2)


def stage1_loss(spec: Stage1, params, batch_stats, frozen, batch):
  """Selective amalgamation of K teachers into a component.

  frozen: {'teachers': stacked teacher variables, 'index': [K, P] logit positions of
  the part in each teacher}. batch: {'image': [B, H, W, C]} (no labels).
  """
  x = batch["image"]
  teacher = jax.lax.stop_gradient(stacked_apply(spec.teacher, frozen["teachers"], x))
  target = jnp.take_along_axis(teacher.logits, frozen["index"][:, None, :], axis=-1)  # [K, B, P]
  amb = ambiguity.get(spec.ambiguity)(target)  # [K, B]
  mask = ambiguity.select(amb)  # [B, K]

  component, batch_stats = _train_apply(spec.component, params["net"], batch_stats, x)
  logits = jnp.broadcast_to(component.logits, target.shape)  # [K, B, P]
  feature = _feature_mse(
      _bridge(spec.bridge_widths, params["net_bridges"], component.feats, False),
      _bridge(spec.bridge_widths, params["teacher_bridges"], teacher.feats, True))
  logit = _scaled_logit_mse(params["logit_scale"], logits, target)
  kernels = jax.tree.leaves(params["teacher_bridges"])  # per tap [K, 1, 1, D, c]
  weight_norm = sum(jnp.sum(jax.vmap(losses.weight_norm_penalty)(k)) for k in kernels)

  loss = losses.masked_mean(feature + logit, mask) + spec.weight_norm * weight_norm
  metrics = {
      "feature_loss": losses.masked_mean(feature, mask),
      "logit_loss": losses.masked_mean(logit, mask),
      "weight_norm": weight_norm,
      "selected_fraction": jnp.mean(mask, axis=0),  # [K]
      "ambiguity": jnp.mean(amb, axis=1),  # [K]
  }
  return loss, (metrics, batch_stats)


def stage2_loss(spec: Stage2, params, batch_stats, frozen, batch):
  """Amalgamation of G components into the student, head g regressing component g.

  frozen: {'components': stacked component variables}. batch: {'image': [B, ...]}.
  No selection: every component supervises its own head on every sample, so the
  mask of the stage-1 reduction is all ones.
  """
  x = batch["image"]
  component = jax.lax.stop_gradient(stacked_apply(spec.component, frozen["components"], x))
  num_components, batch_size, part_size = component.logits.shape  # [G, B, P]

  student, batch_stats = _train_apply(spec.student, params["net"], batch_stats, x)
  heads = student.logits.reshape(batch_size, num_components, part_size).transpose(1, 0, 2)
  feature = _feature_mse(
      _bridge(spec.component_widths, params["net_bridges"], student.feats, False),
      component.feats)
  logit = _scaled_logit_mse(params["logit_scale"], heads, component.logits)

  every = jnp.ones((batch_size, num_components))
  loss = losses.masked_mean(feature + logit, every)
  metrics = {"feature_loss": losses.masked_mean(feature, every),
             "logit_loss": losses.masked_mean(logit, every)}
  return loss, (metrics, batch_stats)


def _init_net(module: nn.Module, key, x):
  variables = module.init(key, x, train=False)
  return variables["params"], variables["batch_stats"]


def _init_bridges(key, widths, in_widths, count: int):
  """`count` bridge sets from in_widths to widths, stacked: leaves [count, ...]."""
  feats = tuple(jnp.zeros((1, 1, 1, d)) for d in in_widths)
  init = lambda k: Bridges(widths).init(k, feats)["params"]
  return jax.vmap(init)(jax.random.split(key, count))


def _tap_widths(module: nn.Module, variables, x) -> tuple[int, ...]:
  shapes = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
  return tuple(f.shape[-1] for f in shapes.feats)


def init_stage1(spec: Stage1, key, teacher_variables, x):
  """Initial {'params', 'batch_stats'} of stage 1 for the stacked teachers; x is an
  example batch [1, H, W, C]."""
  num_teachers = jax.tree.leaves(teacher_variables)[0].shape[0]
  one_teacher = jax.tree.map(lambda leaf: leaf[0], teacher_variables)
  k_net, k_net_bridges, k_teacher_bridges = jax.random.split(key, 3)
  net, batch_stats = _init_net(spec.component, k_net, x)
  component_widths = _tap_widths(spec.component, {"params": net, "batch_stats": batch_stats}, x)
  params = {
      "net": net,
      "net_bridges": _init_bridges(k_net_bridges, spec.bridge_widths,
                                   component_widths, num_teachers),
      "teacher_bridges": _init_bridges(k_teacher_bridges, spec.bridge_widths,
                                       _tap_widths(spec.teacher, one_teacher, x),
                                       num_teachers),
      "logit_scale": jnp.ones((num_teachers,)),
  }
  return {"params": params, "batch_stats": batch_stats}


def init_stage2(spec: Stage2, key, num_components: int, x):
  """Initial {'params', 'batch_stats'} of stage 2; x is an example batch [1, ...]."""
  k_net, k_bridges = jax.random.split(key)
  net, batch_stats = _init_net(spec.student, k_net, x)
  student_widths = _tap_widths(spec.student, {"params": net, "batch_stats": batch_stats}, x)
  params = {
      "net": net,
      "net_bridges": _init_bridges(k_bridges, spec.component_widths, student_widths,
                                   num_components),
      "logit_scale": jnp.ones((num_components,)),
  }
  return {"params": params, "batch_stats": batch_stats}
