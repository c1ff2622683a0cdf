"""Bad input on the command line: exit status 2, one line naming the problem and the
fix, no traceback, and the workdir left exactly as it was.

Each case runs `kamal_jax.main.cli` in this process (its flags live on their own
FlagValues), so the cases cost no interpreter start and no compilation: every one
is refused before a network is built.
"""
import hashlib
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch_nets import random_net

import tiny_config
from kamal_jax import data, door, main, pipeline

TINY = "tests/tiny_config.py"


def _cli(*args) -> int:
  return main.cli(["kamal-jax", f"--compilation_cache={os.environ['KAMAL_JAX_TEST_CACHE']}",
                   *args])


def _snapshot(path: Path):
  """The workdir's state: None if absent, a file's digest, or a directory's files."""
  if not path.exists():
    return None
  if path.is_file():
    return hashlib.sha256(path.read_bytes()).hexdigest()
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(path.rglob("*")) if p.is_file()}


def _config_file(tmp_path: Path, data_dir: str, body: str, base: str = "tiny") -> str:
  """A config file: the tests' tiny config (or configs/folder.py shrunk the same
  way), changed by `body` (statements on `c`)."""
  start = {"tiny": f"c = tiny_config.get_config({data_dir!r})",
           "folder": "c = folder.get_config()\n"
                     "for field in ('models', 'teacher_training', 'stage1', 'stage2'):\n"
                     "  c[field] = tiny_config.get_config()[field]"}[base]
  path = tmp_path / "bad_config.py"
  path.write_text(
      "import ml_collections\nimport tiny_config\nfrom kamal_jax.configs import folder\n\n"
      "def get_config():\n" + textwrap.indent(f"{start}\n{body}\nreturn c\n", "  "))
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, data_dir):
  """Files the cases point at: a PNG folder of four digit classes, checkpoints."""
  root = tmp_path_factory.mktemp("inputs")
  digits = data.load(tiny_config.get_config(data_dir).data)
  keep = digits.labels[:, 0] < 4
  data.folder.write(digits.images.array[keep][:80], digits.labels[keep, 0][:80],
                    digits.class_names, root / "pngs")
  (root / "empty").mkdir()
  broken = root / "broken"
  data.folder.write(digits.images.array[:8], digits.labels[:8, 0], digits.class_names, broken)
  (broken / "0" / "junk.png").write_bytes(b"not an image at all")
  net = random_net(0, widths=(4, 4, 8, 16, 32), blocks=(1, 1, 1, 1), num_classes=3,
                   small_input=True, channels=1)
  save_file(net.state_dict(), str(root / "three_logits.safetensors"))
  save_file({"encoder.weight": torch.ones(3, 3)}, str(root / "not_resnet.safetensors"))
  (root / "garbage.safetensors").write_bytes(os.urandom(256))
  torch.save({"model": net}, str(root / "pickled.pth"))  # a whole module, not a state dict
  (root / "a_file").write_text("not a directory")
  return root


# (case, arguments after the program name, a pattern the one-line message must hold).
# Wrong values of each config field are generated from the schema in
# tests/test_schema.py; these are the flags, the rules between fields, the data, the
# teachers' files and the workdir.
# Arguments are templates: {tiny} is the tiny config with the test data directory,
# {files} the fixture's folder, {cfg:BODY} / {folder:BODY} a config file changed by BODY.
CASES = [
    ("missing config file", "--config=tests/absent.py", r"--config=tests/absent.py: no such file"),
    ("unknown config variant", "--config=configs/digits.py:bogus", r"variant='bogus': use one of"),
    ("override of the wrong type", "{tiny} --config.seed=abc", r"--config.seed=abc: invalid literal"),
    ("unknown flag", "{tiny} --epochs=3", r"Unknown command line flag 'epochs'"),
    ("missing workdir flag", "{tiny} --workdir=", r"--workdir is required"),
    ("unknown stage", "{tiny} --stage=stage3", r"--stage=stage3: value should be one of"),
    ("an unknown field in a config file", "{cfg:c.stage1.selction = 'soft'}",
     r"stage1.selction: no such config field .*did you mean 'stage1.selection'"),
    ("checkpoints between logs", "{tiny} --config.log_every=4 --config.checkpoint_every=6",
     r"checkpoint_every=6 is not a multiple of log_every=4"),
    ("a joint term without rests",
     "{tiny} --config.stage1.rest=none --config.stage2.joint_weight=1.0",
     r"stage2.joint_weight=1.0 needs the heads' rest logits: set stage1.rest"),
    ("a batch larger than its pool", "{tiny} --config.stage1.batch_size=2048",
     r"stage1.batch_size=2048 is more than the \d+ images of part part\d's pool"),
    ("no test images", "{tiny} --config.data.test_fraction=0.0",
     r"data.test_fraction=0.0 holds out no test image"),
    ("bridges for fewer taps than the networks have",
     "{tiny} --config.stage1.bridge_widths=\"(2,2)\"",
     r"stage1.bridge_widths=\(2, 2\) has 2 widths, but teacher t1 .* has 5 feature taps"),
    ("batch size not divisible by the devices", "{tiny} --config.stage1.batch_size=12",
     r"stage1.batch_size=12 does not split over 8 devices"),
    ("per-tap rates of the wrong length",
     "{tiny} --config.stage1.optimizer.tap_learning_rates=\"(0.1,0.2)\"",
     r"has 2 rates for 5 feature taps"),
    ("target classes no teacher covers", "{tiny} --config.target.parts.part1=\"('0','1','x')\"",
     r"Target classes \['x'\] are covered by no teacher"),
    ("a part no single teacher covers", "{tiny} --config.target.parts.part1=\"('0','1','8')\"",
     r"group is empty"),
    ("duplicate class names in a label set", "{tiny} --config.teachers.t1=\"('0','1','1','6')\"",
     r"Duplicate names \['1'\] in the label set of 't1'"),
    ("duplicate class names across parts", "{tiny} --config.target.parts.part2=\"('2','4','5')\"",
     r"Duplicate names \['2'\] in the target parts"),
    ("teacher classes the dataset lacks", "{tiny} --config.teachers.t4=\"('3','4','5','cat')\"",
     r"Teacher classes \['cat'\] are not classes of dataset"),
    ("a split reference to a part that is not there",
     "{cfg:c.teachers.t1 = (dict(split='class', part=3, of=2, seed=0),)}",
     r"teachers.t1\[0\].part=3: give the part's number, an integer from 1 to 2"),
    ("settings for a teacher that does not exist", "{cfg:c.teacher_domains.t9 = 'original'}",
     r"teacher_domains names \['t9'\], which are not teachers"),
    ("workdir that is a file", "{tiny} --workdir={files}/a_file", r"is a file: give a directory"),
    ("workdir that cannot be written", "{tiny} --workdir=/proc/kamal_jax_run",
     r"cannot be written"),
    ("image folder missing", "{folder:c.data.path = '/nonexistent/images'}",
     r"Image folder '/nonexistent/images' does not exist"),
    ("image folder without class folders", "{folder:c.data.path = '{files}/empty'}",
     r"has no class sub-folders"),
    ("an unreadable image", "{folder:c.data.path = '{files}/broken'}",
     r"Cannot read image .*junk.png"),
    ("a class the folder lacks", "{folder:c.data.path = '{files}/pngs'}",
     r"Teacher classes \[.*'4'.*\] are not classes of dataset 'folder'"),
    ("teacher checkpoint missing",
     "{cfg:c.teacher_checkpoints = ml_collections.ConfigDict({'t2': '{files}/absent.pth'})}",
     r"Teacher 't2': PyTorch checkpoint .*absent.pth' does not exist"),
    ("teacher checkpoint corrupt",
     "{cfg:c.teacher_checkpoints = ml_collections.ConfigDict({'t2': '{files}/garbage.safetensors'})}",
     r"Cannot read .*garbage.safetensors' as safetensors"),
    ("teacher checkpoint of another architecture",
     "{cfg:c.teacher_checkpoints = ml_collections.ConfigDict({'t2': '{files}/not_resnet.safetensors'})}",
     r"Not a torchvision-style ResNet state dict"),
    ("teacher logits that do not match its label set",
     "{cfg:c.teacher_checkpoints = ml_collections.ConfigDict({'t2': '{files}/three_logits.safetensors'})}",
     r"has 3 logits but its label set has 4 classes"),
    ("torch checkpoint holding pickled objects",
     "{cfg:c.teacher_checkpoints = ml_collections.ConfigDict({'t2': '{files}/pickled.pth'})}",
     r"Refused .*pickled.pth': it holds pickled objects"),
    ("pretrained weights of another architecture",
     "{tiny} --config.models.pretrained={files}/three_logits.safetensors "
     "--config.models.teacher_width_scale=0.5",
     r"models.pretrained .* give a checkpoint of that architecture"),
    ("a stage whose inputs are missing", "{tiny} --stage=stage2",
     r"Stage 'teachers' has not finished"),
]


def _arguments(template: str, tmp_path: Path, data_dir: str, files: Path) -> list[str]:
  template = template.replace("{files}", str(files))
  for base in ("cfg", "folder"):
    marker = "{" + base + ":"
    if template.startswith(marker):
      body = template[len(marker):-1]
      return [f"--config={_config_file(tmp_path, data_dir, body, 'tiny' if base == 'cfg' else base)}"]
  arguments = []
  for item in template.split(" "):
    if item == "{tiny}":
      item = f"--config={TINY}:{data_dir}"
    arguments.append(item.replace('"', ""))
  return arguments


@pytest.mark.parametrize("case, template, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_the_workdir(
    case, template, message, tmp_path, data_dir, files, capsys):
  del case
  arguments = _arguments(template, tmp_path, data_dir, files)
  if not any(a.startswith("--workdir") for a in arguments):
    arguments.append(f"--workdir={tmp_path / 'run'}")
  workdir = Path(next(a for a in arguments if a.startswith("--workdir")).partition("=")[2]
                 or tmp_path / "run")
  before = _snapshot(workdir)
  assert _cli(*arguments) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("kamal-jax: error: "), err
  assert "Traceback" not in err[0]
  assert re.search(message, err[0]), err[0]
  assert _snapshot(workdir) == before


def test_debug_shows_the_traceback(tmp_path, data_dir):
  with pytest.raises(main.BadInput, match="stage1.batch_size=12") as raised:
    _cli(f"--config={TINY}:{data_dir}", f"--workdir={tmp_path}", "--debug",
         "--config.stage1.batch_size=12")
  assert isinstance(raised.value.__cause__, ValueError)


def test_a_workdir_of_another_config_is_refused_unless_starting_fresh(
    tmp_path, data_dir, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  base = ["--stage=teachers", f"--config={TINY}:{data_dir}"]
  assert _cli(*base, f"--workdir={workdir}") == 0
  capsys.readouterr()  # the progress bars
  before = _snapshot(workdir)
  changed = [*base, "--config.seed=7", "--config.log_every=1", f"--workdir={workdir}"]
  assert _cli(*changed) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "holds a run of another config (seed: 0 -> 7)" in err[0], err
  assert "log_every" not in err[0]  # how often a run logs does not change its results
  assert _snapshot(workdir) == before
  assert _cli(*changed, "--start_fresh") == 0
  assert _snapshot(workdir) == before
  assert '"seed": 7' in (tmp_path / "run-2" / "config.json").read_text()
  assert _cli(*changed, "--start_fresh") == 0  # run-2 holds this config: resumed there
  assert not (tmp_path / "run-3").exists()


def test_a_part_with_one_teacher_warns_and_runs(tiny, tmp_path, caplog):
  """Decided: a single-teacher group is allowed (its head distils that teacher; the
  selection has nothing to choose) and warned about, not refused."""
  config = tiny.copy_and_resolve_references()
  config.teachers.t2 = ("0", "1", "6", "7")  # part1 {0, 1, 2}: only t1 covers it
  with pipeline.prepare(config, tmp_path, ()) as run:
    pass
  assert [g.teachers for g in run.plan.groups] == [("t1",), ("t3", "t4")]
  assert "Part 'part1' has one teacher (t1)" in caplog.text


def test_a_stage_1_that_would_not_fit_is_refused_with_its_estimate(tmp_path, data_dir,
                                                                  capsys, monkeypatch):
  """A pool of 1,000 tiny teachers (500 per part) on a machine with 100 MiB free."""
  monkeypatch.setattr(door, "available_memory", lambda: 100 * 2**20)
  config = tmp_path / "pool.py"
  config.write_text(textwrap.dedent(f"""
      import tiny_config
      def get_config():
        c = tiny_config.get_config({data_dir!r})
        c.teachers = {{f"{{part}}{{n}}": (*classes, str(6 + n % 4)) for n in range(500)
                      for part, classes in (("a", ("0", "1", "2")), ("b", ("3", "4", "5")))}}
        c.stage1.batch_size = 64
        return c
      """))
  workdir = tmp_path / "run"
  assert _cli(f"--config={config}", f"--workdir={workdir}") == 2
  err = capsys.readouterr().err  # (and tfds's progress where this test built the data)
  error, = [line for line in err.splitlines() if line.startswith("kamal-jax:")]
  assert "Traceback" not in err
  assert re.fullmatch(r"kamal-jax: error: stage1 of part 'part\d' \(500 teachers\) needs about "
                      r"[\d.]+ GB .* and 0.10 GB are free: lower stage1.batch_size or "
                      r"stage1.teacher_chunk, or "
                      r"amalgamate fewer teachers per part.", error), error
  assert not workdir.exists()


def test_non_finite_loss_names_the_stage_and_step_and_keeps_no_bad_checkpoint(
    tmp_path, data_dir, capsys):
  workdir = tmp_path / "run"
  assert _cli(f"--config={TINY}:{data_dir}", f"--workdir={workdir}", "--stage=teachers",
              "--config.teacher_training.optimizer.learning_rate=1e30") == 2
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("kamal-jax: error:")]
  assert len(errors) == 1 and "Stage 'teachers/t1': non-finite" in errors[0], err
  assert "at step 2" in errors[0] and "Traceback" not in err  # step 1: initial weights
  assert not list((workdir / "checkpoints").glob("teachers/*/[0-9]*"))


def test_a_storage_threads_late_callback_after_a_failed_write_prints_nothing():
  seen = []
  hook = main._quiet_late_storage_callbacks(lambda *args: seen.append(args[1]))
  hook(RuntimeError, RuntimeError("Event loop is closed"), None)
  assert not seen
  other = RuntimeError("something else")
  hook(RuntimeError, other, None)
  assert seen == [other]
