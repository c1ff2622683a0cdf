"""A trained network as a folder that leaves the workdir and describes itself.

  model.json          what the network is and how to use it: architecture, input,
                      preprocessing, heads with their classes, the joint rule,
                      provenance, and the files with their checks (`write`)
  model.safetensors   the variables under torchvision's ResNet names and layouts
                      (`third_party.torch_resnet.state_dict`): PyTorch's
                      `load_state_dict` reads them into the width-list ResNet of
                      `third_party/torch_nets.py`, and at torchvision's widths into
                      `torchvision.models.resnet18/34/50` itself
  model.jax_exported  a `jax.export` serialisation (StableHLO) of images
                      [batch, S, S, C] -> logits [batch, sum of head widths] with a
                      symbolic batch, lowered for CPU, CUDA and TPU:
                      `jax.export.deserialize(...).call(images)` runs it in a process
                      that never imports kamal_jax
  model.onnx          the same function through jax2onnx (opset 17+, dynamic batch),
                      checked with onnxruntime against JAX before it is kept

The first two are what `kamal_jax.load` reads and need nothing beyond the core
install; the last two need the `export` extra (`pip install 'kamal-jax[export]'`:
flatbuffers, jax2onnx, onnxruntime) and are left out, and named so in model.json,
without it. A folder is written beside its destination and renamed over it once
complete, so a failed export never replaces a good one.
"""
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

import kamal_jax
from kamal_jax import models, teachers

__all__ = ["describe", "DESCRIPTION", "FORMAT", "FORMAT_VERSION", "GRAPHS",
           "has_export_extra", "Head", "JOINT_RULE", "logits_fn", "module_of", "networks",
           "Preprocessing", "TOLERANCE", "WEIGHTS", "write"]

FORMAT = "kamal_jax.model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
DESCRIPTION = "model.json"
# Where the logits of the exported graphs may differ from JAX's on the same images.
TOLERANCE = 1e-4
JOINT_RULE = ("joint.decide: the argmax over the heads' scores laid side by side; a "
              "head with a rest logit (its last output) is first log-softmaxed over its "
              "classes and rest, and the rest dropped; softmax of the scores gives the "
              "probabilities of the target's classes.")


@dataclasses.dataclass(frozen=True)
class Head:
  """One head of the network's logits, in order: its classes, and whether one more
  output after them is the rest logit (`kamal_jax.joint`)."""
  name: str
  classes: tuple[str, ...]
  rest: bool = False

  @property
  def width(self) -> int:
    return len(self.classes) + self.rest


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How an image file becomes the network's input, as training's evaluation view
  did (`data.images.eval_view`): converted to `channels` channels (PIL mode L or
  RGB), the shorter side resized (bilinear) to size / crop_fraction, the centre
  size x size cut, pixels / 255, then (x - mean) / std per channel where given."""
  size: int
  channels: int
  crop_fraction: float = 1.0
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()


def describe(network: str, module: models.ResNet, heads, preprocessing: Preprocessing,
             provenance: dict) -> dict:
  """The content of model.json (but its 'files', which `write` adds)."""
  heads = tuple(heads)
  if not isinstance(module, models.ResNet):
    raise ValueError(f"{network} is a {type(module).__name__}: export writes ResNets (under "
                     "torchvision's names); save your own module's variables yourself.")
  if sum(h.width for h in heads) != module.num_outputs:
    raise ValueError(f"{network}: heads of {sum(h.width for h in heads)} outputs for a "
                     f"network of {module.num_outputs}.")
  return {
      "format": FORMAT, "format_version": FORMAT_VERSION, "network": network,
      "architecture": {"family": "resnet", "widths": list(module.widths),
                       "blocks": list(module.blocks), "block": module.block,
                       "small_input": module.small_input,
                       "num_outputs": module.num_outputs},
      "input": {"layout": "NHWC", "dtype": "float32", "height": preprocessing.size,
                "width": preprocessing.size, "channels": preprocessing.channels},
      "preprocessing": dataclasses.asdict(preprocessing),
      "heads": [dataclasses.asdict(h) for h in heads],
      "joint_rule": JOINT_RULE,
      "provenance": dict(provenance, versions={
          "kamal_jax": kamal_jax.__version__, "jax": jax.__version__,
          "flax": flax.__version__},
          exported=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
  }


def module_of(description: dict) -> models.ResNet:
  """The Flax module model.json describes (float32 compute)."""
  arch = description["architecture"]
  return models.ResNet(widths=tuple(arch["widths"]), blocks=tuple(arch["blocks"]),
                       num_outputs=arch["num_outputs"], block=arch["block"],
                       small_input=arch["small_input"])


def logits_fn(module: models.ResNet, variables):
  """images [N, S, S, C] -> logits [N, sum of head widths] in eval mode, the
  variables closed over (they become the graphs' constants)."""
  return lambda images: module.apply(variables, images, train=False).logits


def has_export_extra() -> bool:
  return all(importlib.util.find_spec(name) for name in ("flatbuffers", "jax2onnx",
                                                         "onnxruntime"))


def _jax_exported(fn, shape, path: Path):
  batch, = jax.export.symbolic_shape("batch")
  exported = jax.export.export(jax.jit(fn), platforms=("cpu", "cuda", "tpu"))(
      jax.ShapeDtypeStruct((batch, *shape), jnp.float32))
  path.write_bytes(exported.serialize())
  return lambda x: jax.export.deserialize(bytearray(path.read_bytes())).call(x)


def _onnx(fn, shape, path: Path):
  import onnx  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  model = to_onnx(fn, inputs=[("batch", *shape)], model_name="kamal_jax",
                  input_names=["images"], output_names=["logits"])
  # jax2onnx 0.17 annotates some tensors after its layout transposes with the shapes
  # of the other layout, which onnxruntime refuses: infer them anew.
  del model.graph.value_info[:]
  model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
  onnx.checker.check_model(model)
  onnx.save(model, str(path))  # one file: the weights inside
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  return lambda x: session.run(["logits"], {"images": np.asarray(x)})[0]


GRAPHS = {"model.jax_exported": _jax_exported, "model.onnx": _onnx}


def _file_entry(path: Path) -> dict:
  return {"bytes": path.stat().st_size,
          "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def write(directory: Path, module: models.ResNet, variables, description: dict,
          check_images: np.ndarray, graphs=tuple(GRAPHS)) -> dict:
  """Writes the model folder at `directory` (replacing one there only once the new
  one is complete) and returns its model.json; `graphs`: which of GRAPHS to write.
  check_images [N, S, S, C] (the network's input, preprocessed): each exported graph
  must reproduce the JAX logits on them within TOLERANCE, or the export fails and
  nothing is replaced."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from kamal_jax.third_party import torch_resnet  # pylint: disable=g-import-not-at-top
  directory = Path(directory)
  staging = directory.with_name(f".{directory.name}.partial")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  variables = jax.tree.map(np.asarray, variables)
  save_file(torch_resnet.state_dict(variables), str(staging / WEIGHTS))
  module = module.clone(bn_axis_name=None, dtype=jnp.float32)
  fn = logits_fn(module, variables)
  expected = np.asarray(jax.jit(fn)(check_images))
  files = {WEIGHTS: _file_entry(staging / WEIGHTS)}
  extra = has_export_extra()
  for name, make in GRAPHS.items():
    if name not in graphs:
      files[name] = {"missing": "not asked for: kamal-jax export writes it"}
      continue
    if not extra:
      files[name] = {"missing": "needs the export extra: pip install 'kamal-jax[export]'"}
      continue
    run = make(fn, check_images.shape[1:], staging / name)
    difference = float(np.max(np.abs(np.asarray(run(check_images)) - expected)))
    if not difference <= TOLERANCE:
      raise ValueError(f"{name}: its logits differ from JAX's by {difference:.2e} on "
                       f"{len(check_images)} test images (allowed {TOLERANCE}).")
    files[name] = dict(_file_entry(staging / name), max_abs_difference=difference,
                       checked_images=len(check_images))
  description = dict(description, files=files)
  (staging / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
  if directory.exists():
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old)
  else:
    os.replace(staging, directory)
  return description


def networks(run, trained, network: str, out: Path, graphs=tuple(GRAPHS)) -> list[Path]:
  """Writes the model folders (`write`, with the given graphs) of a run's
  (`pipeline.Run`) trained networks (`networks.Networks`): its student (out/student),
  its components (out/components/<part>) or its teachers (out/teachers/<name>), each
  checked on the run's first test images; returns the folders."""
  plan, kind = run.plan, run.config.pipeline
  if network == "student":
    if trained.student is None:
      raise ValueError(f"Pipeline {kind!r} has no student: export --network=teachers "
                       "instead.")
    student = trained.student
    heads = [Head(p.name, p.classes, w > len(p.classes))
             for p, w in zip(plan.parts, student.head_sizes)]
    folders = [(out / "student", student.module, student.variables, heads)]
  elif network == "components":
    if not trained.components:
      raise ValueError(f"Pipeline {kind!r} has no components: export --network=student "
                       "or --network=teachers instead.")
    folders = [(out / "components" / p.name, c.module, c.variables,
                [Head(p.name, p.classes, c.head_sizes[0] > len(p.classes))])
               for p, c in zip(plan.parts, trained.components)]
  else:
    folders = [(out / "teachers" / name, stack.module, teachers.take(stack.variables, i),
                [Head(h.name, h.classes) for h in plan.label_spaces[name].heads])
               for stack in trained.teachers for i, name in enumerate(stack.names)]
  check = run.images(run.test_indices[:64])  # [n, S, S, C]
  cfg = run.config.data
  preprocessing = Preprocessing(check.shape[1], check.shape[-1], cfg.get("crop_fraction", 1.0),
                                tuple(cfg.mean), tuple(cfg.std))
  config_text = (run.workdir / "config.json").read_bytes()
  provenance = {"workdir": str(run.workdir.absolute()), "pipeline": kind,
                "seed": run.config.seed, "config_sha256": hashlib.sha256(config_text).hexdigest()}
  for directory, module, variables, heads in folders:
    write(directory, module, variables, describe(directory.name, module, heads,
                                                 preprocessing, provenance), check, graphs)
  return [directory for directory, *_ in folders]
