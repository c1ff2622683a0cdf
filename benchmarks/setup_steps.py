"""Seconds per step and per epoch of a setup's three train steps, at its real sizes.

Builds the programs the pipeline runs for a config (a teacher's training step from
labels, a component's stage-1 step from its group, the student's stage-2 step), with
random weights and images, and times each after compiling. Prints a markdown table.

  python benchmarks/setup_steps.py --config=configs/class_setup.py --epoch_images=6000

--epoch_images: images in one epoch of the stage (e.g. a Stanford Dogs part's ~6,000
training images; the teachers' union of parts is larger, so scale accordingly).
"""
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from kamal_jax import amalgamate, models, parallel, pipeline, supervised, tasks, teachers, train
from kamal_jax.data import tfds_images

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config()).")
flags.DEFINE_integer("epoch_images", 6000, "Images per epoch, for the epoch column.")
flags.DEFINE_integer("steps", 3, "Timed steps per program (after one to compile).")
flags.DEFINE_string("compilation_cache", "~/.cache/kamal_jax/jax", "'' turns it off.")
flags.mark_flags_as_required(["config"])


def _images(config, count: int, rng) -> np.ndarray:
  size, channels = config.data.image_size, config.data.channels
  return rng.normal(size=(count, size, size, channels)).astype(np.float32)


def _init(module, x, count: int, seed: int):
  keys = jax.random.split(jax.random.key(seed, impl="rbg"), count)
  return jax.device_get(jax.jit(jax.vmap(lambda k: module.init(k, x, train=False)))(keys))


def _heads(cfg) -> tuple[tasks.Head, ...]:
  """The heads of config.data's tfds datasets, which its split references name, from
  the datasets' metadata alone (no record is read); none for other data."""
  if cfg.name != "tfds":
    return ()
  return tuple(head for name in cfg.datasets for head in tfds_images.heads(
      name, tfds_images.builder(name, cfg.data_dir).info.features))


def _time(step, state, frozen, batch, steps: int) -> tuple[float, float]:
  """(compile + first step, median step) in seconds."""
  state, frozen, batch = (parallel.replicated(state), parallel.replicated(frozen),
                          parallel.split(batch))
  start = time.perf_counter()
  state, metrics = step(state, frozen, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return first, float(np.median(times))


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.compilation_cache:
    pipeline.enable_compilation_cache(FLAGS.compilation_cache)
  rng = np.random.default_rng(0)
  heads = _heads(config.data)
  spaces = {n: tasks.label_space(tasks.resolve_splits(s, heads, f"teachers.{n}"), n)
            for n, s in config.teachers.items()}
  plan = tasks.make_plan(tasks.resolve_splits(config.target.parts, heads, "target.parts"),
                         spaces)
  group = plan.groups[0]
  cfg = config.models
  teacher = models.create(cfg.teacher, spaces[group.teachers[0]].num_outputs,
                          cfg.teacher_width_scale, cfg.dtype, axis_name=train.AXIS)
  x = _images(config, 1, rng)
  rows = []

  # A teacher's step from labels (each teacher is a stage of its own).
  pool = _init(teacher, x, len(spaces), 0)
  batch_size = config.teacher_training.batch_size
  state = train.create_state({"params": {"net": teachers.take(pool, 0)["params"]},
                              "batch_stats": teachers.take(pool, 0)["batch_stats"]},
                             config.teacher_training.optimizer, 100)
  spec = supervised.Supervised(teacher, tuple(
      len(h.classes) for h in spaces[group.teachers[0]].heads))
  batch = {"image": _images(config, batch_size, rng),
           "label": rng.integers(0, 2, size=(batch_size, len(spec.head_sizes))).astype(np.int32)}
  rows.append(("teacher (one per stage)", batch_size, *_time(
      train.train_step(supervised.supervised_loss, spec), state, None, batch, FLAGS.steps)))

  # Stage 1: a component from its group; stage 2: the student from the components.
  component = models.create(cfg.teacher, len(group.part.classes), cfg.teacher_width_scale,
                            cfg.dtype, axis_name=train.AXIS)
  student = models.create(cfg.student, sum(plan.head_sizes), cfg.student_width_scale,
                          cfg.dtype, axis_name=train.AXIS)
  stage1 = amalgamate.Amalgamation(
      net=component, head_sizes=(len(group.part.classes),),
      bridge_widths=tuple(config.stage1.bridge_widths))
  frozen1 = ((amalgamate.FrozenStack(teacher, teachers.take(pool, range(len(group.teachers))),
                                     group.index),),)
  components = _init(component, x, 1, 1)
  stage2 = amalgamate.Amalgamation(
      net=student, head_sizes=plan.head_sizes, bridge_widths=tuple(component.widths),
      frozen_bridges=False)
  frozen2 = tuple((amalgamate.FrozenStack(
      component, components, np.arange(len(group.part.classes), dtype=np.int32)[None]),)
      for _ in plan.groups)
  for name, spec, frozen, cfg_stage in (("stage 1 (component)", stage1, frozen1, config.stage1),
                                        ("stage 2 (student)", stage2, frozen2, config.stage2)):
    shapes = amalgamate.shapes_of(frozen)
    state = jax.jit(lambda: train.create_state(
        amalgamate.init(spec, jax.random.key(2, impl="rbg"), shapes, x),
        cfg_stage.optimizer, 100))()
    batch = {"image": _images(config, cfg_stage.batch_size, rng)}
    rows.append((name, cfg_stage.batch_size, *_time(
        train.train_step(amalgamate.amalgamation_loss, spec), state, frozen, batch,
        FLAGS.steps)))

  print(f"\n{config.data.image_size} px, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), teacher {cfg.teacher} x{cfg.teacher_width_scale}, student "
        f"{cfg.student} x{cfg.student_width_scale}; epoch = {FLAGS.epoch_images} images\n")
  print("| step | batch | compile + first (s) | s / step | images / s | min / epoch |")
  print("|---|---|---|---|---|---|")
  for name, batch_size, first, per_step in rows:
    print(f"| {name} | {batch_size} | {first:.1f} | {per_step:.2f} | "
          f"{batch_size / per_step:.1f} | {FLAGS.epoch_images / batch_size * per_step / 60:.1f} |")


if __name__ == "__main__":
  app.run(main)
