import ml_collections
import numpy as np
import pytest
from PIL import Image

from kamal_jax import data


def _source(name, **fields):
  return ml_collections.ConfigDict({"name": name, "data_dir": "", **fields})


@pytest.fixture(scope="module")
def digits(data_dir):
  return data.load(_source("digits", data_dir=data_dir))


def test_digits_are_read_through_tfds(digits):
  assert digits.images.shape == (1797, 8, 8, 1)
  assert digits.images.dtype == np.float32
  assert 0.0 <= digits.images.min() and digits.images.max() <= 1.0
  assert digits.class_names == tuple("0123456789")
  from sklearn.datasets import load_digits
  reference = load_digits()  # same order, same values: the 'id' feature restores it
  np.testing.assert_array_equal(digits.labels, reference.target)
  np.testing.assert_allclose(digits.images[..., 0], reference.images / 16.0)


def test_unknown_dataset_names_the_choices():
  with pytest.raises(ValueError, match="Unknown dataset 'mnist2'.*digits"):
    data.load(_source("mnist2"))


def _folder(path, size=8, channels=1):
  return data.load(_source("folder", path=str(path), image_size=size, channels=channels))


def test_an_image_folder_round_trips_the_digits(digits, tmp_path):
  subset = digits.subset(np.arange(40))
  data.folder.write(subset.images, subset.labels, subset.class_names, tmp_path)
  (tmp_path / "3" / ".DS_Store").write_bytes(b"not an image, and hidden")
  loaded = _folder(tmp_path)
  names = np.array(subset.class_names)[subset.labels]
  order = np.argsort(names, kind="stable")  # by class folder, then by file name
  assert loaded.class_names == tuple(sorted(set(names)))
  np.testing.assert_array_equal(np.array(loaded.class_names)[loaded.labels], names[order])
  np.testing.assert_allclose(loaded.images, subset.images[order], atol=0.5 / 255 + 1e-6)


def test_folder_images_are_resized_and_converted(tmp_path):
  (tmp_path / "cat").mkdir()
  (tmp_path / "dog" / "nested").mkdir(parents=True)
  Image.new("L", (30, 17), color=200).save(tmp_path / "cat" / "a.jpg")
  Image.new("RGBA", (5, 9), color=(255, 0, 0, 255)).save(tmp_path / "dog" / "nested" / "b.png")
  loaded = _folder(tmp_path, size=12, channels=3)
  assert loaded.images.shape == (2, 12, 12, 3) and loaded.class_names == ("cat", "dog")
  np.testing.assert_allclose(loaded.images[0], 200 / 255, atol=2 / 255)  # grey -> RGB
  np.testing.assert_allclose(loaded.images[1, 0, 0], [1.0, 0.0, 0.0])


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


def test_shard_splits_the_leading_axis_or_names_the_fix():
  assert data.shard(np.zeros((16, 3)), 8).shape == (8, 2, 3)
  with pytest.raises(ValueError, match="divisible by 8"):
    data.shard(np.zeros((12, 3)), 8)


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
  mixed, assigned = data.mix_domains(images, ("original", "inverted"), seed=1)
  again, _ = data.mix_domains(images, ("original", "inverted"), seed=1)
  np.testing.assert_array_equal(mixed, again)
  assert 0.4 < assigned.mean() < 0.6
  np.testing.assert_array_equal(mixed[assigned == 0], images[assigned == 0])
  np.testing.assert_allclose(mixed[assigned == 1], 1 - images[assigned == 1])
