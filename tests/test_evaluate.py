"""Scoring: selection statistics, the ensemble, the joint accuracies."""
import jax
import numpy as np

from kamal_jax import evaluate, tasks




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
  # Teacher 0 is sure, but the image is unlike its training images (3 nats): by the
  # atypicality the unsure teacher 1, for which the image is typical, is chosen.
  atypical = np.array([[3.0], [0.0]], np.float32)
  np.testing.assert_array_equal(evaluate.rule_weights(
      restricted, targets, "least", "entropy", atypical=atypical), [[1, 0]])
  np.testing.assert_array_equal(evaluate.rule_weights(
      restricted, targets, "least", "entropy", atypical=atypical, atypicality_weight=1.0),
      [[0, 1]])


def test_ensemble_log_probs_average_softmaxes_per_part():
  rng = np.random.default_rng(0)
  parts = [rng.normal(size=(2, 5, 3)), rng.normal(size=(3, 5, 2))]
  got = evaluate.ensemble_log_probs(parts)
  for head, part in zip(got, parts, strict=True):
    np.testing.assert_allclose(head, np.log(np.mean(jax.nn.softmax(part, axis=-1), axis=0)),
                               rtol=1e-5)


def test_score_puts_the_components_together_by_their_rests():
  plan = tasks.make_plan({"a": ["0", "1"], "b": ["2", "3"]},
                         {"t1": tasks.label_space(["0", "1", "9"], "t1"),
                          "t2": tasks.label_space(["2", "3", "9"], "t2")})
  heads = (tasks.Head("classes", ("0", "1", "2", "3", "9")),)
  labels = np.array([[0], [3]])  # one image of '0', one of '3'
  teachers = {"t1": np.zeros((2, 3)), "t2": np.zeros((2, 3))}
  # Both components rank their class 0 first; component a's rest says the second
  # image is not of its part, and it is louder than component b on that image.
  components = [np.array([[4.0, 0.0, -4.0], [6.0, 0.0, 9.0]]),
                np.array([[0.0, 0.0, 5.0], [1.0, 3.0, -4.0]])]
  student_without_rests = [np.array([[4.0, 0.0], [0.0, 0.0]]),
                           np.array([[0.0, 0.0], [0.0, 2.0]])]
  result = evaluate.score(plan, heads, labels, teachers, components, student_without_rests)
  assert result["components_joint"] == 1.0  # concatenated argmax: image 2 -> '0'
  assert result["student"]["accuracy_joint"] == 1.0
  # A student that learned the components' rests is put together the same way.
  result = evaluate.score(plan, heads, labels, teachers, components, components)
  assert result["student"]["accuracy_joint"] == 1.0
  assert [c["accuracy"] for c in result["components"]] == [1.0, 1.0]
