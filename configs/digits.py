"""The embedded default: scikit-learn's 8x8 digits, no download.

Main classes 0-5 in two parts, auxiliary classes 6-9 in four; each teacher knows one
main part and one auxiliary part, as in the paper's class setup in miniature. The
target is the six main classes; the grouping into {t1, t2} and {t3, t4} is found
from these label sets, not written here.
"""
import ml_collections


def _optimizer(learning_rate, bridge_learning_rate=None, decay_at=(0.5, 0.75)):
  return ml_collections.ConfigDict(dict(
      name="adam", learning_rate=learning_rate,
      bridge_learning_rate=bridge_learning_rate or learning_rate,
      weight_decay=0.0, momentum=0.9, decay_at=decay_at, decay_factor=0.5))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  # 'rbg' keys compile several times faster than threefry for the random init.
  c.rng_impl = "rbg"

  c.data = ml_collections.ConfigDict(dict(
      name="digits", data_dir="", test_fraction=0.2,
      # 'all': every stage learns from all unlabeled training images; 'reference':
      # each component sees only its part's images (picked with labels), the
      # student only the target classes' images, as the reference code does.
      pool="all"))

  # Student heads follow the part names in sorted order.
  c.target = ml_collections.ConfigDict(dict(parts=dict(
      part1=("0", "1", "2"), part2=("3", "4", "5"))))
  c.teachers = ml_collections.ConfigDict(dict(
      t1=("0", "1", "2", "6"), t2=("0", "1", "2", "7"),
      t3=("3", "4", "5", "8"), t4=("3", "4", "5", "9")))

  c.models = ml_collections.ConfigDict(dict(
      # Components share the teachers' architecture; the student is wider than one
      # teacher and smaller than the components together.
      teacher="resnet10_digits", teacher_width_scale=1.0,
      student="resnet10_digits", student_width_scale=1.125,
      dtype="float32"))  # compute type: 'bfloat16' speeds up GPUs and TPUs

  c.teacher_training = ml_collections.ConfigDict(dict(
      steps=300, batch_size=64, optimizer=_optimizer(2e-3)))
  c.stage1 = ml_collections.ConfigDict(dict(
      steps=400, batch_size=64, ambiguity="entropy",
      bridge_widths=(8, 8, 16, 32, 64), weight_norm=1.0,
      optimizer=_optimizer(1e-3, bridge_learning_rate=2e-3)))
  c.stage2 = ml_collections.ConfigDict(dict(
      steps=400, batch_size=64, optimizer=_optimizer(1e-3, bridge_learning_rate=2e-3)))

  c.eval_batch_size = 512
  c.log_every = 50
  c.checkpoint_every = 100
  return c
