"""How unsure a teacher is about a sample, and which teacher each sample learns from.

Every measure maps logits [..., C] to an ambiguity [...] (larger = less sure), over
the last axis only, so it serves any leading shape, e.g. [K, B, C] -> [K, B].

Ambiguity reads a teacher's answer; `atypicality` reads whether the image is of the
kind the teacher learned from at all. A teacher shown an image of another domain (or
of no class it knows) can be sure and wrong, and least ambiguity then picks exactly
that teacher; the statistics its stem batch norm recorded over its own training
images tell it apart. The selection score adds the two (`stage1.atypicality_weight`).
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["atypicality", "choose", "entropy", "get", "margin", "max_prob", "Rule", "RULES",
           "weights"]


def entropy(logits: jnp.ndarray) -> jnp.ndarray:
  """Shannon entropy (nats) of softmax(logits)."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def margin(logits: jnp.ndarray) -> jnp.ndarray:
  """1 - (top-1 probability - top-2 probability)."""
  top2 = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), 2)[0]
  return 1.0 - (top2[..., 0] - top2[..., 1])


def max_prob(logits: jnp.ndarray) -> jnp.ndarray:
  """1 - the top-1 probability."""
  return 1.0 - jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


MEASURES: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "entropy": entropy,
    "margin": margin,
    "max_prob": max_prob,
}


def atypicality(stem: jnp.ndarray, mean: jnp.ndarray, var: jnp.ndarray) -> jnp.ndarray:
  """How unlike a network's training images each image is, in nats: the KL divergence
  of the network's recorded input statistics from the image's.

  Per channel d, the image's responses to the stem convolution, over its positions,
  are fitted by a Gaussian N(mu_d, s_d); the network's stem batch norm recorded
  N(mean_d, var_d) over its training images. Summed over channels,
    sum_d KL(N(mu_d, s_d) || N(mean_d, var_d)),
  0 for an image whose responses look like the training images' on average, growing
  as they drift (another domain's images: another range, texture or contrast).

  Args:
    stem: [K, B, H, W, D] the stem convolution's output (a network's first tap).
    mean, var: [K, D] the running statistics of the batch norm it feeds.
  Returns:
    [K, B].
  """
  mu = jnp.mean(stem, axis=(2, 3))  # [K, B, D]
  s = jnp.var(stem, axis=(2, 3)) + BATCH_NORM_EPSILON
  v = (var + BATCH_NORM_EPSILON)[:, None]
  m = mean[:, None]
  return 0.5 * jnp.sum(jnp.log(v / s) + (s + (mu - m) ** 2) / v - 1.0, axis=-1)


BATCH_NORM_EPSILON = 1e-5  # as the networks' batch norms add to their variance


def get(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
  if name not in MEASURES:
    raise ValueError(f"Unknown ambiguity measure {name!r}: use one of {sorted(MEASURES)}.")
  return MEASURES[name]


def choose(tier: jnp.ndarray, score: jnp.ndarray) -> jnp.ndarray:
  """Per sample, the teacher of the lowest tier with the least score, the lowest k on
  ties (as argmin): tier [K, B] int, score [K, B] -> [B] indices into K."""
  first = tier == jnp.min(tier, axis=0)
  return jnp.argmin(jnp.where(first, score, jnp.inf), axis=0)


# Selection rules: how much each sample learns from each teacher, weights [B, K] that
# sum to 1 over K. A one-hot rule ranks each sample's teachers in tiers: the sample
# learns from the least ambiguous teacher of its lowest tier (`choose`). A tier reads
# the teachers' positions k [c] among the group's K (`count`), so that it can be
# worked out a chunk of teachers at a time. `key` ([B] PRNG keys, one per sample, so
# a sample's draw does not depend on how the batch is split) and `correct` ([c, B]
# bool: the teacher's prediction is right, from labels) are only read by the rules
# that need them.

def _least_tier(k, key, correct, count):
  return jnp.zeros(k.shape + (1,), jnp.int32)  # one tier for every sample


def _random_tier(k, key, correct, count):
  draws = jax.vmap(lambda one: jax.random.randint(one, (), 0, count))(key)  # [B]
  return (k[:, None] != draws[None]).astype(jnp.int32)


def _oracle_tier(k, key, correct, count):
  """The right teachers first: the least ambiguous of them; where none is (or the
  sample lies outside the part), the least ambiguous of all. Needs labels: an upper
  bound, not a method."""
  return (~correct).astype(jnp.int32)


def _none(ambiguity, key, correct, temperature):
  k, b = ambiguity.shape
  return jnp.full((b, k), 1.0 / k, ambiguity.dtype)


def _soft(ambiguity, key, correct, temperature):
  return jax.nn.softmax(-ambiguity / temperature, axis=0).T


@dataclasses.dataclass(frozen=True)
class Rule:
  """A selection rule and what its batches must carry besides the images: one-hot by
  its `tier`, or `weigh`ing every teacher."""
  tier: Callable | None = None  # (k [c], key, correct, count K) -> [c, B] int (or [c, 1])
  weigh: Callable | None = None  # (ambiguity [K, B], key, correct, temperature) -> [B, K]
  needs_key: bool = False  # a PRNG key per sample ('key')
  needs_labels: bool = False  # the samples' positions in the parts ('label')

  @property
  def one_hot(self) -> bool:
    return self.tier is not None


RULES = {"least": Rule(_least_tier), "none": Rule(weigh=_none),
         "random": Rule(_random_tier, needs_key=True), "soft": Rule(weigh=_soft),
         "oracle": Rule(_oracle_tier, needs_labels=True)}


def weights(rule: str, ambiguity: jnp.ndarray, *, key=None, correct=None,
            temperature: float = 1.0) -> jnp.ndarray:
  """[K, B] ambiguity -> [B, K] per-sample teacher weights under `rule`."""
  if rule not in RULES:
    raise ValueError(f"Unknown selection rule {rule!r}: use one of {sorted(RULES)}.")
  if not RULES[rule].one_hot:
    return RULES[rule].weigh(ambiguity, key, correct, temperature)
  count = ambiguity.shape[0]
  tier = RULES[rule].tier(jnp.arange(count), key, correct, count)
  return jax.nn.one_hot(choose(jnp.broadcast_to(tier, ambiguity.shape), ambiguity), count,
                        dtype=ambiguity.dtype)
