"""The rest logit, the agreed rest and the joint rule, on cases with known answers."""
import jax
import numpy as np

from kamal_jax import joint, tasks


def _softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def test_rest_logit_keeps_the_part_and_sums_the_others():
  space = tasks.LabelSpace((tasks.Head("classes", ("6", "0", "1", "7")),))
  part = ("0", "1")
  outside = space.outside(part)
  np.testing.assert_array_equal(outside, [True, False, False, True])
  logits = np.array([[[2.0, 1.0, -1.0, 0.5]]], np.float32)  # [K=1, B=1, C=4]
  got = np.asarray(joint.rest_logit(logits, space.positions(part)[None], outside[None]))
  p = _softmax(logits[0, 0])
  # The part's classes keep the probabilities of the whole head; the rest holds the others'.
  np.testing.assert_allclose(_softmax(got[0, 0]), [p[1], p[2], p[0] + p[3]], rtol=1e-6)


def test_rest_logit_floors_a_head_that_is_only_the_part():
  logits = np.array([[[3.0, 1.0]]], np.float32)
  got = np.asarray(joint.rest_logit(logits, np.array([[0, 1]]), np.zeros((1, 2), bool)))
  rest_mass = _softmax(got[0, 0])[-1]
  np.testing.assert_allclose(rest_mass, np.exp(-joint.REST_FLOOR), rtol=1e-3)


def test_mean_rest_gives_every_teacher_the_groups_geometric_mean_part_mass():
  masses = np.array([0.9, 0.4])  # two teachers' probability of the part on one image
  within = np.array([[0.7, 0.3], [0.2, 0.8]])  # their softmaxes within the part
  probs = np.concatenate([masses[:, None] * within, 1 - masses[:, None]], axis=-1)
  logits = np.log(probs)[:, None, :].astype(np.float32)  # [K=2, B=1, P + 1 = 3]
  got = np.asarray(joint.mean_rest(logits))
  agreed = np.sqrt(masses[0] * masses[1])
  for k in range(2):
    p = _softmax(got[k, 0])
    np.testing.assert_allclose(p[-1], 1 - agreed, rtol=1e-5)
    np.testing.assert_allclose(p[:-1] / p[:-1].sum(), within[k], rtol=1e-5)
  np.testing.assert_array_equal(joint.RESTS["own"](logits, np.zeros((2, 1)), 1.0), logits)


def test_typical_rest_is_agreed_by_the_teachers_the_image_is_typical_for():
  masses = np.array([0.9, 0.2, 0.6])  # three teachers' probability of the part, one image
  probs = np.stack([masses / 2, masses / 2, 1 - masses], axis=-1)
  logits = np.log(probs)[:, None, :].astype(np.float32)  # [K=3, B=1, P + 1 = 3]
  # Typical for teachers 0 and 2 (0 nats); teacher 1 never saw such images (3 nats).
  atypical = np.array([[0.0], [3.0], [0.0]], np.float32)
  got = np.asarray(joint.RESTS["typical"](logits, atypical, 0.05))
  agreed = np.sqrt(masses[0] * masses[2])  # teacher 1's weight: e^-60 of theirs
  np.testing.assert_allclose(1 - _softmax(got[:, 0])[:, -1], agreed, rtol=1e-5)
  # At a high temperature every teacher has its say, as the plain mean.
  np.testing.assert_allclose(joint.RESTS["typical"](logits, atypical, 1e6),
                             joint.mean_rest(logits), rtol=1e-5, atol=1e-5)


def test_joint_rule_reads_the_rest_where_the_concatenated_argmax_is_wrong():
  # Head 1 ranks its class 0 highest (5 > 3), but puts most of the image on its rest;
  # head 2 is sure the image is its part: the image is head 2's class 0 (position 3).
  logits = np.array([[5.0, 0.0, 0.0, 9.0, 3.0, 0.0, 0.0, -5.0]], np.float32)
  assert int(np.argmax(np.concatenate([logits[:, 0:3], logits[:, 4:7]], axis=-1))) == 0
  assert int(joint.decide(logits, (4, 4), rest=True)[0]) == 3
  # Without rests the rule is the argmax of all heads side by side.
  student = np.array([[1.0, 2.0, 0.0, 0.5, 2.5, 0.0]], np.float32)
  assert int(joint.decide(student, (3, 3))[0]) == 4
  assert jax.jit(joint.decide, static_argnums=(1, 2))(logits, (4, 4), True)[0] == 3


def test_heads_with_rests_give_back_the_union_distribution_they_were_cut_from():
  # One image's distribution over the target's classes {0, 1, 2 | 3, 4}; each head
  # holds its part's probabilities and, as its rest, the mass of the other part.
  union = np.array([0.05, 0.5, 0.1, 0.3, 0.05])
  head1 = np.log([*union[:3], union[3:].sum()])
  head2 = np.log([*union[3:], union[:3].sum()]) + 7.0  # logits: any offset
  logits = np.concatenate([head1, head2])[None].astype(np.float32)
  got = jax.nn.softmax(joint.scores(logits, (4, 3), rest=True), axis=-1)
  np.testing.assert_allclose(np.asarray(got[0]), union, rtol=1e-5)
