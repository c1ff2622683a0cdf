"""The README's code blocks, read from the README itself and run as written."""
import csv
import re
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

from kamal_jax import main

README = Path(__file__).resolve().parent.parent / "README.md"
RUN_HERE = ("As a library", "Use the student")  # the sections whose blocks run below


def _sections() -> dict[str, list[tuple[str, str]]]:
  """{section title: [(language, code) of each fenced block in it]}."""
  parts = re.split(r"^## (.+)$", README.read_text(), flags=re.M)[1:]
  return {title: re.findall(r"```(\w*)\n(.*?)```", body, re.S)
          for title, body in zip(parts[::2], parts[1::2])}


def _run(blocks):
  """Bash lines through the CLI's entry point, Python blocks executed."""
  for language, code in blocks:
    if language == "bash":
      for line in code.splitlines():
        assert main.cli(shlex.split(line, comments=True)) == 0, line
    elif language == "python":
      exec(compile(code, str(README), "exec"), {})  # pylint: disable=exec-used


def test_every_python_block_of_the_readme_is_run_here():
  with_python = [t for t, blocks in _sections().items() if any(l == "python" for l, _ in blocks)]
  assert sorted(with_python) == sorted(RUN_HERE)


def test_the_library_example_trains_in_a_plain_jit_loop(capsys):
  _run(_sections()["As a library"])
  assert re.search(r"loss \d+\.\d+; teacher a selected on \d+%", capsys.readouterr().out)


def test_the_use_the_student_section_runs(finished, tmp_path, monkeypatch):
  """In a folder where runs/digits is the finished run (its student exported with
  every graph, as the default config exports it) and my_images/ holds one image."""
  workdir, _ = finished
  assert main.cli(["kamal-jax", "export", f"--workdir={workdir}"]) == 0
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "digits").symlink_to(workdir)
  (tmp_path / "my_images").mkdir()
  Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "my_images" / "a.png")
  monkeypatch.chdir(tmp_path)
  blocks = _sections()["Use the student"]
  assert [language for language, _ in blocks].count("python") == 4
  _run(blocks)
  assert (workdir / "export" / "components" / "part1" / "model.onnx").is_file()
  assert len(list(csv.DictReader(open("predictions.csv")))) == 1
