"""Scoring: selection statistics, the ensemble, the joint rules."""
import jax
import numpy as np

from kamal_jax import evaluate




def test_selection_stats_by_hand():
  restricted = np.array([[[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]],
                         [[0.0, 1.0], [0.0, 5.0], [0.0, 4.0]]])  # [K=2, N=3, P=2]
  weights = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])  # [N, K]
  targets = np.array([0, 1, -1])  # the third image lies outside the part
  stats = evaluate.selection_stats(restricted, weights, targets,
                                   teacher_domains=np.array([0, 1]),
                                   sample_domains=np.array([0, 0, 1]))
  np.testing.assert_allclose(stats["selected_fraction"], [0.5, 0.5])
  # Weighted logits: image 0 -> [3, 0] (right), image 1 -> [0, 3] (right).
  assert stats["target_accuracy"] == 1.0
  # Own-domain weight on the part's images: 1 on image 0, 0.5 on image 1.
  np.testing.assert_allclose(stats["selected_own_domain"], 0.75)


def test_rule_weights_as_a_step_computes_them():
  restricted = np.array([[[4.0, 0.0, 0.0]], [[1.0, 1.0, 0.9]]], np.float32)  # [2, 1, 3]
  targets = np.array([1])
  np.testing.assert_array_equal(
      evaluate.rule_weights(restricted, targets, "least", "entropy"), [[1, 0]])
  np.testing.assert_array_equal(  # only teacher 1 is right (argmax 0 vs 0): none is
      evaluate.rule_weights(restricted, targets, "oracle", "entropy"), [[1, 0]])


def test_ensemble_log_probs_average_softmaxes_per_part():
  rng = np.random.default_rng(0)
  parts = [rng.normal(size=(2, 5, 3)), rng.normal(size=(3, 5, 2))]
  got = evaluate.ensemble_log_probs(parts)
  expected = np.concatenate([np.log(np.mean(jax.nn.softmax(p, axis=-1), axis=0))
                             for p in parts], axis=-1)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert got.shape == (5, 5)


def test_joint_rules():
  logits = np.array([[5.0, 0.0, 0.0, 6.0, 0.0, 0.0],    # head 1 louder, both peaked
                     [1.0, 0.9, 0.8, 0.0, 3.0, 0.0]])   # head 2 surer
  got = evaluate.joint_accuracies(logits, (3, 3), np.array([0, 4]), "entropy")
  assert got["argmax"] == 0.5
  assert got["least_ambiguous_head"] == 0.5
