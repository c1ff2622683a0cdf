"""The embedded default: scikit-learn's 8x8 digits, no download.

Main classes 0-5 in two parts, auxiliary classes 6-9 in four; each teacher knows one
main part and one auxiliary part, as in the paper's class setup in miniature. The
target is the six main classes; the grouping into {t1, t2} and {t3, t4} is found
from these label sets, not written here.

  --config=configs/digits.py          the default
  --config=configs/digits.py:domains  the teachers of a group are domain specialists:
      t1 and t3 learn from the original images, t2 and t4 from copies whose pixels
      are shuffled by one fixed permutation; the unlabeled pool and the test images
      mix both domains (half each), so each teacher is sure on its own domain and
      unsure on the other, and per-sample selection matters. (Inverted images make
      a poor second domain: a teacher is confidently wrong on them, since their
      bright background drives its activations far past its training statistics.)
  --config=configs/digits.py:uneven   uneven label sets: parts of four and two
      classes, three teachers in one group and one in the other, and auxiliary
      classes (6, 7) that teachers of both parts know.
  --config=configs/digits.py:zoo      a model zoo: 12 teachers per part, each the part
      and one or two auxiliary classes, of either domain (as in :domains), half of
      them trained for a tenth of the budget; a group of 12 runs its teachers in
      chunks (stage1.teacher_chunk), and which teacher each image learns from decides
      the component. Shorter stages keep its seeded table under 30 minutes; its
      student's heads learn by MSE, as that table measured them.
(`:domains` is short for `:variant=domains`, see configs/arguments.py.)
"""
import ml_collections

from kamal_jax.configs import arguments

VARIANTS = ("default", "domains", "uneven", "zoo")
ZOO_EXTRAS = (("6",), ("7",), ("8",), ("9",), ("6", "7"), ("8", "9"))  # per part, per domain


def optimizer(learning_rate, bridge_learning_rate=None, name="adam", weight_decay=0.0,
              decay_at=(0.5, 0.75), tap_learning_rates=()):
  """An optimizer's settings (see `train.make_optimizer`): step decay x0.5 at the
  `decay_at` fractions of training; bridges at `bridge_learning_rate`, or per tap at
  `tap_learning_rates` where given."""
  return ml_collections.ConfigDict(dict(
      name=name, learning_rate=learning_rate,
      bridge_learning_rate=bridge_learning_rate or learning_rate,
      tap_learning_rates=tuple(tap_learning_rates), weight_decay=weight_decay,
      momentum=0.9, decay_at=decay_at, decay_factor=0.5))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arguments.parse(arg, dict(variant="default"),
                            dict(variant=VARIANTS))["variant"]
  c = ml_collections.ConfigDict()
  c.seed = 0
  # 'rbg' keys compile several times faster than threefry for the random init.
  c.rng_impl = "rbg"
  # two_stage (the method), single_stage, ensemble or supervised (an upper bound).
  c.pipeline = "two_stage"

  c.data = ml_collections.ConfigDict(dict(
      name="digits", data_dir="", test_fraction=0.2,
      # 'all': every stage learns from all unlabeled training images; 'reference':
      # each component sees only its part's images (picked with labels), the
      # student only the target classes' images, as the reference code does.
      pool="all",
      # Each image is shown in one of these domains, drawn with the seed.
      domains=("original",),
      # Per-channel normalisation of the networks' input (empty: none).
      mean=(), std=()))

  # Student heads follow the part names in sorted order.
  c.target = ml_collections.ConfigDict(dict(parts=dict(
      part1=("0", "1", "2"), part2=("3", "4", "5"))))
  c.teachers = ml_collections.ConfigDict(dict(
      t1=("0", "1", "2", "6"), t2=("0", "1", "2", "7"),
      t3=("3", "4", "5", "8"), t4=("3", "4", "5", "9")))
  # The domain each teacher learned in (data.domains[0] where not named).
  c.teacher_domains = ml_collections.ConfigDict()
  # Teachers of another architecture than models.teacher ({name: model}), and
  # teachers imported rather than trained ({name: .pth or .safetensors of a
  # torchvision-named PyTorch ResNet whose logits follow the label set's order}).
  c.teacher_models = ml_collections.ConfigDict()
  c.teacher_checkpoints = ml_collections.ConfigDict()
  # Teachers trained for another number of steps than teacher_training.steps.
  c.teacher_steps = ml_collections.ConfigDict()

  c.models = ml_collections.ConfigDict(dict(
      # Components share the teachers' architecture; the student is wider than one
      # teacher and smaller than the components together.
      teacher="resnet10_digits", teacher_width_scale=1.0,
      student="resnet10_digits", student_width_scale=1.125,
      # A torchvision-named ResNet checkpoint of the teachers' architecture (e.g.
      # ImageNet weights, .pth or .safetensors): teachers trained here and the
      # components start from it, all but its classifier; the student never does.
      pretrained="",
      dtype="float32"))  # compute type: 'bfloat16' speeds up GPUs and TPUs

  c.teacher_training = ml_collections.ConfigDict(dict(
      steps=300, batch_size=64, optimizer=optimizer(2e-3)))
  # The method's settings (also those of the single-stage pipeline).
  c.stage1 = ml_collections.ConfigDict(dict(
      steps=400, batch_size=64,
      selection="least",  # least | none | random | soft | oracle (uses labels)
      ambiguity="entropy",  # entropy | margin | max_prob
      temperature=1.0,  # of the soft rule: weights softmax(-ambiguity / T)
      # A teacher's selection score adds to its ambiguity this times how unlike its
      # training images the image is (nats, from its stem batch norm's statistics;
      # kamal_jax.ambiguity.atypicality): a teacher sure about an image of a kind it
      # never saw is not chosen. 0: the paper's score.
      atypicality_weight=1.0,
      bridge_widths=(8, 8, 16, 32, 64), weight_norm=1.0,
      feature_weight=1.0,  # 0: logits alone
      logit_loss="mse", kd_temperature=4.0,  # 'kd': KL of softmaxes at that T
      # Components (and the student's heads after them) also learn the teachers'
      # mass outside the part as one more output, which tells the parts apart
      # (kamal_jax.joint): 'typical' (agreed by the group's teachers for which the
      # image is typical, weights softmax(-atypicality / typical_temperature)),
      # 'mean' (by all of them), 'own' (each selected teacher's) or 'none' (the
      # paper's method).
      rest="typical", typical_temperature=0.05,
      # A group of more frozen networks than this runs them in a loop over chunks of
      # this many: one traced body, so compiling does not grow with the group, nor,
      # under a one-hot rule, its live memory. On CPU 2 steps and compiles faster
      # than 4 (benchmarks/stage1_scaling.py).
      teacher_chunk=2,
      optimizer=optimizer(1e-3, bridge_learning_rate=2e-3)))
  # The student: from the components, or (single_stage, supervised) directly.
  # logit_loss: how its heads match the components' logits, 'kd' or 'mse' (the
  # paper's; the single-stage student reads stage1.logit_loss). KD over 1600 steps
  # brings the student's joint accuracy up to its components' (MSE over 400 steps
  # left it below them: benchmarks/results/digits.md, rows stage2-mse-400,
  # stage2-kd-400). joint_weight: beside each head's logits and rest, it learns the
  # joint distribution over all the target's classes that its targets' heads give
  # together (KL; kamal_jax.joint.scores); needs a rest. Measured, it adds nothing
  # (row joint-kl).
  c.stage2 = ml_collections.ConfigDict(dict(
      steps=1600, batch_size=64, logit_loss="kd", joint_weight=0.0,
      optimizer=optimizer(1e-3, bridge_learning_rate=2e-3)))

  c.eval_batch_size = 512
  # Where every epoch shows the same images (no augmentation), the frozen networks'
  # outputs (the teachers' in stage 1, the components' in stage 2) are computed once
  # per image and kept, if they fit in this many MB a stage; 0: they run every step.
  c.frozen_output_cache_mb = 1024
  # The graphs a finished run exports beside model.json and model.safetensors
  # (kamal_jax.export; `kamal-jax export` writes them all).
  c.export_graphs = ("model.jax_exported", "model.onnx")
  c.log_every = 50
  c.checkpoint_every = 100

  if variant == "domains":
    c.data.domains = ("original", "shuffled")
    c.teacher_domains = ml_collections.ConfigDict(dict(
        t1="original", t2="shuffled", t3="original", t4="shuffled"))
  if variant == "uneven":
    c.target.parts = ml_collections.ConfigDict(dict(
        part1=("0", "1", "2", "3"), part2=("4", "5")))
    c.teachers = ml_collections.ConfigDict(dict(
        t1=("0", "1", "2", "3", "6"), t2=("0", "1", "2", "3", "7"),
        t3=("0", "1", "2", "3", "8", "9"), t4=("4", "5", "6", "7")))
  if variant == "zoo":
    c.data.domains = ("original", "shuffled")
    zoo = {f"{part}{domain[0]}{n}": (*classes, *extra)
           for part, classes in (("a", ("0", "1", "2")), ("b", ("3", "4", "5")))
           for domain in c.data.domains for n, extra in enumerate(ZOO_EXTRAS)}
    c.teachers = ml_collections.ConfigDict(zoo)
    c.teacher_domains = ml_collections.ConfigDict(
        {name: "original" if name[1] == "o" else "shuffled" for name in zoo})
    c.teacher_training.steps = 150
    c.teacher_steps = ml_collections.ConfigDict(  # the poor half: a tenth of the budget
        {name: 15 for name in zoo if int(name[2:]) % 2})
    for stage in (c.stage1, c.stage2):
      stage.steps = 200
    c.stage2.logit_loss = "mse"
  return c
