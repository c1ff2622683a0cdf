"""Interrupt the command line at moments across every stage (SIGKILL, SIGTERM,
SIGINT, a full disk), rerun it on the same workdir, and check that it ends with the
report, the logged metrics and every stage's final parameters of an uninterrupted
run, bit for bit; and that each interrupt it could see ended it in one line.

The default suite interrupts the shrunk default four times (teachers, stage 1 twice,
stage 2), and checks on the way that a second run on the busy workdir is refused
and that a killed run's lock never blocks the rerun; `pytest -m slow` kills the
embedded default twelve times at seeded random moments, some while a checkpoint is
being written.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import fill
from kamal_jax import files, main, pipeline

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


def _killed(process: subprocess.Popen, workdir: Path):
  process.send_signal(signal.SIGKILL)


def run_with_interruptions(command: list[str], workdir: Path, moments) -> list[tuple]:
  """Starts `command`; for each moment (trigger: a predicate on the workdir; delay;
  interrupt(process, workdir)) waits for the trigger plus the delay, interrupts the
  run, waits for it to end and starts it again; then lets it finish. Returns, per
  moment, where it landed (the newest checkpoint then, '+saving' if one was being
  written), the exit status and the stderr."""
  landed = []
  env = dict(os.environ, PYTHONPATH=str(REPO))
  for trigger, delay, interrupt in moments:
    stderr = workdir.parent / f"interrupt{len(landed) + 1}.stderr"
    with stderr.open("w") as log:
      process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=log)
      while process.poll() is None and not trigger(workdir):
        time.sleep(0.01)
      time.sleep(delay)
      assert process.poll() is None, (f"the run ended before interrupt {len(landed) + 1}, "
                                      f"after {landed}:\n{stderr.read_text()[-3000:]}")
      where = _progress(workdir) + ("+saving" if _saving(workdir) else "")
      interrupt(process, workdir)
      process.wait(timeout=600)
    landed.append((where, process.returncode, stderr.read_text()))
  final = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1800)
  assert final.returncode == 0, final.stderr[-2000:]
  return landed


def _final_variables(config, workdir: Path) -> list[np.ndarray]:
  """Every stage's final parameters and statistics, restored from the workdir."""
  with pipeline.prepare(config, workdir, ()) as run:
    networks = pipeline.restore_networks(run)
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


def _last_line(stderr: str) -> str:
  assert "Traceback" not in stderr, stderr[-3000:]
  return stderr.strip().splitlines()[-1]


def test_interrupts_across_stages_change_nothing(tiny, finished, data_dir, tmp_path,
                                                 small_disk, capsys):
  """SIGTERM in the teachers (while a second run is refused), SIGKILL in stage 1, a
  full disk later in stage 1 (on a file system of its own where the test can mount
  one), SIGINT in stage 2. (A SIGINT at stage 2's last checkpoint raced the run's
  end: evaluation takes a second here.)"""
  reference, _ = finished
  workdir = (small_disk or tmp_path) / "run"
  command = _command(f"tests/tiny_config.py:{data_dir}", workdir)
  holder = []

  def refused_then_terminated(process, workdir):
    assert main.cli(command[2:]) == 2  # the same command, in this process
    holder.append(capsys.readouterr().err)
    process.send_signal(signal.SIGTERM)

  def killed(process, workdir):
    _killed(process, workdir)
    process.wait()
    record = (workdir / files.LOCK).read_text()
    assert record.startswith(f"pid {process.pid} ") and files.holder(workdir) is None

  def full_disk(process, workdir):
    ballast = fill(small_disk)
    process.wait(timeout=600)
    ballast.unlink()

  moments = [(_checkpoint("teachers/t1", 2), 0.0, refused_then_terminated),
             (_checkpoint("stage1_part1", 2), 0.0, killed),
             *([(_checkpoint("stage1_part2", 2), 0.0, full_disk)] if small_disk else []),
             (_checkpoint("stage2", 4), 0.0, lambda p, _: p.send_signal(signal.SIGINT))]
  term, kill, *full, interrupted = run_with_interruptions(command, workdir, moments)
  busy, = holder[0].strip().splitlines()
  assert busy.startswith(f"kamal-jax: error: --workdir {workdir} is in use by another run "
                         f"(pid "), busy
  newest = lambda where: where.split("+")[0]
  assert (newest(term[0]), term[1]) == ("teachers/t1/2", 143)
  assert re.fullmatch(r"kamal-jax: stopped by SIGTERM in stage 'teachers(/t1' after step "
                      r"(\d) of 6 \(its newest checkpoint: step \2\)|'): run the same "
                      r"command again to resume\.", _last_line(term[2])), term[2][-500:]
  assert (newest(kill[0]), kill[1]) == ("stage1_part1/2", -signal.SIGKILL)
  for _, status, stderr in full:
    assert status == 2
    assert re.fullmatch(rf"kamal-jax: error: {workdir}/\S+: No space left on device: free "
                        r"space or fix the file system, then run the same command again",
                        _last_line(stderr)), stderr[-500:]
  assert interrupted[1] == 130
  assert re.fullmatch(r"kamal-jax: stopped by SIGINT in stage 'stage2'.*: run the same "
                      r"command again to resume\.", _last_line(interrupted[2]))
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
              _checkpoint("stage1_part2", 200), _checkpoint("stage2", 400),
              _checkpoint("stage2", 800), _saving, _checkpoint("stage2", 1200),
              _checkpoint("stage2", 1600)]
  delays = [0.0 if t is _saving else float(rng.uniform(0, 2)) for t in triggers]
  landed = run_with_interruptions(_command("configs/digits.py", workdir), workdir,
                                  [(t, d, _killed) for t, d in zip(triggers, delays)])
  with capsys.disabled():
    print(f"\nkills landed at: {[where for where, _, _ in landed]}")
  assert len(landed) == 12
  assert_same_run(digits.get_config(), workdir, reference)
