"""The whole run, in its order: the door (`door`) -> the teachers and the pipeline's
stages (`kinds`) -> evaluation (`evaluate.run_scores`) -> the report -> the student
exported (into WORKDIR/export/student).

Every stage is a value (`train.Stage`) made by a factory beside its method
(`supervised.stage`, `amalgamate.stage1`, ...) and trained by `Run.fit` through
`train.fit`, which resumes from its checkpoints and never retrains a finished stage;
a later stage restores what the earlier ones left.

`config.pipeline` names what stands between the teachers and the report, one entry
of `kinds.PIPELINES` (the method's two stages by default).
"""
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from kamal_jax import (compilation, data, door, evaluate, export, files, interrupts, models,
                       parallel, report, tasks, teachers, train)
from kamal_jax.examples import Examples
from kamal_jax.kinds import PIPELINES, supervised_target, train_teachers
from kamal_jax.networks import Networks

__all__ = ["enable_compilation_cache", "export_workdir", "NETWORKS", "PIPELINES", "prepare",
           "restore_networks", "Run", "StageNotReadyError", "STAGES", "train_and_evaluate"]

STAGES = ("teachers", "stage1", "stage2", "evaluate")
NETWORKS = ("student", "components", "teachers")  # what `export.networks` can write


class StageNotReadyError(RuntimeError):
  pass


def enable_compilation_cache(directory: str):
  """Caches compiled programs on disk: a rerun skips most XLA compilation."""
  jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@dataclasses.dataclass
class Run:
  """What every step of a run reads: the config, the data and the plan."""
  config: ml_collections.ConfigDict
  workdir: Path
  dataset: data.LabeledImages  # every image in its original domain
  domains: np.ndarray  # [N] each image's index into config.data.domains
  train_indices: np.ndarray  # the unlabeled pool (and the teachers' training images)
  test_indices: np.ndarray  # held out from every stage
  plan: tasks.AmalgamationPlan
  sources: dict[str, teachers.Teacher]  # every teacher; variables None: trained here
  stacks: tuple[tuple[str, ...], ...]  # the teachers that run as one, in plan order
  log: train.MetricLog | None  # set once the run passed the door (with the lock)
  train_stages: tuple[str, ...]  # the stages this invocation may train
  backbone: dict | None  # config.models.pretrained's variables, if it names a checkpoint
  trained: set = dataclasses.field(default_factory=set)  # the stages it did train
  lock: Any = None  # the workdir's lock (door.lock_workdir), held until `close`

  def __enter__(self) -> "Run":
    return self

  def __exit__(self, *exception):
    self.close()

  def close(self):
    """Closes the metric log and lets the workdir go (a run is a context manager)."""
    self.log.close()
    if self.lock is not None:
      self.lock.close()

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

  def examples(self, indices: np.ndarray, heads, domain: str | None = None) -> Examples:
    """The images at `indices` as a stage reads them, labelled by their positions in
    `heads` (parts or a label space's heads)."""
    return Examples(indices, lambda at, stream, step: self.images(at, domain, stream, step),
                    self.dataset.images.augments, self.head_labels(indices, heads))

  def labels_in(self, indices: np.ndarray, classes) -> np.ndarray:
    """[N]: the images' positions in `classes` (a part, a teacher's head), -1 for
    images without a label among them."""
    return tasks.label_positions(self.dataset.labels[indices], self.dataset.heads, classes)

  def head_labels(self, indices: np.ndarray, heads) -> np.ndarray:
    """[N, len(heads)]: the images' positions in each head's classes."""
    return np.stack([self.labels_in(indices, head.classes) for head in heads], axis=-1)

  def predict(self, module, variables, indices: np.ndarray, stacked: bool = False,
              returns: str = "logits"):
    """Logits (or what else `returns` names: `evaluate.RETURNS`) of a network (or a
    stack) on the images at `indices`."""
    return evaluate.predict(module, variables, lambda at: self.images(indices[at]),
                            len(indices), self.config.eval_batch_size, stacked, returns)

  def pool(self, classes) -> np.ndarray:
    """The unlabeled images a stage learns from: every training image by default;
    under the reference protocol (data.pool='reference'), only those of `classes`,
    which needs the labels to pick them."""
    if self.config.data.pool == "all":
      return self.train_indices
    return self.train_indices[self.labels_in(self.train_indices, classes) >= 0]

  def teacher_domain(self, name: str) -> str:
    return self.config.teacher_domains.get(name, self.config.data.domains[0])

  def how(self) -> dict:
    """The run-wide settings every amalgamation stage takes (see `amalgamate.stage`)."""
    return dict(seed=self.config.seed, rng_impl=self.config.rng_impl,
                eval_batch_size=self.config.eval_batch_size,
                frozen_output_cache_mb=self.config.frozen_output_cache_mb)

  def warm_start(self, variables: dict) -> dict:
    """A stage's first variables with its network from the pretrained backbone."""
    start = models.with_backbone({"params": variables["params"]["net"],
                                  "batch_stats": variables["batch_stats"]}, self.backbone)
    return {"params": {**variables["params"], "net": start["params"]},
            "batch_stats": start["batch_stats"]}

  def pretrained(self) -> dict:
    """`warm_start=` for a stage whose network starts from config.models.pretrained."""
    return {"warm_start": self.warm_start if self.backbone is not None else None}

  def fit(self, stage: train.Stage, step: str) -> dict:
    """The variables of the network `stage` trains, restored where it has finished,
    else trained where this invocation may train `step` (a STAGES name)."""
    directory = self.workdir / "checkpoints" / stage.name
    state = train.restore_finished(stage, directory)
    if state is None:
      if step not in self.train_stages:
        raise StageNotReadyError(
            f"Stage {step!r} has not finished in {self.workdir} ({stage.name!r} has no "
            f"final checkpoint): run it first with --stage={step} or run all stages.")
      self.trained.add(step)
      schedule = train.Schedule(self.config.log_every, self.config.checkpoint_every)
      state = train.fit(stage, directory, schedule, self.log)
    return {"params": state.params["net"], "batch_stats": state.batch_stats}


def _sources(config: ml_collections.ConfigDict, spaces: dict) -> dict[str, teachers.Teacher]:
  """Every teacher: imported from config.teacher_checkpoints, or to be trained here
  with config.teacher_models' architecture (config.models.teacher by default)."""
  return {name: teachers.imported(name, config.teacher_checkpoints[name], space,
                                  config.models.dtype)
          if name in config.teacher_checkpoints else teachers.Teacher(
              name, models.teacher(config.models, space.num_outputs,
                                   config.teacher_models.get(name, "")), None, space)
          for name, space in spaces.items()}


def prepare(config: ml_collections.ConfigDict, workdir: Path, train_stages) -> Run:
  """The run behind the door: every check passed before the workdir is touched."""
  door.validate(config)
  door.check_workdir(config, workdir)
  first = min(STAGES.index(s) for s in train_stages) if train_stages else 0
  if first and not (workdir / "config.json").is_file():
    raise StageNotReadyError(
        f"Stage {STAGES[0]!r} has not finished: {workdir} holds no run. Run all stages, "
        f"or those before {STAGES[first]!r} first.")
  dataset = data.load(config.data)
  backbone = door.backbone(config, dataset.images.read(np.arange(1)).shape[-1])
  spaces = {name: tasks.label_space(
                tasks.resolve_splits(spec, dataset.heads, f"teachers.{name}"), name)
            for name, spec in config.teachers.items()}
  door.check_teachers(config, dataset.class_names, spaces)
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
  run = Run(config, workdir, dataset, domains, train_indices, test_indices, plan, sources,
            tuple(stacks), None, tuple(train_stages), backbone)
  example = run.images(train_indices[:1])
  door.check_fit(config, {**{f"teacher {n}": t.module for n, t in sources.items()},
                          "the components": models.teacher(config.models, 1),
                          "the student": models.student(config.models, 1)},
                 example, _pool_sizes(run), len(test_indices))
  door.check_memory(config, {g.part.name: [sources[n].module for n in g.teachers]
                             for g in plan.groups},
                    example, door.available_memory(), train_stages)
  # The workdir is touched only once the config has passed every check above.
  with files.writing(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
  run.lock = door.lock_workdir(workdir)
  if parallel.primary():
    files.write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2))
  run.log = train.MetricLog(workdir)
  return run


def _pool_sizes(run: Run) -> dict[str, tuple[str, int]]:
  """Per batch-size field, the smallest pool the run's stages draw that batch from
  (`door.check_fit`): each teacher trained here learns from its labelled training
  images, each component from its part's pool, the student from the target's (or,
  supervised, from the target's labelled images)."""
  def labelled(heads) -> int:
    return int(np.all(run.head_labels(run.train_indices, heads) >= 0, axis=-1).sum())

  pools = [("teacher_training.batch_size", f"teacher {n}'s labelled training images",
            labelled(t.label_space.heads)) for n, t in run.sources.items() if t.variables is None]
  kind = run.config.pipeline
  if kind == "two_stage":
    pools += [("stage1.batch_size", f"part {g.part.name}'s pool", len(run.pool(g.part.classes)))
              for g in run.plan.groups]
  if kind == "supervised":
    pools.append(("stage2.batch_size", "the target's labelled training images",
                  labelled(supervised_target(run).heads)))
  elif kind != "ensemble":
    pools.append(("stage2.batch_size", "the student's pool",
                  len(run.pool(run.plan.target_classes))))
  sizes = {}
  for field, pool, count in pools:
    if field not in sizes or count < sizes[field][1]:
      sizes[field] = (pool, count)
  return sizes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stages=STAGES) -> dict | None:
  """Runs the given stages (all by default) and returns the report if evaluated.

  timings.json keeps, per stage, the seconds of the invocation that trained it to
  the end (a stage restored from its checkpoints keeps its earlier time), and
  compilation.json what that invocation compiled in the stage (`compilation.since`).
  """
  compilation.listen()
  workdir = Path(workdir)
  records = {name: workdir / f"{name}.json" for name in ("timings", "compilation")}
  with prepare(config, workdir, stages) as run:
    run.trained.add("evaluate")  # never checkpointed: always computed anew
    timings, compiled = ({} if not path.exists() else json.loads(path.read_text())
                         for path in records.values())

    def timed(stage, fn, *args):
      start, before = time.perf_counter(), compilation.totals()
      try:
        out = fn(*args)
      except interrupts.Interrupted as interrupted:
        raise interrupted.located(f"in stage {stage!r}") from None
      if stage in run.trained:
        timings[stage] = round(time.perf_counter() - start, 2)
        compiled[stage] = compilation.since(before)
        if parallel.primary():
          for path, record in zip(records.values(), (timings, compiled)):
            files.write_atomic(path, json.dumps(record, indent=2))
      return out

    last = max(STAGES.index(s) for s in stages)
    networks = timed("teachers", train_teachers, run)
    for stage, build in PIPELINES[config.pipeline]:
      if last < STAGES.index(stage):
        return None
      networks = timed(stage, build, run, networks)
    if last < STAGES.index("evaluate"):
      return None
    result = timed("evaluate", evaluate.run_scores, run, networks)
    result["pipeline"] = config.pipeline
    result["timings"] = timings
    if parallel.primary():
      report.write(result, workdir)
      if networks.student is not None and isinstance(networks.student.module, models.ResNet):
        with files.writing(workdir / "export"):
          export.networks(run, networks, "student", workdir / "export",
                          tuple(config.export_graphs))
  return result


def restore_networks(run: Run) -> Networks:
  """A finished run's networks, restored from their checkpoints; a stage that has
  not finished raises StageNotReadyError (`prepare(config, workdir, ())` trains
  nothing)."""
  networks = train_teachers(run)
  for _, build in PIPELINES[run.config.pipeline]:
    networks = build(run, networks)
  return networks


def export_workdir(workdir: Path, network: str, out: Path | None = None) -> list[Path]:
  """Exports a finished run's networks (`export.networks`), into WORKDIR/export by
  default; the run's stages are restored, never trained."""
  workdir = Path(workdir)
  saved = workdir / "config.json"
  if not saved.is_file():
    raise ValueError(f"--workdir {workdir} holds no run (no config.json): give the "
                     "workdir of a finished run.")
  out = Path(out) if out else workdir / "export"
  with prepare(ml_collections.ConfigDict(json.loads(saved.read_text())), workdir, ()) as run:
    with files.writing(out):
      return export.networks(run, restore_networks(run), network, out)
