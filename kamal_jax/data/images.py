"""Images as the networks see them: read on access, cut to the input size, augmented.

A reader maps indices [B] to float32 images [B, S, S, C] in [0, 1]:
  ArrayImages    images held in memory at the input size already (the digits);
  EncodedImages  encoded images (files, tfds records) decoded per batch with PIL in a
                 thread pool (any mode PIL reads, at its real range: `convert`), the
                 oversized refused (`open_image`), and cut by a `View`: the
                 evaluation view (resize the shorter side to S / crop_fraction,
                 centre crop S: 256 -> 224 at 0.875) or, given a NumPy generator, the
                 training view (random resized crop of min_scale..1 of the area,
                 aspect 3/4..4/3, and a random horizontal flip), as torchvision's
                 transforms do.
Every random choice comes from the generator passed in, one child per image drawn
before any work is spread over threads, so a batch is a pure function of it.
"""
import concurrent.futures
import dataclasses
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ArrayImages", "convert", "decode", "EncodedImages", "eval_view", "MODES",
           "open_image", "THREADS", "train_view", "View"]

MODES = {1: "L", 3: "RGB"}
THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class View:
  size: int  # the network's input is size x size
  crop_fraction: float = 1.0  # evaluation: centre crop of this share of the resized side
  min_scale: float = 1.0  # training: least share of the area a random crop keeps
  flip: bool = False  # training: random horizontal flips

  @property
  def augments(self) -> bool:
    return self.min_scale < 1.0 or self.flip


# Grey images of more than 8 bits, and what brings their pixels to [0, 1] (float
# images are taken to be in [0, 1] already); PIL's own conversion to L or RGB clips
# them (a float TIFF turns black, a 16-bit PNG to 0 and 255).
_DEEP_GREY = {"I;16": 1 / 65535, "I;16B": 1 / 65535, "I;16L": 1 / 65535, "I;16N": 1 / 65535,
              "I": 1 / 65535, "F": 1.0}


def _unreadable(where: Any, error: Exception) -> ValueError:
  return ValueError(f"Cannot read image {where}: {error}. Remove or replace it.")


def _too_large(where: Any, detail: str) -> ValueError:
  return ValueError(f"Cannot read image {where}: {detail} Resize it, or raise "
                    f"PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS:,}).")


# kamal_jax refuses an image of more than Image.MAX_IMAGE_PIXELS pixels itself
# (`open_image`), so PIL's warning about those up to twice the limit would only repeat
# the error.
_QUIET = ("ignore", None, Image.DecompressionBombWarning, None, 0)


def _quiet_bomb_warnings():
  """Puts _QUIET among the warning filters, again where a warnings.catch_warnings
  around kamal_jax's import (pytest's, for one) dropped it. Set per call instead, by
  catch_warnings, it would not be thread-safe, and would reset every warning's
  shown-once record."""
  if _QUIET not in warnings.filters:
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def open_image(source: Any, where: Any) -> Image.Image:
  """Image.open (the header: the pixels are decoded on load), refusing in one line
  that names `where` an image PIL cannot identify and one of more than
  Image.MAX_IMAGE_PIXELS pixels, before its pixels are decoded: PIL itself raises
  only past twice the limit, and below that merely warns and decodes."""
  _quiet_bomb_warnings()
  try:
    image = Image.open(source)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
    raise _too_large(where, str(error)) from error  # the warning raised where -W error
  except (UnidentifiedImageError, OSError, ValueError) as error:
    raise _unreadable(where, error) from error
  pixels = image.width * image.height
  if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
    image.close()
    raise _too_large(where, f"Its {image.width}x{image.height} = {pixels:,} pixels exceed "
                     "PIL.Image.MAX_IMAGE_PIXELS.")
  return image


def convert(image: Image.Image, channels: int, where: Any = "(a PIL image)") -> Image.Image:
  """A PIL image of any mode -> `channels` channels as the networks see them: mode L
  or RGB by PIL's conversion, or, for a grey image of more than 8 bits, which that
  would clip, mode F in [0, 1] (one band, that `_to_array` repeats to `channels`)."""
  if image.mode in _DEEP_GREY:
    scale = _DEEP_GREY[image.mode]
    return image.convert("F").point(lambda v: v * scale)
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")  # the same pixels; PIL warns going to L or RGB directly
  try:
    return image.convert(MODES[channels])
  except ValueError as error:  # LAB to L, La to either
    raise ValueError(f"Cannot convert image {where}: PIL cannot bring its mode {image.mode} "
                     f"to {MODES[channels]} ({error}). Save it as RGB.") from error


def decode(record: Any, channels: int) -> Image.Image:
  """Encoded bytes or a file path -> the image as `convert` gives it, or a ValueError
  naming the file where `open_image` refuses it or its pixels do not decode (a
  truncated file whose header is whole)."""
  where = record if isinstance(record, (str, Path)) else "an encoded image"
  with open_image(io.BytesIO(record) if isinstance(record, bytes) else record, where) as image:
    try:
      image.load()
    except (OSError, ValueError) as error:
      raise _unreadable(where, error) from error
    return convert(image, channels, where)


def _to_array(image: Image.Image, channels: int) -> np.ndarray:
  """[H, W, channels] float32 in [0, 1]; a mode F image (`convert`) has one band,
  repeated to `channels`."""
  if image.mode == "F":
    return np.repeat(np.asarray(image, np.float32)[..., None], channels, axis=-1)
  return np.asarray(image, np.float32).reshape(image.height, image.width, channels) / 255.0


def eval_view(image: Image.Image, view: View, channels: int) -> np.ndarray:
  """Shorter side resized to size / crop_fraction, then the centre size x size."""
  scale = view.size / view.crop_fraction / min(image.size)
  width, height = (max(view.size, round(d * scale)) for d in image.size)
  left, top = (width - view.size) // 2, (height - view.size) // 2
  image = image.resize((width, height), Image.Resampling.BILINEAR)
  return _to_array(image.crop((left, top, left + view.size, top + view.size)), channels)


def train_view(image: Image.Image, view: View, channels: int,
               rng: np.random.Generator) -> np.ndarray:
  """A random crop of min_scale..1 of the area at aspect 3/4..4/3 (the whole image
  if ten draws do not fit), resized to size x size, flipped with probability 1/2."""
  width, height = image.size
  box = (0, 0, width, height)
  for _ in range(10):
    area = width * height * rng.uniform(view.min_scale, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < w <= width and 0 < h <= height:
      left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
      box = (left, top, left + w, top + h)
      break
  image = image.resize((view.size, view.size), Image.Resampling.BILINEAR, box=box)
  pixels = _to_array(image, channels)
  return pixels[:, ::-1] if view.flip and rng.uniform() < 0.5 else pixels


@dataclasses.dataclass(frozen=True)
class ArrayImages:
  """Images in memory, already at the input size: nothing to cut or augment."""
  array: np.ndarray  # [N, S, S, C] float32 in [0, 1]

  augments = False

  def __len__(self) -> int:
    return len(self.array)

  def read(self, indices: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    del rng
    return self.array[indices]


@dataclasses.dataclass(frozen=True)
class EncodedImages:
  """Encoded images (paths or bytes, `records[i]`) decoded when read."""
  records: Sequence[Any]
  view: View
  channels: int
  load: Callable[[Any], Any] = lambda record: record  # record -> path or bytes

  def __len__(self) -> int:
    return len(self.records)

  @property
  def augments(self) -> bool:
    """Whether training reads differ from evaluation reads (and between epochs)."""
    return self.view.augments

  def read(self, indices: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """[B, S, S, C]: the evaluation view, or the training view drawn from rng where
    the view augments."""
    augment = rng is not None and self.view.augments
    children = rng.spawn(len(indices)) if augment else [None] * len(indices)

    def one(index, child):
      image = decode(self.load(self.records[index]), self.channels)
      if child is None:
        return eval_view(image, self.view, self.channels)
      return train_view(image, self.view, self.channels, child)

    return np.stack(list(THREADS.map(one, indices, children)))
