"""A user's folder of images: one sub-folder per class, named by the class.

  DIR/
    cat/  001.jpg  002.png ...
    dog/  a.jpeg ...

Any format PIL reads, decoded when a batch needs it (`images.EncodedImages`). The
class names are the sub-folder names, in sorted order. Files and folders whose names
start with '.' are skipped. An empty folder, a class without images, a file PIL
cannot identify and an image of more than PIL.Image.MAX_IMAGE_PIXELS pixels are
errors that name the folder, class or file.
"""
import os
from pathlib import Path

import numpy as np
from PIL import Image

from kamal_jax.data import images as image_io

__all__ = ["check_readable", "load", "write"]


def _visible(entries):
  return sorted(e for e in entries if not e.name.startswith("."))


def _files(directory: Path) -> list[Path]:
  """The visible files under `directory`, at any depth, sorted as Paths sort (by
  their parts), the order a run's images keep. By os.scandir and sorted tuples: it
  spares a Path per entry, a stat per file and a Python comparison per step of the
  sort, which rglob and sorted Paths cost (benchmarks/folder_check.py)."""
  found, pending = [], [(str(directory), ())]
  while pending:
    folder, parts = pending.pop()
    try:
      with os.scandir(folder) as entries:
        for entry in entries:
          if entry.name.startswith("."):
            continue
          if entry.is_dir(follow_symlinks=False):
            pending.append((entry.path, (*parts, entry.name)))
          elif entry.is_file():
            found.append(((*parts, entry.name), entry.path))
    except OSError as error:
      raise ValueError(f"Cannot list image folder {folder}: {error}. Make it readable or "
                       "remove it.") from error
  return [Path(path) for _, path in sorted(found)]


def load(path: str) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
  """The folder's image files (sorted by class, then path), their labels [N] and
  the class names."""
  root = Path(path).expanduser()
  if not root.is_dir():
    raise ValueError(f"Image folder {str(root)!r} does not exist or is not a folder: "
                     "set data.path to a folder with one sub-folder per class.")
  classes = [d for d in _visible(root.iterdir()) if d.is_dir()]
  if not classes:
    raise ValueError(f"Image folder {str(root)!r} has no class sub-folders: put each "
                     "class's images in a sub-folder named by the class.")
  files, labels = [], []
  for label, directory in enumerate(classes):
    found = _files(directory)
    if not found:
      raise ValueError(f"Class {directory.name!r} has no images in {directory}: add "
                       "images or remove the sub-folder.")
    for f in found:
      check_readable(f)
    files.extend(found)
    labels.extend([label] * len(found))
  return files, np.array(labels, np.int32), tuple(directory.name for directory in classes)


def check_readable(path: Path):
  """Fails at the door, naming the file, on what `images.open_image` refuses (it
  reads the header only; the pixels are decoded when a batch needs them)."""
  image_io.open_image(path, path).close()


def write(images: np.ndarray, labels: np.ndarray, class_names, path: str):
  """Images [N, H, W, C] in [0, 1] with labels [N] (indices into class_names) as PNG
  files in class sub-folders (e.g. the embedded digits, to run the folder pipeline
  on known data)."""
  root = Path(path)
  for i, (image, label) in enumerate(zip(images, labels)):
    directory = root / class_names[label]
    directory.mkdir(parents=True, exist_ok=True)
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
        directory / f"{i:06d}.png")
