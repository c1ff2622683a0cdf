"""Label spaces, the user's target, and the grouping of teachers by sub-task.

A *label space* is a tuple of heads; a head is a named tuple of class names, and a
network's logits lay its heads side by side. A class teacher has one head of C classes;
a multi-attribute teacher has one 2-way head per attribute. Class names are global
(the class "3" of one teacher is the class "3" of another), which is what lets the
grouping match teachers to the target without any hand-written table.

The target is a tuple of *parts* (sub-tasks): each part is a set of classes that one
head of a teacher must cover entirely, and becomes one component net and one head of
the student. `make_plan` finds, for each part, every teacher that covers it and the
positions of the part's classes in that teacher's logits.

A config may name classes it has not seen: in any list of class names, a *split
reference* {"split": HEAD, "part": i, "of": n, "seed": s} stands for part i of n of
the classes of the dataset's head HEAD, split with seed s. Building the config then
reads no dataset; the run resolves the references once the data is loaded
(`resolve_splits`), and `label_space` and `make_plan` see plain class names.
"""
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["AmalgamationPlan", "attribute_head", "Group", "Head", "is_reference",
           "label_positions", "label_space", "LabelSpace", "make_plan", "resolve_splits",
           "shared_head"]

_SPLIT_KEYS = ("split", "part", "of", "seed")  # a split reference's, in this order


@dataclasses.dataclass(frozen=True)
class Head:
  """Named classes that one softmax ranks: a head of a teacher, or a target part
  (which becomes one head of the student)."""
  name: str
  classes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  heads: tuple[Head, ...]

  @property
  def classes(self) -> tuple[str, ...]:
    """All class names in logit order."""
    return tuple(c for head in self.heads for c in head.classes)

  @property
  def num_outputs(self) -> int:
    return len(self.classes)

  def _home(self, classes: Sequence[str]) -> tuple[int, Head] | None:
    """The first head that holds all of `classes`, with its offset in the logits."""
    offset = 0
    for head in self.heads:
      if all(c in head.classes for c in classes):
        return offset, head
      offset += len(head.classes)
    return None

  def positions(self, classes: Sequence[str]) -> np.ndarray | None:
    """Logit positions of `classes` if one head holds them all, else None."""
    home = self._home(classes)
    if home is None:
      return None
    offset, head = home
    return np.array([offset + head.classes.index(c) for c in classes], np.int32)

  def outside(self, classes: Sequence[str]) -> np.ndarray:
    """[C] bool: the classes of the head that holds all of `classes`, but those (a
    teacher's knowledge of what an image is, if not one of them)."""
    home = self._home(classes)
    if home is None:
      raise ValueError(f"No head holds all of {list(classes)}.")
    offset, head = home
    mask = np.zeros(self.num_outputs, bool)
    mask[offset:offset + len(head.classes)] = [c not in classes for c in head.classes]
    return mask


def attribute_head(attribute: str) -> Head:
  """A binary attribute as a 2-way head: logit 0 is 'absent', logit 1 'present'."""
  return Head(attribute, (f"{attribute}:0", f"{attribute}:1"))


def label_space(spec, owner: str) -> LabelSpace:
  """A label space from a config value: a list of class names (one head named
  'classes') or a mapping {head name: list of class names}."""
  is_mapping = hasattr(spec, "items")  # a dict or an ml_collections.ConfigDict
  if isinstance(spec, str) or not (is_mapping or isinstance(spec, Sequence)):
    raise ValueError(
        f"Label set of {owner!r} must be a list of class names or a mapping "
        f"{{head: [class names]}}, got {spec!r}.")
  named = spec.items() if is_mapping else [("classes", spec)]
  heads = tuple(Head(str(name), _names(classes, f"The label set of {owner!r}"))
                for name, classes in named)
  space = LabelSpace(heads)
  _check_unique(space.classes, f"the label set of {owner!r}")
  if not space.classes:
    raise ValueError(f"The label set of {owner!r} is empty: give it its classes.")
  return space


def resolve_splits(spec, heads: Sequence[Head], field: str):
  """A label set, or the target's parts, as configured ({name: list} or a list of
  class names), with each split reference in its lists replaced by the classes it
  names (see the module docstring):

    {"split": "stanford_dogs", "part": 1, "of": 2, "seed": 0}

  is the first of 2 seeded, near-equal parts of the classes of the head named
  'stanford_dogs' (a tfds dataset's labels are one head named by the dataset), each
  part in the head's order. `heads` are the loaded dataset's; `field` names the
  value in errors ('teachers.t11'). Anything else is returned as it is, for
  `label_space` and `make_plan` to judge.
  """
  if hasattr(spec, "items") and not is_reference(spec):  # a dict or a ConfigDict
    return {key: _resolve_list(value, heads, f"{field}.{key}")
            for key, value in spec.items()}
  return _resolve_list(spec, heads, field)


def _resolve_list(classes, heads: Sequence[Head], field: str):
  if is_reference(classes):
    raise ValueError(f"{field} is a split reference where a list of classes belongs: "
                     f"put it in a list, ({dict(classes)},).")
  if isinstance(classes, str) or not isinstance(classes, Sequence):
    return classes
  return tuple(name for k, item in enumerate(classes)
               for name in (_split_part(item, heads, f"{field}[{k}]")
                            if hasattr(item, "items") else (item,)))


def is_reference(value) -> bool:
  """Whether a config value is a split reference (see the module docstring)."""
  return hasattr(value, "items") and set(value.keys()) == set(_SPLIT_KEYS)


def _split_part(reference, heads: Sequence[Head], field: str) -> tuple[str, ...]:
  """The classes one split reference names, or a ValueError naming the bad key."""
  if not is_reference(reference):
    raise ValueError(f"{field}={dict(reference)} is no split reference: give exactly the "
                     f"keys {_SPLIT_KEYS}, e.g. {{'split': 'cars196', 'part': 1, "
                     "'of': 4, 'seed': 0}.")
  name, part, of, seed = (reference[key] for key in _SPLIT_KEYS)
  by_name = {head.name: head for head in heads}
  if name not in by_name:
    raise ValueError(f"{field}.split={name!r} names no head of the data: use one of "
                     f"{list(by_name)} (a tfds dataset's head is named by the dataset).")
  classes = by_name[name].classes
  if not _is_count(of, 1, len(classes)):
    raise ValueError(f"{field}.of={of!r}: give the number of parts, an integer from 1 to "
                     f"{len(classes)} (the classes of {name!r}).")
  if not _is_count(part, 1, of):
    raise ValueError(f"{field}.part={part!r}: give the part's number, an integer from 1 "
                     f"to {of} (of={of}).")
  if not _is_count(seed, 0, None):
    raise ValueError(f"{field}.seed={seed!r}: give a non-negative integer.")
  return _seeded_parts(classes, of, seed)[part - 1]


def _is_count(value, low: int, high: int | None) -> bool:
  return (isinstance(value, int) and not isinstance(value, bool) and low <= value
          and (high is None or value <= high))


def _seeded_parts(classes: Sequence[str], parts: int, seed: int) -> list[tuple[str, ...]]:
  """`classes` in `parts` near-equal parts drawn with the seed, each in their order.
  (The class setup's split since its first runs: changing it changes their classes.)"""
  order = np.random.default_rng([seed, parts]).permutation(len(classes))
  return [tuple(classes[i] for i in sorted(chunk))
          for chunk in np.array_split(order, parts)]


def _names(classes, where: str) -> tuple[str, ...]:
  """Class names as strings; a split reference left among them is refused."""
  unresolved = [c for c in classes if hasattr(c, "items")]
  if unresolved:
    raise ValueError(f"{where} holds the split reference {dict(unresolved[0])}: resolve "
                     "it against the dataset's heads first (tasks.resolve_splits).")
  return tuple(str(c) for c in classes)


def label_positions(labels: np.ndarray, heads: Sequence[Head], classes) -> np.ndarray:
  """Each sample's position in `classes` (a part, a head of a teacher), -1 where none
  of its labels is among them.

  A dataset's labels are heads too: labels [N, H] hold each sample's class index in
  each of the dataset's H heads, -1 where it has none (a class dataset has one head;
  CelebA one 2-way head per attribute; a union of datasets one head per dataset).
  """
  labels = np.asarray(labels).reshape(len(labels), -1)
  lookup = {name: i for i, name in enumerate(classes)}
  found = np.full(len(labels), -1, np.int32)
  for h, head in enumerate(heads):
    table = np.array([lookup.get(c, -1) for c in head.classes] + [-1], np.int32)
    found = np.maximum(found, table[labels[:, h]])  # index -1 reads the trailing -1
  return found


def shared_head(heads: Sequence[Head], parts: Sequence[Head]) -> bool:
  """Whether every part's classes lie in one head of the dataset, so the parts are
  mutually exclusive and a prediction over all of them (joint accuracy, a single
  softmax) means something; attributes, each its own head, are not."""
  homes = {next((h for h, head in enumerate(heads) if c in head.classes), None)
           for part in parts for c in part.classes}
  return len(homes) == 1 and None not in homes


@dataclasses.dataclass(frozen=True)
class Group:
  """The teachers that share one part, and where the part sits in their logits."""
  part: Head
  teachers: tuple[str, ...]
  index: np.ndarray  # [K, P] int32: logit positions of the part's classes per teacher


@dataclasses.dataclass(frozen=True)
class AmalgamationPlan:
  groups: tuple[Group, ...]
  label_spaces: Mapping[str, LabelSpace]  # every teacher in the pool, by name

  @property
  def parts(self) -> tuple[Head, ...]:
    return tuple(g.part for g in self.groups)

  @property
  def head_sizes(self) -> tuple[int, ...]:
    """The student's heads: one per part, in part order."""
    return tuple(len(p.classes) for p in self.parts)

  @property
  def target_classes(self) -> tuple[str, ...]:
    """All target classes in the order of the student's concatenated logits."""
    return tuple(c for p in self.parts for c in p.classes)

  @property
  def used_teachers(self) -> tuple[str, ...]:
    return tuple(t for g in self.groups for t in g.teachers)


def _check_unique(names: Sequence[str], where: str):
  seen, repeated = set(), []
  for name in names:
    if name in seen:
      repeated.append(name)
    seen.add(name)
  if repeated:
    raise ValueError(f"Duplicate names {sorted(set(repeated))} in {where}: "
                     "give each a distinct name.")


def make_plan(parts: Mapping[str, Sequence[str]],
              teachers: Mapping[str, LabelSpace]) -> AmalgamationPlan:
  """Groups the teachers by the target part they cover.

  Args:
    parts: {part name: class names}, in the order of the student's heads.
    teachers: {teacher name: label space}; teachers that cover no part are left out.

  Raises:
    ValueError: empty or overlapping parts, target classes that no teacher knows,
      or a part that no single teacher head covers entirely.
  """
  if not parts:
    raise ValueError("The target has no parts: name at least one part and its classes.")
  parts = tuple(Head(str(name), _names(classes, f"Target part {name!r}"))
                for name, classes in parts.items())
  for part in parts:
    if not part.classes:
      raise ValueError(f"Target part {part.name!r} is empty: give it its classes.")
  _check_unique([c for p in parts for c in p.classes], "the target parts")
  known = {c for space in teachers.values() for c in space.classes}
  unknown = [c for p in parts for c in p.classes if c not in known]
  if unknown:
    raise ValueError(
        f"Target classes {unknown} are covered by no teacher (teachers know "
        f"{sorted(known)}): drop them from the target or add a teacher that knows them.")
  groups = []
  for part in parts:
    members = {name: space.positions(part.classes) for name, space in teachers.items()}
    members = {name: index for name, index in members.items() if index is not None}
    if not members:
      raise ValueError(
          f"No teacher has one head covering all of part {part.name!r} "
          f"{list(part.classes)}, so its group is empty: split the part into "
          "pieces that single teachers cover, or add such a teacher.")
    groups.append(Group(part, tuple(members), np.stack(list(members.values()))))
  return AmalgamationPlan(tuple(groups), dict(teachers))
