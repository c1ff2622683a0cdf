"""One decision over all target classes, and the rest logit that makes parts comparable.

The user's question is joint: which of the target classes is this image? Each part's
teachers never saw the other parts' classes, so their logits on one part say nothing
about another, and heads that regress them are not comparable. What they do say is
how much of an image is *not* their part: a teacher of {0, 1, 2, 6} puts the mass of
an image of 3 mostly on 6. That mass, kept as one extra *rest* logit beside the part's
logits (`rest_logit`), is what makes a part's evidence comparable with another's.

  rest_logit    a teacher's logits -> the part's logits and log sum exp of the logits
                outside the part (its head's other classes): [..., P + 1];
  mean_rest     the rest agreed by a group's teachers (a single teacher's is noisy);
  typical_rest  agreed by those of them the image is typical for;
  split_heads   heads laid side by side, apart;
  scores,       the joint rule: the class of all the target's, in the order of the
  decide        heads laid side by side.

Pure jnp functions over leading axes.
"""
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["decide", "mean_rest", "REST_FLOOR", "rest_logit", "RESTS", "scores",
           "split_heads", "typical_rest"]

# A teacher sure that an image is of its part puts at least e^-REST_FLOOR of that
# image's mass on the rest: it bounds the rest logit's regression target, and stands
# for teachers whose head holds nothing but the part.
REST_FLOOR = 10.0


def rest_logit(logits: jnp.ndarray, index: jnp.ndarray, outside: jnp.ndarray) -> jnp.ndarray:
  """The part's logits with the rest logit after them.

  Args:
    logits: [K, B, C] of K networks.
    index: [K, P] the part's positions in each network's logits.
    outside: [K, C] bool, the classes of the head that holds the part, but the part's.
  Returns:
    [K, B, P + 1]; softmax of it gives the part's classes the probabilities of the
    network's whole head, and the rest the mass of the others.
  """
  part = jnp.take_along_axis(logits, index[:, None, :], axis=-1)  # [K, B, P]
  rest = jax.nn.logsumexp(jnp.where(outside[:, None, :], logits, -jnp.inf), axis=-1)
  rest = jnp.maximum(rest, jax.nn.logsumexp(part, axis=-1) - REST_FLOOR)  # [K, B]
  return jnp.concatenate([part, rest[..., None]], axis=-1)


def _log_part_mass(with_rest: jnp.ndarray) -> jnp.ndarray:
  """[..., P + 1] -> [...]: log of the probability of the part's classes."""
  return (jax.nn.logsumexp(with_rest[..., :-1], axis=-1)
          - jax.nn.logsumexp(with_rest, axis=-1))


def mean_rest(with_rest: jnp.ndarray, weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """[K, B, P + 1] -> the same logits with each network's rest moved so that its part
  mass is the group's: the geometric mean of the K networks' part masses, weighted by
  `weights` ([K, B], summing to 1 over K; None: equally). The part logits stay each
  network's own, and every network of the group agrees how much of an image is the
  part."""
  part = with_rest[..., :-1]
  log_mass = _log_part_mass(with_rest)  # [K, B]
  mass = (jnp.mean(log_mass, axis=0) if weights is None
          else jnp.sum(weights * log_mass, axis=0))  # [B], log of the agreed mass
  odds = jnp.log(-jnp.expm1(jnp.minimum(mass, -1e-12))) - mass  # log (1 - m) / m
  rest = jax.nn.logsumexp(part, axis=-1) + jnp.maximum(odds, -REST_FLOOR)  # [K, B]
  return jnp.concatenate([part, rest[..., None]], axis=-1)


def typical_rest(with_rest: jnp.ndarray, atypicality: jnp.ndarray,
                 temperature: float) -> jnp.ndarray:
  """The rest agreed by the networks for which an image is typical: `mean_rest`
  weighted by softmax(-atypicality / temperature) over the group ([K, B] in nats, see
  `ambiguity.atypicality`). Teachers of the image's kind agree; one that never saw
  such images has no say in how much of it is the part. Not the least ambiguous
  teacher's: on an image outside the part, that is the teacher most sure it is of
  the part."""
  return mean_rest(with_rest, jax.nn.softmax(-atypicality / temperature, axis=0))


# How a group's networks' rest logits [K, B, P + 1] become the targets, given how
# atypical each image is for each network ([K, B]) and the temperature of 'typical':
# each its own, moved to the group's agreed part mass, or to the part mass agreed by
# the networks the image is typical for.
RESTS = {"own": lambda with_rest, atypicality, temperature: with_rest,
         "mean": lambda with_rest, atypicality, temperature: mean_rest(with_rest),
         "typical": typical_rest}


def split_heads(logits, head_sizes) -> list:
  """Heads laid side by side, apart: [..., sum of head_sizes] -> [[..., size] per head]
  (NumPy or jnp arrays alike)."""
  bounds = np.cumsum((0,) + tuple(head_sizes))
  return [logits[..., a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def scores(logits, head_sizes, rest: bool = False):
  """What the joint rule compares: [N, sum of head widths] -> [N, T] one score per
  target class (the parts' classes in head order).

  Without rests (the student of the paper's method) the scores are the heads' logits
  side by side. Heads that carry a rest logit after their classes (`rest`;
  head_sizes then count it) are first normalised over their classes and rest, so that
  each class scores its log-probability in its own head and the rests drop out.
  """
  heads = split_heads(logits, head_sizes)
  if rest:
    heads = [jax.nn.log_softmax(h, axis=-1)[..., :-1] for h in heads]
  return jnp.concatenate(heads, axis=-1)


def decide(logits, head_sizes, rest: bool = False):
  """The joint class of every image: [N, sum of head widths] -> [N] positions in the
  target's classes, the argmax of `scores`. The report scores with it and predictions
  are made with it; softmax of the scores gives each class its probability."""
  return jnp.argmax(scores(logits, head_sizes, rest), axis=-1)
