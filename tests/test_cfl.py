"""Common Feature Learning, the second amalgamation method: its MMD, its loss terms by
hand, and the pipeline kind end to end from the shared run's teachers."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kamal_jax import amalgamate, cfl, models, pipeline, tasks, teachers

IMAGES = np.random.default_rng(0).uniform(size=(16, 8, 8, 1)).astype(np.float32)


def test_mmd_is_zero_between_a_sample_and_itself_and_grows_with_the_gap():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  assert float(cfl.mmd(x, x)) < 1e-6
  assert float(cfl.mmd(x, 3 * x)) < 1e-6  # rows are normalised first
  near = cfl.mmd(x, x + 0.1 * rng.normal(size=x.shape).astype(np.float32))
  far = cfl.mmd(x, rng.normal(size=x.shape).astype(np.float32) + 5)
  assert 0 < float(near) < float(far)


def test_the_loss_terms_are_those_computed_by_hand(tiny):
  """Two teachers share a part of 3 classes at different positions of their logits:
  the KD target is the mean of their softmaxes over the part's logits."""
  plan = tasks.make_plan({"p": ["0", "1", "2"]},
                         {"a": tasks.label_space(["0", "1", "2", "6"], "a"),
                          "b": tasks.label_space(["6", "2", "1", "0"], "b")})
  module = models.create(tiny.models.teacher, 4, tiny.models.teacher_width_scale)
  nets = teachers.stack_variables([jax.jit(module.init)(jax.random.key(k, impl="rbg"),
                                                        IMAGES[:1]) for k in (1, 2)])
  pool = [teachers.TeacherStack(("a", "b"), module, nets)]
  frozen = (amalgamate.group_frozen(plan, pool, plan.groups[0]),)
  student = models.create(tiny.models.student, 3, tiny.models.student_width_scale)
  spec = cfl.CFL(student, (3,), width=4)
  variables = cfl.init(spec, jax.random.key(0, impl="rbg"), amalgamate.shapes_of(frozen),
                       IMAGES[:1])
  loss, (metrics, _) = jax.jit(lambda v: cfl.cfl_loss(
      spec, v["params"], v["batch_stats"], frozen, {"image": IMAGES}))(variables)

  logits = teachers.stacked_apply(module, nets, IMAGES, in_step=False).logits  # [2, B, 4]
  part = np.stack([logits[0][:, [0, 1, 2]], logits[1][:, [3, 2, 1]]])  # [2, B, 3]
  target = jnp.mean(jax.nn.softmax(part, axis=-1), axis=0)
  z = student.apply({"params": variables["params"]["net"],
                     "batch_stats": variables["batch_stats"]},
                    IMAGES, train=True, mutable=["batch_stats"])[0].logits
  kd = jnp.mean(optax.losses.kl_divergence(jax.nn.log_softmax(z, axis=-1), target))
  np.testing.assert_allclose(metrics["kd_loss"], kd, rtol=1e-5)
  np.testing.assert_allclose(loss, metrics["kd_loss"] + metrics["mmd"]
                             + metrics["reconstruction"], rtol=1e-6)
  assert metrics["mmd"] > 0 and metrics["reconstruction"] > 0
  adapters = variables["params"]["common"]["groups"]["0"][0]["adapters"]
  assert jax.tree.leaves(adapters)[0].shape[0] == 2  # one adapter per teacher


def test_the_cfl_kind_runs_from_the_teachers_to_an_exported_student(tiny, finished, tmp_path):
  reference, result = finished
  shutil.copytree(reference / "checkpoints" / "teachers", tmp_path / "checkpoints" / "teachers")
  config = tiny.copy_and_resolve_references()
  config.pipeline = "cfl"
  report = pipeline.train_and_evaluate(config, str(tmp_path))
  assert "teachers" not in report["timings"] and "stage2" in report["timings"]
  assert report["teachers"] == result["teachers"]  # the same teachers, restored
  assert all(c["accuracy"] is None for c in report["components"])
  assert 0 <= report["student"]["accuracy_joint"] <= 1
  assert report["student"]["params"] < result["student"]["params"]  # no rest logits
  assert (tmp_path / "export" / "student" / "model.json").is_file()
