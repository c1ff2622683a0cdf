"""The config schema, attacked with generated wrong values through the real command
line, in this process: for every field of `kamal_jax.schema.FIELDS`, values of the
wrong type, out of range, empty, huge, negative, NaN, unknown names, and unknown
nested paths; and generated malformed teacher files. Each must exit 2 with exactly
one line that names the field (or the file), no traceback, and the workdir
byte-identical.

Values reach the door by both routes a user has: a config file that sets the field
(any Python value, past ml_collections' type locks, as a hand-written config does)
and a `--config.FIELD=TEXT` override. Hypothesis runs derandomized, so CI sees the
same cases every time.
"""
import ast
import hashlib
import math
import os
import pickle
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import save_file

from kamal_jax import data, main, schema

CASES_PER_FIELD = 10
SETTINGS = settings(max_examples=CASES_PER_FIELD, deadline=None, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck))


def _cli(*args) -> int:
  return main.cli(["kamal-jax", f"--compilation_cache={os.environ['KAMAL_JAX_TEST_CACHE']}",
                   *args])


def _digest(root: Path):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir that holds something: every refused run must leave it as it is."""
  root = tmp_path_factory.mktemp("refused")
  (root / "notes.txt").write_text("the user's own file")
  return root


def _refused(capsys, workdir: Path, arguments: list[str], names: str) -> str:
  """Runs the command line; checks the refusal and returns its one line."""
  before = _digest(workdir)
  assert _cli(*arguments, f"--workdir={workdir}") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("kamal-jax: error: "), err
  assert "Traceback" not in err[0]
  assert names in err[0], err[0]
  assert _digest(workdir) == before
  return err[0]


def _config_with(directory: Path, data_dir: str, path: str, value) -> str:
  """A config file: the tiny config with `path` set to `value` (any picklable value),
  built as a plain dict so that no type lock stops it."""
  source = directory / "generated_config.py"
  source.write_text(textwrap.dedent(f"""\
      import pickle
      import ml_collections
      import tiny_config

      def get_config():
        config = tiny_config.get_config({data_dir!r}).to_dict()
        *parents, name = {path.split('.')!r}
        node = config
        for parent in parents:
          node = node[parent]
        node[name] = pickle.loads(bytes.fromhex({pickle.dumps(value).hex()!r}))
        return ml_collections.ConfigDict(config)
      """))
  return f"--config={source}"


_NAMES = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)
_JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=8), st.just(()),
                  st.just({"a": 1}), st.floats(allow_nan=True, allow_infinity=True))


def wrong(allowed) -> st.SearchStrategy:
  """Values `allowed` refuses: of other types, out of its range, empty, unknown."""
  if isinstance(allowed, schema.Integer):
    return st.one_of(st.integers(max_value=allowed.low - 1),
                     st.integers(min_value=allowed.high + 1),
                     st.floats().filter(lambda v: not float(v).is_integer()),
                     st.text(max_size=6), st.none(), st.booleans(), st.just((1,)))
  if isinstance(allowed, schema.Number):
    below = st.floats(max_value=allowed.low, allow_nan=False).filter(
        lambda v: not allowed.allows(v)) if allowed.low > -math.inf else st.nothing()
    above = st.floats(min_value=allowed.high, allow_nan=False).filter(
        lambda v: not allowed.allows(v)) if allowed.high < math.inf else st.nothing()
    return st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf), below,
                     above, st.text(max_size=6), st.none(), st.booleans())
  if isinstance(allowed, schema.Choice):
    return st.one_of(_NAMES, st.integers(), st.none(), st.just(())).filter(
        lambda v: not allowed.allows(v))
  if isinstance(allowed, schema.Model):
    return st.one_of(_NAMES, st.integers(), st.none()).filter(lambda v: not allowed.allows(v))
  if isinstance(allowed, (schema.Text, schema.Flag)):
    return st.one_of(_JUNK, st.integers(), st.just("   ")).filter(
        lambda v: not allowed.allows(v))
  if isinstance(allowed, schema.Sequence):
    items = st.lists(wrong(allowed.item), min_size=1, max_size=3).map(tuple)
    return st.one_of(items, st.text(min_size=1, max_size=6), st.integers(), st.none(),
                     st.just(())).filter(lambda v: not allowed.allows(v))
  if isinstance(allowed, schema.LabelSet):
    return st.one_of(st.just(()), st.text(max_size=6), st.integers(), st.none(),
                     st.lists(st.integers(), min_size=1, max_size=3).map(tuple),
                     st.dictionaries(_NAMES, st.just(()), min_size=1, max_size=2))
  if isinstance(allowed, schema.Mapping):
    entries = st.dictionaries(_NAMES, wrong(allowed.value), min_size=1, max_size=2)
    return st.one_of(entries, st.text(max_size=6), st.integers(), st.just(("a",)),
                     st.just({}) if allowed.min_len else st.nothing()).filter(
                         lambda v: not allowed.allows(v))
  raise TypeError(f"no strategy for {allowed!r}")


_EVERY_DATASET = [f for f in schema.FIELDS if f.when is None]


@pytest.mark.parametrize("field", _EVERY_DATASET, ids=[f.path for f in _EVERY_DATASET])
def test_a_wrong_value_of_any_field_is_refused_naming_it(field, data_dir, workdir,
                                                          tmp_path_factory, capsys):
  directory = tmp_path_factory.mktemp("configs")

  @SETTINGS
  @given(value=wrong(field.allowed))
  def refused(value):
    _refused(capsys, workdir, [_config_with(directory, data_dir, field.path, value)],
             field.path)

  refused()  # pylint: disable=no-value-for-parameter


@SETTINGS
@given(field=st.sampled_from([f for f in schema.FIELDS if f.when]), data=st.data())
def test_fields_of_other_datasets(field, data, data_dir, workdir, tmp_path_factory, capsys):
  """Fields read only for some datasets (data.path, data.image_size, ...): the
  folder config, with one of them wrong."""
  value = data.draw(wrong(field.allowed))
  directory = tmp_path_factory.mktemp("configs")
  source = directory / "folder_config.py"
  source.write_text(textwrap.dedent(f"""\
      import pickle
      import ml_collections
      from kamal_jax.configs import folder

      def get_config():
        config = folder.get_config().to_dict()
        config["data"]["name"] = {field.when[1][0]!r}
        config["data"].setdefault("datasets", ("mnist",))
        config["data"]["path"] = "/somewhere"
        config["data"][{field.path.split('.')[1]!r}] = pickle.loads(
            bytes.fromhex({pickle.dumps(value).hex()!r}))
        return ml_collections.ConfigDict(config)
      """))
  _refused(capsys, workdir, [f"--config={source}"], field.path)


_GROUPS = sorted({f.path.rsplit(".", 1)[0] for f in schema.FIELDS if "." in f.path}
                 | {""})


@SETTINGS
@given(group=st.sampled_from(_GROUPS), name=_NAMES, depth=st.integers(0, 2))
def test_an_unknown_field_at_any_depth_is_refused_naming_it(group, name, depth, data_dir,
                                                             workdir, capsys):
  """Overrides of fields the config lacks (`--config.stage1.optimizer.x.y=1`)."""
  path = ".".join(filter(None, [group, f"x{name}", *["deeper"] * depth]))
  _refused(capsys, workdir, [f"--config=tests/tiny_config.py:{data_dir}",
                             f"--config.{path}=1"], f"--config.{path}")


_TEXTS = ["nan", "-inf", "1e400", "-1", "0", "abc", "''", "None", "99999999999999999999",
          "0.5", "(1,)"]


def _literal(text: str):
  for parse in (ast.literal_eval, float):
    try:
      return parse(text)
    except (ValueError, SyntaxError):
      pass
  return text


@SETTINGS
@given(field=st.sampled_from([f for f in _EVERY_DATASET if isinstance(
    f.allowed, (schema.Integer, schema.Number))]), text=st.sampled_from(_TEXTS))
def test_numbers_given_as_overrides(field, text, data_dir, workdir, capsys):
  """The override route: the flag parser turns the text into a value of the field's
  type or refuses it itself; either way a value the schema does not allow is refused
  naming the field."""
  if field.allowed.allows(_literal(text)):
    return  # an allowed value: nothing to refuse
  _refused(capsys, workdir, [f"--config=tests/tiny_config.py:{data_dir}",
                             f"--config.{field.path}={text}"], field.path)


def test_the_readme_holds_the_schema_reference():
  readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
  assert schema.reference() in readme, "update README.md: python -m kamal_jax.schema"


def test_every_shipped_config_passes_the_schema():
  from kamal_jax.configs import attribute_setup, class_setup, digits  # pylint: disable=g-import-not-at-top
  for config in (*(digits.get_config(v) for v in digits.VARIANTS), class_setup.get_config(),
                 attribute_setup.get_config()):
    schema.check(config, devices=8)


# Malformed teacher files: a real teacher's state dict, damaged.
def _state_dict() -> dict[str, np.ndarray]:
  from torch_nets import random_net  # pylint: disable=g-import-not-at-top
  net = random_net(0, widths=(4, 4, 8, 16, 32), blocks=(1, 1, 1, 1), num_classes=4,
                   small_input=True, channels=1)
  return {k: v.numpy() for k, v in net.state_dict().items()}


_DAMAGES = st.sampled_from(["rank", "empty", "dtype", "drop", "truncate", "pickle", "shape"])


@pytest.fixture(scope="module")
def built(tiny):
  """The digits' tfds files, built once (building them writes progress bars)."""
  data.load(tiny.data)


@settings(SETTINGS, max_examples=2 * CASES_PER_FIELD)
@given(damage=_DAMAGES, seed=st.integers(0, 2**16))
def test_a_malformed_teacher_file_is_refused_naming_it(damage, seed, built, data_dir,
                                                       workdir, tmp_path_factory, capsys):
  del built
  rng = np.random.default_rng(seed)
  state = _state_dict()
  weights = sorted(n for n in state if not n.endswith("num_batches_tracked"))
  name = weights[rng.integers(len(weights))]
  path = tmp_path_factory.mktemp("teacher") / "t2.safetensors"
  if damage == "rank":
    state[name] = state[name].reshape(-1)[None, None]
  elif damage == "empty":
    state[name] = state[name][:0]
  elif damage == "dtype":
    state[name] = state[name].astype(rng.choice([np.int32, np.bool_, np.uint8]))
  elif damage == "drop":
    del state[name]
  elif damage == "shape":
    state[name] = np.concatenate([state[name], state[name]])
  if damage == "pickle":
    path = path.with_suffix(".pth")
    path.write_bytes(pickle.dumps({"model": {"weights": np.ones(3)}, "hook": print}))
  else:
    save_file(state, str(path))
  if damage == "truncate":
    data = path.read_bytes()
    path.write_bytes(data[:int(rng.integers(1, len(data)))])
  config = _config_with(tmp_path_factory.mktemp("configs"), data_dir, "teacher_checkpoints",
                        {"t2": str(path)})
  _refused(capsys, workdir, [config], path.name)
