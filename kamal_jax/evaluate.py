"""Predictions on held-out images and the accuracies of the report.

Networks run data-parallel in eval mode; the scoring is NumPy on the gathered
logits, so every number is a plain function of logits and labels.
"""
import functools

import flax.linen as nn
import jax
import numpy as np

from kamal_jax import ambiguity, data, tasks
from kamal_jax.teachers import stacked_apply
from kamal_jax.train.step import AXIS, replicate


def _logits(module: nn.Module, stacked: bool, variables, x):
  if stacked:
    return stacked_apply(module, variables, x).logits.transpose(1, 0, 2)  # [B, K, C]
  return module.apply(variables, x, train=False).logits  # [B, C]


@functools.cache
def _predictor(module: nn.Module, stacked: bool):
  return jax.pmap(functools.partial(_logits, module, stacked), axis_name=AXIS)


def predict(module: nn.Module, variables, images: np.ndarray, batch_size: int,
            stacked: bool = False) -> np.ndarray:
  """Logits [N, C], or [K, N, C] for stacked variables, in fixed-size batches (the
  last one padded) so one compiled program serves every batch."""
  devices = jax.local_device_count()
  predictor = _predictor(module, stacked)
  variables = replicate(variables)
  count = len(images)
  padded = np.concatenate(
      [images, np.zeros((-count % batch_size,) + images.shape[1:], images.dtype)])
  chunks = []
  for start in range(0, len(padded), batch_size):
    chunks.append(predictor(variables, data.shard(padded[start:start + batch_size], devices)))
  logits = np.concatenate([np.asarray(c).reshape((-1,) + c.shape[2:]) for c in chunks])
  logits = logits[:count]
  return logits.transpose(1, 0, 2) if stacked else logits


def part_labels(labels: np.ndarray, class_names, part: tasks.Head):
  """(mask of the samples whose class is in the part, their position in the part)."""
  names = np.array(class_names)[labels]
  inside = np.isin(names, part.classes)
  position = np.array([part.classes.index(n) for n in names[inside]], np.int32)
  return inside, position


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, axis=-1) == targets))


@functools.partial(jax.jit, static_argnames="measure")
def _ambiguity(logits, measure: str):
  return ambiguity.get(measure)(logits)


@functools.partial(jax.jit, static_argnames="measure")
def _least_ambiguous(restricted, measure: str):
  return ambiguity.select(ambiguity.get(measure)(restricted))


def _selection(teacher_logits: np.ndarray, index: np.ndarray, measure: str):
  """(restricted logits [K, N, P], one-hot choice [N, K]) as a stage-1 step makes it."""
  restricted = np.take_along_axis(teacher_logits, index[:, None, :], axis=-1)
  return restricted, np.asarray(_least_ambiguous(restricted, measure))


def selected_fraction(teacher_logits: np.ndarray, index: np.ndarray,
                      measure: str) -> np.ndarray:
  """Fraction of samples that learn from each teacher: [K, N, C], [K, P] -> [K]."""
  return _selection(teacher_logits, index, measure)[1].mean(axis=0)


def selected_teacher_accuracy(teacher_logits: np.ndarray, index: np.ndarray,
                              targets: np.ndarray, measure: str) -> float:
  """Accuracy of the targets a component learns from: each sample's least
  ambiguous teacher, restricted to the part ([K, N, C] -> one number)."""
  restricted, mask = _selection(teacher_logits, index, measure)
  return accuracy(np.einsum("nk,knp->np", mask, restricted), targets)


def joint_accuracies(student_logits: np.ndarray, head_sizes, targets: np.ndarray,
                     measure: str) -> dict[str, float]:
  """Accuracy over the whole target label space, by two rules:

  'argmax': argmax over all heads' concatenated logits (the plain rule);
  'least_ambiguous_head': the head whose softmax is least ambiguous answers, with its
  own argmax. Heads are trained separately, so their logit scales need not agree;
  comparing their confidences instead sidesteps that.
  """
  bounds = np.cumsum((0,) + tuple(head_sizes))
  heads = [student_logits[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  amb = np.stack([np.asarray(_ambiguity(h, measure)) for h in heads])  # [G, N]
  head = np.argmin(amb, axis=0)
  within = np.stack([np.argmax(h, axis=-1) for h in heads])  # [G, N]
  prediction = bounds[head] + within[head, np.arange(len(head))]
  return {"argmax": accuracy(student_logits, targets),
          "least_ambiguous_head": float(np.mean(prediction == targets))}


def score(plan: tasks.AmalgamationPlan, class_names, labels: np.ndarray,
          teacher_logits: dict[str, np.ndarray], component_logits: np.ndarray,
          student_logits: np.ndarray, measure: str) -> dict:
  """The accuracies of the report on one labelled split.

  teacher_logits: {name: [N, C_t]}; component_logits: [G, N, P]; student_logits:
  [N, sum P]. Teachers, components and the student's head g are scored on the images
  of part g, each by argmax over the part's classes.
  """
  teachers = {name: {"name": name, "classes": list(space.classes),
                     "accuracy_per_part": {}, "accuracy": None}
              for name, space in plan.label_spaces.items()}
  components, per_part, counts = [], {}, {}
  bounds = np.cumsum((0,) + plan.head_sizes)  # the student's heads in its logits
  for g, group in enumerate(plan.groups):
    inside, targets = part_labels(labels, class_names, group.part)
    counts[group.part.name] = int(inside.sum())
    stacked = np.stack([teacher_logits[t][inside] for t in group.teachers])  # [K, n, C]
    for t, logits, index in zip(group.teachers, stacked, group.index):
      teachers[t]["accuracy_per_part"][group.part.name] = accuracy(logits[:, index], targets)
    components.append({
        "name": group.part.name, "classes": list(group.part.classes),
        "teachers": list(group.teachers),
        "accuracy": accuracy(component_logits[g][inside], targets),
        "selected_teacher_accuracy": selected_teacher_accuracy(
            stacked, group.index, targets, measure),
    })
    per_part[group.part.name] = accuracy(
        student_logits[inside][:, bounds[g]:bounds[g + 1]], targets)
  for entry in teachers.values():
    parts = entry["accuracy_per_part"]
    if parts:  # over the parts it covers, weighted by their test images
      entry["accuracy"] = float(np.average(list(parts.values()),
                                           weights=[counts[p] for p in parts]))
  in_target, targets = part_labels(labels, class_names,
                                   tasks.Head("target", plan.target_classes))
  joint = joint_accuracies(student_logits[in_target], plan.head_sizes, targets, measure)
  return {
      "teachers": list(teachers.values()),
      "components": components,
      "student": {"accuracy_per_part": per_part,
                  "accuracy_joint": joint["argmax"],
                  "accuracy_joint_least_ambiguous_head": joint["least_ambiguous_head"]},
  }
