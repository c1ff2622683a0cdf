"""SIGKILL the command line at moments across every stage, rerun it on the same
workdir, and check that it ends with the report, the logged metrics and every
stage's final parameters of an uninterrupted run, bit for bit.

The default suite kills the shrunk default three times (teachers, stage 1,
evaluation); `pytest -m slow` kills the embedded default twelve times at seeded
random moments, some while a checkpoint is being written.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from kamal_jax import pipeline

REPO = Path(__file__).resolve().parent.parent


def _command(config_arg: str, workdir: Path) -> list[str]:
  return [sys.executable, "-m", "kamal_jax.main", f"--config={config_arg}",
          f"--workdir={workdir}", f"--compilation_cache={os.environ['KAMAL_JAX_TEST_CACHE']}"]


def _checkpoint(stage: str, step: int):
  return lambda workdir: (workdir / "checkpoints" / stage / str(step)).is_dir()


def _saving(workdir: Path) -> bool:
  """A checkpoint is being written (orbax's temporary directory exists)."""
  return any("tmp" in p.name for p in (workdir / "checkpoints").rglob("*"))


def _progress(workdir: Path) -> str:
  """The newest checkpoint in the workdir, as 'stage/step', or 'start'."""
  checkpoints = workdir / "checkpoints"
  steps = [p for p in checkpoints.rglob("*") if p.name.isdigit()]
  newest = max(steps, key=lambda p: p.stat().st_mtime, default=None)
  return str(newest.relative_to(checkpoints)) if newest else "start"


def run_with_kills(command: list[str], workdir: Path, triggers, delays) -> list[str]:
  """Starts `command`, waits for each trigger (a predicate on the workdir) plus its
  delay, SIGKILLs it and starts it again; then lets it finish. Returns where each
  kill landed: the newest checkpoint then, '+saving' if one was being written."""
  landed = []
  env = dict(os.environ, PYTHONPATH=str(REPO))
  for trigger, delay in zip(triggers, delays):
    stderr = workdir.parent / f"kill{len(landed) + 1}.stderr"
    with stderr.open("w") as log:
      process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=log)
      while process.poll() is None and not trigger(workdir):
        time.sleep(0.01)
      time.sleep(delay)
    assert process.poll() is None, (f"the run ended before kill {len(landed) + 1}, after "
                                    f"{landed}:\n{stderr.read_text()[-3000:]}")
    process.send_signal(signal.SIGKILL)
    process.wait()
    landed.append(_progress(workdir) + ("+saving" if _saving(workdir) else ""))
  final = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1800)
  assert final.returncode == 0, final.stderr[-2000:]
  return landed


def _final_variables(config, workdir: Path) -> list[np.ndarray]:
  """Every stage's final parameters and statistics, restored from the workdir."""
  run = pipeline.prepare(config, workdir, ())
  try:
    networks = pipeline.restore_networks(run)
  finally:
    run.log.close()
  return [np.asarray(x) for x in jax.tree.leaves((
      [s.variables for s in networks.teachers], [c.variables for c in networks.components],
      networks.student.variables))]


def assert_same_run(config, workdir: Path, reference: Path):
  read = lambda w: {k: v for k, v in json.loads((w / "report.json").read_text()).items()
                    if k != "timings"}
  assert read(workdir) == read(reference)
  logged = lambda w: [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
  assert logged(workdir) == logged(reference)  # each step logged once, same numbers
  for a, b in zip(_final_variables(config, workdir), _final_variables(config, reference),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_three_kills_across_stages_change_nothing(tiny, finished, data_dir, tmp_path):
  reference, _ = finished
  workdir = tmp_path / "run"
  first_teachers = "teachers/t1"
  triggers = [_checkpoint(first_teachers, 2), _checkpoint("stage1_part2", 2),
              _checkpoint("stage2", 6)]  # the last one lands in evaluation
  landed = run_with_kills(_command(f"tests/tiny_config.py:{data_dir}", workdir), workdir,
                          triggers, delays=[0.0] * 3)
  assert [where.split("+")[0] for where in landed][:2] == [f"{first_teachers}/2",
                                                          "stage1_part2/2"]
  assert_same_run(tiny, workdir, reference)


@pytest.mark.slow
def test_twelve_random_kills_of_the_default_change_nothing(tmp_path, capsys):
  from kamal_jax.configs import digits  # pylint: disable=g-import-not-at-top
  reference, workdir = tmp_path / "uninterrupted", tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  subprocess.run(_command("configs/digits.py", reference), cwd=REPO, env=env, check=True,
                 capture_output=True, timeout=1800)
  # Moments spread over every stage: each waits for a checkpoint (or for one being
  # written), then a seeded random delay.
  rng = np.random.default_rng(0)
  teacher_stages = [f"teachers/{name}" for name in digits.get_config().teachers]
  triggers = [_checkpoint(teacher_stages[0], 100), _saving,
              _checkpoint(teacher_stages[-1], 300),
              _checkpoint("stage1_part1", 100), _checkpoint("stage1_part1", 300), _saving,
              _checkpoint("stage1_part2", 200), _checkpoint("stage2", 100),
              _checkpoint("stage2", 200), _saving, _checkpoint("stage2", 300),
              _checkpoint("stage2", 400)]
  delays = [0.0 if t is _saving else float(rng.uniform(0, 2)) for t in triggers]
  landed = run_with_kills(_command("configs/digits.py", workdir), workdir, triggers, delays)
  with capsys.disabled():
    print(f"\nkills landed at: {landed}")
  assert len(landed) == 12
  assert_same_run(digits.get_config(), workdir, reference)
