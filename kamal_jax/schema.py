"""The config's schema: every field a run reads, the values it allows, and the rules
between fields, declared once.

The door checks a config against it before anything is read or written (`check`:
an unknown or missing field, a value it does not allow, a broken rule: one line
that names the field, the value and what is allowed), and the README's reference of
fields is its rendering (`reference`; `python -m kamal_jax.schema` prints it, a
test holds the README to it). The checks that need the data or the teachers' files
(label sets against the dataset, batch sizes against the pools, the networks'
shapes) follow in `door`, still before the workdir is touched.
"""
import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping as MappingABC, Sequence as SequenceABC
from typing import Any

import ml_collections

from kamal_jax import amalgamate, ambiguity, data, export, joint, kinds, models, tasks
from kamal_jax.train import state

__all__ = ["check", "Field", "FIELDS", "reference", "Rule", "RULES", "value_at"]

MAX_STEPS = 2**31 - 1  # optax counts steps in int32


@dataclasses.dataclass(frozen=True)
class Integer:
  low: int = 1
  high: int = MAX_STEPS

  def allows(self, value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and self.low <= value <= self.high)

  def __str__(self):
    return f"an integer from {self.low} to {self.high}"


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite int or float in the interval; `open_low` / `open_high` leave its ends out."""
  low: float = -math.inf
  high: float = math.inf
  open_low: bool = False
  open_high: bool = False

  def allows(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    above = value > self.low if self.open_low else value >= self.low
    below = value < self.high if self.open_high else value <= self.high
    return math.isfinite(value) and above and below

  def __str__(self):
    ends = []
    if self.low > -math.inf:
      ends.append(f"{'>' if self.open_low else '>='} {self.low:g}")
    if self.high < math.inf:
      ends.append(f"{'<' if self.open_high else '<='} {self.high:g}")
    return " ".join(["a finite number", " and ".join(ends)]).strip()


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `options`: a tuple, or a registry (a dict, read when asked, so entries
  added to it later count)."""
  options: tuple | MappingABC

  def names(self) -> tuple:
    return tuple(self.options)

  def allows(self, value) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool) and value in self.names()

  def __str__(self):
    return f"one of {', '.join(repr(n) for n in self.names())}"


@dataclasses.dataclass(frozen=True)
class Text:
  nonempty: bool = False

  def allows(self, value) -> bool:
    return isinstance(value, str) and (bool(value.strip()) or not self.nonempty)

  def __str__(self):
    return "a non-empty string" if self.nonempty else "a string ('' for none)"


@dataclasses.dataclass(frozen=True)
class Flag:
  def allows(self, value) -> bool:
    return isinstance(value, bool)

  def __str__(self):
    return "True or False"


@dataclasses.dataclass(frozen=True)
class Model:
  """A network by name (`models.create`): one of models.ARCHS or a user's module."""

  def allows(self, value) -> bool:
    return isinstance(value, str) and (value in models.ARCHS or ":" in value)

  def __str__(self):
    return (f"one of {', '.join(repr(a) for a in models.ARCHS)}, or your module as "
            "'package.module:Class' or 'file.py:Class'")


@dataclasses.dataclass(frozen=True)
class Sequence:
  """A tuple (or list) of `item`s, at least `min_len` of them, each once if `unique`."""
  item: Any
  min_len: int = 0
  unique: bool = False

  def allows(self, value) -> bool:
    if isinstance(value, (str, bytes)) or not isinstance(value, SequenceABC):
      return False
    return (len(value) >= self.min_len and all(self.item.allows(v) for v in value)
            and (not self.unique or len(set(value)) == len(value)))

  def __str__(self):
    size = f"{self.min_len} or more" if self.min_len else "zero or more"
    return f"a tuple of {size}{' distinct' if self.unique else ''} values, each {self.item}"


@dataclasses.dataclass(frozen=True)
class LabelSet:
  """Class names (`tasks.label_space`): a tuple of names and split references, or a
  mapping head -> such a tuple. Their names are judged against the data later."""

  @staticmethod
  def _classes(value) -> bool:
    return (isinstance(value, SequenceABC) and not isinstance(value, str) and len(value) > 0
            and all(isinstance(c, str) or isinstance(c, MappingABC) for c in value))

  def allows(self, value) -> bool:
    if not _is_mapping(value):
      return self._classes(value)
    if tasks.is_reference(value):  # one reference: the whole set
      return True
    return len(value) > 0 and all(self._classes(v) for v in value.values())

  def __str__(self):
    return ("a tuple of class names (or split references), or a mapping head -> such "
            "a tuple")


@dataclasses.dataclass(frozen=True)
class Mapping:
  """Names (teachers, parts) -> values each `value`; at least `min_len` of them."""
  value: Any
  min_len: int = 0

  def allows(self, value) -> bool:
    return (_is_mapping(value) and len(value) >= self.min_len
            and all(isinstance(k, str) and k and self.value.allows(v) for k, v in value.items()))

  def __str__(self):
    least = f", at least {self.min_len}" if self.min_len else ""
    return f"a mapping name -> {self.value}{least}"


def _is_mapping(value) -> bool:
  return isinstance(value, (MappingABC, ml_collections.ConfigDict))


@dataclasses.dataclass(frozen=True)
class Field:
  """path: dotted, from the config's root; doc: what it does. `when` = (field,
  values): the field is read only where that field has one of those values (and may
  be absent elsewhere)."""
  path: str
  allowed: Any
  doc: str
  when: tuple[str, tuple] | None = None


def _optimizer(stage: str) -> list[Field]:
  at = f"{stage}.optimizer."
  return [
      Field(at + "name", Choice(state.OPTIMIZERS), "The optimizer."),
      Field(at + "learning_rate", Number(0, open_low=True), "The network's learning rate."),
      Field(at + "bridge_learning_rate", Number(0, open_low=True),
            "The learning rate of bridges and logit scales."),
      Field(at + "tap_learning_rates", Sequence(Number(0, open_low=True)),
            "Per feature tap, the learning rate of its bridges (empty: bridge_learning_rate)."),
      Field(at + "weight_decay", Number(0), "Decoupled weight decay (adam), L2 (sgd)."),
      Field(at + "momentum", Number(0, 1, open_high=True), "sgd's momentum."),
      Field(at + "decay_at", Sequence(Number(0, 1, open_low=True, open_high=True)),
            "Fractions of the steps at which the learning rates step down."),
      Field(at + "decay_factor", Number(0, open_low=True), "The factor of each step down."),
  ]


_SUBSET = ("folder", "tfds")  # the datasets cut to data.image_size

FIELDS: tuple[Field, ...] = (
    Field("seed", Integer(0), "Seeds every random draw: split, data order, initialisation."),
    Field("rng_impl", Choice(("rbg", "threefry2x32", "unsafe_rbg")),
          "JAX's random number generator."),
    Field("pipeline", Choice(kinds.PIPELINES), "What runs between the teachers and the "
          "report: the method (two_stage) or a baseline."),
    Field("data.name", Choice(data.NAMES), "The dataset: embedded, a folder, tfds."),
    Field("data.data_dir", Text(), "Where tfds datasets live (tfds' default where '')."),
    Field("data.test_fraction", Number(0, 1, open_high=True),
          "The stratified share held out for the report (datasets without a test split)."),
    Field("data.pool", Choice(("all", "reference")), "Which unlabeled images a stage "
          "learns from: all, or as the reference code, those of its classes."),
    Field("data.domains", Sequence(Choice(data.DOMAINS), 1, unique=True),
          "Each image is shown in one of these domains, drawn with the seed."),
    Field("data.mean", Sequence(Number()), "Per-channel mean the inputs are normalised by "
          "(empty: none)."),
    Field("data.std", Sequence(Number(0, open_low=True)), "Per-channel std, as data.mean."),
    Field("data.path", Text(), "The image folder: one sub-folder per class.",
          when=("data.name", ("folder",))),
    Field("data.datasets", Sequence(Text(nonempty=True), 1, unique=True),
          "tfds catalogue names, read as one dataset.", when=("data.name", ("tfds",))),
    Field("data.image_size", Integer(1, 4096), "The networks' input: image_size x image_size.",
          when=("data.name", _SUBSET)),
    Field("data.channels", Choice((1, 3)), "1: grey, 3: RGB.", when=("data.name", _SUBSET)),
    Field("data.crop_fraction", Number(0, 1, open_low=True), "Evaluation view: the centre "
          "crop's share of the resized shorter side.", when=("data.name", _SUBSET)),
    Field("data.min_scale", Number(0, 1, open_low=True), "Training view: the least share "
          "of the area a random crop keeps (1: no crops).", when=("data.name", _SUBSET)),
    Field("data.flip", Flag(), "Training view: random horizontal flips.",
          when=("data.name", _SUBSET)),
    Field("target.parts", Mapping(LabelSet(), 1), "The target: part name -> its classes; "
          "the student's heads follow the sorted part names."),
    Field("teachers", Mapping(LabelSet(), 1), "The pool: teacher name -> its label set."),
    Field("teacher_domains", Mapping(Choice(data.DOMAINS)),
          "The domain each teacher learned in (data.domains[0] where not named)."),
    Field("teacher_models", Mapping(Model()), "Teachers of another architecture than "
          "models.teacher."),
    Field("teacher_checkpoints", Mapping(Text(nonempty=True)), "Teachers imported, not "
          "trained: name -> a torchvision-named ResNet (.pth or .safetensors)."),
    Field("teacher_steps", Mapping(Integer()), "Teachers trained for another number of "
          "steps than teacher_training.steps: name -> steps."),
    Field("models.teacher", Model(), "The teachers' and the components' architecture."),
    Field("models.teacher_width_scale", Number(0, 64, open_low=True),
          "Scales every width of models.teacher."),
    Field("models.student", Model(), "The student's architecture."),
    Field("models.student_width_scale", Number(0, 64, open_low=True),
          "Scales every width of models.student."),
    Field("models.pretrained", Text(), "A torchvision-named ResNet checkpoint the teachers "
          "trained here and the components start from ('' for none)."),
    Field("models.dtype", Choice(models.DTYPES), "The compute type."),
    Field("teacher_training.steps", Integer(), "Steps of each teacher trained here."),
    Field("teacher_training.batch_size", Integer(), "Its global batch size."),
    *_optimizer("teacher_training"),
    Field("stage1.steps", Integer(), "Steps of each component."),
    Field("stage1.batch_size", Integer(), "Its global batch size."),
    # The method's settings below are also the single-stage pipeline's.
    Field("stage1.selection", Choice(ambiguity.RULES),
          "Which teacher each image learns from: the least ambiguous, or a baseline rule."),
    Field("stage1.ambiguity", Choice(ambiguity.MEASURES),
          "The ambiguity of a teacher's prediction over the part."),
    Field("stage1.temperature", Number(0, open_low=True),
          "The 'soft' rule's weights: softmax(-ambiguity / temperature)."),
    Field("stage1.atypicality_weight", Number(0),
          "Weight of how unlike a teacher's training images an image is (its stem batch "
          "norm's statistics, in nats) beside the ambiguity (0: the paper's selection)."),
    Field("stage1.bridge_widths", Sequence(Integer(1, 65536), 1),
          "The bridges' width at each feature tap of the networks."),
    Field("stage1.weight_norm", Number(0), "Weight of the frozen-side bridges' penalty."),
    Field("stage1.feature_weight", Number(0), "Weight of the feature loss (0: logits alone)."),
    Field("stage1.logit_loss", Choice(amalgamate.LOGIT_LOSSES),
          "How logits are matched: mse, or kd (KL of softmaxes at kd_temperature)."),
    Field("stage1.kd_temperature", Number(0, open_low=True), "The kd loss's temperature."),
    Field("stage1.rest", Choice(("none", *joint.RESTS)),
          "The rest logit components learn: the teachers' mass outside the part, as "
          "the selected one's, the group's mean, or the typical teachers' mean."),
    Field("stage1.typical_temperature", Number(0, open_low=True),
          "The 'typical' rest weighs teachers by softmax(-atypicality / temperature)."),
    Field("stage1.teacher_chunk", Integer(0),
          "Frozen networks a step runs per traced body: a group of more loops over "
          "chunks of this many, so compile time, and under a one-hot selection rule "
          "live memory, stay flat in its size (0: all in one)."),
    *_optimizer("stage1"),
    Field("stage2.steps", Integer(), "Steps of the student."),
    Field("stage2.batch_size", Integer(), "Its global batch size."),
    Field("stage2.logit_loss", Choice(amalgamate.LOGIT_LOSSES),
          "How the student's heads match the components' logits: kd (at "
          "stage1.kd_temperature), or mse (the paper's); a single-stage student reads "
          "stage1.logit_loss."),
    Field("stage2.joint_weight", Number(0),
          "Weight of the KL between the student's and its targets' joint distributions "
          "over all the target's classes (needs stage1.rest; 0: heads learn apart)."),
    *_optimizer("stage2"),
    Field("eval_batch_size", Integer(), "Images per forward when scoring and caching."),
    Field("frozen_output_cache_mb", Number(0), "MB a stage may keep of the frozen "
          "networks' outputs, where epochs repeat (0: run them every step)."),
    Field("export_graphs", Sequence(Choice(export.GRAPHS), unique=True),
          "Graphs a finished run exports beside the weights."),
    Field("log_every", Integer(), "Steps between logged metrics."),
    Field("checkpoint_every", Integer(), "Steps between checkpoints."),
)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A constraint between fields: `problem(config, devices)` says what breaks it (or
  None), naming the fields and the fix."""
  fields: tuple[str, ...]
  doc: str
  problem: Callable[[ml_collections.ConfigDict, int], str | None]


_BATCHES = ("teacher_training.batch_size", "stage1.batch_size", "stage2.batch_size",
            "eval_batch_size")


def value_at(config, path: str):
  """The config's value at a dotted path ('stage1.optimizer.name')."""
  for name in path.split("."):
    config = config[name]
  return config


def _split_over_devices(config, devices: int) -> str | None:
  for path in _BATCHES:
    if value_at(config, path) % devices:
      return (f"{path}={value_at(config, path)} does not split over {devices} devices: use "
              f"a positive multiple of {devices}.")
  return None


def _checkpoints_after_logs(config, devices: int) -> str | None:
  del devices
  if config.checkpoint_every % config.log_every:
    return (f"checkpoint_every={config.checkpoint_every} is not a multiple of "
            f"log_every={config.log_every}: make it one, so every checkpoint follows a "
            "check that the loss is finite.")
  return None


def _rate_per_tap(config, devices: int) -> str | None:
  del devices
  taps = len(config.stage1.bridge_widths)
  for stage in ("teacher_training", "stage1", "stage2"):
    rates = config[stage].optimizer.tap_learning_rates
    if len(rates) not in (0, taps):
      return (f"{stage}.optimizer.tap_learning_rates has {len(rates)} rates for {taps} "
              "feature taps (stage1.bridge_widths): give one per tap, or none.")
  return None


def _normalisation(config, devices: int) -> str | None:
  del devices
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  channels = config.data.get("channels", len(mean))
  if len(mean) != len(std) or len(mean) not in (0, channels):
    return (f"data.mean {mean} and data.std {std}: give one of each per channel "
            f"({channels}), or neither.")
  return None


def _folder_named(config, devices: int) -> str | None:
  del devices
  if config.data.name == "folder" and not config.data.path.strip():
    return ("data.path is empty: set --config.data.path to a folder with one sub-folder "
            "of images per class.")
  return None


def _joint_needs_rest(config, devices: int) -> str | None:
  del devices
  if config.stage2.joint_weight and config.stage1.rest == "none":
    return (f"stage2.joint_weight={config.stage2.joint_weight} needs the heads' rest "
            "logits: set stage1.rest (e.g. 'typical'), or stage2.joint_weight=0.")
  return None


RULES: tuple[Rule, ...] = (
    Rule(_BATCHES, "Every batch splits evenly over the devices.", _split_over_devices),
    Rule(("checkpoint_every", "log_every"), "checkpoint_every is a multiple of log_every.",
         _checkpoints_after_logs),
    Rule(("*.optimizer.tap_learning_rates", "stage1.bridge_widths"),
         "tap_learning_rates: one rate per feature tap, or none.", _rate_per_tap),
    Rule(("data.mean", "data.std", "data.channels"),
         "data.mean and data.std: one of each per channel, or neither.", _normalisation),
    Rule(("data.path", "data.name"), "A folder dataset names its folder.", _folder_named),
    Rule(("stage2.joint_weight", "stage1.rest"), "The joint term needs a rest.",
         _joint_needs_rest),
)


def _needed(field: Field, config) -> bool:
  if field.when is None:
    return True
  on, values = field.when
  return value_at(config, on) in values


def _unknown(config, prefix: str = "") -> str | None:
  """The first field of `config` the schema does not declare, as an error."""
  declared = {f.path for f in FIELDS}
  for name in config:
    path = prefix + name
    if path in declared:
      continue
    inner = sorted(d[len(path) + 1:] for d in declared if d.startswith(path + "."))
    if inner and not isinstance(config[name], ml_collections.ConfigDict):
      return (f"{path}={_shown(config[name])}: give a group of fields "
              f"({', '.join(inner[:4])}, ...).")
    if inner:
      problem = _unknown(config[name], path + ".")
      if problem:
        return problem
      continue
    siblings = {d[len(prefix):].split(".")[0] for d in declared if d.startswith(prefix)}
    near = difflib.get_close_matches(name, sorted(siblings), n=1)
    hint = f"did you mean {prefix + near[0]!r}?" if near else "remove it or fix its name."
    return f"{path}: no such config field (kamal_jax does not read it): {hint}"
  return None


def check(config: ml_collections.ConfigDict, devices: int):
  """Refuses, in one line, the first unknown field, missing field, value the schema
  does not allow or broken rule of `config`."""
  problem = _unknown(config)
  if problem:
    raise ValueError(problem)
  for field in FIELDS:
    if not _needed(field, config):
      continue
    if not _present(config, field.path):
      raise ValueError(f"{field.path}: the config lacks this field: add it ({field.allowed}; "
                       "see configs/digits.py).")
    value = value_at(config, field.path)
    if not field.allowed.allows(value):
      raise ValueError(f"{field.path}={_shown(value)}: give {field.allowed}.")
  for rule in RULES:
    problem = rule.problem(config, devices)
    if problem:
      raise ValueError(problem)


def _present(config, path: str) -> bool:
  for name in path.split("."):
    if not isinstance(config, ml_collections.ConfigDict) or name not in config:
      return False
    config = config[name]
  return True


def _shown(value) -> str:
  text = repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
  return text if len(text) <= 80 else text[:77] + "..."


_STAGES = ("teacher_training", "stage1", "stage2")  # each with the optimizer's fields


def reference() -> str:
  """The README's reference of fields: a markdown table of FIELDS (the optimizer's
  fields once for the three stages, with their defaults in that order) and the rules."""
  from kamal_jax.configs import digits  # pylint: disable=g-import-not-at-top
  default = digits.get_config()

  def shown(path: str) -> str:
    return f"`{_shown(value_at(default, path))}`"

  rows = ["| field | allowed | default | what it does |", "|---|---|---|---|"]
  for field in FIELDS:
    stage, _, rest = field.path.partition(".optimizer.")
    if rest and stage != _STAGES[0]:
      continue
    if rest:
      path = f"{'/'.join(_STAGES)}.optimizer.{rest}"
      value = " / ".join(shown(f"{s}.optimizer.{rest}") for s in _STAGES)
    else:
      path = field.path
      value = (shown(path) if _present(default, path)
               else f"(data.name {' or '.join(field.when[1])})")
    rows.append(f"| `{path}` | {field.allowed} | {value} | {field.doc} |")
  rules = [f"- {rule.doc} ({', '.join(f'`{f}`' for f in rule.fields)})" for rule in RULES]
  return "\n".join(rows + ["", "Between fields:", ""] + rules) + "\n"


if __name__ == "__main__":
  print(reference(), end="")
