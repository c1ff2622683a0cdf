"""configs/folder.py on the digits written out as PNG files, with user teachers of
three architectures: trained here (from pretrained weights), trained here with
another model, and imported from PyTorch with a label set of another size."""
import json

import ml_collections
import numpy as np
import pytest
from safetensors.torch import save_file
from torch_nets import random_net

import tiny_config
from kamal_jax import data, models, pipeline
from kamal_jax.configs import folder
from kamal_jax.third_party import torch_resnet


@pytest.fixture(scope="module")
def png_digits(tiny, tmp_path_factory):
  root = tmp_path_factory.mktemp("digits_png")
  digits = data.load(tiny.data)
  data.folder.write(digits.images.array, digits.labels[:, 0], digits.class_names, root)
  return root


def _folder_config(path) -> ml_collections.ConfigDict:
  """configs/folder.py with the tiny shapes of the other pipeline tests."""
  config = folder.get_config()
  tiny = tiny_config.get_config()
  for field in ("models", "teacher_training", "stage1", "stage2", "eval_batch_size",
                "log_every", "checkpoint_every"):
    config[field] = tiny[field]
  config.data.path = str(path)
  return config


def _pretrained(config, path, num_classes=7) -> dict:
  """A torch net of the config's teacher architecture saved at `path`, with another
  number of classes (as ImageNet weights would have); returns its variables."""
  module = models.create(config.models.teacher, 1, config.models.teacher_width_scale)
  net = random_net(1, widths=module.widths, blocks=module.blocks, num_classes=num_classes,
                   small_input=True, channels=1)
  save_file(net.state_dict(), str(path))
  return torch_resnet.load(str(path))[1]


def test_folder_with_heterogeneous_and_imported_teachers(png_digits, tmp_path):
  torch_teacher = random_net(0, widths=(4, 6, 8, 8, 12), blocks=(1, 1, 1, 1),
                             num_classes=5, small_input=True, channels=1)
  save_file(torch_teacher.state_dict(), str(tmp_path / "t2.safetensors"))
  config = _folder_config(png_digits)
  config.models.pretrained = str(tmp_path / "pretrained.safetensors")
  pretrained = _pretrained(config, config.models.pretrained)
  config.teachers.t2 = ("0", "1", "2", "7", "8")
  config.teacher_checkpoints = ml_collections.ConfigDict(
      {"t2": str(tmp_path / "t2.safetensors")})
  config.teacher_models = ml_collections.ConfigDict({"t4": "resnet18"})
  workdir = tmp_path / "run"
  result = pipeline.train_and_evaluate(config, str(workdir))

  assert json.loads((workdir / "report.json").read_text())["student"]["accuracy_joint"] \
      == result["student"]["accuracy_joint"]
  assert [c["teachers"] for c in result["components"]] == [["t1", "t2"], ["t3", "t4"]]
  params = {t["name"]: t["params"] for t in result["teachers"]}
  assert params["t2"] == sum(p.numel() for p in torch_teacher.parameters())
  assert params["t4"] > params["t3"] == params["t1"]  # resnet18 at the same width scale
  # Two trained stacks ({t1, t3} and {t4}), a stage per teacher; the imported teacher
  # is never trained.
  checkpoints = workdir / "checkpoints"
  assert sorted(str(p.parent.relative_to(checkpoints)) for p in checkpoints.rglob("6")) == [
      "stage1_part1", "stage1_part2", "stage2", "teachers_1/t1", "teachers_1/t3",
      "teachers_2/t4"]
  for component in result["components"]:
    assert sum(component["selected_fraction"].values()) == pytest.approx(1.0)
  # The trained teachers learned their parts from the folder's labels.
  trained = [t["accuracy"] for t in result["teachers"] if t["name"] != "t2"]
  assert min(trained) > 0.3 and np.isfinite(result["student"]["accuracy_joint"])

  # Teachers of the teachers' architecture and the components started from the
  # pretrained weights: a few steps at these rates move a weight by < 0.02, while
  # random initial weights differ from them by ~0.3.
  with pipeline.prepare(config, workdir, ()) as run:
    networks = pipeline.restore_networks(run)
  stem = pretrained["params"]["stem_conv"]["kernel"]
  pool = networks.teachers
  started = [*pool[0].variables["params"]["stem_conv"]["kernel"],
             *(c.variables["params"]["stem_conv"]["kernel"] for c in networks.components)]
  assert pool[0].names == ("t1", "t3") and len(started) == 4
  for kernel in started:
    assert np.max(np.abs(kernel - stem)) < 0.02
  assert np.mean(np.abs(stem)) > 0.1


def test_folder_config_needs_its_path(tmp_path):
  config = _folder_config("")
  with pytest.raises(ValueError, match="data.path is empty"):
    pipeline.train_and_evaluate(config, str(tmp_path / "run"))
  config.data.path = str(tmp_path / "absent")
  with pytest.raises(ValueError, match="does not exist"):
    pipeline.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_pretrained_weights_of_another_architecture_are_refused(png_digits, tmp_path):
  config = _folder_config(png_digits)
  config.models.pretrained = str(tmp_path / "wide.safetensors")
  config.models.teacher_width_scale = 0.5  # the file holds the 0.25-wide net
  _pretrained(_folder_config(png_digits), config.models.pretrained)
  with pytest.raises(ValueError, match="models.pretrained .* widths \\(4, 4, 8, 16, 32\\)"
                     ".* widths \\(8, 8, 16, 32, 64\\).*that architecture"):
    pipeline.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_teachers_logits_must_match_its_label_set(png_digits, tmp_path):
  torch_teacher = random_net(0, widths=(4, 4, 4, 4, 4), blocks=(1, 1, 1, 1),
                             num_classes=3, small_input=True, channels=1)
  save_file(torch_teacher.state_dict(), str(tmp_path / "t2.safetensors"))
  config = _folder_config(png_digits)
  config.teacher_checkpoints = ml_collections.ConfigDict(
      {"t2": str(tmp_path / "t2.safetensors")})
  with pytest.raises(ValueError, match="'t2' .* has 3 logits but its label set has 4"):
    pipeline.train_and_evaluate(config, str(tmp_path / "run"))
