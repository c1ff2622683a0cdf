"""A user's folder of images: one sub-folder per class, named by the class.

  DIR/
    cat/  001.jpg  002.png ...
    dog/  a.jpeg ...

Any format PIL reads; every image is converted to the configured channels (1: grey,
3: RGB) and resized to the configured square size. The class names are the
sub-folder names, in sorted order. Files and folders whose names start with '.' are
skipped. An empty folder, a class without images and an unreadable image are errors
that name the folder, class or file.
"""
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MODES = {1: "L", 3: "RGB"}


def read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
  """One image file -> [image_size, image_size, channels] float32 in [0, 1]."""
  try:
    with Image.open(path) as image:
      image = image.convert(MODES[channels]).resize((image_size, image_size),
                                                    Image.Resampling.BILINEAR)
      pixels = np.asarray(image, np.float32) / 255.0
  except (UnidentifiedImageError, OSError, ValueError) as error:
    raise ValueError(f"Cannot read image {path}: {error}. Remove or replace the file.") \
        from error
  return pixels.reshape(image_size, image_size, channels)


def _visible(entries):
  return sorted(e for e in entries if not e.name.startswith("."))


def load(path: str, image_size: int, channels: int):
  """All images of the folder: (images [N, S, S, C] float32, labels [N] int32,
  class names)."""
  if channels not in MODES:
    raise ValueError(f"data.channels={channels}: use 1 (grey) or 3 (RGB).")
  root = Path(path).expanduser()
  if not root.is_dir():
    raise ValueError(f"Image folder {str(root)!r} does not exist or is not a folder: "
                     "set data.path to a folder with one sub-folder per class.")
  classes = [d for d in _visible(root.iterdir()) if d.is_dir()]
  if not classes:
    raise ValueError(f"Image folder {str(root)!r} has no class sub-folders: put each "
                     "class's images in a sub-folder named by the class.")
  images, labels = [], []
  for label, directory in enumerate(classes):
    files = [f for f in _visible(directory.rglob("*")) if f.is_file()]
    if not files:
      raise ValueError(f"Class {directory.name!r} has no images in {directory}: add "
                       "images or remove the sub-folder.")
    images.extend(read_image(f, image_size, channels) for f in files)
    labels.extend([label] * len(files))
  return (np.stack(images), np.array(labels, np.int32),
          tuple(directory.name for directory in classes))


def write(images: np.ndarray, labels: np.ndarray, class_names, path: str):
  """Images [N, H, W, C] in [0, 1] as PNG files in class sub-folders (e.g. the
  embedded digits, to run the folder pipeline on known data)."""
  root = Path(path)
  for i, (image, label) in enumerate(zip(images, labels)):
    directory = root / class_names[label]
    directory.mkdir(parents=True, exist_ok=True)
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
        directory / f"{i:06d}.png")
