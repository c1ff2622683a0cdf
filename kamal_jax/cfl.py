"""Common Feature Learning (Luo et al., IJCAI 2019, "Knowledge Amalgamation from
Heterogeneous Networks by Common Feature Learning") as a pipeline kind: the student
learns from every teacher at once, in one stage, with no selection.

Each network's deepest feature map is carried into one common space: an adapter of
its own (a 1x1 convolution and a ReLU, to C = D_s / 4 channels, D_s the student's
width there), then one extractor shared by all (two residual blocks of 3x3
convolutions), giving h_s for the student and h_t for teacher t. The loss is
  kd_weight      * sum_g KD(z_g, mean over group g's teachers of softmax(z_t,g / T))
  + mmd_weight   * sum_t MMD(h_s, h_t)       multi-kernel RBF, on L2-normalised h
  + recon_weight * sum_t MSE(dec_t(h_t), F_t)  each teacher's map from its h_t
with z_g the student's head g, z_t,g teacher t's logits on part g (the student's heads
are the target's parts, where the paper's student concatenates its teachers' whole
outputs) and F_t teacher t's map at the student's spatial size. The constants are the
reference code's (KamalEngine): the kernels' widths, the weights 1, T = 1.

Two departures, so the loss stays a pure function of its parameters: the blocks have
no BatchNorm (the reference's do), and the MMD is a statistic of each device's rows
of the batch (the step averages it over devices), so N devices equal one only where
the step runs on one.
"""
import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from kamal_jax import ambiguity, amalgamate, data, joint, models, tasks, train
from kamal_jax.examples import Examples
from kamal_jax.networks import Network
from kamal_jax.teachers import TeacherStack, map_stacked

__all__ = ["CFL", "cfl_loss", "Common", "init", "mmd", "stage", "student"]

SIGMAS = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)  # the RBF kernels' widths


@dataclasses.dataclass(frozen=True)
class CFL:
  """What the stage trains and how (static, hashable)."""
  net: nn.Module  # the student
  head_sizes: tuple[int, ...]  # the student's heads, one per group
  width: int  # C, the common space's channels
  kd_weight: float = 1.0
  mmd_weight: float = 1.0
  recon_weight: float = 1.0
  temperature: float = 1.0
  sigmas: tuple[float, ...] = SIGMAS


class _Adapter(nn.Module):
  """A network's map into the common space's width: [B, H, W, D] -> [B, H, W, C]."""
  width: int

  @nn.compact
  def __call__(self, f):
    return nn.relu(nn.Conv(self.width, (1, 1))(f))


class Common(nn.Module):
  """The shared extractor: two residual blocks of 3x3 convolutions, [B, H, W, C]."""
  width: int

  @nn.compact
  def __call__(self, h):
    for _ in range(2):
      inner = nn.relu(nn.Conv(self.width, (3, 3))(h))
      h = nn.relu(h + nn.Conv(self.width, (3, 3))(inner))
    return h


class _Decoder(nn.Module):
  """A teacher's map back from the common space: [B, H, W, C] -> [B, H, W, D_t]."""
  width: int
  out: int

  @nn.compact
  def __call__(self, h):
    return nn.Conv(self.out, (1, 1))(nn.relu(nn.Conv(self.width, (1, 1))(h)))


def mmd(x: jnp.ndarray, y: jnp.ndarray, sigmas: Sequence[float] = SIGMAS) -> jnp.ndarray:
  """The (biased) squared maximum mean discrepancy of two samples [N, ...] and
  [M, ...], each row flattened and L2-normalised, under a sum of RBF kernels of
  widths `sigmas`; clipped at 0."""
  x = x.reshape(len(x), -1)
  y = y.reshape(len(y), -1)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  y = y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12)

  def kernel(a, b):  # [N, M]: the mean over pairs of the summed kernels
    distances = jnp.maximum(jnp.sum((a[:, None] - b[None]) ** 2, axis=-1), 1e-12)
    return jnp.mean(sum(jnp.exp(-distances / (2 * s**2)) for s in sigmas))

  return jax.nn.relu(kernel(x, x) + kernel(y, y) - 2 * kernel(x, y))


def _part_probabilities(logits, index, temperature) -> jnp.ndarray:
  """A stack's softmax over the part's logits: [K, B, C], [K, P] -> [K, B, P]."""
  part = jnp.take_along_axis(logits, index[:, None, :], axis=-1)
  return jax.nn.softmax(part / temperature, axis=-1)


def cfl_loss(spec: CFL, params, batch_stats, frozen, batch):
  """The loss of one step, a pure function (see `amalgamate.amalgamation_loss` for
  `frozen` and `batch`, whose 'frozen' entry it reads too).

  params: {'net': the student's, 'common': {'student': its adapter, 'extractor',
  'groups': {str(g): [{'adapters', 'decoders'} per stack, leaves [K_s, ...]]}}}.
  Returns (loss [], (metrics, new batch_stats)).
  """
  x = batch["image"]
  net, updates = spec.net.apply({"params": params["net"], "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"])
  common = params["common"]
  extract = lambda h: Common(spec.width).apply({"params": common["extractor"]}, h)
  student_map = net.feats[-1]  # [B, H, W, D_s]
  h_s = extract(_Adapter(spec.width).apply({"params": common["student"]}, student_map))
  kd, discrepancy, reconstruction = 0.0, 0.0, 0.0
  for g, logits in enumerate(joint.split_heads(net.logits, spec.head_sizes)):
    probabilities = []
    for s, stack in enumerate(frozen[g]):
      out = amalgamate.frozen_outputs(stack, x, batch["frozen"][g][s]
                                      if "frozen" in batch else None)
      probabilities.append(_part_probabilities(out.logits, stack.index, spec.temperature))
      (maps,) = amalgamate.resized((out.feats[-1],), (student_map,))  # [K_s, B, H, W, D_t]
      blocks = common["groups"][str(g)][s]

      def one(adapter, decoder, f):  # one teacher: its MMD and reconstruction terms
        h_t = extract(_Adapter(spec.width).apply({"params": adapter}, f))
        rebuilt = _Decoder(spec.width, f.shape[-1]).apply({"params": decoder}, h_t)
        return mmd(h_s, h_t, spec.sigmas), jnp.mean(optax.losses.squared_error(rebuilt, f))

      d, r = map_stacked(one, blocks["adapters"], blocks["decoders"], maps, in_step=True)
      discrepancy, reconstruction = discrepancy + jnp.sum(d), reconstruction + jnp.sum(r)
    target = jnp.mean(jnp.concatenate(probabilities), axis=0)  # [B, P]
    kd = kd + jnp.mean(spec.temperature**2 * optax.losses.kl_divergence(
        jax.nn.log_softmax(logits / spec.temperature, axis=-1), target))
  loss = (spec.kd_weight * kd + spec.mmd_weight * discrepancy
          + spec.recon_weight * reconstruction)
  metrics = {"kd_loss": kd, "mmd": discrepancy, "reconstruction": reconstruction}
  return loss, (metrics, updates.get("batch_stats", {}))


def init(spec: CFL, key, frozen_shapes, x) -> dict:
  """The stage's first variables: the student's, and the common space's blocks, one
  adapter and decoder per teacher ([K_s, ...] per stack); `frozen_shapes`: the
  structure of `frozen` (shapes suffice); x: [1, H, W, C]."""
  k_net, k_common = jax.random.split(key)
  variables = spec.net.init(k_net, x, train=False)
  zeros = lambda width: jnp.zeros((1, 1, 1, width))
  student_width = amalgamate.tap_shapes(spec.net, variables, x)[-1][-1]
  k_student, k_extractor, k_groups = jax.random.split(k_common, 3)
  common = {"student": _Adapter(spec.width).init(k_student, zeros(student_width))["params"],
            "extractor": Common(spec.width).init(k_extractor, zeros(spec.width))["params"],
            "groups": {}}
  for g, (k_group, stacks) in enumerate(zip(jax.random.split(k_groups, len(spec.head_sizes)),
                                            frozen_shapes)):
    common["groups"][str(g)] = []
    for stack, k_stack in zip(stacks, jax.random.split(k_group, len(stacks))):
      width = amalgamate.stack_tap_shapes(stack, x)[-1][-1]
      keys = jax.random.split(k_stack, 2 * len(stack.index)).reshape(2, -1)
      common["groups"][str(g)].append({
          "adapters": jax.vmap(lambda k: _Adapter(spec.width).init(k, zeros(width))["params"])(keys[0]),
          "decoders": jax.vmap(lambda k: _Decoder(spec.width, width).init(
              k, zeros(spec.width))["params"])(keys[1])})
  return {"params": {"net": variables["params"], "common": common},
          "batch_stats": variables.get("batch_stats", {})}


def stage(name: str, plan: tasks.AmalgamationPlan, pool: list[TeacherStack], net: nn.Module,
          head_sizes, cfg: ml_collections.ConfigDict, examples: Examples, *, seed: int,
          rng_impl: str, eval_batch_size: int, frozen_output_cache_mb: float) -> train.Stage:
  """The stage training the student `net` (a head per group) from every group's
  teachers by `cfl_loss`, by `cfg` (a config section: steps, batch_size, optimizer;
  the common space's blocks learn at its bridge_learning_rate)."""
  frozen = tuple(amalgamate.group_frozen(plan, pool, group) for group in plan.groups)
  x = examples.example()
  spec = CFL(net, tuple(head_sizes), width=max(1, models.tap_widths(net, x)[-1] // 4))
  batches = amalgamate.batches(name, frozen, examples, cfg.batch_size,
                               ambiguity.RULES["none"], seed=seed,
                               eval_batch_size=eval_batch_size,
                               frozen_output_cache_mb=frozen_output_cache_mb)
  shapes = amalgamate.shapes_of(frozen)
  return train.Stage(name, cfl_loss, spec, frozen, batches,
                     lambda key: init(spec, key, shapes, x),
                     data.stream_key(seed, rng_impl, name), cfg.optimizer, cfg.steps)


def student(run, networks):
  """The pipeline kind's step: the student from the teachers by CFL (stage 2, by
  config.stage2's training settings), on the target's pool."""
  plan = run.plan
  net = models.student(run.config.models, sum(plan.head_sizes))
  examples = run.examples(run.pool(plan.target_classes), plan.parts)
  trained = run.fit(stage("stage2", plan, networks.teachers, net, plan.head_sizes,
                          run.config.stage2, examples, **run.how()), "stage2")
  return dataclasses.replace(networks, student=Network(net, trained, plan.head_sizes))
