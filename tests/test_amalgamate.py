"""The amalgamation loss and the data-parallel step on tiny networks, on 8 simulated
devices."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kamal_jax import ambiguity, amalgamate, door, evaluate, joint, models, parallel, teachers, train

BATCH = 16
IMAGES = np.random.default_rng(0).uniform(size=(BATCH, 8, 8, 1)).astype(np.float32)


def _teacher_stack(tiny, confidences, arch="", width_scale=None):
  """K tiny teachers whose head kernels are scaled by `confidences`: a large scale
  gives peaked softmaxes (low entropy), zero gives uniform ones (maximal entropy)."""
  module = models.create(arch or tiny.models.teacher, 4,
                         width_scale or tiny.models.teacher_width_scale)
  init = jax.jit(lambda key: module.init(key, IMAGES[:1], train=False))
  stack = []
  for k, scale in enumerate(confidences):
    variables = init(jax.random.key(k, impl="rbg"))
    head = variables["params"]["head"]
    stack.append({**variables, "params": {**variables["params"], "head": {
        "kernel": head["kernel"] * scale, "bias": head["bias"] * 0}}})
  return module, teachers.stack_variables(stack)


def _state(spec, frozen, optimizer, seed=7):
  shapes = amalgamate.shapes_of(frozen)
  return jax.jit(lambda: train.create_state(
      amalgamate.init(spec, jax.random.key(seed, impl="rbg"), shapes, IMAGES[:1]),
      optimizer, 6))()


def _stage1(tiny, *stacks, **overrides):
  """A component (3 classes) from teacher stacks (module, variables [K_s, ...]) that
  know the part at logits 0-2."""
  spec = amalgamate.Amalgamation(
      net=models.create(tiny.models.teacher, 3, tiny.models.teacher_width_scale,
                        axis_name=train.AXIS),
      head_sizes=(3,),
      bridge_widths=tuple(tiny.stage1.bridge_widths), **overrides)
  count = lambda nets: len(jax.tree.leaves(nets)[0])
  frozen = (tuple(amalgamate.FrozenStack(
      module, nets, np.tile(np.arange(3, dtype=np.int32), (count(nets), 1)),
      np.tile([False, False, False, True], (count(nets), 1)))  # logit 3: the rest
      for module, nets in stacks),)
  return spec, frozen, _state(spec, frozen, tiny.stage1.optimizer)


def _run(step, state, nets, images, devices, **extra):
  """One step on `devices` with the global batch split over them (`nets`: the
  step's frozen networks; `extra`: more batch entries, rows first)."""
  devices = tuple(devices)
  new, metrics = step(parallel.replicated(state, devices), parallel.replicated(nets, devices),
                      parallel.split({"image": images, **extra}, devices))
  return parallel.host(new), parallel.host(metrics)


def _step(spec, loss=amalgamate.amalgamation_loss):
  return train.train_step(loss, spec)


@pytest.fixture(scope="module")
def stage1(tiny):
  return _stage1(tiny, _teacher_stack(tiny, (50.0, 0.0)))  # 0 sure, 1 uniform


counted_loss = chex.assert_max_traces(amalgamate.amalgamation_loss, n=1)


def test_step_on_8_devices_equals_step_on_1_device(stage1):
  spec, frozen, state = stage1
  devices = jax.local_devices()
  assert len(devices) == 8
  on_8, metrics_8 = _run(_step(spec, counted_loss), state, frozen, IMAGES, devices)
  on_1, metrics_1 = _run(train.train_step(amalgamate.amalgamation_loss, spec,
                                          tuple(devices[:1])),
                         state, frozen, IMAGES, devices[:1])
  chex.assert_trees_all_close(on_8.params, on_1.params, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(on_8.batch_stats, on_1.batch_stats, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(metrics_8, metrics_1, atol=1e-5, rtol=1e-5)
  # The update is real: parameters moved.
  assert not np.allclose(on_8.params["net"]["head"]["kernel"],
                         state.params["net"]["head"]["kernel"])


def test_step_traces_once(stage1):
  spec, frozen, state = stage1
  for seed in (1, 2):  # new data, same shapes: no new trace (chex raises if there is)
    images = np.random.default_rng(seed).uniform(size=IMAGES.shape).astype(np.float32)
    _run(_step(spec, counted_loss), state, frozen, images, jax.local_devices())


def test_outputs_computed_before_the_stage_give_the_same_step(stage1):
  """Where every epoch shows the same images, the pipeline computes the frozen
  networks' outputs once (evaluate.predict) and the step reads them from the batch
  instead of running the networks: same step."""
  spec, frozen, state = stage1
  stack = frozen[0][0]
  outputs = evaluate.predict(stack.module, stack.nets, lambda at: IMAGES[at],
                             BATCH, BATCH, stacked=True, returns="outputs")  # [B, K, ...]
  devices = jax.local_devices()
  ran = _run(_step(spec), state, frozen, IMAGES, devices)
  read = _run(_step(spec), state, frozen, IMAGES, devices, frozen=((outputs,),))
  chex.assert_trees_all_close(read, ran, atol=1e-6, rtol=1e-5)
  # The step reads them: uniform logits in place of the sure teacher's make both
  # teachers maximally ambiguous.
  uniform = outputs._replace(logits=np.zeros_like(outputs.logits))
  _, metrics = _run(_step(spec), state, frozen, IMAGES, devices, frozen=((uniform,),))
  np.testing.assert_allclose(metrics["0/ambiguity"], [np.log(3)] * 2, rtol=1e-5)


@pytest.fixture(scope="module")
def five_teachers(tiny):
  return _stage1(tiny, _teacher_stack(tiny, (50.0, 0.0, 5.0, 20.0, 1.0)))


def test_a_group_run_in_chunks_takes_the_step_of_one_run_at_once(five_teachers):
  """Five teachers, two per traced body: a loop of two chunks, then the fifth."""
  spec, frozen, state = five_teachers
  devices = jax.local_devices()
  at_once = _run(_step(spec), state, frozen, IMAGES, devices)
  chunked = _run(_step(dataclasses.replace(spec, teacher_chunk=2)), state, frozen, IMAGES,
                 devices)
  chex.assert_trees_all_close(chunked, at_once, atol=1e-6, rtol=1e-5)
  selected = at_once[1]["0/selected_fraction"]  # [5]
  assert selected[1] == 0 and np.isclose(selected.sum(), 1)  # never the uniform teacher


def test_the_doors_stage_1_estimate_is_near_xlas_memory_analysis(tiny, five_teachers):
  """Per device: the group's teachers, bridges and taps against what the compiled step
  holds (its arguments, outputs and temporaries), beside the trained network's share."""
  spec, frozen, state = five_teachers
  devices = tuple(jax.local_devices())
  step = _step(spec).lower(parallel.replicated(state, devices), parallel.replicated(frozen, devices),
                           parallel.split({"image": IMAGES}, devices)).compile()
  held = step.memory_analysis()
  xla = (held.argument_size_in_bytes + held.output_size_in_bytes - held.alias_size_in_bytes
         + held.temp_size_in_bytes)
  estimate = door.stage1_memory(tiny, {"part": [frozen[0][0].module] * 5}, IMAGES[:1], BATCH)
  assert 0.5 < estimate["bytes"] / len(devices) / xla < 1.5, (estimate, xla)


def _unchanged(before, after, k):
  """Whether teacher k's entries of every [K, ...] leaf are unchanged."""
  return all(np.array_equal(a[k], b[k]) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_samples_learn_only_from_the_least_ambiguous_teacher(stage1):
  spec, frozen, state = stage1
  new, metrics = _run(_step(spec), state, frozen, IMAGES, jax.local_devices())
  np.testing.assert_array_equal(metrics["0/selected_fraction"], [1.0, 0.0])
  assert metrics["0/ambiguity"][0] < metrics["0/ambiguity"][1]
  np.testing.assert_allclose(metrics["0/ambiguity"][1], np.log(3), rtol=1e-5)  # uniform
  before, after = state.params["groups"]["0"], new.params["groups"]["0"]
  # The unselected teacher's network-side bridges and logit scale get no gradient.
  assert _unchanged(before["net_bridges"], after["net_bridges"], 1)
  assert not _unchanged(before["net_bridges"], after["net_bridges"], 0)
  assert after["logit_scale"][1] == before["logit_scale"][1]
  assert after["logit_scale"][0] != before["logit_scale"][0]


def test_teachers_of_other_widths_and_depths_share_a_group(tiny):
  """A group of two stacks: the tiny teacher (uniform) and a ResNet-18 with the
  ImageNet stem (sure), whose taps are wider and spatially smaller (8x8 images:
  4, 2, 1, 1, 1 against the component's 8, 8, 4, 2, 1)."""
  resnet18 = _teacher_stack(tiny, (50.0,), arch="resnet18", width_scale=0.125)
  spec, frozen, state = _stage1(tiny, _teacher_stack(tiny, (0.0,)), resnet18)
  bridges = state.params["groups"]["0"]["frozen_bridges"]
  assert [b["tap4"]["kernel"].shape for b in bridges] == [(1, 1, 1, 32, 16),
                                                          (1, 1, 1, 64, 16)]
  new, metrics = _run(_step(spec), state, frozen, IMAGES, jax.local_devices())
  np.testing.assert_array_equal(metrics["0/selected_fraction"], [0.0, 1.0])
  assert np.isfinite(metrics["0/feature_loss"]) and metrics["0/feature_loss"] > 0
  # Only the selected teacher's side learns (beyond the weight-norm penalty).
  before, after = state.params["groups"]["0"], new.params["groups"]["0"]
  assert _unchanged(before["net_bridges"], after["net_bridges"], 0)
  assert not _unchanged(before["net_bridges"], after["net_bridges"], 1)


@pytest.mark.parametrize("stage", ["stage1 of two stacks", "stage2"])
def test_a_one_hot_rule_keeps_the_chosen_features_alone_and_takes_the_dense_step(
    tiny, monkeypatch, stage):
  """Stage 1 from two stacks (five tiny teachers, two per traced body, and a ResNet-18
  about as sure as the surest of them), each image's rest agreed by the teachers it is
  typical for; stage 2 from two components, their features compared as they are: the
  step that keeps each image's chosen network's features only equals the step that
  keeps every network's and masks their losses with the same one-hot weights."""
  if stage == "stage2":
    spec, frozen, state = _stage2(tiny)
  else:
    resnet18 = _teacher_stack(tiny, (8.0,), arch="resnet18", width_scale=0.125)
    spec, frozen, state = _stage1(tiny, _teacher_stack(tiny, (50.0, 0.0, 5.0, 20.0, 1.0)),
                                  resnet18, teacher_chunk=2, rest="typical")
  monkeypatch.setitem(ambiguity.RULES, "least, weighing all", ambiguity.Rule(
      weigh=lambda amb, key, correct, temperature: ambiguity.weights("least", amb)))
  devices = jax.local_devices()
  chosen = _run(_step(spec), state, frozen, IMAGES, devices)
  dense = _run(_step(dataclasses.replace(spec, selection="least, weighing all")), state,
               frozen, IMAGES, devices)
  chex.assert_trees_all_close(chosen, dense, atol=1e-6, rtol=1e-5)
  if stage != "stage2":
    assert 0 < chosen[1]["0/selected_fraction"][-1] < 1  # both stacks chosen


def test_frozen_networks_need_as_many_taps(tiny):
  shallow = models.ResNet(widths=(4, 4, 8), blocks=(1, 1), num_outputs=4, small_input=True)
  nets = teachers.stack_variables([shallow.init(jax.random.key(0, impl="rbg"), IMAGES[:1])])
  with pytest.raises(ValueError, match="3 feature taps .* has 5"):
    _stage1(tiny, (shallow, nets))


def test_selection_follows_the_teachers_not_their_order(tiny):
  spec, frozen, state = _stage1(tiny, _teacher_stack(tiny, (0.0, 50.0)))
  _, metrics = _run(_step(spec), state, frozen, IMAGES, jax.local_devices())
  np.testing.assert_array_equal(metrics["0/selected_fraction"], [0.0, 1.0])


def test_a_sure_teacher_is_not_chosen_on_images_unlike_its_training_images(tiny):
  """Teacher 0 is sure and teacher 1 uniform, but teacher 0's stem batch norm recorded
  responses 10 higher than these images give: with the atypicality in the score, every
  image learns from teacher 1."""
  module, nets = _teacher_stack(tiny, (50.0, 0.0))
  stem = nets["batch_stats"]["stem_bn"]
  nets = {**nets, "batch_stats": {**nets["batch_stats"], "stem_bn": {
      **stem, "mean": np.asarray(stem["mean"]) + np.array([[10.0], [0.0]])}}}
  spec, frozen, state = _stage1(tiny, (module, nets), atypicality_weight=1.0)
  _, (metrics, _) = jax.device_get(_loss(spec, state, frozen))
  np.testing.assert_array_equal(metrics["0/selected_fraction"], [0.0, 1.0])
  outputs = teachers.stacked_apply(module, nets, IMAGES, in_step=False)
  np.testing.assert_allclose(metrics["0/atypicality"],
                             np.mean(teachers.atypicality(nets, outputs), axis=1), rtol=1e-4)
  assert metrics["0/atypicality"][0] > 10 * metrics["0/atypicality"][1]


def test_no_selection_teaches_with_every_teacher(stage1):
  spec, frozen, state = stage1
  spec = dataclasses.replace(spec, selection="none")
  new, metrics = _run(_step(spec), state, frozen, IMAGES, jax.local_devices())
  np.testing.assert_allclose(metrics["0/selected_fraction"], [0.5, 0.5])
  for k in (0, 1):
    assert not _unchanged(state.params["groups"]["0"]["net_bridges"],
                          new.params["groups"]["0"]["net_bridges"], k)


def test_oracle_follows_the_labels(stage1):
  spec, frozen, state = stage1
  spec = dataclasses.replace(spec, selection="oracle")
  # Teacher 1 is uniform (argmax 0 everywhere): label 0 makes it right; where teacher
  # 0 is right as well, the less ambiguous teacher 0 wins.
  teacher0 = jax.device_get(teachers.stacked_apply(
      frozen[0][0].module, jax.tree.map(lambda a: a[:1], frozen[0][0].nets),
      IMAGES, in_step=False).logits[0, :, :3].argmax(-1))
  labels = np.zeros((BATCH, 1), np.int32)  # [B, G]: position in the one part
  _, metrics = _run(_step(spec), state, frozen, IMAGES, jax.local_devices(), label=labels)
  expected = np.mean(teacher0 == 0)
  np.testing.assert_allclose(metrics["0/selected_fraction"], [expected, 1 - expected],
                             atol=1e-6)


def test_random_rule_draws_from_each_images_key(stage1):
  """One key per image: the draws are the batch's, however it is split."""
  spec, frozen, state = stage1
  spec = dataclasses.replace(spec, selection="random")
  keys = np.random.default_rng(0).integers(0, 2**32, size=(BATCH, 2), dtype=np.uint32)
  devices = jax.local_devices()
  _, on_8 = _run(_step(spec), state, frozen, IMAGES, devices, key=keys)
  _, on_1 = _run(train.train_step(amalgamate.amalgamation_loss, spec, tuple(devices[:1])),
                 state, frozen, IMAGES, devices[:1], key=keys)
  assert 0.0 < on_8["0/selected_fraction"][0] < 1.0
  np.testing.assert_allclose(np.sum(on_8["0/selected_fraction"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(on_8["0/selected_fraction"], on_1["0/selected_fraction"],
                             rtol=1e-6)


def _loss(spec, state, frozen):
  """The loss on IMAGES on one device, the step's axis bound (the networks name it)."""
  loss_fn = parallel.data_parallel(
      lambda p, s, f, b: amalgamate.amalgamation_loss(spec, p, s, f, b),
      (parallel.REPLICATED,) * 3 + (parallel.SPLIT,), parallel.REPLICATED,
      tuple(jax.local_devices()[:1]))
  return loss_fn(state.params, state.batch_stats, frozen, {"image": IMAGES})


def test_loss_is_the_weighted_sum_of_feature_and_logit_terms(stage1):
  spec, frozen, state = stage1
  loss, (metrics, _) = jax.device_get(_loss(spec, state, frozen))
  np.testing.assert_allclose(
      loss, metrics["0/feature_loss"] + metrics["0/logit_loss"]
      + spec.weight_norm * metrics["0/weight_norm"], rtol=1e-6)
  assert metrics["0/weight_norm"] > 0  # fresh bridge rows are not unit norm


def _stage2(tiny, **overrides):
  """A student (heads of 3 and 2 classes, each with one output more for the rest where
  `overrides` name a rest) from one frozen component per group."""
  extra = int(overrides.get("rest", "none") != "none")
  components = [models.create(tiny.models.teacher, p + extra, tiny.models.teacher_width_scale)
                for p in (3, 2)]
  spec = amalgamate.Amalgamation(
      net=models.create(tiny.models.student, 5 + 2 * extra, tiny.models.student_width_scale,
                        axis_name=train.AXIS),
      head_sizes=(3 + extra, 2 + extra),
      bridge_widths=components[0].widths, frozen_bridges=False, **overrides)
  frozen = tuple(amalgamate.component_frozen(c, c.init(jax.random.key(g, impl="rbg"), IMAGES[:1]),
                                             c.num_outputs - extra)
                 for g, c in enumerate(components))
  return spec, frozen, _state(spec, frozen, tiny.stage2.optimizer, seed=3)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_the_loss_under_a_plain_jit_takes_the_projects_step(tiny, stage1, stage):
  """A researcher's loop: the loss under plain jax.jit and value_and_grad, one device,
  the network built without an axis name, gives the loss and update of the project's
  data-parallel step on one device."""
  spec, frozen, state = stage1 if stage == "stage1" else _stage2(tiny)
  plain = dataclasses.replace(spec, net=spec.net.clone(bn_axis_name=None))
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, s, f, b: amalgamate.amalgamation_loss(plain, p, s, f, b), has_aux=True))
  (loss, (_, batch_stats)), grads = grad_fn(state.params, state.batch_stats, frozen,
                                            {"image": IMAGES})
  mine = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  devices = jax.local_devices()[:1]
  theirs, metrics = _run(train.train_step(amalgamate.amalgamation_loss, spec, tuple(devices)),
                         state, frozen, IMAGES, devices)
  np.testing.assert_allclose(loss, metrics["loss"], rtol=1e-6)
  chex.assert_trees_all_close(jax.device_get(mine.params), theirs.params, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(mine.batch_stats), theirs.batch_stats,
                              atol=1e-6, rtol=1e-5)


def test_student_head_g_learns_from_group_g_only(tiny):
  """Stage 2: with group 1's logit scale at zero, head 1 gets no logit gradient
  while head 0 does."""
  spec, frozen, state = _stage2(tiny)
  state = state.replace(params={**state.params, "groups": {
      "0": state.params["groups"]["0"],
      "1": {**state.params["groups"]["1"], "logit_scale": jnp.zeros(1)}}})
  new, metrics = _run(_step(spec), state, frozen, IMAGES, jax.local_devices())
  kernel_before = state.params["net"]["head"]["kernel"]
  kernel_after = new.params["net"]["head"]["kernel"]
  assert not np.array_equal(kernel_after[:, :3], kernel_before[:, :3])
  np.testing.assert_array_equal(kernel_after[:, 3:], kernel_before[:, 3:])
  assert "frozen_bridges" not in new.params["groups"]["0"]
  assert metrics["0/weight_norm"] == 0.0 and metrics["1/feature_loss"] > 0


def test_a_component_learns_the_groups_agreed_rest_logit(tiny):
  """With stage1.rest='mean' the component's fourth output regresses the rest logit
  (the teacher's mass on its class outside the part) agreed by both teachers."""
  module, nets = _teacher_stack(tiny, (50.0, 0.0))
  spec = amalgamate.Amalgamation(
      net=models.create(tiny.models.teacher, 4, tiny.models.teacher_width_scale,
                        axis_name=train.AXIS),
      head_sizes=(4,),
      bridge_widths=tuple(tiny.stage1.bridge_widths), rest="mean")
  index = np.tile(np.arange(3, dtype=np.int32), (2, 1))
  outside = np.tile(np.array([False, False, False, True]), (2, 1))
  frozen = ((amalgamate.FrozenStack(module, nets, index, outside),),)
  state = _state(spec, frozen, tiny.stage1.optimizer)
  _, (metrics, _) = jax.device_get(_loss(spec, state, frozen))

  logits = teachers.stacked_apply(module, nets, IMAGES, in_step=False).logits  # [2, B, 4]
  target = joint.mean_rest(joint.rest_logit(logits, index, outside))  # [2, B, 4]
  plain = spec.net.clone(bn_axis_name=None)  # one device: the batch is the global one
  net_logits = plain.apply({"params": state.params["net"], "batch_stats": state.batch_stats},
                           IMAGES, train=True, mutable=["batch_stats"])[0].logits  # [B, 4]
  selected = target[0]  # teacher 0 is sure, teacher 1 uniform
  expected = np.mean((net_logits - selected) ** 2)  # logit scales start at 1
  np.testing.assert_allclose(metrics["0/logit_loss"], expected, rtol=1e-4)
  masses = jax.nn.softmax(target, axis=-1)[..., -1]  # [2, B]: the teachers agree
  np.testing.assert_allclose(masses[0], masses[1], rtol=1e-4)


def test_the_joint_term_is_the_kl_of_the_joint_distributions_over_every_heads_classes(tiny):
  """Stage 2 with rests: beside each head's terms, joint_weight times the KL (at the
  KD temperature T, times T^2) from the components' joint distribution over the 5
  target classes to the student's."""
  spec, frozen, state = _stage2(tiny, rest="own", joint_weight=0.5, kd_temperature=2.0)
  loss, (metrics, _) = jax.device_get(_loss(spec, state, frozen))

  components = [teachers.stacked_apply(s.module, s.nets, IMAGES, in_step=False).logits[0]
                for (s,) in frozen]  # [B, P + 1] each: the rest is the component's own
  scores = lambda logits: joint.scores(logits, (4, 3), rest=True) / 2.0  # [B, 5]
  target = jax.nn.softmax(scores(np.concatenate(components, -1)))
  plain = spec.net.clone(bn_axis_name=None)
  net_logits = plain.apply({"params": state.params["net"], "batch_stats": state.batch_stats},
                           IMAGES, train=True, mutable=["batch_stats"])[0].logits  # [B, 7]
  student = jax.nn.log_softmax(scores(net_logits))
  kl = 4.0 * np.mean(np.sum(target * (np.log(target) - student), axis=-1))
  np.testing.assert_allclose(metrics["joint_loss"], kl, rtol=1e-4)
  heads = sum(metrics[f"{g}/feature_loss"] + metrics[f"{g}/logit_loss"] for g in (0, 1))
  np.testing.assert_allclose(loss, heads + 0.5 * kl, rtol=1e-5)
  assert kl > 0.01  # untrained: the student's joint decision is not the components'


def test_a_spec_with_a_joint_term_and_no_rest_is_refused(tiny):
  """The joint distribution reads each head's rest: a researcher's own spec without
  one fails where it is built, not with a silently meaningless loss."""
  with pytest.raises(ValueError, match=r"joint_weight=1.0 needs the heads' rest logits"):
    amalgamate.Amalgamation(net=models.create(tiny.models.student, 5), head_sizes=(3, 2),
                            bridge_widths=(8,), joint_weight=1.0)
