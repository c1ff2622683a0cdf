"""A user's folder of images: one sub-folder per class, named by the class.

  DIR/
    cat/  001.jpg  002.png ...
    dog/  a.jpeg ...

Any format PIL reads, decoded when a batch needs it (`images.EncodedImages`). The
class names are the sub-folder names, in sorted order. Files and folders whose names
start with '.' are skipped. An empty folder, a class without images and a file PIL
cannot identify are errors that name the folder, class or file.
"""
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["check_readable", "load", "write"]


def _visible(entries):
  return sorted(e for e in entries if not e.name.startswith("."))


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
    found = [f for f in _visible(directory.rglob("*")) if f.is_file()]
    if not found:
      raise ValueError(f"Class {directory.name!r} has no images in {directory}: add "
                       "images or remove the sub-folder.")
    for f in found:
      check_readable(f)
    files.extend(found)
    labels.extend([label] * len(found))
  return files, np.array(labels, np.int32), tuple(directory.name for directory in classes)


def check_readable(path: Path):
  """Fails at the door, naming the file, on what PIL cannot identify (reads the
  header only; the pixels are decoded when a batch needs them)."""
  try:
    with Image.open(path) as image:
      image.size  # pylint: disable=pointless-statement
  except (UnidentifiedImageError, OSError) as error:
    raise ValueError(f"Cannot read image {path}: {error}. Remove or replace the file.") \
        from error


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
