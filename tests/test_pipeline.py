"""The shrunk digits default end to end: report, checkpoints, resume, determinism, CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ml_collections

from kamal_jax import bench, main, pipeline, train

REPO = Path(__file__).resolve().parent.parent


def _numbers(result: dict) -> dict:
  return {k: v for k, v in result.items() if k != "timings"}


def test_report_has_the_documented_keys(finished):
  workdir, result = finished
  on_disk = json.loads((workdir / "report.json").read_text())
  assert on_disk == json.loads(json.dumps(result))
  assert [t["name"] for t in on_disk["teachers"]] == ["t1", "t2", "t3", "t4"]
  for teacher in on_disk["teachers"]:
    assert {"name", "classes", "accuracy"} <= teacher.keys()
    assert 0.0 <= teacher["accuracy"] <= 1.0
  assert [c["teachers"] for c in on_disk["components"]] == [["t1", "t2"], ["t3", "t4"]]
  for component in on_disk["components"]:
    assert {"name", "classes", "teachers", "accuracy", "selected_fraction"} <= component.keys()
    assert sum(component["selected_fraction"].values()) == pytest.approx(1.0)
  student = on_disk["student"]
  assert set(student["accuracy_per_part"]) == {"part1", "part2"}
  assert 0.0 <= student["accuracy_joint"] <= 1.0
  components_params = sum(c["params"] for c in on_disk["components"])
  assert on_disk["teachers"][0]["params"] < student["params"] < components_params
  assert set(on_disk["timings"]) >= {"teachers", "stage1", "stage2", "evaluate"}
  assert "| part1 | 0 1 2 |" in (workdir / "report.md").read_text()
  assert list((workdir / "tensorboard").iterdir())
  assert json.loads((workdir / "config.json").read_text())["seed"] == 0


def test_every_stage_checkpointed_its_last_step(finished):
  workdir, _ = finished
  checkpoints = workdir / "checkpoints"
  stages = sorted(str(p.parent.relative_to(checkpoints)) for p in checkpoints.rglob("6"))
  assert stages == ["stage1_part1", "stage1_part2", "stage2",
                    *(f"teachers/t{k}" for k in range(1, 5))]
  for stage in stages:
    steps = sorted(int(p.name) for p in (workdir / "checkpoints" / stage).iterdir())
    assert steps[-1] == 6 and len(steps) == 2  # max_to_keep=2


def test_rerun_restores_finished_stages(tiny, finished, monkeypatch):
  workdir, result = finished

  def no_training(*args, **kwargs):
    raise AssertionError("a finished stage was trained again")

  monkeypatch.setattr(train.loop, "train_step", no_training)
  again = pipeline.train_and_evaluate(tiny, str(workdir))
  assert _numbers(again) == _numbers(result)
  for stage in ("teachers", "stage1", "stage2"):  # the times of the training run stay
    assert again["timings"][stage] == result["timings"][stage]


def test_same_seed_gives_identical_numbers(tiny, finished, tmp_path):
  _, result = finished
  assert _numbers(pipeline.train_and_evaluate(tiny, str(tmp_path))) == _numbers(result)


def test_amalgamation_never_sees_labels(tiny, tmp_path, monkeypatch):
  seen = {}
  fit = train.fit

  def spy(stage, *args):
    seen[stage.name] = sorted(stage.batches(0))
    return fit(stage, *args)

  monkeypatch.setattr(train, "fit", spy)
  tiny = tiny.copy_and_resolve_references()
  tiny.data.pool = "reference"
  result = pipeline.train_and_evaluate(tiny, str(tmp_path))
  # Amalgamation batches hold images and, computed once from them, the frozen
  # networks' outputs (the digits are not augmented): no labels.
  assert seen == {**{f"teachers/t{k}": ["image", "label"] for k in range(1, 5)},
                  "stage1_part1": ["frozen", "image"], "stage1_part2": ["frozen", "image"],
                  "stage2": ["frozen", "image"]}
  assert result["components"][0]["selected_fraction"]


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run(
      [sys.executable, "-m", "kamal_jax.main",
       f"--compilation_cache={os.environ['KAMAL_JAX_TEST_CACHE']}", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_cli_evaluates_a_finished_run(finished, data_dir):
  workdir, result = finished
  done = _cli(f"--config=tests/tiny_config.py:{data_dir}", f"--workdir={workdir}",
              "--stage=evaluate")
  assert done.returncode == 0, done.stderr
  assert "student joint accuracy" in done.stdout
  assert _numbers(json.loads((workdir / "report.json").read_text())) == \
      _numbers(json.loads(json.dumps(result)))


def test_cli_refuses_a_stage_whose_inputs_are_missing(data_dir, tmp_path):
  done = _cli(f"--config=tests/tiny_config.py:{data_dir}", f"--workdir={tmp_path}",
              "--stage=stage2")
  assert done.returncode == 2
  assert "Stage 'teachers' has not finished" in done.stderr
  assert "Traceback" not in done.stderr


def test_a_refused_config_leaves_the_workdir_untouched(tiny, tmp_path):
  bad = tiny.copy_and_resolve_references()
  bad.target.parts.part1 = ("0", "1", "9")  # no teacher covers 0, 1 and 9 together
  with pytest.raises(ValueError, match="group is empty"):
    pipeline.train_and_evaluate(bad, str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()


# Every pipeline of the bench, and the selection rules whose batches carry more than
# images (random: a key; oracle: labels) or whose weights are checked below (none);
# the other rules differ only in the weights, tested by hand in test_ambiguity.py.
PIPELINE_VARIANTS = ["least-entropy", "paper", "none", "random", "oracle", "single-stage",
                     "kd-logits", "cfl", "ensemble", "supervised"]


@pytest.mark.slow  # 2.4 min on 2 cores; benchmarks/variants.py runs them all too
def test_every_pipeline_variant_runs_through_one_pipeline_and_report(tiny, tmp_path):
  """The bench's variants, on two image domains and parts of unequal size."""
  config = tiny.copy_and_resolve_references()
  config.target.parts.part2 = ("3", "4")
  config.data.domains = ("original", "shuffled")
  config.teacher_domains = ml_collections.ConfigDict(
      dict(t1="original", t2="shuffled", t3="original", t4="shuffled"))
  assert set(PIPELINE_VARIANTS) <= set(bench.VARIANTS)
  reports = {v: r[0] for v, r in bench.run(config, PIPELINE_VARIANTS, [0], tmp_path).items()}
  teacher_params = reports["least-entropy"]["teachers"][0]["params"]
  for variant, result in reports.items():
    assert result["timings"].keys() >= {"evaluate"}, variant
    trained_teachers = "teachers" in result["timings"]
    assert trained_teachers == (variant == "least-entropy"), variant  # shared after
    has_components = result["pipeline"] == "two_stage"
    assert all((c["accuracy"] is not None) == has_components
               for c in result["components"]), variant
    for c in result["components"]:
      assert sum(c["selected_fraction"].values()) == pytest.approx(1.0)
      assert 0.0 <= c["test_selection"]["selected_own_domain"] <= 1.0
  ensemble = reports["ensemble"]["student"]
  assert ensemble["inference_forwards"] == 4 and ensemble["params"] == 4 * teacher_params
  for c in reports["none"]["components"]:
    assert list(c["selected_fraction"].values()) == pytest.approx([0.5, 0.5])
  # The same student; the method's heads have one more output each, the rest logit.
  assert (reports["supervised"]["student"]["params"] == reports["paper"]["student"]["params"]
          < reports["least-entropy"]["student"]["params"])
  assert reports["least-entropy"]["components"][1]["classes"] == ["3", "4"]

  out = tmp_path / "table.md"
  bench.write(bench.per_seed(bench.run(config, ["least-entropy", "none"], [0], tmp_path)),
              [0], out, "# t")
  text = out.read_text()
  assert "| least-entropy |" in text and "| none |" in text and "+-" in text
  assert out.with_suffix(".png").exists()
  per_seed = json.loads(out.with_suffix(".json").read_text())
  assert per_seed["none"]["0"]["student joint"] == reports["none"]["student"]["accuracy_joint"]


def test_report_plots_are_written_and_embedded(finished):
  workdir, _ = finished
  text = (workdir / "report.md").read_text()
  for name in ("loss.png", "selection.png", "accuracy.png"):
    assert (workdir / name).stat().st_size > 1000
    assert f"]({name})" in text


def test_teacher_classes_the_dataset_lacks_are_named(tiny, tmp_path):
  bad = tiny.copy_and_resolve_references()
  bad.teachers.t4 = ("3", "4", "5", "nine")
  with pytest.raises(ValueError, match=r"\['nine'\] are not classes of dataset 'digits' "
                                       r"\(10 classes"):
    pipeline.train_and_evaluate(bad, str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()


USER_MODULE = '''
import flax.linen as nn
from kamal_jax.models import Outputs


class SmallCNN(nn.Module):
  """Not a ResNet: plain strided convolutions, taps after each, other widths."""
  num_outputs: int
  width: int = 4
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    feats = []
    for i, stride in enumerate((1, 1, 2, 2, 2)):
      x = nn.Conv(self.width * (1 + i // 2), (3, 3), stride)(x)
      feats.append(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train,
                               axis_name=self.axis_name if train else None)(x))
    return Outputs(nn.Dense(self.num_outputs)(x.mean(axis=(1, 2))), tuple(feats))
'''


def test_a_users_own_teacher_module_amalgamates_through_the_cli(data_dir, tmp_path):
  """Teachers and components of the user's module (named from the config, with a
  keyword), the student our ResNet, through the CLI's entry point."""
  (tmp_path / "my_nets.py").write_text(USER_MODULE)
  workdir = tmp_path / "run"
  arch = f"{tmp_path / 'my_nets.py'}:SmallCNN(width=3)"
  assert main.cli(["kamal-jax", f"--config=tests/tiny_config.py:{data_dir}",
                   f"--workdir={workdir}", f"--config.models.teacher={arch}"]) == 0
  result = json.loads((workdir / "report.json").read_text())
  assert result["teachers"][0]["params"] < 3000 < result["student"]["params"]
  assert (workdir / "export" / "student" / "model.safetensors").is_file()
  assert main.cli(["kamal-jax", "export", f"--workdir={workdir}", "--network=teachers"]) == 2
