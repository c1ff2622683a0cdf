"""Networks by name: `create(arch, num_outputs, width_scale)`.

A name is one of ARCHS (ResNets with feature taps), or a user's own Flax module:
'package.module:ClassName' or 'path/to/file.py:ClassName', optionally with keyword
arguments as Python literals, 'my_nets.py:SmallCNN(width=16)'. Such a module must
return `Outputs(logits, feats)` from `__call__(x, train: bool)` and take
`num_outputs` (the number of logits); a field named `axis_name` receives the
data-parallel axis of the step that trains it (for its BatchNorms). Where its first
tap feeds a BatchNorm named 'stem_bn', as in the ResNets, the selection also reads how
typical an image is for it (`stem_statistics`).
"""
import ast
import dataclasses
import functools
import importlib
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util

from kamal_jax import parallel

from kamal_jax.models import conv
from kamal_jax.models.bridges import Bridges
from kamal_jax.models.resnet import Outputs, ResNet


@dataclasses.dataclass(frozen=True)
class Arch:
  widths: tuple[int, ...]  # stem, then one per stage
  blocks: tuple[int, ...]
  small_input: bool
  block: str = "basic"


ARCHS = {
    "resnet18": Arch((64, 64, 128, 256, 512), (2, 2, 2, 2), small_input=False),
    "resnet34": Arch((64, 64, 128, 256, 512), (3, 4, 6, 3), small_input=False),
    "resnet50": Arch((64, 256, 512, 1024, 2048), (3, 4, 6, 3), small_input=False,
                     block="bottleneck"),
    # Sized for the 8x8 digits: 3x3 stem, one block per stage, 8 -> 4 -> 2 -> 1.
    "resnet10_digits": Arch((16, 16, 32, 64, 128), (1, 1, 1, 1), small_input=True),
}


DTYPES = ("float32", "bfloat16")


def create(arch: str, num_outputs: int, width_scale: float = 1.0,
           dtype: str = "float32", axis_name: str | None = None) -> ResNet:
  """The named architecture with every width scaled (rounded) by `width_scale`.

  dtype is the compute type ('bfloat16' on GPU/TPU); parameters, batch statistics
  and the returned logits and feature taps stay float32. axis_name: the
  data-parallel axis of the step that trains it (`ResNet.bn_axis_name`), None under
  plain `jit` on one device.
  """
  if ":" in arch:
    return _user_module(arch, num_outputs, axis_name)
  if arch not in ARCHS:
    raise ValueError(f"Unknown model {arch!r}: use one of {sorted(ARCHS)}, or your own "
                     "module as 'package.module:ClassName' or 'file.py:ClassName'.")
  if dtype not in DTYPES:
    raise ValueError(f"Unknown compute dtype {dtype!r}: use one of {DTYPES}.")
  spec = ARCHS[arch]
  widths = tuple(int(round(w * width_scale)) for w in spec.widths)
  return ResNet(widths=widths, blocks=spec.blocks, num_outputs=num_outputs,
                block=spec.block, small_input=spec.small_input, bn_axis_name=axis_name,
                dtype=jnp.dtype(dtype))


def teacher(cfg, num_outputs: int, arch: str = "") -> nn.Module:
  """A teacher trained in the run, of config.models' teacher architecture (or `arch`),
  which the components share; like every network a run trains, its BatchNorm spans
  the step's batch axis. `cfg`: config.models."""
  return create(arch or cfg.teacher, num_outputs, cfg.teacher_width_scale, cfg.dtype,
                axis_name=parallel.AXIS)


def student(cfg, num_outputs: int) -> nn.Module:
  """The student, of config.models' student architecture (`cfg`: config.models)."""
  return create(cfg.student, num_outputs, cfg.student_width_scale, cfg.dtype,
                axis_name=parallel.AXIS)


@functools.cache
def _user_class(where: str, name: str) -> type:
  """The class `name` of a module path or a .py file (loaded once: a second create
  gives an equal module, as stacking and compiled-step caching need)."""
  if where.endswith(".py"):
    spec = importlib.util.spec_from_file_location(Path(where).stem, Path(where).expanduser())
    if spec is None or not Path(where).expanduser().is_file():
      raise ValueError(f"no such file {where!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    module = importlib.import_module(where)
  return getattr(module, name)


def _user_module(arch: str, num_outputs: int, axis_name: str | None):
  """'where:ClassName' or 'where:ClassName(key=literal, ...)' -> the module."""
  where, _, call = arch.partition(":")
  name, _, arguments = call.partition("(")
  try:
    kwargs = {}
    if arguments:
      parsed = ast.parse(f"f({arguments}", mode="eval").body
      if parsed.args:
        raise ValueError("give its arguments by keyword")
      kwargs = {k.arg: ast.literal_eval(k.value) for k in parsed.keywords}
    cls = _user_class(where, name.strip())
    fields = {f.name for f in dataclasses.fields(cls)}
    if "num_outputs" not in fields:
      raise ValueError(f"{name} has no field num_outputs (the number of logits)")
    if "axis_name" in fields:
      kwargs["axis_name"] = axis_name
    return cls(num_outputs=num_outputs, **kwargs)
  except (ImportError, AttributeError, SyntaxError, TypeError, ValueError, OSError) as error:
    raise ValueError(f"Model {arch!r}: {error}: name a Flax module as "
                     "'package.module:ClassName' or 'file.py:ClassName(key=value, ...)'.") \
        from error


def tap_widths(module, x) -> tuple[int, ...]:
  """The channels of each feature tap of `module` on images like x [1, H, W, C]
  (shapes only: nothing runs)."""
  def feats():
    return module.apply(module.init(jax.random.key(0), x), x, train=False).feats
  return tuple(f.shape[-1] for f in jax.eval_shape(feats))


def stem_statistics(variables) -> tuple | None:
  """The running (mean, var) of the batch norm fed by a network's first tap, each
  [..., D] with the variables' leading axes (a stack's: [K, D]); None for a network
  without one (a user's module may have none: it is then never judged atypical)."""
  stem = variables.get("batch_stats", {}).get("stem_bn")
  return None if stem is None else (stem["mean"], stem["var"])


def with_backbone(variables: dict, backbone: dict) -> dict:
  """`variables` ({'params', 'batch_stats'} of a network, or of a stack of them with
  leading axes) with every variable of `backbone` (one network of the same
  architecture, e.g. ImageNet weights) copied in, broadcast over the leading axes,
  except the classifier 'head': the network starts from the pretrained features and
  learns a head for its own classes."""
  flat = traverse_util.flatten_dict(variables)
  given = {k: v for k, v in traverse_util.flatten_dict(backbone).items() if "head" not in k}
  missing = [k for k in flat if "head" not in k and k not in given]
  wrong = [k for k, v in given.items()
           if k not in flat or np.shape(flat[k])[np.ndim(flat[k]) - np.ndim(v):] != np.shape(v)]
  if missing or wrong:
    names = ["/".join(k) for k in (missing + wrong)[:4]]
    raise ValueError(f"The pretrained variables do not fit the network ({names} missing "
                     "or of another shape): give a checkpoint of the network's "
                     "architecture and input channels.")
  flat.update({k: np.broadcast_to(v, np.shape(flat[k])) for k, v in given.items()})
  return traverse_util.unflatten_dict(flat)


__all__ = ["ARCHS", "Arch", "Bridges", "Outputs", "ResNet", "conv", "create", "stem_statistics",
           "student", "tap_widths", "teacher", "with_backbone"]
