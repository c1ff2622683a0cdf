import warnings

import ml_collections
import numpy as np
import pytest
from PIL import Image

from kamal_jax import data, parallel
from kamal_jax.configs import folder


def _source(name, **fields):
  return ml_collections.ConfigDict({"name": name, "data_dir": "", **fields})


@pytest.fixture(scope="module")
def digits(data_dir):
  return data.load(_source("digits", data_dir=data_dir))


def test_digits_are_read_through_tfds(digits):
  images = digits.images.array
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0
  assert digits.class_names == tuple("0123456789")
  from sklearn.datasets import load_digits
  reference = load_digits()  # same order, same values: the 'id' feature restores it
  np.testing.assert_array_equal(digits.labels, reference.target[:, None])
  np.testing.assert_allclose(digits.images.array[..., 0], reference.images / 16.0)


def test_unknown_dataset_names_the_choices():
  with pytest.raises(ValueError, match="Unknown dataset 'mnist2'.*digits"):
    data.load(_source("mnist2"))


def _folder(path, size=8, channels=1):
  """configs/folder.py's data settings on `path`."""
  cfg = folder.get_config().data
  cfg.update(path=str(path), image_size=size, channels=channels)
  return data.load(cfg)


def test_an_image_folder_round_trips_the_digits(digits, tmp_path):
  images, labels = digits.images.array[:40], digits.labels[:40, 0]
  data.folder.write(images, labels, digits.class_names, tmp_path)
  (tmp_path / "3" / ".DS_Store").write_bytes(b"not an image, and hidden")
  loaded = _folder(tmp_path)
  names = np.array(digits.class_names)[labels]
  order = np.argsort(names, kind="stable")  # by class folder, then by file name
  assert loaded.class_names == tuple(sorted(set(names)))
  np.testing.assert_array_equal(np.array(loaded.class_names)[loaded.labels[:, 0]],
                                names[order])
  np.testing.assert_allclose(loaded.images.read(np.arange(40)), images[order],
                             atol=1 / 255 + 1e-6)


def test_folder_images_are_resized_and_converted(tmp_path):
  (tmp_path / "cat").mkdir()
  (tmp_path / "dog" / "nested").mkdir(parents=True)
  Image.new("L", (30, 17), color=200).save(tmp_path / "cat" / "a.jpg")
  Image.new("RGBA", (5, 9), color=(255, 0, 0, 255)).save(tmp_path / "dog" / "nested" / "b.png")
  loaded = _folder(tmp_path, size=12, channels=3)
  assert loaded.class_names == ("cat", "dog")
  images = loaded.images.read(np.array([0, 1]))
  assert images.shape == (2, 12, 12, 3)
  np.testing.assert_allclose(images[0], 200 / 255, atol=2 / 255)  # grey -> RGB
  np.testing.assert_allclose(images[1, 0, 0], [1.0, 0.0, 0.0])


def test_folder_files_keep_path_order_and_hidden_folders_are_skipped(tmp_path):
  for name in ["cat/a/b.png", "cat/a-b.png", "cat/.thumbs/c.png", "cat/d.png"]:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (2, 2)).save(tmp_path / name)
  files, _, _ = data.folder.load(tmp_path)
  # As Paths sort, by parts ('a' < 'a-b.png'), not as strings ('-' < '/').
  assert files == [tmp_path / "cat/a/b.png", tmp_path / "cat/a-b.png", tmp_path / "cat/d.png"]


def _halves(width=40, height=20) -> Image.Image:
  """Black left half, white right half."""
  pixels = np.zeros((height, width), np.uint8)
  pixels[:, width // 2:] = 255
  return Image.fromarray(pixels)


def test_evaluation_view_resizes_the_shorter_side_then_centre_crops():
  # 40x20 at size 10: resized to 20x10, then its centre columns 5..14.
  out = data.images.eval_view(_halves(), data.images.View(10), channels=1)
  assert out.shape == (10, 10, 1)
  np.testing.assert_allclose(out[:, :4, 0], 0.0, atol=1e-6)
  np.testing.assert_allclose(out[:, 6:, 0], 1.0, atol=1e-6)
  # crop_fraction 0.5: the shorter side goes to 10 / 0.5 = 20 (no resize here), and
  # the crop is the middle 10 columns, 15..24: exactly 5 dark, then 5 bright.
  wide = data.images.eval_view(_halves(), data.images.View(10, crop_fraction=0.5), 1)
  np.testing.assert_array_equal(wide[:, :, 0], np.repeat([[0.0] * 5 + [1.0] * 5], 10, 0))


def test_training_view_is_a_pure_function_of_its_generator():
  rows, columns = np.mgrid[:30, :30]
  gradient = Image.fromarray((3 * rows + 5 * columns).astype(np.uint8))  # rises to the right
  view = data.images.View(8, min_scale=0.5, flip=True)
  draw = lambda seed: data.images.train_view(gradient, view, 1, np.random.default_rng(seed))
  np.testing.assert_array_equal(draw(3), draw(3))
  draws = np.stack([draw(seed) for seed in range(40)])
  assert len({d.tobytes() for d in draws}) == 40  # every crop differs
  flipped = draws[:, :, -1].mean(axis=(1, 2)) < draws[:, :, 0].mean(axis=(1, 2))
  assert 10 < flipped.sum() < 30  # about half are mirrored


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.write_text("a file"), "is not a folder"),
    (lambda root: root.mkdir(), "has no class sub-folders"),
    (lambda root: (root / "cat").mkdir(parents=True), "Class 'cat' has no images"),
    (lambda root: ((root / "cat").mkdir(parents=True),
                   (root / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")),
     "Cannot read image .*broken.png"),
])
def test_bad_folders_name_the_problem(tmp_path, make, message):
  root = tmp_path / "images"
  make(root)
  with pytest.raises(ValueError, match=message):
    _folder(root)


# Each mode PIL has, and a format that writes it and reads it back as it is (None:
# none does, so the image goes to `images.convert` from memory). The deep grey ones
# hold known values; the others a random RGBA image in that mode.
_DEEP = {"I;16": ("<u2", 65535), "I;16B": (">u2", 65535), "I;16L": ("<u2", 65535),
         "I;16N": ("=u2", 65535), "I": ("=i4", 65535), "F": ("=f4", 1)}
_MODES = [("1", "PNG"), ("L", "PNG"), ("P", "PNG"), ("PA", "TIFF"), ("LA", "PNG"),
          ("La", None), ("RGB", "PNG"), ("RGBA", "PNG"), ("RGBa", None), ("RGBX", None),
          ("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("LAB", "TIFF"), ("HSV", None), ("I;16", "PNG"),
          ("I;16B", "TIFF"), ("I;16L", None), ("I;16N", None), ("I", "TIFF"), ("F", "TIFF")]


def _in_mode(mode: str) -> tuple[Image.Image, np.ndarray | None]:
  """A 2x2 image of `mode`, and for a deep grey one its pixels in [0, 1]."""
  if mode in _DEEP:
    dtype, top = _DEEP[mode]
    values = np.array([[0, top / 4], [top / 2, top]]) if mode == "F" else \
        np.array([[0, 32768], [1000, 65535]])
    return Image.frombytes(mode, (2, 2), values.astype(dtype).tobytes()), values / top
  rgba = np.random.default_rng(0).integers(0, 256, (2, 2, 4), np.uint8)
  image = Image.fromarray(rgba).convert(mode)
  if mode == "P":  # a palette with transparency, which PIL warns about converting
    image.info["transparency"] = bytes(range(0, 256, 16))
  return image, None


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode, form", _MODES)
def test_every_mode_is_decoded_at_its_real_range(tmp_path, mode, form, channels):
  image, deep = _in_mode(mode)
  if form is None:
    decoded = lambda: data.images.convert(image, channels)
  else:
    image.save(tmp_path / "image", form)
    with Image.open(tmp_path / "image") as back:
      assert back.mode == image.mode  # the file holds the mode under test
    decoded = lambda: data.images.decode(tmp_path / "image", channels)
  if deep is not None:  # 32768 -> 32768 / 65535, a float 0.25 -> 0.25, in every channel
    expected = np.repeat(deep[..., None], channels, axis=-1)
  else:
    try:
      with warnings.catch_warnings():  # P with transparency: converted as PIL does, unwarned
        warnings.simplefilter("ignore")
        expected = np.asarray(image.convert(data.images.MODES[channels])) / 255
    except ValueError:  # PIL cannot: LAB to L, La to either
      with pytest.raises(ValueError, match=f"image .*: PIL cannot bring its mode {mode} to"):
        decoded()
      return
  view = lambda size: data.images.eval_view(decoded(), data.images.View(size), channels)
  np.testing.assert_allclose(view(2), expected.reshape(2, 2, channels), atol=1e-6)
  # Resized 2x2 -> 1x1, bilinearly: the mean, at the real range too (not clipped).
  np.testing.assert_allclose(view(1)[0, 0], expected.reshape(4, channels).mean(0),
                             atol=1 / 255 + 1e-6)


@pytest.mark.parametrize("limit, warnings_as_errors", [(500, False), (300, False), (500, True)])
def test_an_image_of_more_than_max_image_pixels_is_refused_unread(
    tmp_path, monkeypatch, limit, warnings_as_errors):
  """28x28 = 784 pixels against a limit of 500 (PIL warns), 300 (PIL raises), and
  500 under -W error: one line naming the file, its size and the fix; no warning."""
  (tmp_path / "cat").mkdir()
  Image.new("L", (28, 28)).save(tmp_path / "cat" / "big.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
  monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels decoded"))
  message = r"Cannot read image .*big.png: .*784 pixels.* raise PIL.Image.MAX_IMAGE_PIXELS"
  with warnings.catch_warnings(record=True) as caught:
    if warnings_as_errors:
      warnings.simplefilter("error", Image.DecompressionBombWarning)
    with pytest.raises(ValueError, match=message):
      _folder(tmp_path)
    with pytest.raises(ValueError, match=message):
      data.images.decode(tmp_path / "cat" / "big.png", 1)
  assert not caught


def test_a_truncated_image_passes_the_door_and_its_batch_names_it(tmp_path):
  (tmp_path / "cat").mkdir()
  noise = np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)
  Image.fromarray(noise).save(tmp_path / "cat" / "cut.png")
  whole = (tmp_path / "cat" / "cut.png").read_bytes()
  (tmp_path / "cat" / "cut.png").write_bytes(whole[:len(whole) // 2])
  loaded = _folder(tmp_path)  # the header is whole
  with pytest.raises(ValueError, match=r"Cannot read image .*cut.png: .*Remove or replace"):
    loaded.images.read(np.array([0]))


def test_stratified_split_is_seeded_disjoint_and_keeps_class_shares():
  labels = np.repeat(np.arange(5), [50, 40, 30, 20, 10])
  train, test = data.stratified_split(labels, 0.2, seed=3)
  assert len(np.intersect1d(train, test)) == 0
  assert len(train) + len(test) == len(labels)
  np.testing.assert_array_equal(np.bincount(labels[test]), [10, 8, 6, 4, 2])
  again = data.stratified_split(labels, 0.2, seed=3)
  np.testing.assert_array_equal(test, again[1])
  other = data.stratified_split(labels, 0.2, seed=4)
  assert not np.array_equal(test, other[1])


def test_batch_stream_is_a_pure_function_of_the_step():
  batches = [data.batch_indices(10, 4, 0, "s", step) for step in range(4)]
  # 10 items in batches of 4: two batches per epoch, each epoch a fresh permutation.
  epoch0 = np.concatenate(batches[:2])
  assert len(set(epoch0)) == 8
  assert not np.array_equal(batches[:2], batches[2:])
  np.testing.assert_array_equal(data.batch_indices(10, 4, 0, "s", 3), batches[3])
  assert not np.array_equal(data.batch_indices(10, 4, 0, "other", 0), batches[0])


def test_batch_stream_needs_one_full_batch():
  with pytest.raises(ValueError, match="fewer than one batch"):
    data.batch_indices(3, 4, 0, "s", 0)


def test_a_batch_splits_its_rows_over_the_devices_or_names_the_fix():
  batch = parallel.split({"image": np.arange(48.0).reshape(16, 3)})
  assert batch["image"].shape == (16, 3)
  assert [s.data.shape for s in batch["image"].addressable_shards] == [(2, 3)] * 8
  np.testing.assert_array_equal(parallel.gathered(batch)["image"], np.arange(48.0).reshape(16, 3))
  with pytest.raises(ValueError, match="divisible by 8"):
    parallel.split(np.zeros((12, 3)))


def test_domains_transform_images_and_keep_their_shape():
  images = np.random.default_rng(0).uniform(size=(5, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(data.in_domain(images, "original"), images)
  np.testing.assert_allclose(data.in_domain(images, "inverted"), 1 - images)
  np.testing.assert_array_equal(data.in_domain(images, "rotated")[:, 0], images[:, :, -1])
  shuffled = data.in_domain(images, "shuffled")
  assert shuffled.shape == images.shape and not np.array_equal(shuffled, images)
  # One fixed permutation: every image keeps its pixels, all moved the same way.
  np.testing.assert_array_equal(np.sort(shuffled.reshape(5, -1)), np.sort(images.reshape(5, -1)))
  np.testing.assert_array_equal(data.in_domain(images[:2], "shuffled"), shuffled[:2])
  with pytest.raises(ValueError, match="Unknown image domain 'sepia'"):
    data.in_domain(images, "sepia")


def test_mixed_domains_are_seeded_and_balanced():
  images = np.random.default_rng(0).uniform(size=(400, 8, 8, 1)).astype(np.float32)
  assigned = data.assign_domains(len(images), ("original", "inverted"), seed=1)
  np.testing.assert_array_equal(
      assigned, data.assign_domains(len(images), ("original", "inverted"), seed=1))
  assert 0.4 < assigned.mean() < 0.6
  mixed = data.in_domains(images, assigned, ("original", "inverted"))
  np.testing.assert_array_equal(mixed[assigned == 0], images[assigned == 0])
  np.testing.assert_allclose(mixed[assigned == 1], 1 - images[assigned == 1])


def test_processes_read_disjoint_blocks_that_make_up_the_global_batch():
  picks = np.arange(12) * 10
  blocks = [parallel.local_rows(picks, p, 3) for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(blocks), picks)
  np.testing.assert_array_equal(blocks[1], [40, 50, 60, 70])
  with pytest.raises(ValueError, match="does not split over 5 processes"):
    parallel.local_rows(picks, 0, 5)
