import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from kamal_jax import ambiguity, models, teachers


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


def test_atypicality_is_the_kl_of_the_recorded_statistics_from_the_images():
  # One network, two images, a stem of two channels over 2x2 positions. Image 0's
  # responses have the recorded mean and variance per channel; image 1's channel 0
  # is shifted by 2 recorded standard deviations and its channel 1 has 4x the variance.
  mean, var = np.array([[1.0, -1.0]]), np.array([[1.0, 0.25]])  # [K=1, D=2]
  signs = np.array([1.0, -1.0, 1.0, -1.0]).reshape(2, 2)  # mean 0, variance 1
  typical = np.stack([1.0 + signs, -1.0 + 0.5 * signs], axis=-1)  # [H=2, W=2, D=2]
  drifted = np.stack([3.0 + signs, -1.0 + 1.0 * signs], axis=-1)
  stem = np.stack([typical, drifted])[None].astype(np.float32)  # [K=1, B=2, 2, 2, 2]
  got = np.asarray(ambiguity.atypicality(jnp.asarray(stem), jnp.asarray(mean),
                                         jnp.asarray(var)))
  kl_variance = 0.5 * (np.log(1 / 4) + 4 - 1)  # KL(N(0, 4) || N(0, 1)) in nats
  np.testing.assert_allclose(got, [[0.0, 0.5 * 2**2 + kl_variance]], atol=1e-4)


def test_choose_takes_the_least_score_of_the_lowest_tier_with_ties_to_lowest_k():
  amb = jnp.array([[0.5, 0.1, 0.3, 0.2],
                   [0.2, 0.1, 0.9, 0.2],
                   [0.7, 0.4, 0.2, 0.2]])  # [K=3, B=4]
  np.testing.assert_array_equal(ambiguity.choose(jnp.zeros((3, 4), int), amb),
                                [1, 0, 2, 0])  # samples 1 and 3: ties -> the lowest k
  tier = jnp.array([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(ambiguity.choose(tier, amb), [2, 1, 2, 0])


def test_unknown_measure_names_the_choices():
  with pytest.raises(ValueError, match="entropy.*margin.*max_prob"):
    ambiguity.get("variance")


AMB = jnp.array([[0.2, 0.9, 0.5],
                 [0.7, 0.1, 0.5]])  # [K=2, B=3]


def test_least_rule_is_one_hot_on_the_least_ambiguous():
  np.testing.assert_array_equal(ambiguity.weights("least", AMB),
                                [[1, 0], [0, 1], [1, 0]])


def test_none_rule_weighs_every_teacher_equally():
  np.testing.assert_allclose(ambiguity.weights("none", AMB), np.full((3, 2), 0.5))


def test_soft_rule_is_a_softmax_of_negative_ambiguity_over_teachers():
  got = ambiguity.weights("soft", AMB, temperature=0.5)
  expected = special.softmax(-np.asarray(AMB) / 0.5, axis=0).T
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  sharp = ambiguity.weights("soft", AMB, temperature=1e-3)  # T -> 0: the least rule
  np.testing.assert_allclose(sharp[:2], [[1, 0], [0, 1]], atol=1e-6)


def test_oracle_rule_prefers_right_teachers_then_the_least_ambiguous():
  correct = jnp.array([[False, True, True],
                       [True, True, False]])
  # sample 0: only teacher 1 is right although teacher 0 is surer; sample 1: both
  # right, teacher 1 surer; sample 2: only teacher 0 right.
  np.testing.assert_array_equal(ambiguity.weights("oracle", AMB, correct=correct),
                                [[0, 1], [0, 1], [1, 0]])
  nobody = jnp.zeros_like(correct)  # no teacher right: fall back to the least rule
  np.testing.assert_array_equal(ambiguity.weights("oracle", AMB, correct=nobody),
                                ambiguity.weights("least", AMB))


def test_random_rule_is_one_hot_seeded_and_covers_every_teacher():
  amb = jnp.zeros((3, 600))
  keys = jax.random.split(jax.random.key(0), 600)  # one per sample
  a = ambiguity.weights("random", amb, key=keys)
  b = ambiguity.weights("random", amb, key=keys)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a.sum(axis=1), 1.0)
  assert np.all(np.abs(a.mean(axis=0) - 1 / 3) < 0.08)


def test_unknown_rule_names_the_choices():
  with pytest.raises(ValueError, match="least.*none.*oracle.*random.*soft"):
    ambiguity.weights("best", AMB)


def test_networks_without_a_stem_batch_norm_are_never_atypical():
  outputs = models.Outputs(jnp.zeros((2, 3, 4)), (jnp.ones((2, 3, 2, 2, 5)),))  # K=2, B=3
  np.testing.assert_array_equal(teachers.atypicality({"params": {}}, outputs), np.zeros((2, 3)))
