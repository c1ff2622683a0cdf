"""The paper's class setup: fine-grained datasets from the tfds catalogue.

  kamal-jax --config=configs/class_setup.py:main=stanford_dogs,aux=cars196 \
      --config.data.data_dir=~/tensorflow_datasets --workdir=runs/dogs

The argument (`configs/arguments.py`): main= and aux= one of DATASETS (default
stanford_dogs and cars196), seed= an integer (default 0), the run's seed and the
split's. The main dataset's classes are split (seeded) into 2 parts, the auxiliary
dataset's into 4. Four source nets, one per (main part i, aux part j), main part 1
with aux parts 1-2 and main part 2 with aux parts 3-4, are trained here with labels
on the union of their two parts; each main part becomes a component from the 2
teachers that share it, and the student covers all main classes with 2 heads.

The config names the parts without reading any dataset: each is a split reference
(`kamal_jax.tasks`), which the run resolves to class names once it has loaded the
data (from data.data_dir), so a config is a value. Source net t12 is

  ({"split": "stanford_dogs", "part": 1, "of": 2, "seed": 0},
   {"split": "cars196", "part": 2, "of": 4, "seed": 0})

and target part1 ({"split": "stanford_dogs", "part": 1, "of": 2, "seed": 0},).

ResNet-18 teachers and components at 224 px, the student 1.125x wider; the
reference's optimizers, learning rates and augmentation (random resized crop 0.81-1,
flip, ImageNet normalisation; test: shorter side 256, centre crop 224). As in the
reference, each component learns from its part's images and the student from all
main-dataset training images (data.pool='reference'); data.pool='all' uses every
unlabeled image instead.

tfds has stanford_dogs, caltech_birds2011 and cars196 (FGVC-Aircraft is not in the
catalogue: use configs/folder.py on its images). The datasets' own train/test
splits are used. As in the reference, the source nets and components start from
ImageNet weights with --config.models.pretrained=resnet18.safetensors (a
torchvision-named checkpoint; see the README), the student from scratch;
teacher_checkpoints imports source nets trained elsewhere instead.
"""
import ml_collections

from kamal_jax.configs import arguments, digits

DATASETS = ("stanford_dogs", "caltech_birds2011", "cars196")


def _part(dataset: str, part: int, of: int, seed: int) -> dict:
  """Part `part` (1-based) of `of` of the dataset's classes, split with the seed: a
  split reference (`kamal_jax.tasks.resolve_splits`)."""
  return dict(split=dataset, part=part, of=of, seed=seed)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  settings = arguments.parse(arg, dict(main="stanford_dogs", aux="cars196", seed=0),
                             dict(main=DATASETS, aux=DATASETS))
  seed = settings["seed"]
  c = digits.get_config()
  c.seed = seed
  c.data = ml_collections.ConfigDict(dict(
      name="tfds", datasets=(settings["main"], settings["aux"]), data_dir="",
      test_fraction=0.0,  # unused: the datasets' own test splits
      pool="reference", domains=("original",),
      image_size=224, channels=3, crop_fraction=0.875, min_scale=0.81, flip=True,
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
  main = lambda i: _part(settings["main"], i, 2, seed)
  aux = lambda j: _part(settings["aux"], j, 4, seed)
  c.target = ml_collections.ConfigDict(dict(parts={
      f"part{i}": (main(i),) for i in (1, 2)}))
  c.teachers = ml_collections.ConfigDict({
      f"t{i}{j}": (main(i), aux(j)) for i in (1, 2) for j in (2 * i - 1, 2 * i)})
  c.models.update(teacher="resnet18", teacher_width_scale=1.0, student="resnet18",
                  student_width_scale=1.125)
  c.teacher_training = ml_collections.ConfigDict(dict(
      steps=20_000, batch_size=64,
      optimizer=digits.optimizer(1e-3, name="sgd", weight_decay=5e-4)))
  # Adam at 5e-4 for the network, 1e-3 for the bridges but 8e-4 for the last tap's.
  amalgamation = lambda: digits.optimizer(5e-4, bridge_learning_rate=1e-3,
                                          tap_learning_rates=(1e-3,) * 4 + (8e-4,))
  c.stage1.update(steps=20_000, batch_size=64, bridge_widths=(32, 32, 64, 128, 256),
                  optimizer=amalgamation())
  c.stage2.update(steps=20_000, batch_size=64, optimizer=amalgamation())
  c.eval_batch_size = 256
  c.log_every = 100
  c.checkpoint_every = 1000
  return c
