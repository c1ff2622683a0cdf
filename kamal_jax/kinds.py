"""The pipeline kinds: what stands between the data and the report, as steps that
make stages (`train.Stage`, by the factories beside their methods) and train them.

A kind (`PIPELINES[config.pipeline]`) is a tuple of steps (the STAGES name it runs
under, a builder `(run, networks) -> networks`); the teachers come first in every
kind (`train_teachers`). A new amalgamation method is a builder and an entry here.
"""
import dataclasses
from typing import TYPE_CHECKING

import ml_collections
import numpy as np

from kamal_jax import amalgamate, cfl, models, supervised, tasks, teachers
from kamal_jax.examples import Examples
from kamal_jax.networks import Network, Networks

if TYPE_CHECKING:
  from kamal_jax.pipeline import Run

__all__ = ["PIPELINES", "supervised_target", "train_teachers"]


def _from_labels(run: "Run", name: str, step: str, module, space: tasks.LabelSpace,
                 domain: str | None, cfg, **warm_start) -> Network:
  """A network trained from labels on the training images labelled in all of its
  heads, in `domain` (None: each image in its own)."""
  examples = run.examples(run.train_indices, space.heads, domain)
  keep = np.all(examples.labels >= 0, axis=-1)
  examples = dataclasses.replace(examples, indices=examples.indices[keep],
                                 labels=examples.labels[keep])
  sizes = tuple(len(h.classes) for h in space.heads)
  stage = supervised.stage(name, module, sizes, examples, cfg, run.config.seed,
                           run.config.rng_impl, **warm_start)
  return Network(module, run.fit(stage, step), sizes)


def _teacher_training(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """config.teacher_training, for `name` trained config.teacher_steps[name] steps
  where it is named."""
  if name not in config.teacher_steps:
    return config.teacher_training
  cfg = config.teacher_training.copy_and_resolve_references()
  cfg.steps = config.teacher_steps[name]
  return cfg


def train_teachers(run: "Run") -> Networks:
  """The pool, one stack per architecture: imported teachers as they are; the others
  trained from labels, each on the images of its own classes in its own domain
  (stage 'teachers/NAME', or 'teachers_S/NAME' for the S-th stack trained), those of
  models.teacher's architecture from models.pretrained where it is given."""
  to_train = [names for names in run.stacks if run.sources[names[0]].variables is None]
  pool = []
  for names in run.stacks:
    members = [run.sources[n] for n in names]
    if members[0].variables is None:
      prefix = "teachers" if len(to_train) == 1 else f"teachers_{to_train.index(names) + 1}"
      module = members[0].module
      start = run.pretrained() if module == models.teacher(
          run.config.models, module.num_outputs) else {}
      members = [dataclasses.replace(t, variables=_from_labels(
          run, f"{prefix}/{t.name}", "teachers", module, t.label_space, run.teacher_domain(t.name),
          _teacher_training(run.config, t.name), **start).variables) for t in members]
    pool.append(teachers.stack(members))
  return Networks(pool)


def _component_arch(config: ml_collections.ConfigDict, group: tasks.Group):
  """A component: the teachers' architecture with one output per class of its part,
  and one more for the rest logit where stage1.rest keeps it."""
  return models.teacher(config.models, len(group.part.classes) + (config.stage1.rest != "none"))


def _student_heads(run: "Run") -> tuple[int, ...]:
  """The amalgamated student's head widths: one output per class of each part, and
  one more for the rest logit where it learns from networks that carry it
  (stage1.rest)."""
  rest = run.config.stage1.rest != "none"
  return tuple(size + rest for size in run.plan.head_sizes)


def _components(run: "Run", networks: Networks) -> Networks:
  """Stage 1: each group's teachers' knowledge of its part into a component (which
  starts from models.pretrained where given; the student never does, as in the
  reference)."""
  components = []
  for group in run.plan.groups:
    net = _component_arch(run.config, group)
    stage = amalgamate.stage1(
        f"stage1_{group.part.name}", run.plan, networks.teachers, group, net,
        run.config.stage1, run.examples(run.pool(group.part.classes), [group.part]),
        **run.how(), **run.pretrained())
    components.append(Network(net, run.fit(stage, "stage1"), (net.num_outputs,)))
  return dataclasses.replace(networks, components=components)


def _student_examples(run: "Run") -> Examples:
  return run.examples(run.pool(run.plan.target_classes), run.plan.parts)


def _student_from_components(run: "Run", networks: Networks) -> Networks:
  """Stage 2: head g regresses component g on every image, no selection."""
  heads = _student_heads(run)
  net = models.student(run.config.models, sum(heads))
  stage = amalgamate.stage2("stage2", run.plan.parts,
                            [(c.module, c.variables) for c in networks.components], net,
                            heads, run.config.stage1, run.config.stage2,
                            _student_examples(run), **run.how())
  return dataclasses.replace(networks, student=Network(net, run.fit(stage, "stage2"), heads))


def _student_from_teachers(run: "Run", networks: Networks) -> Networks:
  """The single stage: the student from every group's teachers, selecting per sample."""
  heads = _student_heads(run)
  net = models.student(run.config.models, sum(heads))
  stage = amalgamate.single_stage("stage2", run.plan, networks.teachers, net, heads,
                                  run.config.stage1, run.config.stage2,
                                  _student_examples(run), **run.how())
  return dataclasses.replace(networks, student=Network(net, run.fit(stage, "stage2"), heads))


def supervised_target(run: "Run") -> tasks.LabelSpace:
  """What the supervised student learns: one softmax over all target classes where
  they are exclusive (one dataset head), else one per part (attributes)."""
  plan = run.plan
  return tasks.LabelSpace((tasks.Head("student", plan.target_classes),)
                          if tasks.shared_head(run.dataset.heads, plan.parts) else plan.parts)


def _student_from_labels(run: "Run", networks: Networks) -> Networks:
  """The supervised student, trained on the images labelled in `supervised_target`."""
  plan = run.plan
  net = models.student(run.config.models, sum(plan.head_sizes))
  student = _from_labels(run, "stage2/student", "stage2", net, supervised_target(run), None,
                         run.config.stage2)
  return dataclasses.replace(networks, student=dataclasses.replace(
      student, head_sizes=plan.head_sizes))  # scored per part


PIPELINES = {
    # The method: components (stage 1), then the student from them (stage 2).
    "two_stage": (("stage1", _components), ("stage2", _student_from_components)),
    # The student from the teachers directly (stage 2 only).
    "single_stage": (("stage2", _student_from_teachers),),
    # No student: the teachers of each group, averaged, answer.
    "ensemble": (),
    # The student trained with labels on the target classes (an upper bound).
    "supervised": (("stage2", _student_from_labels),),
    # Common Feature Learning (Luo et al. 2019): the student from every teacher at once.
    "cfl": (("stage2", cfl.student),),
}
