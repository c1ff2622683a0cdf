"""Amalgamation: one network learns its heads from groups of frozen networks.

One loss serves every stage. The network being trained has one head per group; the
networks of a group (K teachers, or one component) are frozen and give targets on
every image. A group's frozen networks come as stacks, one per architecture (teachers
of one architecture run as one stacked program); teachers of different widths and
depths meet through their bridges, and taps of another spatial size are resized to
the network's:
  stage 1       a component (one head) from its group's K teachers;
  stage 2       the student (G heads) from the G components, one per group (K = 1),
                whose own features are the targets (no bridges on their side);
  single stage  the student (G heads) from the G groups of teachers directly.

Per group, per teacher k and sample b:
  L[k, b] = feature_weight * sum_l MSE(S_k^l(F_net^l), T_k^l(F_k^l)) + D(m_k * z_net, z_k)
with z_k the teacher's logits restricted to the part, D the MSE (the method) or a KD
divergence, and the batch loss mean_b sum_k w[b, k] L[k, b] + lambda * WN(T), where the
selection rule gives the weights w (one-hot on the least ambiguous teacher for the
method; see `ambiguity.RULES`) from the score amb[k, b] + atypicality_weight * a[k, b]:
the teacher's ambiguity and how unlike its training images the image is
(`ambiguity.atypicality`; weight 0: the paper's score).

With a `rest`, z_k carries one more logit, the teacher's mass outside the part
(`joint.rest_logit`; 'mean': agreed by the group's teachers, 'typical': by those the
image is typical for), which a component learns as an extra output. A network of
several heads with rests may also learn, at joint_weight, the joint distribution over
all the heads' classes that its targets give together (`_joint_loss`).

The frozen networks are a tuple over groups of tuples over stacks of `FrozenStack`
(the architecture, static, beside its arrays).

Trainable parameters: {'net': the network, 'groups': {str(g): {
  'net_bridges': [K] bridge sets S_k on the network's features,
  'frozen_bridges': per stack s, [K_s] bridge sets T_k on its networks' features
    (absent when the frozen features are compared as they are),
  'logit_scale': [K] learnable scalars m_k}}}; k runs over the group's stacks in order.
"""
import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from kamal_jax import ambiguity, data, evaluate, joint, losses, models, parallel, tasks, train
from kamal_jax.examples import Examples
from kamal_jax.models import Bridges, Outputs
from kamal_jax.teachers import (TeacherStack, atypicality, scan_stacked, stack_variables,
                                stacked_apply, sub_stacks)

__all__ = ["Amalgamation", "amalgamation_loss", "batches", "component_frozen",
           "FrozenStack", "frozen_outputs", "group_frozen", "init", "LOGIT_LOSSES",
           "metric_labels", "metric_name", "resized", "settings", "shapes_of", "single_stage",
           "stack_tap_shapes", "stage", "stage1", "stage2", "tap_shapes", "VECTOR_METRICS"]


@flax.struct.dataclass
class FrozenStack:
  """K_s frozen networks of one architecture in a group: what gives the targets."""
  module: nn.Module = flax.struct.field(pytree_node=False)  # their architecture
  nets: object  # their variables, every leaf [K_s, ...]
  index: jnp.ndarray  # [K_s, P] the part's positions in each network's logits
  outside: jnp.ndarray | None = None  # [K_s, C] bool: the classes of the head that
  #   holds the part, but the part's (read where the targets carry a rest logit)


@dataclasses.dataclass(frozen=True)
class Amalgamation:
  """What a stage trains and how (static, hashable: one compiled step per value)."""
  net: nn.Module
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
  rest: str = "none"  # 'none', or the targets carry a rest logit: joint.RESTS
  typical_temperature: float = 0.05  # of the 'typical' rest, in nats of atypicality
  atypicality_weight: float = 0.0  # of the atypicality in the selection score
  joint_weight: float = 0.0  # of the joint KL over all heads' classes (`_joint_loss`)
  teacher_chunk: int = 0  # frozen networks run per traced body (`scan_stacked`); 0: all

  def __post_init__(self):
    if self.joint_weight and self.rest == "none":
      raise ValueError(f"joint_weight={self.joint_weight} needs the heads' rest logits: "
                       "give a rest (joint.RESTS), or joint_weight=0.")


LOGIT_LOSSES = {
    "mse": lambda predicted, target, temperature: losses.mse(predicted, target, batch_dims=2),
    "kd": lambda predicted, target, temperature: losses.kd_kl(predicted, target, temperature),
}


def _train_apply(module: nn.Module, params, batch_stats, x):
  outputs, updates = module.apply({"params": params, "batch_stats": batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
  return outputs, updates.get("batch_stats", {})


def _kernels(bridge_params, taps: int) -> list:
  """A bridge set's 1x1 kernels as matrices: [K, D, c] per tap."""
  return [bridge_params[f"tap{l}"]["kernel"][:, 0, 0] for l in range(taps)]


def _bridge(bridge_params, feats, stacked_feats: bool) -> tuple:
  """K bridge sets (`Bridges` parameters, per tap a kernel [K, 1, 1, D, c]) on
  features: stacked feats [K, B, H, W, D] map one to one; shared feats [B, H, W, D]
  go through every set. Returns ([K, B, H, W, c] per tap).

  A bridge is a 1x1 convolution, so K of them are one batched matrix product per tap:
  one operation whatever K is, where K convolutions (unrolled, or grouped by vmap)
  grow the program with K."""
  pattern = "kbhwd,kdc->kbhwc" if stacked_feats else "bhwd,kdc->kbhwc"
  return tuple(jnp.einsum(pattern, f, kernel)
               for f, kernel in zip(feats, _kernels(bridge_params, len(feats))))


def _bridge_chosen(bridge_params, feats, weights) -> tuple:
  """K bridge sets on features [B, H, W, D] per tap, each sample through the set its
  one-hot weights [B, K] choose (a zero output where they are all zero). Returns
  ([B, H, W, c] per tap)."""
  return tuple(jnp.einsum("bhwd,bdc->bhwc", f, jnp.einsum("bk,kdc->bdc", weights, kernel))
               for f, kernel in zip(feats, _kernels(bridge_params, len(feats))))


def _feature_mse(predicted: tuple, target: tuple, batch_dims: int = 2) -> jnp.ndarray:
  """Sum over taps of the per-sample MSE: ([K, B, H, W, D] per tap) -> [K, B] (or
  [B, H, W, D] -> [B] with batch_dims 1)."""
  return sum(losses.mse(p, t, batch_dims=batch_dims) for p, t in zip(predicted, target))


def resized(feats: tuple, like: tuple) -> tuple:
  """Taps [..., B, H', W', c] (stacked or not) resized (bilinear) to the spatial size
  of the network's taps [B, H, W, D] where they differ."""
  def one(f, reference):
    size = reference.shape[1:3]
    if f.shape[-3:-1] == size:
      return f
    return jax.image.resize(f, f.shape[:-3] + size + f.shape[-1:], method="linear")
  return tuple(one(f, r) for f, r in zip(feats, like))


def frozen_outputs(stack: FrozenStack, x, outputs) -> Outputs:
  """A frozen stack's eval-mode outputs on x, [K_s, B, ...]: read from `outputs` (the
  batch's 'frozen' entry for the stack, [B, K_s, ...], computed before the stage)
  where given, else run (no gradient flows into them)."""
  if outputs is None:
    return jax.lax.stop_gradient(stacked_apply(stack.module, stack.nets, x, in_step=True))
  return _networks_first(outputs)


def _networks_first(outputs: Outputs) -> Outputs:
  """Outputs computed before the stage, [B, K_s, ...], as the step's [K_s, B, ...]."""
  return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), outputs)


@flax.struct.dataclass
class _Choice:
  """Per sample, the frozen network a one-hot rule chose so far, and its features."""
  tier: jnp.ndarray  # [B] int
  score: jnp.ndarray  # [B]
  network: jnp.ndarray  # [B] int: its position k in the group
  feats: tuple = ()  # per tap [B, H, W, D]

  def merge(self, other: "_Choice") -> "_Choice":
    """`other` where it is strictly better (a lower tier, or the same tier and a lower
    score), so that ties keep the earlier network, as argmin does."""
    better = (other.tier < self.tier) | ((other.tier == self.tier) & (other.score < self.score))
    return jax.tree.map(
        lambda a, b: jnp.where(better.reshape(better.shape + (1,) * (a.ndim - 1)), b, a),
        self, other)


def _selection_inputs(spec: Amalgamation, part, atypical, labels):
  """What a rule selects by, per network and sample ([..., B]), from the networks'
  logits of the part [..., B, P]: their ambiguity, the score (ambiguity plus the
  weighted atypicality) and, where labels are given (the oracle), whether the
  network's prediction is right."""
  amb = ambiguity.get(spec.ambiguity)(part)
  correct = None if labels is None else jnp.argmax(part, axis=-1) == labels[None]
  return amb, amb + spec.atypicality_weight * atypical, correct


def _stack_pass(spec: Amalgamation, stack: FrozenStack, x, outputs, first: int, count: int,
                key, labels):
  """A stack's networks on x, `spec.teacher_chunk` at a time (`scan_stacked`).

  Returns (choice, (per_network, feats)): per network its targets (restricted logits
  [K_s, B, P], or [K_s, B, P + 1] with its own rest logit) and what the rule selects
  by (`_selection_inputs`); for a one-hot rule the choice among them per sample
  (`_Choice`: one network's features per sample, the live memory of the chunk, not
  of K) and no feats, else no choice and their feats ([K_s, B, H, W, D] per tap).
  `first`: the stack's first position among the group's `count` networks; outputs,
  key, labels: see `_group_loss`."""
  rule = ambiguity.RULES[spec.selection]
  part_size = stack.index.shape[-1]
  run = lambda nets: jax.lax.stop_gradient(
      stacked_apply(stack.module, nets, x, in_step=True))

  def chunk(best, nets, index, outside, k, out):  # leaves [c, ...]
    out = run(nets) if out is None else out
    atypical = atypicality(nets, out)
    if spec.rest != "none":
      target = joint.rest_logit(out.logits, index, outside)
    else:
      target = jnp.take_along_axis(out.logits, index[:, None, :], axis=-1)
    amb, score, correct = _selection_inputs(spec, target[..., :part_size], atypical,
                                            labels)  # [c, B]
    per_network = (target, amb, atypical, score, correct)
    if not rule.one_hot:
      return best, (per_network, out.feats)
    tier = jnp.broadcast_to(rule.tier(k, key, correct, count), score.shape)
    i, rows = ambiguity.choose(tier, score), jnp.arange(score.shape[1])  # [B]
    here = _Choice(tier[i, rows], score[i, rows], k[i], tuple(f[i, rows] for f in out.feats))
    return best.merge(here), (per_network, None)

  size = jax.tree.leaves(stack.nets)[0].shape[0]
  outputs = None if outputs is None else _networks_first(outputs)
  best = ()
  if rule.one_hot:
    taps = jax.eval_shape(run, jax.tree.map(lambda a: a[:1], stack.nets)).feats  # [1, B, ...]
    batch = x.shape[0]
    best = _Choice(jnp.full((batch,), jnp.iinfo(jnp.int32).max, jnp.int32),
                   jnp.full((batch,), jnp.inf), jnp.zeros((batch,), jnp.int32),
                   tuple(jnp.zeros(t.shape[1:], t.dtype) for t in taps))
  return scan_stacked(chunk, best, stack.nets, stack.index, stack.outside,
                      first + jnp.arange(size), outputs, chunk=spec.teacher_chunk)


def _group_loss(spec: Amalgamation, params, group: tuple[FrozenStack, ...], x, logits, feats,
                key, labels, outputs):
  """Group g's term: logits [B, H] of the network's head (H = P, or P + 1 where a
  component learns the rest logit too) and its feats; key [B] (one PRNG key per
  sample) only for the random rule, labels [B] (positions in the part, -1 outside it)
  only for the oracle rule; outputs: the stacks' outputs on x computed beforehand
  ([B, K_s, ...]), or None to run them. Returns (loss, metrics, target): target [B, H]
  the logits the head learns, by the selection's weights over the group's networks.

  Under a one-hot rule the frozen features reach the loss only through each sample's
  chosen network, so the step keeps one network's features per sample; a rule that
  weighs every network keeps every network's."""
  sizes = [jax.tree.leaves(stack.nets)[0].shape[0] for stack in group]
  firsts, count = np.cumsum([0] + sizes)[:-1], sum(sizes)
  passes = [_stack_pass(spec, stack, x, None if outputs is None else outputs[s], first, count,
                        key, labels) for s, (stack, first) in enumerate(zip(group, firsts))]
  choices, passed = zip(*passes)
  per_network, frozen_feats = zip(*passed)
  target, amb, atypical, score, correct = jax.tree.map(lambda *a: jnp.concatenate(a),
                                                       *per_network)  # [K, B, ...]
  if spec.rest != "none":
    target = joint.RESTS[spec.rest](target, atypical, spec.typical_temperature)

  weight_norm, targets = jnp.zeros(()), []
  if spec.frozen_bridges:
    for bridges in params["frozen_bridges"]:  # per tap [K_s, 1, 1, D, c]
      weight_norm += sum(jnp.sum(jax.vmap(losses.weight_norm_penalty)(k))
                         for k in jax.tree.leaves(bridges))
  if not ambiguity.RULES[spec.selection].one_hot:
    weights = ambiguity.weights(spec.selection, score, key=key, correct=correct,
                                temperature=spec.temperature)
    for s, stack_feats in enumerate(frozen_feats):
      bridged = (_bridge(params["frozen_bridges"][s], stack_feats, True)
                 if spec.frozen_bridges else stack_feats)
      targets.append(resized(bridged, feats))
    joined = tuple(jnp.concatenate(taps) for taps in zip(*targets))
    feature = losses.masked_mean(
        _feature_mse(_bridge(params["net_bridges"], feats, False), joined), weights)
  else:
    chosen = functools.reduce(_Choice.merge, [c.replace(feats=()) for c in choices])
    weights = jax.nn.one_hot(chosen.network, count, dtype=amb.dtype)  # [B, K]
    for s, (choice, first, size) in enumerate(zip(choices, firsts, sizes)):
      mine = weights[:, first:first + size]  # [B, K_s]: zero where another stack's
      bridged = (_bridge_chosen(params["frozen_bridges"][s], choice.feats, mine)
                 if spec.frozen_bridges else
                 tuple(f * jnp.sum(mine, axis=1)[:, None, None, None] for f in choice.feats))
      targets.append(resized(bridged, feats))
    joined = tuple(sum(taps) for taps in zip(*targets))  # [B, H, W, c] per tap
    feature = jnp.mean(_feature_mse(_bridge_chosen(params["net_bridges"], feats, weights),
                                    joined, batch_dims=1))

  scaled = params["logit_scale"][:, None, None] * logits[None]  # [K, B, H]
  regressed = target[..., :logits.shape[-1]]  # the part's logits (and the rest)
  logit = LOGIT_LOSSES[spec.logit_loss](scaled, regressed, spec.kd_temperature)  # [K, B]
  loss = (spec.feature_weight * feature + losses.masked_mean(logit, weights)
          + spec.weight_norm * weight_norm)
  metrics = {
      "feature_loss": feature,
      "logit_loss": losses.masked_mean(logit, weights),
      "weight_norm": weight_norm,
      "selected_fraction": jnp.mean(weights, axis=0),  # [K]
      "ambiguity": jnp.mean(amb, axis=1),  # [K]
      "atypicality": jnp.mean(atypical, axis=1),  # [K]
  }
  return loss, metrics, jnp.einsum("bk,kbh->bh", weights, regressed)


def _joint_loss(spec: Amalgamation, logits, targets):
  """KL(target || network) of the joint distributions over every head's classes
  (`joint.scores`): the network's logits [B, sum of head_sizes] and the heads'
  targets (per head [B, H_g], each with its rest logit). Each head's own term
  learns its part's decision and its rest; this asks for the one decision across
  the parts that the joint rule takes. [B]."""
  target = joint.scores(jnp.concatenate(targets, axis=-1), spec.head_sizes, rest=True)
  return losses.kd_kl(joint.scores(logits, spec.head_sizes, rest=True), target,
                      spec.kd_temperature)


# The per-group metrics with one entry per frozen network of the group ([K]).
VECTOR_METRICS = ("selected_fraction", "ambiguity", "atypicality")


def metric_name(g: int, name: str) -> str:
  """The name of group g's metric `name`: the one place metric names are built."""
  return f"{g}/{name}"


def metric_labels(networks_per_group) -> dict[str, tuple[str, ...]]:
  """{metric name: its entries' names} for the vector metrics of groups whose frozen
  networks bear these names (what a stage's `labels` and the metric log read)."""
  return {metric_name(g, metric): tuple(names) for g, names in enumerate(networks_per_group)
          for metric in VECTOR_METRICS}


def amalgamation_loss(spec: Amalgamation, params, batch_stats, frozen, batch):
  """The loss of one step: a pure function, for `jax.value_and_grad` in any loop.

  Args:
    spec: what is trained and how (static).
    params: {'net': the trained network's params, 'groups': {str(g): its bridges and
      logit scales}}, as `init` makes them.
    batch_stats: the trained network's batch statistics.
    frozen: per group (head), its FrozenStacks: ((FrozenStack, ...), ...).
    batch: {'image': [B, H, W, C]}, plus 'key' ([B, 2] raw PRNG key data, one per
      image) for the random rule and 'label' ([B, G]: each image's position in head g's part, -1 outside
      it) for the oracle rule (no other stage-1 or stage-2 batch carries labels);
      plus 'frozen' where the frozen networks' outputs on these images were computed
      before the stage (per group, per stack, Outputs [B, K_s, ...]): then they do
      not run.
  Returns:
    (loss [], (metrics {'g/name': per-group values}, new batch_stats)).
  """
  x = batch["image"]
  net, batch_stats = _train_apply(spec.net, params["net"], batch_stats, x)
  keys = jax.random.wrap_key_data(batch["key"]) if "key" in batch else None  # [B]
  total, metrics, targets = 0.0, {}, []
  for g, logits in enumerate(joint.split_heads(net.logits, spec.head_sizes)):
    loss, group_metrics, target = _group_loss(
        spec, params["groups"][str(g)], frozen[g], x, logits, net.feats,
        None if keys is None else jax.vmap(jax.random.fold_in, (0, None))(keys, g),
        batch["label"][:, g] if "label" in batch else None,
        batch["frozen"][g] if "frozen" in batch else None)
    total, targets = total + loss, targets + [target]
    metrics.update({metric_name(g, name): value for name, value in group_metrics.items()})
  if spec.joint_weight:
    metrics["joint_loss"] = jnp.mean(_joint_loss(spec, net.logits, targets))
    total = total + spec.joint_weight * metrics["joint_loss"]
  return total, (metrics, batch_stats)


def stack_tap_shapes(stack: FrozenStack, x) -> tuple:
  """The shapes of each feature tap of one network of the stack on x (its variables'
  shapes suffice)."""
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stack.nets)
  return tap_shapes(stack.module, one, x)


def tap_shapes(module: nn.Module, variables, x) -> tuple:
  """The shapes of each feature tap of `module` with `variables` (shapes suffice) on x."""
  return tuple(f.shape for f in jax.eval_shape(
      lambda v: module.apply(v, x, train=False), variables).feats)


def _init_bridges(key, widths, in_widths, count: int):
  """`count` bridge sets from in_widths to widths, stacked: leaves [count, ...]."""
  feats = tuple(jnp.zeros((1, 1, 1, d)) for d in in_widths)
  init = lambda k: Bridges(widths).init(k, feats)["params"]
  return jax.vmap(init)(jax.random.split(key, count))


def init(spec: Amalgamation, key, frozen_shapes, x) -> dict:
  """The initial variables of a stage.

  Args:
    spec: the stage.
    key: a PRNG key.
    frozen_shapes: `frozen` (see `amalgamation_loss`); shapes suffice
      (`shapes_of`): `jax.eval_shape` reads the frozen networks' taps.
    x: an example batch [1, H, W, C].
  Returns:
    {'params': {'net', 'groups'}, 'batch_stats'}.
  """
  k_net, k_groups = jax.random.split(key)
  variables = spec.net.init(k_net, x, train=False)
  net_taps = tap_shapes(spec.net, variables, x)
  groups = {}
  for g, (k_group, stacks) in enumerate(zip(jax.random.split(k_groups, len(spec.head_sizes)),
                                            frozen_shapes)):
    counts, in_widths = [], []
    for stack in stacks:
      counts.append(jax.tree.leaves(stack.nets)[0].shape[0])
      taps = stack_tap_shapes(stack, x)
      if len(taps) != len(net_taps):
        raise ValueError(
            f"Head {g}'s frozen networks have {len(taps)} feature taps and the network "
            f"being trained has {len(net_taps)}: use architectures with as many stages.")
      in_widths.append(tuple(t[-1] for t in taps))
    keys = jax.random.split(k_group, 1 + len(counts))
    groups[str(g)] = {"net_bridges": _init_bridges(keys[0], spec.bridge_widths,
                                                   [t[-1] for t in net_taps], sum(counts)),
                      "logit_scale": jnp.ones((sum(counts),))}
    if spec.frozen_bridges:
      groups[str(g)]["frozen_bridges"] = [
          _init_bridges(k, spec.bridge_widths, widths, count)
          for k, widths, count in zip(keys[1:], in_widths, counts)]
  return {"params": {"net": variables["params"], "groups": groups},
          "batch_stats": variables.get("batch_stats", {})}


# --- stages: the method's stages as values (`train.Stage`) -----------------------------

def settings(cfg: ml_collections.ConfigDict) -> dict:
  """The method's settings in a config section (config.stage1) as Amalgamation fields."""
  return dict(bridge_widths=tuple(cfg.bridge_widths), selection=cfg.selection,
              ambiguity=cfg.ambiguity, temperature=cfg.temperature,
              weight_norm=cfg.weight_norm, feature_weight=cfg.feature_weight,
              logit_loss=cfg.logit_loss, kd_temperature=cfg.kd_temperature, rest=cfg.rest,
              typical_temperature=cfg.typical_temperature,
              atypicality_weight=cfg.atypicality_weight, teacher_chunk=cfg.teacher_chunk)


def group_frozen(plan: tasks.AmalgamationPlan, pool: list[TeacherStack],
                 group: tasks.Group) -> tuple[FrozenStack, ...]:
  """A group's teachers as the group's FrozenStacks, one per stack of the pool."""
  subs = sub_stacks(pool, group.teachers)
  ends = np.cumsum([len(s.names) for s in subs])[:-1]
  return tuple(FrozenStack(s.module, s.variables, index, np.stack(
      [plan.label_spaces[n].outside(group.part.classes) for n in s.names]))
               for s, index in zip(subs, np.split(group.index, ends)))


def component_frozen(module: nn.Module, variables, part_size: int) -> tuple[FrozenStack]:
  """A component as a group of one FrozenStack (K = 1): its part's logits first, and
  after them its rest logit where it learned one."""
  return (FrozenStack(module, stack_variables([variables]),
                      np.arange(part_size, dtype=np.int32)[None],
                      (np.arange(module.num_outputs) >= part_size)[None]),)


def _outputs_once(frozen, examples: Examples, batch_size: int, cache_mb: float):
  """The frozen networks' outputs on every image of `examples`, computed once for a
  stage: per group, per stack, Outputs of [N, K_s, ...] host arrays. Only where every
  epoch shows the same images (no augmentation) and the outputs fit in `cache_mb`;
  else None, and each step runs the frozen networks."""
  x = examples.example()
  shapes = lambda stack: jax.eval_shape(
      lambda v: stacked_apply(stack.module, v, x, in_step=False), stack.nets)
  per_image = sum(a.size * a.dtype.itemsize for group in frozen for stack in group
                  for a in jax.tree.leaves(shapes(stack)))
  megabytes = per_image * len(examples.indices) / 2**20
  if examples.augments or megabytes > cache_mb:
    return None
  logging.info("Computing the frozen networks' outputs once: %.0f MB.", megabytes)
  read = lambda at: examples.read(examples.indices[at], None, 0)
  return tuple(tuple(evaluate.predict(stack.module, stack.nets, read, len(examples.indices),
                                      batch_size, stacked=True, returns="outputs")
                     for stack in group) for group in frozen)


def batches(name: str, frozen, examples: Examples, batch_size: int, rule: ambiguity.Rule, *,
            seed: int, eval_batch_size: int, frozen_output_cache_mb: float):
  """step -> the batch of a stage that learns from `frozen` networks on `examples`:
  'image'; 'frozen', the frozen networks' outputs, where they are computed once for
  the stage (`_outputs_once`); a PRNG key per image ('key', [B, 2]) and the images'
  positions in the network's parts ('label', [B, G]) where the selection `rule`
  needs them."""
  cached = functools.cache(lambda: _outputs_once(frozen, examples, eval_batch_size,
                                                 frozen_output_cache_mb))

  def batch(step):
    rows = examples.rows(batch_size, seed, name, step)
    out = {"image": examples.read(examples.indices[rows], name, step)}
    if cached() is not None:
      out["frozen"] = jax.tree.map(lambda a: a[rows], cached())
    if rule.needs_labels:
      out["label"] = examples.labels[rows]
    if rule.needs_key:
      keys = data.stream_rng(seed, f"{name}/keys", step).integers(
          0, 2**32, size=(batch_size, 2), dtype=np.uint32)
      out["key"] = parallel.local_rows(keys)
    return out

  return batch


def shapes_of(tree):
  """The tree's shapes and dtypes (what `init` reads of the frozen networks)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), tree)


def stage(name: str, spec: Amalgamation, frozen, examples: Examples,
          cfg: ml_collections.ConfigDict, labels, *, seed: int, rng_impl: str,
          eval_batch_size: int, frozen_output_cache_mb: float,
          warm_start=None) -> train.Stage:
  """The stage training spec.net by `amalgamation_loss` on `examples` (their labels:
  [N, G] positions in the network's parts, read by the oracle rule only; see
  `batches`), by `cfg` (a config section: steps, batch_size, optimizer); `labels`
  names the entries of its per-group metrics."""
  batch = batches(name, frozen, examples, cfg.batch_size,
                  ambiguity.RULES[spec.selection], seed=seed, eval_batch_size=eval_batch_size,
                  frozen_output_cache_mb=frozen_output_cache_mb)
  shapes, x = shapes_of(frozen), examples.example()
  return train.Stage(name, amalgamation_loss, spec, frozen, batch,
                     lambda key: init(spec, key, shapes, x),
                     data.stream_key(seed, rng_impl, name), cfg.optimizer, cfg.steps,
                     labels, warm_start)


def stage1(name: str, plan: tasks.AmalgamationPlan, pool: list[TeacherStack],
           group: tasks.Group, net: nn.Module, method: ml_collections.ConfigDict,
           examples: Examples, **how) -> train.Stage:
  """A component `net` (one head) from its group's teachers, by the method's
  settings and training section `method` (config.stage1); `how`: see `stage`."""
  spec = Amalgamation(net=net, head_sizes=(net.num_outputs,), **settings(method))
  return stage(name, spec, (group_frozen(plan, pool, group),), examples, method,
               metric_labels([group.teachers]), **how)


def single_stage(name: str, plan: tasks.AmalgamationPlan, pool: list[TeacherStack],
                 net: nn.Module, head_sizes, method: ml_collections.ConfigDict,
                 cfg: ml_collections.ConfigDict, examples: Examples, **how) -> train.Stage:
  """The student `net` (a head per group) from every group's teachers directly, by the
  method's settings (config.stage1) and training section `cfg` (config.stage2)."""
  spec = Amalgamation(net=net, head_sizes=tuple(head_sizes), joint_weight=cfg.joint_weight,
                      **settings(method))
  frozen = tuple(group_frozen(plan, pool, group) for group in plan.groups)
  return stage(name, spec, frozen, examples, cfg,
               metric_labels([group.teachers for group in plan.groups]), **how)


def stage2(name: str, parts, components: list[tuple[nn.Module, dict]], net: nn.Module,
           head_sizes, method: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
           examples: Examples, **how) -> train.Stage:
  """The student `net` from the components ((module, variables), one per part):
  head g regresses component g's logits (and rest, by `method.rest`) and features on
  every image, no selection, no bridges on the components' side."""
  frozen = tuple(component_frozen(module, variables, len(part.classes))
                 for (module, variables), part in zip(components, parts))
  spec = Amalgamation(**dict(
      settings(method), net=net, head_sizes=tuple(head_sizes),
      bridge_widths=models.tap_widths(components[0][0], examples.example()),
      frozen_bridges=False, selection="least", feature_weight=1.0, logit_loss=cfg.logit_loss,
      joint_weight=cfg.joint_weight))
  return stage(name, spec, frozen, examples, cfg,
               metric_labels([(part.name,) for part in parts]), **how)
