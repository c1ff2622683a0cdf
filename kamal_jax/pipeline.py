"""The whole run, one way: config -> plan -> teachers -> stage 1 -> stage 2 -> report
-> the student exported (`export_networks`, into WORKDIR/export/student).

Each stage trains through `train.fit`, which resumes from the stage's checkpoints and
never retrains a finished stage; a later stage restores what the earlier ones left.

`config.pipeline` picks what stands between the teachers and the report:
  two_stage     the method: components (stage 1), then the student from them (stage 2);
  single_stage  the student from the teachers directly (stage 2 only);
  ensemble      no student: the teachers of each group, averaged, answer;
  supervised    the student trained with labels on the target classes (an upper bound).
"""
import dataclasses
import functools
import hashlib
import json
import tempfile
import time
import zlib
from pathlib import Path

import jax
from absl import logging
import ml_collections
import numpy as np

from kamal_jax import (ambiguity, amalgamate, compilation, data, evaluate, export, files,
                       joint, models, report, tasks, teachers, train)

__all__ = ["amalgamate_groups", "CADENCE", "config_drift", "enable_compilation_cache",
           "evaluate_all", "export_networks", "export_workdir", "NETWORKS", "PIPELINES",
           "prepare", "restore_networks", "Run", "sharded", "StageNotReadyError",
           "STAGES", "supervised_stages", "train_and_evaluate", "train_student",
           "train_supervised", "train_teachers", "validate", "workdir_for"]

STAGES = ("teachers", "stage1", "stage2", "evaluate")
NETWORKS = ("student", "components", "teachers")  # what `export_networks` can write
PIPELINES = ("two_stage", "single_stage", "ensemble", "supervised")


class StageNotReadyError(RuntimeError):
  pass


def _primary() -> bool:
  """Whether this process writes the run's files: only process 0 of a multi-process
  run does (checkpoints go through orbax, which coordinates the processes)."""
  return jax.process_index() == 0


def enable_compilation_cache(directory: str):
  """Caches compiled programs on disk: a rerun skips most XLA compilation."""
  jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@dataclasses.dataclass
class Run:
  """What every stage reads: the config, the data and the plan."""
  config: ml_collections.ConfigDict
  workdir: Path
  dataset: data.LabeledImages  # every image in its original domain
  domains: np.ndarray  # [N] each image's index into config.data.domains
  train_indices: np.ndarray  # the unlabeled pool (and the teachers' training images)
  test_indices: np.ndarray  # held out from every stage
  plan: tasks.AmalgamationPlan
  sources: dict[str, teachers.Teacher]  # every teacher; variables None: trained here
  stacks: tuple[tuple[str, ...], ...]  # the teachers that run as one, in plan order
  log: train.MetricLog
  train_stages: tuple[str, ...]  # the stages this invocation may train
  backbone: dict | None  # config.models.pretrained's variables, if it names a checkpoint
  trained: set = dataclasses.field(default_factory=set)  # the stages it did train

  def key(self, stream: str):
    root = jax.random.key(self.config.seed, impl=self.config.rng_impl)
    return jax.random.fold_in(root, zlib.crc32(stream.encode()))

  def images(self, indices: np.ndarray, domain: str | None = None,
             stream: str | None = None, step: int = 0) -> np.ndarray:
    """Images [B, S, S, C] as the networks see them: each in its own domain (what
    stages 1-2 and the tests see) or all in `domain` (a teacher's training images);
    augmented as config.data says when a training stream is named; then normalised
    by config.data's mean and std where it gives them."""
    rng = None if stream is None else data.stream_rng(self.config.seed, f"{stream}/images", step)
    x = self.dataset.images.read(indices, rng)
    if domain is None:
      x = data.in_domains(x, self.domains[indices], tuple(self.config.data.domains))
    else:
      x = data.in_domain(x, domain)
    if self.config.data.mean:
      x = (x - np.asarray(self.config.data.mean, np.float32)) / np.asarray(
          self.config.data.std, np.float32)
    return x

  def teacher_domain(self, name: str) -> str:
    return self.config.teacher_domains.get(name, self.config.data.domains[0])

  def warm_start(self, state: train.TrainState) -> train.TrainState:
    """The state with its network (or stack of networks) starting from the pretrained
    backbone."""
    start = models.with_backbone(_variables(state), self.backbone)
    return state.replace(params={**state.params, "net": start["params"]},
                         batch_stats=start["batch_stats"])

  def checkpoints(self, name: str) -> Path:
    """The directory of the checkpoints of training stage `name`."""
    return self.workdir / "checkpoints" / name

  def fit(self, name: str, stage: str, make_state, loss_fn, spec, frozen, batch_fn,
          cfg, labels, pretrained: bool = False, key=None) -> train.TrainState:
    """Trains (or restores) a stage from `make_state(key)` (key: by default drawn
    from the name); `pretrained`: its network starts from the backbone of
    config.models.pretrained, where that names one."""
    directory = self.checkpoints(name)
    key = self.key(name) if key is None else key
    state = train.restore_finished(directory, make_state, key, cfg.steps)
    if state is not None:
      return state
    if stage not in self.train_stages:
      raise StageNotReadyError(
          f"Stage {stage!r} has not finished in {self.workdir} ({name!r} has no final "
          f"checkpoint): run it first with --stage={stage} or run all stages.")
    self.trained.add(stage)
    schedule = train.Schedule(cfg.steps, self.config.log_every, self.config.checkpoint_every)
    warm_start = self.warm_start if pretrained and self.backbone is not None else None
    return train.fit(name, directory, make_state, key, loss_fn, spec, frozen, batch_fn,
                     schedule, self.log, labels, warm_start)


def _local(picks: np.ndarray) -> np.ndarray:
  """This process's rows of a global batch's indices (all of them in one process)."""
  return data.local_rows(picks, jax.process_index(), jax.process_count())


def sharded(batch: dict, axis: int = 0) -> dict:
  """Splits the batch axis of every array over the local devices."""
  devices = jax.local_device_count()
  return jax.tree.map(
      lambda v: np.moveaxis(data.shard(np.moveaxis(v, axis, 0), devices), 1, axis + 1), batch)


def _shapes(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), tree)


def _teacher_arch(config: ml_collections.ConfigDict, num_outputs: int, arch: str = ""):
  """The teachers' architecture (config.models.teacher), which the components share;
  like every network the run trains, its batch statistics span the step's axis."""
  cfg = config.models
  return models.create(arch or cfg.teacher, num_outputs, cfg.teacher_width_scale, cfg.dtype,
                       axis_name=train.AXIS)


def _component_arch(config: ml_collections.ConfigDict, group: tasks.Group):
  """A component: the teachers' architecture with one output per class of its part,
  and one more for the rest logit where stage1.rest keeps it."""
  return _teacher_arch(config, len(group.part.classes) + (config.stage1.rest != "none"))


def _student_heads(run: Run) -> tuple[int, ...]:
  """The student's head widths: one output per class of each part, and one more for
  the rest logit where it amalgamates networks that carry it (stage1.rest)."""
  rest = run.config.stage1.rest != "none" and run.config.pipeline != "supervised"
  return tuple(size + rest for size in run.plan.head_sizes)


def _student_arch(run: Run):
  cfg = run.config.models
  return models.create(cfg.student, sum(_student_heads(run)), cfg.student_width_scale,
                       cfg.dtype, axis_name=train.AXIS)


def _variables(state: train.TrainState) -> dict:
  return {"params": state.params["net"], "batch_stats": state.batch_stats}


def _labels_in(run: Run, indices: np.ndarray, classes) -> np.ndarray:
  """The images' positions in `classes` (a part, a teacher's head), -1 for images
  without a label among them."""
  return tasks.label_positions(run.dataset.labels[indices], run.dataset.heads, classes)


def _head_labels(run: Run, indices: np.ndarray, heads) -> np.ndarray:
  """[N, len(heads)]: the images' positions in each head (or part)."""
  return np.stack([_labels_in(run, indices, head.classes) for head in heads], axis=-1)


def _pool(run: Run, classes) -> np.ndarray:
  """The unlabeled images a stage learns from: every training image by default;
  under the reference protocol (data.pool='reference'), only those of `classes`,
  which needs the labels to pick them."""
  if run.config.data.pool == "all":
    return run.train_indices
  return run.train_indices[_labels_in(run, run.train_indices, classes) >= 0]


def supervised_stages(name: str, names: tuple[str, ...],
                      vectorized: bool | None = None) -> list[tuple[str, tuple[str, ...]]]:
  """How `train_supervised` splits networks `names` into stages: [(stage name,
  networks)]. Where stacks of trained networks run vectorized (`teachers.stack_way`;
  `vectorized` overrides it), all in one stage `name`; elsewhere (CPU, where they
  would unroll), one stage `{name}_{network}` each, all through one compiled step: a
  K-th of the compiling."""
  if vectorized is None:
    vectorized = teachers.stack_way(in_step=True) == "vmap"
  if len(names) == 1 or vectorized:
    return [(name, tuple(names))]
  return [(f"{name}_{n}", (n,)) for n in names]


def train_supervised(run: Run, name: str, stage: str, module, spaces: dict,
                     domains: dict[str, str | None], cfg,
                     pretrained: bool = False) -> teachers.TeacherStack:
  """Trains K networks of one architecture and head layout from labels: network k
  (label space `spaces[k]`) on the training images labelled in each of its heads,
  all in domain `domains[k]` (None: each image in its own). The teachers of the pool
  are trained this way (`pretrained`: from the pretrained backbone), and so is the
  supervised student.

  They train in one stage or one each (`supervised_stages`); either way network k
  sees the same batches and starts from the same weights: its own key, initialised
  alone (`lax.map`; a vmapped 'rbg' init would depend on the keys beside it). A run
  begun on a backend with the other split is restored from it where it finished
  there (trained on a GPU, evaluated on a CPU), never trained again.
  """
  names = tuple(spaces)
  x = run.images(np.arange(1))
  spec = teachers.Supervised(module, tuple(len(h.classes) for h in spaces[names[0]].heads))

  keys = lambda members: jax.numpy.stack([run.key(f"{name}/{n}") for n in members])

  def make_state(member_keys):
    variables = jax.lax.map(lambda k: module.init(k, x, train=False), member_keys)
    return train.create_state({"params": {"net": variables["params"]},
                               "batch_stats": variables["batch_stats"]}, cfg.optimizer, cfg.steps)

  def fit(stage_name: str, members: tuple[str, ...]) -> dict:
    images = [run.train_indices[np.all(_head_labels(
        run, run.train_indices, spaces[n].heads) >= 0, axis=-1)] for n in members]

    def batch_fn(step):
      picks = [_local(m[data.batch_indices(len(m), cfg.batch_size, run.config.seed,
                                           f"{name}/{n}", step)])
               for n, m in zip(members, images)]
      return sharded({
          "image": np.stack([run.images(p, domains[n], f"{name}/{n}", step)
                             for n, p in zip(members, picks)]),
          "label": np.stack([_head_labels(run, p, spaces[n].heads)
                             for n, p in zip(members, picks)]),
      }, axis=1)

    state = run.fit(stage_name, stage, make_state,
                    teachers.supervised_loss, spec, None, batch_fn, cfg,
                    labels={"": members}, pretrained=pretrained, key=keys(members))
    return _variables(state)

  def restored(stages) -> list[dict] | None:
    """The final variables of every one of `stages`, or None if one has not finished."""
    variables = []
    for stage_name, members in stages:
      directory = run.checkpoints(stage_name)
      if not directory.is_dir():  # checked first: a checkpoint manager would create it
        return None
      state = train.restore_finished(directory, make_state, keys(members), cfg.steps)
      if state is None:
        return None
      variables.append(_variables(state))
    return variables

  stages = supervised_stages(name, names)
  other = supervised_stages(name, names, vectorized=len(stages) > 1)
  started = lambda split: any(run.checkpoints(s).is_dir() for s, _ in split)
  variables = None
  if other != stages and not started(stages) and started(other):
    variables = restored(other)  # None where it did not finish there: trained here
    if variables is not None:
      logging.info("Restored %s from stages %s, as another backend trained them.", names,
                   [s for s, _ in other])
  if variables is None:
    variables = [fit(*stage_members) for stage_members in stages]
  return teachers.TeacherStack(names, module,
                               jax.tree.map(lambda *a: np.concatenate(a), *variables))


def train_teachers(run: Run) -> list[teachers.TeacherStack]:
  """The pool, one stack per architecture: imported teachers as they are; the others
  trained, each on the training images of its own classes in its own domain, a
  stack in one step; those of models.teacher's architecture start from
  models.pretrained where it is given."""
  to_train = [names for names in run.stacks if run.sources[names[0]].variables is None]
  pool = []
  for names in run.stacks:
    members = [run.sources[n] for n in names]
    if members[0].variables is not None:
      pool.append(teachers.stack(members))
      continue
    name = "teachers" if len(to_train) == 1 else f"teachers_{to_train.index(names) + 1}"
    module = members[0].module
    pool.append(train_supervised(run, name, "teachers", module,
                                 {t.name: t.label_space for t in members},
                                 {n: run.teacher_domain(n) for n in names},
                                 run.config.teacher_training,
                                 pretrained=module == _teacher_arch(run.config,
                                                                    module.num_outputs)))
  return pool


def _amalgamation(run: Run, net, head_sizes, frozen_nets, **overrides) -> amalgamate.Amalgamation:
  """The spec of an amalgamation stage from config.stage1's method settings."""
  cfg = run.config.stage1
  settings = dict(bridge_widths=tuple(cfg.bridge_widths), selection=cfg.selection,
                  ambiguity=cfg.ambiguity, temperature=cfg.temperature,
                  weight_norm=cfg.weight_norm, feature_weight=cfg.feature_weight,
                  logit_loss=cfg.logit_loss, kd_temperature=cfg.kd_temperature,
                  rest=cfg.rest)
  return amalgamate.Amalgamation(net=net, frozen_nets=tuple(frozen_nets),
                                 head_sizes=tuple(head_sizes), **dict(settings, **overrides))


def _frozen_outputs(run: Run, spec, frozen, indices: np.ndarray) -> dict | None:
  """The frozen networks' outputs on the images at `indices`, computed once for a
  stage: {str(g): [Outputs of [N, K_s, ...] host arrays, one per stack]}. Only where
  every epoch shows the same images (no augmentation) and the outputs fit in
  config.frozen_output_cache_mb; else None, and each step runs the frozen networks."""
  stacks = [(str(g), module, stack) for g, modules in enumerate(spec.frozen_nets)
            for module, stack in zip(modules, frozen["groups"][str(g)]["stacks"])]
  x = run.images(indices[:1])
  shapes = lambda module, nets: jax.eval_shape(
      lambda v: teachers.stacked_apply(module, v, x, in_step=False), nets)
  per_image = sum(a.size * a.dtype.itemsize for _, module, stack in stacks
                  for a in jax.tree.leaves(shapes(module, stack["nets"])))
  megabytes = per_image * len(indices) / 2**20
  if run.dataset.images.augments or megabytes > run.config.frozen_output_cache_mb:
    return None
  logging.info("Computing the frozen networks' outputs once: %.0f MB.", megabytes)
  outputs = {}
  for g, module, stack in stacks:
    outputs.setdefault(g, []).append(
        _predict(run, module, stack["nets"], indices, stacked=True, feats=True))
  return outputs


def _amalgamation_batches(run: Run, spec, indices: np.ndarray, parts, stream: str,
                          batch_size: int, frozen_outputs):
  """batch_fn over the given images: 'image' reaches the step, with 'frozen' (the
  frozen networks' outputs [B, K_s, ...]) where `frozen_outputs()` has them, a PRNG
  key per device for the random rule and, for the oracle (an upper bound), labels
  [B, G]: each image's position in each of the network's G parts. Each process reads
  its own rows of the global batch."""

  def batch_fn(step):
    positions = _local(data.batch_indices(len(indices), batch_size, run.config.seed,
                                          stream, step))
    picks = indices[positions]
    batch = {"image": run.images(picks, stream=stream, step=step)}
    if frozen_outputs() is not None:
      batch["frozen"] = jax.tree.map(lambda a: a[positions], frozen_outputs())
    if spec.selection in ambiguity.NEEDS_LABELS:
      batch["label"] = _head_labels(run, picks, parts)
    batch = sharded(batch)
    if spec.selection in ambiguity.NEEDS_KEY:
      rng = data.stream_rng(run.config.seed, f"{stream}/keys", step)
      keys = rng.integers(0, 2**32, size=(jax.device_count(), 2), dtype=np.uint32)
      batch["key"] = _local(keys)  # one per device of the run
    return batch

  return batch_fn


def _amalgamate(run: Run, name: str, stage: str, spec, frozen, parts, pool, cfg,
                labels, pretrained: bool = False) -> dict:
  """Trains spec.net by `amalgamation_loss` and returns its variables."""
  x = run.images(np.arange(1))
  shapes = _shapes(frozen)

  def make_state(key):
    variables = amalgamate.init(spec, key, shapes, x)
    return train.create_state(variables, cfg.optimizer, cfg.steps)

  frozen_outputs = functools.cache(lambda: _frozen_outputs(run, spec, frozen, pool))
  batch_fn = _amalgamation_batches(run, spec, pool, parts, name, cfg.batch_size,
                                   frozen_outputs)
  state = run.fit(name, stage, make_state, amalgamate.amalgamation_loss, spec, frozen,
                  batch_fn, cfg, labels, pretrained)
  return _variables(state)


def _group_frozen(plan: tasks.AmalgamationPlan, pool: list[teachers.TeacherStack],
                  group: tasks.Group):
  """A group's teachers as amalgamation inputs: their architectures, one per stack,
  and {'stacks': [{'nets', 'index', 'outside'}]}."""
  subs = teachers.sub_stacks(pool, group.teachers)
  ends = np.cumsum([len(s.names) for s in subs])[:-1]
  stacks = [{"nets": s.variables, "index": index,
             "outside": np.stack([plan.label_spaces[n].outside(group.part.classes)
                                  for n in s.names])}
            for s, index in zip(subs, np.split(group.index, ends))]
  return tuple(s.module for s in subs), {"stacks": stacks}


def amalgamate_groups(run: Run, pool: list[teachers.TeacherStack]) -> list[dict]:
  """Stage 1: each group's teachers' knowledge of its part into a component (which
  starts from models.pretrained where given; the student never does, as in the
  reference)."""
  components = []
  for group in run.plan.groups:
    modules, frozen = _group_frozen(run.plan, pool, group)
    net = _component_arch(run.config, group)
    spec = _amalgamation(run, net, (net.num_outputs,), (modules,))
    components.append(_amalgamate(
        run, f"stage1_{group.part.name}", "stage1", spec, {"groups": {"0": frozen}},
        [group.part], _pool(run, group.part.classes), run.config.stage1,
        {"0": group.teachers}, pretrained=True))
  return components


def train_student(run: Run, pool: list[teachers.TeacherStack], components) -> dict:
  """Stage 2: the student, from the components (two_stage), from the teachers
  directly (single_stage) or from labels (supervised)."""
  plan, cfg = run.plan, run.config.stage2
  student = _student_arch(run)
  if run.config.pipeline == "supervised":
    # One softmax over all target classes where they are exclusive (one dataset
    # head), else one per part (attributes).
    space = tasks.LabelSpace((tasks.Head("student", plan.target_classes),)
                             if tasks.shared_head(run.dataset.heads, plan.parts)
                             else plan.parts)
    stack = train_supervised(run, "stage2", "stage2", student, {"student": space},
                             {"student": None}, cfg)
    return teachers.take(stack.variables, 0)
  if run.config.pipeline == "single_stage":
    modules, frozen = zip(*(_group_frozen(plan, pool, group) for group in plan.groups))
    spec = _amalgamation(run, student, _student_heads(run), modules)
    frozen = {"groups": {str(g): f for g, f in enumerate(frozen)}}
    labels = {str(g): group.teachers for g, group in enumerate(plan.groups)}
  else:  # two_stage: head g regresses component g on every image, no selection
    modules = [_component_arch(run.config, group) for group in plan.groups]
    spec = _amalgamation(run, student, _student_heads(run), [(m,) for m in modules],
                         bridge_widths=models.tap_widths(modules[0], run.images(run.test_indices[:1])),
                         frozen_bridges=False,
                         selection="least", feature_weight=1.0, logit_loss="mse")
    frozen = {"groups": {str(g): {"stacks": [{  # a component's rest is its last output
        "nets": teachers.stack_variables([c]),
        "index": np.arange(len(group.part.classes), dtype=np.int32)[None],
        "outside": (np.arange(m.num_outputs) >= len(group.part.classes))[None]}]}
        for g, (c, m, group) in enumerate(zip(components, modules, plan.groups))}}
    labels = {str(g): (group.part.name,) for g, group in enumerate(plan.groups)}
  return _amalgamate(run, "stage2", "stage2", spec, frozen, plan.parts,
                     _pool(run, plan.target_classes), cfg, labels)


def _restricted(logits: dict[str, np.ndarray], group: tasks.Group) -> np.ndarray:
  """The group's teachers' logits on its part: {name: [N, C_t]} -> [K, N, P]."""
  return np.stack([logits[t][:, index] for t, index in zip(group.teachers, group.index)])


def _predict(run: Run, module, variables, indices: np.ndarray, stacked: bool = False,
             feats: bool = False):
  """Logits (or Outputs) of a network (or a stack) on the images at `indices`."""
  return evaluate.predict(module, variables, lambda at: run.images(indices[at]),
                          len(indices), run.config.eval_batch_size, stacked, feats)


def _teacher_logits(run: Run, pool: list[teachers.TeacherStack], indices) -> dict:
  """{teacher name: logits [N, C_t]} on the images at `indices`, each stack in one
  program."""
  logits = {}
  for stack in pool:
    stacked = _predict(run, stack.module, stack.variables, indices, stacked=True)  # [N, K, C]
    logits.update(zip(stack.names, np.swapaxes(stacked, 0, 1)))
  return logits


def _selection(run: Run, g: int, group: tasks.Group, logits: dict,
               indices: np.ndarray) -> dict:
  """How the configured rule weighs the group's teachers on the given images
  ({teacher name: logits [N, C_t]} on them)."""
  cfg = run.config
  restricted = _restricted(logits, group)
  targets = _labels_in(run, indices, group.part.classes)
  weights = evaluate.rule_weights(restricted, targets, cfg.stage1.selection,
                                  cfg.stage1.ambiguity, cfg.stage1.temperature,
                                  seed=cfg.seed + g)
  domains = list(cfg.data.domains)
  teacher_domains = np.array([domains.index(run.teacher_domain(t)) if
                              run.teacher_domain(t) in domains else -1
                              for t in group.teachers])
  stats = evaluate.selection_stats(restricted, weights, targets, teacher_domains,
                                   run.domains[indices])
  stats["selected_fraction"] = dict(zip(group.teachers, stats["selected_fraction"]))
  return stats


def evaluate_all(run: Run, pool: list[teachers.TeacherStack], components, student) -> dict:
  """Scores every network on the held-out split; adds sizes and selection stats."""
  cfg, plan = run.config, run.plan
  teacher_logits = _teacher_logits(run, pool, run.test_indices)
  component_logits = [
      _predict(run, _component_arch(cfg, g), c, run.test_indices)
      for g, c in zip(plan.groups, components)] or None
  teacher_params = {n: train.count_params(teachers.take(s.variables, i)["params"])
                    for s in pool for i, n in enumerate(s.names)}
  if student is None:  # the ensemble answers: every teacher of every group runs
    student_logits = evaluate.ensemble_log_probs(
        [_restricted(teacher_logits, g) for g in plan.groups])
    student_params = sum(teacher_params[t] for t in plan.used_teachers)
    forwards = len(plan.used_teachers)
  else:
    logits = _predict(run, _student_arch(run), student, run.test_indices)
    student_logits = np.split(logits, np.cumsum(_student_heads(run))[:-1], axis=-1)
    student_params, forwards = train.count_params(student["params"]), 1
  result = evaluate.score(plan, run.dataset.heads, run.dataset.labels[run.test_indices],
                          teacher_logits, component_logits, student_logits)
  result["student"].update(params=student_params, inference_forwards=forwards)
  for entry in result["teachers"]:
    entry["params"] = teacher_params[entry["name"]]

  # What each component learns from: on its stage-1 pool, and on the test images.
  pools = [_pool(run, group.part.classes) for group in plan.groups]
  seen = np.unique(np.concatenate(pools))  # every training image under data.pool='all'
  seen_logits = _teacher_logits(run, pool, seen)
  for g, (group, entry, images) in enumerate(zip(plan.groups, result["components"], pools)):
    at = np.searchsorted(seen, images)
    entry.update(_selection(run, g, group, {n: l[at] for n, l in seen_logits.items()},
                            images))
    entry["test_selection"] = _selection(run, g, group, teacher_logits, run.test_indices)
    entry["params"] = train.count_params(components[g]["params"]) if components else None
  return result


def validate(config: ml_collections.ConfigDict):
  """Checks what can be checked before any data is read, naming the fix."""
  devices = jax.device_count()
  widths = tuple(config.stage1.bridge_widths)
  if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
    raise ValueError(f"stage1.bridge_widths={widths}: give one positive integer per "
                     "feature tap.")
  batch_sizes = {"eval_batch_size": config.eval_batch_size}
  counts = {"log_every": config.log_every}
  for stage in ("teacher_training", "stage1", "stage2"):
    batch_sizes[f"{stage}.batch_size"] = config[stage].batch_size
    counts[f"{stage}.steps"] = config[stage].steps
    rates = config[stage].optimizer.get("tap_learning_rates", ())
    if len(rates) not in (0, len(widths)):
      raise ValueError(f"{stage}.optimizer.tap_learning_rates has {len(rates)} rates for "
                       f"{len(widths)} feature taps: give one per tap, or none.")
  for name, size in batch_sizes.items():
    if size <= 0 or size % devices:
      raise ValueError(f"{name}={size} does not split over {devices} devices: use a "
                       f"positive multiple of {devices}.")
  for name, count in counts.items():
    if count <= 0:
      raise ValueError(f"{name}={count}: give a positive number.")
  if config.frozen_output_cache_mb < 0:
    raise ValueError(f"frozen_output_cache_mb={config.frozen_output_cache_mb}: give a "
                     "size in MB, or 0 to run the frozen networks in every step.")
  choices = {"pipeline": (config.pipeline, PIPELINES),
             "data.pool": (config.data.pool, ("all", "reference")),
             "stage1.selection": (config.stage1.selection, tuple(ambiguity.RULES)),
             "stage1.logit_loss": (config.stage1.logit_loss, tuple(amalgamate.LOGIT_LOSSES)),
             "stage1.rest": (config.stage1.rest, ("none",) + tuple(joint.RESTS))}
  for name, (value, allowed) in choices.items():
    if value not in allowed:
      raise ValueError(f"{name}={value!r}: use one of {list(allowed)}.")
  ambiguity.get(config.stage1.ambiguity)
  unknown = sorted(set(config.export_graphs) - set(export.GRAPHS))
  if unknown:
    raise ValueError(f"export_graphs names {unknown}: use some of {list(export.GRAPHS)}.")
  if len(config.data.mean) != len(config.data.std) or min(config.data.std, default=1) <= 0:
    raise ValueError(f"data.mean {tuple(config.data.mean)} and data.std "
                     f"{tuple(config.data.std)}: give one of each per channel, std > 0.")
  if config.data.name == "folder" and not config.data.get("path"):
    raise ValueError("data.path is empty: set --config.data.path to a folder with one "
                     "sub-folder of images per class.")
  for domain in list(config.data.domains) + list(config.teacher_domains.values()):
    data.in_domain(np.zeros((1, 1, 1, 1)), domain)
  for arch in (config.models.teacher, config.models.student,
               *config.teacher_models.values()):
    models.create(arch, 1, dtype=config.models.dtype)


def _sources(config: ml_collections.ConfigDict, spaces: dict) -> dict[str, teachers.Teacher]:
  """Every teacher: imported from config.teacher_checkpoints, or to be trained here
  with config.teacher_models' architecture (config.models.teacher by default)."""
  return {name: teachers.imported(name, config.teacher_checkpoints[name], space,
                                  config.models.dtype)
          if name in config.teacher_checkpoints else teachers.Teacher(
              name, _teacher_arch(config, space.num_outputs,
                                  config.teacher_models.get(name, "")), None, space)
          for name, space in spaces.items()}


def _backbone(config: ml_collections.ConfigDict, channels: int) -> dict | None:
  """The variables of config.models.pretrained (a torchvision-named ResNet checkpoint,
  e.g. ImageNet weights), checked to be models.teacher's architecture and to read
  images of `channels` channels; None where it names none."""
  path = config.models.pretrained
  if not path:
    return None
  from kamal_jax.third_party import torch_resnet  # pylint: disable=g-import-not-at-top
  try:
    module, variables = torch_resnet.load(path, config.models.dtype)
  except ValueError as error:
    raise ValueError(f"models.pretrained: {error}") from error
  wanted = _teacher_arch(config, module.num_outputs)
  stem = variables["params"]["stem_conv"]["kernel"].shape[2]
  if module.clone(bn_axis_name=wanted.bn_axis_name) != wanted or stem != channels:
    raise ValueError(
        f"models.pretrained {path} holds a ResNet of widths {module.widths}, blocks "
        f"{module.blocks} on {stem}-channel images; models.teacher "
        f"{config.models.teacher!r} has widths {wanted.widths}, blocks {wanted.blocks} "
        f"and the data {channels} channels: give a checkpoint of that architecture.")
  return variables


# Config fields that change how often a run logs and checkpoints, or what it exports,
# never its results.
CADENCE = ("log_every", "checkpoint_every", "export_graphs")


def _flat(tree, prefix: str = "") -> dict:
  """A nested dict -> {'a.b.c': leaf}."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {k: v for key, value in tree.items()
          for k, v in _flat(value, f"{prefix}.{key}" if prefix else key).items()}


def config_drift(config: ml_collections.ConfigDict, workdir: Path) -> list[str]:
  """The fields (but CADENCE) whose values differ from those of the config the
  workdir was started with, as 'field: old -> new'; none for a new workdir."""
  saved = workdir / "config.json"
  if not saved.is_file():
    return []
  old = _flat(json.loads(saved.read_text()))
  new = _flat(json.loads(config.to_json_best_effort()))
  return [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
          for k in sorted(set(old) | set(new)) if k not in CADENCE and old.get(k) != new.get(k)]


def _check_workdir(config: ml_collections.ConfigDict, workdir: Path):
  """Refuses a workdir that is a file, cannot be written, or holds a run of a config
  that gives other results (resuming it would mix the two)."""
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is a file: give a directory, new or of this run.")
  existing = next(p for p in (workdir, *workdir.absolute().parents) if p.exists())
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as error:
    raise ValueError(f"--workdir {workdir} cannot be written ({error.strerror} in "
                     f"{existing}): give a directory you can write.") from error
  drift = config_drift(config, workdir)
  if drift:
    more = f" and {len(drift) - 5} more" if len(drift) > 5 else ""
    raise ValueError(
        f"{workdir} holds a run of another config ({'; '.join(drift[:5])}{more}): "
        "resume it with its config.json's values, use another --workdir, or pass "
        "--start_fresh to start anew beside it.")


def workdir_for(config: ml_collections.ConfigDict, workdir: Path, start_fresh: bool) -> Path:
  """`workdir`; with start_fresh, where it holds a run of another config, the first
  WORKDIR-N (N = 2, 3, ...) that is new or holds a run of this config."""
  candidate, n = workdir, 1
  while start_fresh and candidate.exists() and config_drift(config, candidate):
    n += 1
    candidate = workdir.with_name(f"{workdir.name}-{n}")
  if candidate != workdir:
    logging.warning("%s holds a run of another config; this one runs in %s.", workdir,
                    candidate)
  return candidate


def prepare(config: ml_collections.ConfigDict, workdir: Path, train_stages) -> Run:
  validate(config)
  _check_workdir(config, workdir)
  first = min(STAGES.index(s) for s in train_stages) if train_stages else 0
  if first and not (workdir / "config.json").is_file():
    raise StageNotReadyError(
        f"Stage {STAGES[0]!r} has not finished: {workdir} holds no run. Run all stages, "
        f"or those before {STAGES[first]!r} first.")
  dataset = data.load(config.data)
  backbone = _backbone(config, dataset.images.read(np.arange(1)).shape[-1])
  spaces = {name: tasks.label_space(
                tasks.resolve_splits(spec, dataset.heads, f"teachers.{name}"), name)
            for name, spec in config.teachers.items()}
  unknown = sorted({c for s in spaces.values() for c in s.classes} - set(dataset.class_names))
  if unknown:
    names = dataset.class_names
    raise ValueError(f"Teacher classes {unknown[:10]} are not classes of dataset "
                     f"{config.data.name!r} ({len(names)} classes, e.g. {list(names[:10])}): "
                     "fix the teachers' label sets.")
  for field in ("teacher_domains", "teacher_models", "teacher_checkpoints"):
    strangers = sorted(set(config[field]) - set(spaces))
    if strangers:
      raise ValueError(f"{field} names {strangers}, which are not teachers "
                       f"{sorted(spaces)}: fix the names.")
  sources = _sources(config, spaces)
  stacks = teachers.stack_order({n: (t.module, t.variables is None, tuple(
      len(h.classes) for h in t.label_space.heads)) for n, t in sources.items()})
  parts = tasks.resolve_splits(config.target.parts, dataset.heads, "target.parts")
  plan = tasks.make_plan(parts, {n: spaces[n] for names in stacks for n in names})
  for group in plan.groups:  # allowed: amalgamation then distils that one teacher
    if len(group.teachers) == 1 and config.pipeline in ("two_stage", "single_stage"):
      logging.warning("Part %r has one teacher (%s): there is nothing to select; its "
                      "head learns from that teacher alone.", group.part.name,
                      group.teachers[0])
  if dataset.test is None:
    train_indices, test_indices = data.stratified_split(
        dataset.labels, config.data.test_fraction, config.seed)
  else:  # the dataset's own split
    train_indices, test_indices = np.flatnonzero(~dataset.test), np.flatnonzero(dataset.test)
  domains = data.assign_domains(len(dataset.labels), tuple(config.data.domains), config.seed)
  # The workdir is touched only once the config has passed every check above.
  workdir.mkdir(parents=True, exist_ok=True)
  if _primary():
    files.write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2))
  return Run(config, workdir, dataset, domains, train_indices, test_indices, plan,
             sources, tuple(stacks), train.MetricLog(workdir), tuple(train_stages), backbone)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stages=STAGES) -> dict | None:
  """Runs the given stages (all by default) and returns the report if evaluated.

  timings.json keeps, per stage, the seconds of the invocation that trained it to
  the end (a stage restored from its checkpoints keeps its earlier time), and
  compilation.json what that invocation compiled in the stage (`compilation.since`).
  """
  compilation.listen()
  workdir = Path(workdir)
  run = prepare(config, workdir, stages)
  run.trained.add("evaluate")  # never checkpointed: always computed anew
  records = {name: workdir / f"{name}.json" for name in ("timings", "compilation")}
  timings, compiled = ({} if not path.exists() else json.loads(path.read_text())
                       for path in records.values())

  def timed(stage, fn, *args):
    start, before = time.perf_counter(), compilation.totals()
    out = fn(*args)
    if stage in run.trained:
      timings[stage] = round(time.perf_counter() - start, 2)
      compiled[stage] = compilation.since(before)
      if _primary():
        for path, record in zip(records.values(), (timings, compiled)):
          files.write_atomic(path, json.dumps(record, indent=2))
    return out

  last = max(STAGES.index(s) for s in stages)
  try:
    pool = timed("teachers", train_teachers, run)
    if last < STAGES.index("stage1"):
      return None
    components = []
    if config.pipeline == "two_stage":
      components = timed("stage1", amalgamate_groups, run, pool)
    if last < STAGES.index("stage2"):
      return None
    student = None
    if config.pipeline != "ensemble":
      student = timed("stage2", train_student, run, pool, components)
    if last < STAGES.index("evaluate"):
      return None
    result = timed("evaluate", evaluate_all, run, pool, components, student)
  finally:
    run.log.close()
  result["pipeline"] = config.pipeline
  result["timings"] = timings
  if _primary():
    report.write(result, workdir)
    if student is not None and isinstance(_student_arch(run), models.ResNet):
      export_networks(run, pool, components, student, "student", workdir / "export",
                      tuple(config.export_graphs))
  return result


def export_networks(run: Run, pool: list[teachers.TeacherStack], components, student,
                    network: str, out: Path, graphs=tuple(export.GRAPHS)) -> list[Path]:
  """Writes model folders (`export.write`, with the given graphs) of the run's
  student (out/student), its components (out/components/<part>) or its teachers
  (out/teachers/<name>), checked on the first test images; returns the folders."""
  plan = run.plan
  if network == "student":
    if student is None:
      raise ValueError(f"Pipeline {run.config.pipeline!r} has no student: export "
                       "--network=teachers instead.")
    rests = [w > p for w, p in zip(_student_heads(run), plan.head_sizes)]
    heads = [export.Head(p.name, p.classes, r) for p, r in zip(plan.parts, rests)]
    networks = [(out / "student", _student_arch(run), student, heads)]
  elif network == "components":
    if not components:
      raise ValueError(f"Pipeline {run.config.pipeline!r} has no components: export "
                       "--network=student or --network=teachers instead.")
    rest = run.config.stage1.rest != "none"
    networks = [(out / "components" / g.part.name, _component_arch(run.config, g), c,
                 [export.Head(g.part.name, g.part.classes, rest)])
                for g, c in zip(plan.groups, components)]
  else:
    networks = [(out / "teachers" / name, stack.module, teachers.take(stack.variables, i),
                 [export.Head(h.name, h.classes) for h in plan.label_spaces[name].heads])
                for stack in pool for i, name in enumerate(stack.names)]
  check = run.images(run.test_indices[:64])  # [n, S, S, C]
  cfg = run.config.data
  preprocessing = export.Preprocessing(check.shape[1], check.shape[-1],
                                       cfg.get("crop_fraction", 1.0), tuple(cfg.mean),
                                       tuple(cfg.std))
  config_text = (run.workdir / "config.json").read_bytes()
  provenance = {"workdir": str(run.workdir.absolute()), "pipeline": run.config.pipeline,
                "seed": run.config.seed, "config_sha256": hashlib.sha256(config_text).hexdigest()}
  for directory, module, variables, heads in networks:
    description = export.describe(directory.name, module, heads, preprocessing, provenance)
    export.write(directory, module, variables, description, check, graphs)
  return [directory for directory, *_ in networks]


def export_workdir(workdir: Path, network: str, out: Path | None = None) -> list[Path]:
  """Exports a finished run's networks (`export_networks`), into WORKDIR/export by
  default; the run's stages are restored, never trained."""
  workdir = Path(workdir)
  saved = workdir / "config.json"
  if not saved.is_file():
    raise ValueError(f"--workdir {workdir} holds no run (no config.json): give the "
                     "workdir of a finished run.")
  config = ml_collections.ConfigDict(json.loads(saved.read_text()))
  run = prepare(config, workdir, ())
  try:
    pool, components, student = restore_networks(run)
  finally:
    run.log.close()
  return export_networks(run, pool, components, student, network,
                         Path(out) if out else workdir / "export")


def restore_networks(run: Run):
  """A finished run's teachers (stacks), components ([] where the pipeline has none)
  and student (None for the ensemble), restored from their checkpoints; a stage that
  has not finished raises StageNotReadyError (`prepare(config, workdir, ())` trains
  nothing)."""
  pool = train_teachers(run)
  components = amalgamate_groups(run, pool) if run.config.pipeline == "two_stage" else []
  student = (None if run.config.pipeline == "ensemble"
             else train_student(run, pool, components))
  return pool, components, student
