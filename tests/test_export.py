"""The exported student: the same logits in JAX, onnxruntime, a deserialised
jax.export without kamal_jax, and PyTorch; predict on files; bad model folders."""
import csv
import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from torch_nets import TorchResNet

import kamal_jax
from kamal_jax import export, main, models, pipeline
from kamal_jax.third_party import torch_resnet


@pytest.fixture(scope="module")
def exported(tiny, finished):
  """The finished run's student folder (written at the end of the run), the run's
  test images [N, S, S, C] with their labels [N], and the student's variables as
  restored from its checkpoints."""
  workdir, _ = finished
  assert json.loads((workdir / "export" / "student" / "model.json").read_text())[
      "files"]["model.onnx"] == {"missing": "not asked for: kamal-jax export writes it"}
  with pipeline.prepare(tiny, workdir, ()) as run:
    networks = pipeline.restore_networks(run)
    folder, = export.networks(run, networks, "student", workdir / "export")
  images = run.images(run.test_indices)
  return folder, images, run.dataset.labels[run.test_indices, 0], networks.student.variables


def test_the_student_gives_the_same_logits_in_every_format(exported, finished, tmp_path):
  folder, images, _, student = exported
  description = json.loads((folder / "model.json").read_text())
  assert [h["name"] for h in description["heads"]] == ["part1", "part2"]
  assert all(h["rest"] for h in description["heads"])  # the default learns rests
  for name in ("model.onnx", "model.jax_exported"):
    assert description["files"][name]["max_abs_difference"] <= export.TOLERANCE
  model = kamal_jax.load(folder)
  expected = model.logits(images)  # [N, 8]
  x = images[:37]  # a batch size the graphs never saw

  import onnxruntime  # pylint: disable=g-import-not-at-top
  session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
  np.testing.assert_allclose(session.run(["logits"], {"images": x})[0], expected[:37],
                             atol=1e-4, rtol=0)

  np.save(tmp_path / "x.npy", x)
  script = textwrap.dedent(f"""
      import sys
      sys.modules["kamal_jax"] = sys.modules["flax"] = None  # importing them fails
      import jax, numpy as np
      exported = jax.export.deserialize(bytearray(open({str(folder / 'model.jax_exported')!r}, 'rb').read()))
      np.save({str(tmp_path / 'y.npy')!r}, np.asarray(exported.call(np.load({str(tmp_path / 'x.npy')!r}))))
  """)
  subprocess.run([sys.executable, "-I", "-c", script], check=True, cwd=tmp_path)
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected[:37], atol=1e-4, rtol=0)

  arch = description["architecture"]
  net = TorchResNet(arch["widths"], arch["blocks"], arch["num_outputs"],
                    small_input=arch["small_input"], channels=x.shape[-1]).eval()
  state = {k: torch.from_numpy(v) for k, v in load_file(folder / "model.safetensors").items()}
  net.load_state_dict(state, strict=True)
  with torch.no_grad():
    logits, _ = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(logits.numpy(), expected[:37], atol=1e-4, rtol=0)

  # The importer reads the export back bit for bit.
  _, variables = torch_resnet.load(str(folder / "model.safetensors"))
  jax.tree.map(np.testing.assert_array_equal, variables, jax.tree.map(np.asarray, student))


def test_predict_on_files_reproduces_the_reports_joint_accuracy(exported, finished, tmp_path):
  folder, images, labels, _ = exported
  _, result = finished
  root = tmp_path / "images"
  for i, (image, label) in enumerate(zip(images, labels)):
    (root / str(label)).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0], mode="F").save(root / str(label) / f"{i:04d}.tiff")
  out = tmp_path / "predictions.csv"
  assert main.cli(["kamal-jax", "predict", f"--model={folder}", str(root),
                   f"--out={out}", "--batch_size=64"]) == 0
  rows = list(csv.DictReader(out.open()))
  assert len(rows) == len(images)
  targets = [r for r in rows if r["path"].split("/")[-2] in "012345"]
  accuracy = np.mean([r["class"] == r["path"].split("/")[-2] for r in targets])
  assert accuracy == result["student"]["accuracy_joint"]
  assert {r["part"] for r in rows} <= {"part1", "part2"} and not any(r["skipped"] for r in rows)


def test_bad_exports_and_predictions_get_one_line(exported, tmp_path, capsys):
  folder, images, _, _ = exported
  good = tmp_path / "good.png"
  Image.fromarray((images[0, ..., 0] * 255).astype(np.uint8)).save(good)
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not an image")
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "model.json").write_text((folder / "model.json").read_text())
  (damaged / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:999])
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  (unfinished / "config.json").write_text((folder.parent.parent / "config.json").read_text())
  cases = [
      (["export", f"--workdir={tmp_path / 'none'}"], "holds no run"),
      (["export", f"--workdir={unfinished}"], "has not finished"),
      (["predict", f"--model={tmp_path}", str(good)], "no model.json"),
      (["predict", f"--model={damaged}", str(good)], "damaged model folder"),
      (["predict", f"--model={folder}", str(good), str(broken)], f"Cannot read image {broken}"),
      (["predict", f"--model={folder}", str(tmp_path / "absent.png")], "no such file"),
  ]
  out = tmp_path / "predictions.csv"
  for arguments, message in cases:
    capsys.readouterr()
    assert main.cli(["kamal-jax", *arguments, f"--out={out}"]) == 2, arguments
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, (arguments, err)
  assert not (unfinished / "export").exists() and not list(tmp_path.glob("*.csv*"))

  out = tmp_path / "skipped.csv"
  assert main.cli(["kamal-jax", "predict", f"--model={folder}", str(good), str(broken),
                   f"--out={out}", "--skip_unreadable"]) == 0
  rows = list(csv.DictReader(out.open()))
  assert rows[0]["class"] and not rows[0]["skipped"]
  assert not rows[1]["class"] and "Cannot read image" in rows[1]["skipped"]
  with pytest.raises(ValueError, match=r"takes \[N, 8, 8, 1\]"):
    kamal_jax.load(folder).predict(np.zeros((2, 8, 8, 3), np.float32))


def _torchvision_resnet18_state() -> dict[str, tuple[int, ...]]:
  """torchvision.models.resnet18().state_dict()'s names and shapes, written out from
  its layout (torchvision does not install beside this torch build)."""
  state = {"conv1.weight": (64, 3, 7, 7)}

  def norm(name, width):
    state.update({f"{name}.weight": (width,), f"{name}.bias": (width,),
                  f"{name}.running_mean": (width,), f"{name}.running_var": (width,),
                  f"{name}.num_batches_tracked": ()})

  norm("bn1", 64)
  cin = 64
  for stage, width in enumerate((64, 128, 256, 512), start=1):
    for block in range(2):
      prefix = f"layer{stage}.{block}"
      state[f"{prefix}.conv1.weight"] = (width, cin if block == 0 else width, 3, 3)
      norm(f"{prefix}.bn1", width)
      state[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
      norm(f"{prefix}.bn2", width)
      if block == 0 and stage > 1:
        state[f"{prefix}.downsample.0.weight"] = (width, cin, 1, 1)
        norm(f"{prefix}.downsample.1", width)
    cin = width
  state.update({"fc.weight": (1000, 512), "fc.bias": (1000,)})
  return state


def test_a_resnet18_exports_under_torchvisions_names_and_reads_back():
  net = models.create("resnet18", 1000)
  variables = net.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  state = torch_resnet.state_dict(variables)
  assert {k: v.shape for k, v in state.items()} == _torchvision_resnet18_state()
  module, back = torch_resnet.convert(
      {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
  assert module == net
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))

