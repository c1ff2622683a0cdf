"""The whole run, one way: config -> plan -> teachers -> stage 1 -> stage 2 -> report.

Each stage trains through `train.fit`, which resumes from the stage's checkpoints and
never retrains a finished stage; a later stage restores what the earlier ones left.
"""
import dataclasses
import json
import time
import zlib
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tensorboardX import SummaryWriter

from kamal_jax import ambiguity, amalgamate, data, evaluate, models, report, tasks, teachers, train

STAGES = ("teachers", "stage1", "stage2", "evaluate")


class StageNotReadyError(RuntimeError):
  pass


@dataclasses.dataclass
class Run:
  """What every stage reads: the config, the data and the plan."""
  config: ml_collections.ConfigDict
  workdir: Path
  dataset: data.LabeledImages
  train_indices: np.ndarray  # the unlabeled pool (and the teachers' training images)
  test_indices: np.ndarray  # held out from every stage
  plan: tasks.AmalgamationPlan
  writer: SummaryWriter
  train_stages: tuple[str, ...]  # the stages this invocation may train
  trained: set = dataclasses.field(default_factory=set)  # the stages it did train

  def key(self, stream: str):
    root = jax.random.key(self.config.seed, impl=self.config.rng_impl)
    return jax.random.fold_in(root, zlib.crc32(stream.encode()))

  def fit(self, name: str, stage: str, make_state, loss_fn, spec, frozen, batch_fn,
          cfg, axis_labels=()) -> train.TrainState:
    directory = self.workdir / "checkpoints" / name
    state = train.restore_finished(directory, make_state, cfg.steps)
    if state is not None:
      return state
    if stage not in self.train_stages:
      raise StageNotReadyError(
          f"Stage {stage!r} has not finished in {self.workdir} ({name!r} has no final "
          f"checkpoint): run it first with --stage={stage} or run all stages.")
    self.trained.add(stage)
    schedule = train.Schedule(cfg.steps, self.config.log_every, self.config.checkpoint_every)
    return train.fit(name, directory, make_state, loss_fn, spec, frozen, batch_fn,
                     schedule, self.writer, axis_labels)


def _sharded(batch: dict, axis: int = 0) -> dict:
  """Splits the batch axis of every array over the local devices."""
  devices = jax.local_device_count()
  return {k: np.moveaxis(data.shard(np.moveaxis(v, axis, 0), devices), 1, axis + 1)
          for k, v in batch.items()}


def _images(run: Run, indices: np.ndarray, stream: str, batch_size: int):
  """batch_fn over the given images, labels withheld: only 'image' reaches a step."""
  images = run.dataset.images
  return lambda step: _sharded({"image": images[indices[
      data.batch_indices(len(indices), batch_size, run.config.seed, stream, step)]]})


def _teacher_arch(run: Run, num_outputs: int):
  """The teachers' architecture, which the components share."""
  cfg = run.config.models
  return models.create(cfg.teacher, num_outputs, cfg.teacher_width_scale, cfg.dtype)


def _variables(state: train.TrainState) -> dict:
  return {"params": state.params["net"], "batch_stats": state.batch_stats}


def train_teachers(run: Run) -> teachers.TeacherStack:
  """Trains the pool's teachers from labels, each on the training images of its own
  classes; all of them in one step."""
  cfg = run.config.teacher_training
  spaces = run.plan.label_spaces
  names = tuple(spaces)
  module = _teacher_arch(run, spaces[names[0]].num_outputs)
  x = run.dataset.images[:1]
  class_names = np.array(run.dataset.class_names)
  members, local_labels = [], []
  for name in names:
    classes = spaces[name].classes
    inside = np.isin(class_names[run.dataset.labels[run.train_indices]], classes)
    members.append(run.train_indices[inside])
    local_labels.append(np.array([classes.index(c) for c in class_names[
        run.dataset.labels[members[-1]]]], np.int32))

  def batch_fn(step):
    picks = [data.batch_indices(len(m), cfg.batch_size, run.config.seed,
                                f"teachers/{name}", step)
             for name, m in zip(names, members)]
    return _sharded({"image": np.stack([run.dataset.images[m[p]] for m, p in zip(members, picks)]),
                     "label": np.stack([l[p] for l, p in zip(local_labels, picks)])}, axis=1)

  def make_state():
    keys = jax.random.split(run.key("teachers"), len(names))
    variables = jax.vmap(lambda k: module.init(k, x, train=False))(keys)
    return train.create_state({"params": {"net": variables["params"]},
                               "batch_stats": variables["batch_stats"]}, cfg.optimizer, cfg.steps)

  state = run.fit("teachers", "teachers", make_state, teachers.supervised_loss, module,
                  None, batch_fn, cfg, axis_labels=names)
  return teachers.TeacherStack(names, module, _variables(state))


def _pool(run: Run, classes) -> np.ndarray:
  """The unlabeled images a stage learns from: every training image by default;
  under the reference protocol (data.pool='reference'), only those of `classes`,
  which needs the labels to pick them."""
  if run.config.data.pool == "all":
    return run.train_indices
  names = np.array(run.dataset.class_names)[run.dataset.labels[run.train_indices]]
  return run.train_indices[np.isin(names, classes)]


def amalgamate_group(run: Run, pool_teachers: teachers.TeacherStack,
                     group: tasks.Group) -> dict:
  """Stage 1 for one group: its teachers' knowledge of the part into a component."""
  cfg = run.config.stage1
  spec = amalgamate.Stage1(
      component=_teacher_arch(run, len(group.part.classes)),
      teacher=pool_teachers.module, bridge_widths=tuple(cfg.bridge_widths),
      ambiguity=cfg.ambiguity, weight_norm=cfg.weight_norm)
  stack = teachers.take(pool_teachers.variables,
                        [pool_teachers.names.index(t) for t in group.teachers])
  frozen = {"teachers": stack, "index": group.index}
  x = run.dataset.images[:1]
  name = f"stage1_{group.part.name}"

  def make_state():
    variables = amalgamate.init_stage1(spec, run.key(name), stack, x)
    return train.create_state(variables, cfg.optimizer, cfg.steps)

  state = run.fit(name, "stage1", make_state, amalgamate.stage1_loss, spec, frozen,
                  _images(run, _pool(run, group.part.classes), name, cfg.batch_size),
                  cfg, axis_labels=group.teachers)
  return _variables(state)


def amalgamate_groups(run: Run, pool_teachers: teachers.TeacherStack) -> list[dict]:
  return [amalgamate_group(run, pool_teachers, g) for g in run.plan.groups]


def amalgamate_components(run: Run, components: list[dict]) -> tuple[dict, amalgamate.Stage2]:
  """Stage 2: the components into one multi-head student."""
  cfg = run.config.stage2
  plan = run.plan
  component = _teacher_arch(run, plan.head_sizes[0])
  spec = amalgamate.Stage2(
      student=models.create(run.config.models.student, sum(plan.head_sizes),
                            run.config.models.student_width_scale, run.config.models.dtype),
      component=component, component_widths=tuple(component.widths))
  frozen = {"components": teachers.stack_variables(components)}
  x = run.dataset.images[:1]

  def make_state():
    variables = amalgamate.init_stage2(spec, run.key("stage2"), len(components), x)
    return train.create_state(variables, cfg.optimizer, cfg.steps)

  state = run.fit("stage2", "stage2", make_state, amalgamate.stage2_loss, spec, frozen,
                  _images(run, _pool(run, plan.target_classes), "stage2", cfg.batch_size),
                  cfg, axis_labels=[p.name for p in plan.parts])
  return _variables(state), spec


def evaluate_all(run: Run, pool_teachers, components, student, spec) -> dict:
  """Scores every network on the held-out split; adds sizes and selection stats."""
  cfg = run.config
  test = run.dataset.subset(run.test_indices)
  batch = cfg.eval_batch_size
  teacher_logits = evaluate.predict(pool_teachers.module, pool_teachers.variables,
                                    test.images, batch, stacked=True)
  component_logits = evaluate.predict(spec.component, teachers.stack_variables(components),
                                      test.images, batch, stacked=True)
  student_logits = evaluate.predict(spec.student, student, test.images, batch)
  result = evaluate.score(run.plan, test.class_names, test.labels,
                          dict(zip(pool_teachers.names, teacher_logits)),
                          component_logits, student_logits, cfg.stage1.ambiguity)
  # Which teacher each image of a component's stage-1 pool learned from.
  train_logits = evaluate.predict(pool_teachers.module, pool_teachers.variables,
                                  run.dataset.images[run.train_indices], batch, stacked=True)
  for group, entry in zip(run.plan.groups, result["components"]):
    rows = np.searchsorted(run.train_indices, _pool(run, group.part.classes))
    ids = [pool_teachers.names.index(t) for t in group.teachers]
    fraction = evaluate.selected_fraction(train_logits[ids][:, rows], group.index,
                                          cfg.stage1.ambiguity)
    entry["selected_fraction"] = dict(zip(group.teachers, fraction.tolist()))
    entry["params"] = train.count_params(components[0]["params"])
  for entry in result["teachers"]:
    entry["params"] = train.count_params(teachers.take(pool_teachers.variables, 0)["params"])
  result["student"]["params"] = train.count_params(student["params"])
  return result


def validate(config: ml_collections.ConfigDict):
  """Checks what can be checked before any data is read, naming the fix."""
  devices = jax.local_device_count()
  sizes = {f"{stage}.batch_size": config[stage].batch_size
           for stage in ("teacher_training", "stage1", "stage2")}
  for name, size in dict(sizes, eval_batch_size=config.eval_batch_size).items():
    if size % devices:
      raise ValueError(f"{name}={size} does not split over {devices} devices: use a "
                       f"multiple of {devices}.")
  if config.data.pool not in ("all", "reference"):
    raise ValueError(f"data.pool={config.data.pool!r}: use 'all' or 'reference'.")
  ambiguity.get(config.stage1.ambiguity)
  for arch in (config.models.teacher, config.models.student):
    models.create(arch, 1, dtype=config.models.dtype)


def _check_stackable(plan: tasks.AmalgamationPlan):
  """Teachers train and run as one stack, and so do the components: for now that
  needs equal label-space sizes and equal part sizes."""
  sizes = {name: space.num_outputs for name, space in plan.label_spaces.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"Teachers have label sets of different sizes {sizes}; one stack "
                     "needs one size: give every teacher as many classes.")
  if len(set(plan.head_sizes)) > 1:
    raise ValueError(f"Target parts have different sizes {plan.head_sizes}; the "
                     "components form one stack: give every part as many classes.")


def prepare(config: ml_collections.ConfigDict, workdir: Path, train_stages) -> Run:
  validate(config)
  dataset = data.load(config.data.name, config.data.data_dir)
  spaces = {name: tasks.label_space(spec, name) for name, spec in config.teachers.items()}
  unknown = sorted({c for s in spaces.values() for c in s.classes} - set(dataset.class_names))
  if unknown:
    raise ValueError(f"Teacher classes {unknown} are not classes of dataset "
                     f"{config.data.name!r} {list(dataset.class_names)}: fix the teachers' label sets.")
  plan = tasks.make_plan(config.target.parts, spaces)
  _check_stackable(plan)
  train_indices, test_indices = data.stratified_split(
      dataset.labels, config.data.test_fraction, config.seed)
  # The workdir is touched only once the config has passed every check above.
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  writer = SummaryWriter(str(workdir / "tensorboard"))
  return Run(config, workdir, dataset, train_indices, test_indices, plan, writer,
             tuple(train_stages))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stages=STAGES) -> dict | None:
  """Runs the given stages (all by default) and returns the report if evaluated.

  timings.json keeps, per stage, the seconds of the invocation that trained it to
  the end (a stage restored from its checkpoints keeps its earlier time).
  """
  workdir = Path(workdir)
  run = prepare(config, workdir, stages)
  run.trained.add("evaluate")  # never checkpointed: always computed anew
  timings_path = workdir / "timings.json"
  timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}

  def timed(stage, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    if stage in run.trained:
      timings[stage] = round(time.perf_counter() - start, 2)
      timings_path.write_text(json.dumps(timings, indent=2))
    return out

  last = max(STAGES.index(s) for s in stages)
  try:
    pool_teachers = timed("teachers", train_teachers, run)
    if last < STAGES.index("stage1"):
      return None
    components = timed("stage1", amalgamate_groups, run, pool_teachers)
    if last < STAGES.index("stage2"):
      return None
    student, spec = timed("stage2", amalgamate_components, run, components)
    if last < STAGES.index("evaluate"):
      return None
    result = timed("evaluate", evaluate_all, run, pool_teachers, components, student, spec)
  finally:
    run.writer.close()
  result["timings"] = timings
  report.write(result, workdir)
  return result
