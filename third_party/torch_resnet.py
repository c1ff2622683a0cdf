"""PyTorch ResNet checkpoints with torchvision's parameter names <-> kamal_jax ResNets.

`load(path)` reads a state dict from `.safetensors` (NumPy only, no torch needed) or
from `.pth`/`.pt` (torch, with `weights_only=True`: a file that holds pickled objects
beyond tensors is refused, never executed), infers the architecture from the names and
shapes (ResNet-18/34 basic blocks, ResNet-50+ bottlenecks, any widths and depths), and
returns the Flax module with its variables. The module's feature taps are the stem
convolution and each stage's output before its last ReLU, exactly as for a network
trained here, so an imported teacher goes wherever a trained one does.
`state_dict(variables)` is the way back: a network's variables under torchvision's
names and layouts, for `load_state_dict` in PyTorch (and `load` reads it bit for bit).

torchvision name                         kamal_jax variable
conv1.weight [O, I, kh, kw]              params/stem_conv/kernel [kh, kw, I, O]
bn1.{weight,bias}                        params/stem_bn/{scale,bias}
bn1.{running_mean,running_var}           batch_stats/stem_bn/{mean,var}
layerS.I.convJ / bnJ                     stage{S}_block{I+1}/convJ / bnJ
layerS.I.downsample.0 / .1               stage{S}_block{I+1}/shortcut_conv / shortcut_bn
fc.weight [C, D], fc.bias [C]            params/head/kernel [D, C], params/head/bias
bnJ.num_batches_tracked (int64 [])       none: written as 0, skipped when read
"""
import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np

from kamal_jax.models import ResNet

_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"),
              "running_var": ("batch_stats", "var")}


def load(path: str, dtype: str = "float32") -> tuple[ResNet, dict]:
  """The ResNet in a checkpoint file and its variables {'params', 'batch_stats'}
  (host NumPy arrays)."""
  return convert(read_state_dict(path), dtype)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A checkpoint file -> {torch name: float32 array}. Accepts a bare state dict or
  one under 'state_dict' or 'model', with or without DataParallel's 'module.'."""
  if not os.path.isfile(path):
    raise ValueError(f"PyTorch checkpoint {path!r} does not exist: give the path of a "
                     ".pth, .pt or .safetensors file.")
  if path.endswith(".safetensors"):
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      state = load_file(path)
    except (SafetensorError, TypeError, ValueError) as error:
      raise ValueError(f"Cannot read {path!r} as safetensors ({error}); bfloat16 files "
                       "need converting to float32 first.") from error
  else:
    state = _torch_load(path)
  for wrapper in ("state_dict", "model"):
    if isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  state = {re.sub(r"^module\.", "", name): value for name, value in state.items()}
  return {name: _as_float32(value, f"{path!r}: {name!r}") for name, value in state.items()
          if not name.endswith("num_batches_tracked")}


def _as_float32(value, where: str) -> np.ndarray:
  """A weight as float32; integer, boolean and empty tensors are refused (a weight
  file of another kind, or damaged), naming `where`."""
  if type(value).__module__.startswith("torch"):  # also bfloat16, which NumPy lacks
    floating = value.is_floating_point()
    value = value.detach().float().numpy() if floating else value.numpy()
  value = np.asarray(value)
  if not np.issubdtype(value.dtype, np.floating) or not value.size:
    kind = "is empty" if not value.size else f"holds {value.dtype} values"
    raise ValueError(f"{where} {kind}: a ResNet's weights are floats; give the "
                     "checkpoint as PyTorch saved it.")
  return value.astype(np.float32)


def _torch_load(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ValueError(f"Reading {path!r} needs PyTorch: `pip install -e '.[torch]'`, or "
                     "save the weights as .safetensors, which needs no torch.") from error
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    raise ValueError(
        f"Refused {path!r}: it holds pickled objects beyond tensors, which are never "
        "executed here. Save `model.state_dict()` instead of the model.") from error
  except (RuntimeError, EOFError) as error:
    raise ValueError(f"Cannot read {path!r} as a PyTorch checkpoint ({error}).") from error
  if not isinstance(state, dict):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict: save "
                     "`model.state_dict()`.")
  return state


def infer_architecture(state: dict[str, np.ndarray], dtype: str = "float32") -> ResNet:
  """The ResNet whose variables the state dict holds (widths, depths, block kind,
  stem, number of outputs), from torchvision's names and the tensors' shapes."""
  for name in ("conv1.weight", "fc.weight", "layer1.0.conv1.weight"):
    if name not in state:
      raise ValueError(f"Not a torchvision-style ResNet state dict: {name!r} is missing "
                       f"(found e.g. {sorted(state)[:5]}).")
  bottleneck = "layer1.0.conv3.weight" in state
  last_conv = "conv3" if bottleneck else "conv2"
  blocks, widths = [], [state["conv1.weight"].shape[0]]
  while f"layer{len(blocks) + 1}.0.conv1.weight" in state:
    stage = len(blocks) + 1
    count = 1 + max(int(m.group(1)) for name in state
                    if (m := re.match(rf"layer{stage}\.(\d+)\.", name)))
    blocks.append(count)
    widths.append(state[f"layer{stage}.0.{last_conv}.weight"].shape[0])
  return ResNet(widths=tuple(widths), blocks=tuple(blocks),
                num_outputs=state["fc.weight"].shape[0],
                block="bottleneck" if bottleneck else "basic",
                small_input=state["conv1.weight"].shape[-1] == 3,
                dtype=jnp.dtype(dtype))


def _flax_location(name: str) -> tuple[str, tuple[str, ...], str]:
  """torch name -> (collection, module path, variable) in the Flax tree."""
  parts = name.split(".")
  field = parts[-1]
  if parts[0] == "fc":
    return "params", ("head",), {"weight": "kernel", "bias": "bias"}[field]
  if parts[0] in ("conv1", "bn1"):
    path, module = (), {"conv1": "stem_conv", "bn1": "stem_bn"}[parts[0]]
  else:  # layerS.I.<module>[.k].field
    path = (f"stage{parts[0][len('layer'):]}_block{int(parts[1]) + 1}",)
    module = parts[2] if parts[2] != "downsample" else (
        "shortcut_conv" if parts[3] == "0" else "shortcut_bn")
  if "conv" in module:
    return "params", path + (module,), "kernel"
  collection, variable = _BN_FIELDS[field]
  return collection, path + (module,), variable


_MODULES = {"stem_conv": "conv1", "stem_bn": "bn1", "shortcut_conv": "downsample.0",
            "shortcut_bn": "downsample.1", "head": "fc"}


def _torch_name(collection: str, path: tuple[str, ...], variable: str) -> str:
  """(collection, module path, variable) in the Flax tree -> torch name: the inverse
  of `_flax_location`."""
  *block, module = path
  prefix = ""
  if block:  # stage{S}_block{I} -> layer{S}.{I - 1}
    stage, index = re.fullmatch(r"stage(\d+)_block(\d+)", block[0]).groups()
    prefix = f"layer{stage}.{int(index) - 1}."
  if variable in ("kernel", "bias") and collection == "params" and "bn" not in module:
    field = {"kernel": "weight", "bias": "bias"}[variable]  # convolutions and fc
  else:
    field = next(f for f, at in _BN_FIELDS.items() if at == (collection, variable))
  return f"{prefix}{_MODULES.get(module, module)}.{field}"


def state_dict(variables: dict) -> dict[str, np.ndarray]:
  """A network's variables {'params', 'batch_stats'} -> {torch name: array}, in
  torchvision's layouts (conv [O, I, kh, kw], fc [C, D]), with each batch norm's
  `num_batches_tracked` (0), so that the keys are exactly those of torchvision's
  `state_dict()` for the same architecture."""
  state = {}
  for path, value in jax.tree_util.tree_leaves_with_path(variables):
    collection, *path, variable = _key(path)
    name = _torch_name(collection, tuple(path), variable)
    value = np.asarray(value, np.float32)
    if value.ndim == 4:  # [kh, kw, I, O] -> [O, I, kh, kw]
      value = value.transpose(3, 2, 0, 1)
    elif name == "fc.weight":  # [D, C] -> [C, D]
      value = value.T
    state[name] = np.ascontiguousarray(value)
    if name.endswith("running_var"):
      state[name.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
  return state


def _key(path) -> tuple[str, ...]:
  return tuple(entry.key for entry in path)


def _has(tree: dict, key: tuple[str, ...]) -> bool:
  for name in key:
    if name not in tree:
      return False
    tree = tree[name]
  return True


def _to_flax_layout(name: str, value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
    return value.transpose(2, 3, 1, 0)
  if name == "fc.weight":  # [C, D] -> [D, C]
    return value.T
  return value


def convert(state: dict[str, np.ndarray], dtype: str = "float32") -> tuple[ResNet, dict]:
  """A torchvision-named state dict -> (module, variables). Every variable the module
  needs must be present with its shape, and every tensor must be used."""
  module = infer_architecture(state, dtype)
  channels = state["conv1.weight"].shape[1]
  expected = jax.eval_shape(  # shapes only: nothing is compiled or run
      lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, channels))))
  wanted = {_key(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  variables, unexpected, wrong = {"params": {}, "batch_stats": {}}, [], []
  for name, value in sorted(state.items()):
    try:
      collection, path, variable = _flax_location(name)
    except (KeyError, IndexError, ValueError):
      unexpected.append(name)
      continue
    key, value = (collection,) + path + (variable,), _to_flax_layout(name, value)
    if key not in wanted:
      unexpected.append(name)
    elif value.shape != wanted[key]:
      wrong.append(f"{name} {value.shape} for {'/'.join(key)} {wanted[key]}")
    else:
      node = variables[collection]
      for module_name in path:
        node = node.setdefault(module_name, {})
      node[variable] = value
  missing = ["/".join(key) for key in wanted if not _has(variables, key)]
  if missing or unexpected or wrong:
    raise ValueError(
        "The state dict does not match the ResNet it describes: "
        f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}.")
  return module, variables
