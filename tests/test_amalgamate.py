"""The stage losses and the pmapped step on tiny networks, on 8 simulated devices."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kamal_jax import amalgamate, models, teachers, train
from kamal_jax.train import replicate, unreplicate

BATCH = 16
IMAGES = np.random.default_rng(0).uniform(size=(BATCH, 8, 8, 1)).astype(np.float32)


def _teacher_stack(tiny, confidences):
  """K tiny teachers whose head kernels are scaled by `confidences`: a large scale
  gives peaked softmaxes (low entropy), zero gives uniform ones (maximal entropy)."""
  module = models.create(tiny.models.teacher, 4, tiny.models.teacher_width_scale)
  init = jax.jit(lambda key: module.init(key, IMAGES[:1], train=False))
  stack = []
  for k, scale in enumerate(confidences):
    variables = init(jax.random.key(k, impl="rbg"))
    head = variables["params"]["head"]
    stack.append({**variables, "params": {**variables["params"], "head": {
        "kernel": head["kernel"] * scale, "bias": head["bias"] * 0}}})
  return module, teachers.stack_variables(stack)


def _stage1(tiny, confidences):
  module, stack = _teacher_stack(tiny, confidences)
  spec = amalgamate.Stage1(
      component=models.create(tiny.models.teacher, 3, tiny.models.teacher_width_scale),
      teacher=module, bridge_widths=tuple(tiny.stage1.bridge_widths))
  frozen = {"teachers": stack, "index": np.array([[0, 1, 2], [0, 1, 2]], np.int32)}
  state = jax.jit(lambda: train.create_state(
      amalgamate.init_stage1(spec, jax.random.key(7, impl="rbg"), stack, IMAGES[:1]),
      tiny.stage1.optimizer, tiny.stage1.steps))()
  return spec, frozen, state


def _run(step, state, frozen, images, devices):
  """One step on `devices` with the global batch split over them."""
  batch = {"image": images.reshape((len(devices), -1) + images.shape[1:])}
  new, metrics = step(replicate(state, devices), replicate(frozen, devices),
                      batch)
  return jax.device_get(unreplicate(new)), jax.device_get(unreplicate(metrics))


@pytest.fixture(scope="module")
def stage1(tiny):
  return _stage1(tiny, confidences=(50.0, 0.0))  # teacher 0 sure, teacher 1 uniform


counted_stage1_loss = chex.assert_max_traces(amalgamate.stage1_loss, n=1)


def test_step_on_8_devices_equals_step_on_1_device(stage1):
  spec, frozen, state = stage1
  devices = jax.local_devices()
  assert len(devices) == 8
  on_8, metrics_8 = _run(train.train_step(counted_stage1_loss, spec), state, frozen,
                         IMAGES, devices)
  on_1, metrics_1 = _run(train.train_step(amalgamate.stage1_loss, spec, tuple(devices[:1])),
                         state, frozen, IMAGES, devices[:1])
  chex.assert_trees_all_close(on_8.params, on_1.params, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(on_8.batch_stats, on_1.batch_stats, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(metrics_8, metrics_1, atol=1e-5, rtol=1e-5)
  # The update is real: parameters moved.
  assert not np.allclose(on_8.params["net"]["head"]["kernel"],
                         state.params["net"]["head"]["kernel"])


def test_step_traces_once(stage1):
  spec, frozen, state = stage1
  step = train.train_step(counted_stage1_loss, spec)
  for seed in (1, 2):  # new data, same shapes: no new trace (chex raises if there is)
    images = np.random.default_rng(seed).uniform(size=IMAGES.shape).astype(np.float32)
    _run(step, state, frozen, images, jax.local_devices())


def test_samples_learn_only_from_the_least_ambiguous_teacher(stage1):
  spec, frozen, state = stage1
  new, metrics = _run(train.train_step(amalgamate.stage1_loss, spec), state, frozen,
                      IMAGES, jax.local_devices())
  np.testing.assert_array_equal(metrics["selected_fraction"], [1.0, 0.0])
  assert metrics["ambiguity"][0] < metrics["ambiguity"][1]
  np.testing.assert_allclose(metrics["ambiguity"][1], np.log(3), rtol=1e-5)  # uniform
  before, after = state.params, new.params
  # The unselected teacher's component-side bridges and logit scale get no gradient.
  for old, now in zip(jax.tree.leaves(before["net_bridges"]), jax.tree.leaves(after["net_bridges"])):
    np.testing.assert_array_equal(now[1], old[1])
    assert not np.array_equal(now[0], old[0])
  assert after["logit_scale"][1] == before["logit_scale"][1]
  assert after["logit_scale"][0] != before["logit_scale"][0]


def test_selection_follows_the_teachers_not_their_order(tiny):
  spec, frozen, state = _stage1(tiny, confidences=(0.0, 50.0))
  _, metrics = _run(train.train_step(amalgamate.stage1_loss, spec), state, frozen,
                    IMAGES, jax.local_devices())
  np.testing.assert_array_equal(metrics["selected_fraction"], [0.0, 1.0])


def test_stage1_loss_is_the_masked_sum_of_feature_and_logit_terms(stage1):
  spec, frozen, state = stage1
  loss_fn = jax.pmap(lambda p, s, f, b: amalgamate.stage1_loss(spec, p, s, f, b),
                     axis_name=train.AXIS, devices=jax.local_devices()[:1])
  replicated = [replicate(t, jax.local_devices()[:1])
                for t in (state.params, state.batch_stats, frozen)]
  loss, (metrics, _) = jax.device_get(loss_fn(*replicated, {"image": IMAGES[None]}))
  np.testing.assert_allclose(
      loss[0], metrics["feature_loss"][0] + metrics["logit_loss"][0]
      + spec.weight_norm * metrics["weight_norm"][0], rtol=1e-6)
  assert metrics["weight_norm"][0] > 0  # fresh bridge rows are not unit norm


def test_student_head_g_regresses_component_g(tiny):
  component = models.create(tiny.models.teacher, 3, tiny.models.teacher_width_scale)
  init = jax.jit(lambda key: component.init(key, IMAGES[:1], train=False))
  components = teachers.stack_variables([init(jax.random.key(k, impl="rbg")) for k in (0, 1)])
  spec = amalgamate.Stage2(
      student=models.create(tiny.models.student, 6, tiny.models.student_width_scale),
      component=component, component_widths=component.widths)
  variables = amalgamate.init_stage2(spec, jax.random.key(3, impl="rbg"), 2, IMAGES[:1])
  variables["params"]["logit_scale"] = jnp.array([1.0, 0.0])  # head 1 sees no logit loss
  state = jax.jit(lambda v: train.create_state(v, tiny.stage2.optimizer, 6))(variables)
  new, metrics = _run(train.train_step(amalgamate.stage2_loss, spec), state,
                      {"components": components}, IMAGES, jax.local_devices())
  kernel_before = state.params["net"]["head"]["kernel"]
  kernel_after = new.params["net"]["head"]["kernel"]
  assert not np.array_equal(kernel_after[:, :3], kernel_before[:, :3])
  np.testing.assert_array_equal(kernel_after[:, 3:], kernel_before[:, 3:])
  assert np.isfinite(metrics["loss"]) and metrics["feature_loss"] > 0
