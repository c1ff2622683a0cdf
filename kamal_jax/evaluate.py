"""Predictions on held-out images and the accuracies of the report.

Networks run data-parallel in eval mode; the scoring is NumPy on the gathered
logits, so every number is a plain function of logits and labels.
"""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kamal_jax import ambiguity, joint, parallel, tasks
from kamal_jax.teachers import atypicality, stacked_apply, take
from kamal_jax.train.state import count_params

__all__ = ["accuracy", "ensemble_log_probs", "joint_accuracy", "predict", "RETURNS",
           "rule_weights", "run_scores", "score", "selection_stats"]


# What `predict` returns: the logits; the Outputs (logits and taps); or, of stacked
# networks, the logits and how atypical each image is for each (`atypicality`), what
# the selection reads.
RETURNS = ("logits", "outputs", "selection")


def _outputs(module: nn.Module, stacked: bool, returns: str, variables, x):
  """Eval-mode outputs as `returns` says, every array batch first: logits [B, C]
  ([B, K, C] for stacked networks), Outputs, or (logits [B, K, C], atypicality
  [B, K])."""
  if not stacked:
    outputs = module.apply(variables, x, train=False)
    return outputs if returns == "outputs" else outputs.logits
  outputs = stacked_apply(module, variables, x, in_step=False)  # [K, B, ...]
  batch_first = lambda tree: jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), tree)
  if returns == "selection":
    return batch_first((outputs.logits, atypicality(variables, outputs)))
  return batch_first(outputs if returns == "outputs" else outputs.logits)


@functools.cache
def _predictor(module: nn.Module, stacked: bool, returns: str):
  return parallel.data_parallel(functools.partial(_outputs, module, stacked, returns),
                                (parallel.REPLICATED, parallel.SPLIT), parallel.SPLIT)


def predict(module: nn.Module, variables, read: Callable[[np.ndarray], np.ndarray],
            count: int, batch_size: int, stacked: bool = False, returns: str = "logits"):
  """Logits [N, C] ([N, K, C] for stacked variables) of the images `read(indices)`
  gives for indices 0..count-1, or what else `returns` names (see RETURNS), N first,
  as host arrays. Fixed-size batches (the last one padded with repeats), so one
  compiled program serves every batch. In a multi-process run each process reads its
  rows of every batch and all get every output."""
  predictor = _predictor(module, stacked, returns)
  variables = parallel.replicated(variables)
  chunks = []
  for start in range(0, count, batch_size):
    indices = np.minimum(np.arange(start, start + batch_size), count - 1)
    chunks.append(parallel.gathered(predictor(
        variables, parallel.split(read(parallel.local_rows(indices))))))
  return jax.tree.map(lambda *c: np.concatenate(c)[:count], *chunks)


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, axis=-1) == targets))


@functools.partial(jax.jit, static_argnames=("rule", "measure", "temperature"))
def _weights(restricted, atypical, atypicality_weight, correct, key, rule: str, measure: str,
             temperature: float):
  score = ambiguity.get(measure)(restricted) + atypicality_weight * atypical
  return ambiguity.weights(rule, score, key=key, correct=correct, temperature=temperature)


def rule_weights(restricted: np.ndarray, targets: np.ndarray, rule: str, measure: str,
                 temperature: float = 1.0, seed: int = 0, atypical: np.ndarray | None = None,
                 atypicality_weight: float = 0.0) -> np.ndarray:
  """The weights [N, K] a selection rule gives K teachers' restricted logits
  [K, N, P], as a stage-1 step computes them, the images' atypicality for each
  teacher ([K, N]) weighing in by atypicality_weight. targets [N] (positions in the
  part, -1 outside) serve the oracle rule; seed the random one."""
  correct = np.argmax(restricted, axis=-1) == targets[None]  # [K, N]
  keys = jax.random.split(jax.random.key(seed), restricted.shape[1])  # one per image
  atypical = np.zeros(restricted.shape[:2], np.float32) if atypical is None else atypical
  return np.asarray(_weights(restricted, atypical, atypicality_weight, correct, keys, rule,
                             measure, temperature))


def selection_stats(restricted: np.ndarray, weights: np.ndarray, targets: np.ndarray,
                    teacher_domains: np.ndarray, sample_domains: np.ndarray) -> dict:
  """What a component learns from, over one set of images.

  'selected_fraction' [K]: each teacher's mean weight over all the images.
  On the images of the part (targets >= 0):
  'target_accuracy': accuracy of the weighted mean of the teachers' restricted
    logits (what an MSE regression onto the weighted teachers converges to);
  'selected_own_domain': the weight on the teacher(s) of the image's own domain.
  """
  inside = targets >= 0
  combined = np.einsum("nk,knp->np", weights, restricted)  # [N, P]
  own = teacher_domains[None, :] == sample_domains[:, None]  # [N, K]
  return {"selected_fraction": weights.mean(axis=0).tolist(),
          "target_accuracy": accuracy(combined[inside], targets[inside]),
          "selected_own_domain": float(np.sum((weights * own)[inside]) / inside.sum())}


def joint_accuracy(heads: list[np.ndarray], part_sizes, targets: np.ndarray) -> float:
  """The accuracy of the joint rule (`joint.decide`) over all target classes. heads:
  one [N, P_g] array per part, or [N, P_g + 1] where the network learned the rest
  logit; targets [N]: positions in the parts' classes laid side by side."""
  sizes = [h.shape[-1] for h in heads]
  decided = joint.decide(np.concatenate(heads, axis=-1), sizes,
                         rest=sum(sizes) > sum(part_sizes))
  return float(np.mean(np.asarray(decided) == targets))


def score(plan: tasks.AmalgamationPlan, heads, labels: np.ndarray,
          teacher_logits: dict[str, np.ndarray], component_logits: list | None,
          student_heads: list[np.ndarray]) -> dict:
  """The accuracies of the report on one labelled split.

  heads, labels [N, H]: the dataset's label heads and each image's class in each
  (see `tasks.label_positions`). teacher_logits: {name: [N, C_t]}; component_logits
  (None where the pipeline has no components) and student_heads: G arrays [N, P_g],
  or [N, P_g + 1] where the networks learned the rest logit. Teachers, components
  and the student's head g are scored on the images of part g, each by argmax over
  the part's classes; the student and the components together on every image of the
  target by the joint rule (`joint.decide`), where the parts are exclusive.
  """
  teachers = {name: {"name": name, "classes": list(space.classes),
                     "accuracy_per_part": {}, "accuracy": None}
              for name, space in plan.label_spaces.items()}
  components, per_part, counts = [], {}, {}
  for g, group in enumerate(plan.groups):
    targets = tasks.label_positions(labels, heads, group.part.classes)
    inside = targets >= 0
    targets = targets[inside]
    counts[group.part.name] = int(inside.sum())
    for t, index in zip(group.teachers, group.index):
      teachers[t]["accuracy_per_part"][group.part.name] = accuracy(
          teacher_logits[t][inside][:, index], targets)
    components.append({
        "name": group.part.name, "classes": list(group.part.classes),
        "teachers": list(group.teachers),
        "accuracy": None if component_logits is None else accuracy(
            component_logits[g][inside][:, :len(group.part.classes)], targets)})
    per_part[group.part.name] = accuracy(
        student_heads[g][inside][:, :len(group.part.classes)], targets)
  for entry in teachers.values():
    parts = entry["accuracy_per_part"]
    if parts:  # over the parts it covers, weighted by their test images
      entry["accuracy"] = float(np.average(list(parts.values()),
                                           weights=[counts[p] for p in parts]))
  student_joint = components_joint = None  # parts not exclusive: no joint question
  if tasks.shared_head(heads, plan.parts):
    targets = tasks.label_positions(labels, heads, plan.target_classes)
    inside = targets >= 0
    joint_of = lambda network: joint_accuracy([h[inside] for h in network],
                                              plan.head_sizes, targets[inside])
    student_joint = joint_of(student_heads)
    if component_logits is not None:
      components_joint = joint_of(component_logits)
  return {
      "teachers": list(teachers.values()),
      "components": components,
      "components_joint": components_joint,
      "student": {"accuracy_per_part": per_part, "accuracy_joint": student_joint},
  }


def ensemble_log_probs(restricted: list[np.ndarray]) -> list[np.ndarray]:
  """The teacher ensemble as a multi-head predictor: per part g, the mean of its
  teachers' softmaxes over the part ([K_g, N, P_g] each), as log-probabilities
  [N, P_g]."""
  def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
  return [np.log(np.mean(softmax(r), axis=0)) for r in restricted]


# --- a run's report: every network on the held-out split -----------------------------

def _restricted(logits: dict[str, np.ndarray], group: tasks.Group) -> np.ndarray:
  """The group's teachers' logits on its part: {name: [N, C_t]} -> [K, N, P]."""
  return np.stack([logits[t][:, index] for t, index in zip(group.teachers, group.index)])


def _teachers_on(run, pool, indices) -> tuple[dict, dict]:
  """({teacher name: logits [N, C_t]}, {teacher name: atypicality [N]}) on the images
  at `indices`, each stack in one program."""
  logits, atypical = {}, {}
  for stack in pool:
    stacked, stacked_atypical = run.predict(stack.module, stack.variables, indices,
                                            stacked=True, returns="selection")  # [N, K, ...]
    logits.update(zip(stack.names, np.swapaxes(stacked, 0, 1)))
    atypical.update(zip(stack.names, stacked_atypical.T))
  return logits, atypical


def _selection(run, g: int, group: tasks.Group, logits: dict, atypical: dict,
               indices: np.ndarray) -> dict:
  """How the configured rule weighs the group's teachers on the given images
  ({teacher name: logits [N, C_t]} and {teacher name: atypicality [N]} on them)."""
  cfg = run.config
  restricted = _restricted(logits, group)
  targets = run.labels_in(indices, group.part.classes)
  weights = rule_weights(restricted, targets, cfg.stage1.selection, cfg.stage1.ambiguity,
                         cfg.stage1.temperature, seed=cfg.seed + g,
                         atypical=np.stack([atypical[t] for t in group.teachers]),
                         atypicality_weight=cfg.stage1.atypicality_weight)
  domains = list(cfg.data.domains)
  teacher_domains = np.array([domains.index(run.teacher_domain(t)) if
                              run.teacher_domain(t) in domains else -1
                              for t in group.teachers])
  stats = selection_stats(restricted, weights, targets, teacher_domains, run.domains[indices])
  stats["selected_fraction"] = dict(zip(group.teachers, stats["selected_fraction"]))
  return stats


def run_scores(run, networks) -> dict:
  """The report's numbers of a run (`pipeline.Run`) and its networks
  (`networks.Networks`): every network scored on the held-out split, with sizes and
  what each component's selection rule chose."""
  plan, pool = run.plan, networks.teachers
  teacher_logits, teacher_atypical = _teachers_on(run, pool, run.test_indices)
  component_logits = [run.predict(c.module, c.variables, run.test_indices)
                      for c in networks.components] or None
  teacher_params = {n: count_params(take(s.variables, i)["params"])
                    for s in pool for i, n in enumerate(s.names)}
  student = networks.student
  if student is None:  # the ensemble answers: every teacher of every group runs
    student_logits = ensemble_log_probs([_restricted(teacher_logits, g) for g in plan.groups])
    student_params = sum(teacher_params[t] for t in plan.used_teachers)
    forwards = len(plan.used_teachers)
  else:
    logits = run.predict(student.module, student.variables, run.test_indices)
    student_logits = joint.split_heads(logits, student.head_sizes)
    student_params, forwards = count_params(student.variables["params"]), 1
  result = score(plan, run.dataset.heads, run.dataset.labels[run.test_indices],
                 teacher_logits, component_logits, student_logits)
  result["student"].update(params=student_params, inference_forwards=forwards)
  for entry in result["teachers"]:
    entry["params"] = teacher_params[entry["name"]]

  # What each component learns from: on its stage-1 pool, and on the test images.
  pools = [run.pool(group.part.classes) for group in plan.groups]
  seen = np.unique(np.concatenate(pools))  # every training image under data.pool='all'
  seen_logits, seen_atypical = _teachers_on(run, pool, seen)
  for g, (group, entry, images) in enumerate(zip(plan.groups, result["components"], pools)):
    at = np.searchsorted(seen, images)
    entry.update(_selection(run, g, group, {n: l[at] for n, l in seen_logits.items()},
                            {n: a[at] for n, a in seen_atypical.items()}, images))
    entry["test_selection"] = _selection(run, g, group, teacher_logits, teacher_atypical,
                                         run.test_indices)
    entry["params"] = (count_params(networks.components[g].variables["params"])
                       if networks.components else None)
  return result
