import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from kamal_jax import ambiguity


def _logits(shape=(3, 5, 7), seed=0):
  return np.random.default_rng(seed).normal(scale=3.0, size=shape).astype(np.float32)


def _softmax(x):
  return special.softmax(x.astype(np.float64), axis=-1)


def test_entropy_matches_numpy_on_stacked_logits():
  logits = _logits()  # [K, B, C]
  p = _softmax(logits)
  expected = -np.sum(p * np.log(p), axis=-1)
  got = ambiguity.entropy(jnp.asarray(logits))
  assert got.shape == (3, 5)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_entropy_bounds():
  uniform = jnp.zeros((4, 6))
  np.testing.assert_allclose(ambiguity.entropy(uniform), np.log(6), rtol=1e-6)
  certain = jnp.array([[100.0, 0.0, 0.0]])
  assert float(ambiguity.entropy(certain)[0]) < 1e-6


def test_margin_and_max_prob_match_numpy():
  logits = _logits()
  p = np.sort(_softmax(logits), axis=-1)
  np.testing.assert_allclose(ambiguity.margin(jnp.asarray(logits)),
                             1 - (p[..., -1] - p[..., -2]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ambiguity.max_prob(jnp.asarray(logits)), 1 - p[..., -1],
                             rtol=1e-5, atol=1e-6)


def test_measures_order_a_confident_teacher_below_an_unsure_one():
  confident, unsure = [8.0, 0.0, 0.0], [1.0, 0.9, 0.8]
  logits = jnp.array([[unsure], [confident]])  # [K=2, B=1, C=3]
  for name, measure in ambiguity.MEASURES.items():
    values = measure(logits)[:, 0]
    assert values[1] < values[0], name


def test_select_picks_least_ambiguous_with_ties_to_lowest_k():
  amb = jnp.array([[0.5, 0.1, 0.3, 0.2],
                   [0.2, 0.1, 0.9, 0.2],
                   [0.7, 0.4, 0.2, 0.2]])  # [K=3, B=4]
  mask = ambiguity.select(amb)
  expected = np.array([[0, 1, 0],   # sample 0: teacher 1
                       [1, 0, 0],   # sample 1: tie of teachers 0 and 1 -> 0
                       [0, 0, 1],   # sample 2: teacher 2
                       [1, 0, 0]])  # sample 3: three-way tie -> 0
  np.testing.assert_array_equal(mask, expected)
  assert mask.shape == (4, 3)


def test_unknown_measure_names_the_choices():
  with pytest.raises(ValueError, match="entropy.*margin.*max_prob"):
    ambiguity.get("variance")
