"""The paper's class and attribute setups end to end on mocked tfds data, shrunk.

tfds' own mock generator encodes images with TensorFlow, which is not installed, so
the mock data source here writes JPEG bytes with PIL, as the real array_record files
hold them; builders, features and class names are tfds' real ones.
"""
import io
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tiny_config
from kamal_jax import pipeline, tasks
from kamal_jax.configs import arguments, attribute_setup, class_setup
from kamal_jax.data import tfds_images

EXAMPLES = 64  # per split and dataset


class _Source(list):
  """A list with the batched read of tfds' data sources."""

  def __getitems__(self, keys):
    return [self[k] for k in keys]


def _as_data_source(builder, split, decoders=None, **kwargs):
  """Random JPEG images of random sizes with random labels or attributes."""
  del decoders, kwargs
  rng = np.random.default_rng(zlib.crc32(f"{builder.name}/{split}".encode()))
  features = builder.info.features
  examples = []
  for _ in range(EXAMPLES):
    height, width = rng.integers(24, 48, size=2)
    encoded = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(encoded, "JPEG")
    example = {"image": encoded.getvalue()}
    if "label" in features:
      example["label"] = int(rng.integers(features["label"].num_classes))
    else:
      example["attributes"] = {a: bool(rng.integers(2)) for a in features["attributes"].keys()}
    examples.append(example)
  return _Source(examples)


@pytest.fixture
def mocked_tfds():
  with tfds.testing.mock_data(as_data_source_fn=_as_data_source):
    yield


def _shrunk(config):
  """The setup at 32 px with the tests' tiny networks and run lengths (compiling
  ResNet-18s would double the time and test nothing more here)."""
  tiny = tiny_config.get_config()
  config.data.image_size = 32
  config.models = tiny.models
  for stage in ("teacher_training", "stage1", "stage2"):
    config[stage].update(steps=tiny[stage].steps, batch_size=tiny[stage].batch_size)
  config.stage1.bridge_widths = tiny.stage1.bridge_widths
  config.update(eval_batch_size=64, log_every=tiny.log_every,
                checkpoint_every=tiny.checkpoint_every)
  return config


def _heads(names) -> tuple[tasks.Head, ...]:
  """The heads `data.load` gives the tfds datasets, from their metadata."""
  return tuple(head for name in names for head in tfds_images.heads(
      name, tfds_images.builder(name).info.features))


def test_class_setup_dogs_with_cars(mocked_tfds, tmp_path):
  config = _shrunk(class_setup.get_config("main=stanford_dogs,aux=cars196"))
  heads = _heads(config.data.datasets)
  parts = tasks.resolve_splits(config.target.parts, heads, "target.parts")
  assert [len(parts[p]) for p in sorted(parts)] == [60, 60]
  assert sorted(config.teachers) == ["t11", "t12", "t23", "t24"]
  t11 = tasks.resolve_splits(config.teachers.t11, heads, "teachers.t11")
  assert len(t11) == 60 + 49 and t11[:60] == parts["part1"]
  result = pipeline.train_and_evaluate(config, str(tmp_path))
  assert [c["teachers"] for c in result["components"]] == [["t11", "t12"], ["t23", "t24"]]
  assert result["student"]["accuracy_joint"] is not None  # dog classes are exclusive
  assert (tmp_path / "report.md").exists()


def test_attribute_setup_eye(mocked_tfds, tmp_path):
  config = _shrunk(attribute_setup.get_config("target=eye"))
  result = pipeline.train_and_evaluate(config, str(tmp_path))
  assert [c["name"] for c in result["components"]] == [
      "Bags_Under_Eyes", "Bushy_Eyebrows", "Narrow_Eyes"]
  assert [c["teachers"] for c in result["components"]][0] == [
      "Bags_Under_Eyes_1", "Bags_Under_Eyes_2"]
  for component in result["components"]:  # every image has every attribute
    assert 0.0 <= component["accuracy"] <= 1.0
    assert sum(component["selected_fraction"].values()) == pytest.approx(1.0)
  assert result["student"]["accuracy_joint"] is None  # attributes are not exclusive
  assert set(result["student"]["accuracy_per_part"]) == {
      "Bags_Under_Eyes", "Bushy_Eyebrows", "Narrow_Eyes"}
  assert "no joint accuracy" in (tmp_path / "report.md").read_text()


def test_unknown_setup_arguments_name_the_choices():
  with pytest.raises(ValueError, match="main='mnist'"):
    class_setup.get_config("main=mnist")
  with pytest.raises(ValueError, match="target='hands'"):
    attribute_setup.get_config("target=hands")


def test_building_a_setup_reads_no_dataset(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"a config read the dataset {args}")
  monkeypatch.setattr(tfds, "builder", refuse)
  monkeypatch.setattr(tfds, "data_source", refuse)
  config = class_setup.get_config("main=caltech_birds2011,seed=3")
  assert config.target.parts.part2 == (
      dict(split="caltech_birds2011", part=2, of=2, seed=3),)
  assert config.teachers.t23[1] == dict(split="cars196", part=3, of=4, seed=3)
  attribute_setup.get_config("target=face")


def test_config_arguments_refuse_unknown_keys_and_bad_values():
  defaults, choices = dict(main="a", seed=0), dict(main=("a", "b"))
  assert arguments.parse("seed=3,main=b", defaults, choices) == dict(main="b", seed=3)
  # A lone value is the first key's.
  assert arguments.parse("b", defaults, choices) == dict(main="b", seed=0)
  assert arguments.parse(None, defaults, choices) == defaults
  with pytest.raises(ValueError, match=r"Unknown config argument 'aux': use main=, seed="):
    arguments.parse("main=a,aux=b", defaults, choices)
  with pytest.raises(ValueError, match=r"main='c': use one of \('a', 'b'\)\."):
    arguments.parse("main=c", defaults, choices)
  with pytest.raises(ValueError, match=r"seed='x': give an integer\."):
    arguments.parse("seed=x", defaults, choices)
