"""Amalgamation on your own images: a folder with one sub-folder per class.

  kamal-jax --config=configs/folder.py --config.data.path=DIR --workdir=W

Copy this file and name, by class (sub-folder) name, the target parts and each
teacher's label set. Teachers are trained here from the folder's labels, unless
`teacher_checkpoints` names a PyTorch ResNet for them (torchvision parameter names,
.pth or .safetensors, logits in the order of the label set); teachers of different
architectures may share a group. Stages 1 and 2 never see the labels; the
held-out split scores every network.

Everything else is the embedded default's (configs/digits.py), so pointing
data.path at the digits written out as PNG files reproduces it:

  python -c "from kamal_jax import data; from kamal_jax.configs import digits
  d = data.load(digits.get_config().data)
  data.folder.write(d.images.array, d.labels[:, 0], d.class_names, 'digits_png')"
  kamal-jax --config=configs/folder.py --config.data.path=digits_png --workdir=W

For photos, raise data.image_size, set data.channels=3, the views and the
normalisation the teachers expect, and pick ImageNet-size models
(models.teacher='resnet18', stage1.bridge_widths to match).
"""
from kamal_jax.configs import digits


def get_config(arg: str | None = None):
  del arg
  c = digits.get_config()
  c.data.name = "folder"
  c.data.path = ""  # the folder: one sub-folder per class
  c.data.image_size = 8  # the networks' input: image_size x image_size
  c.data.channels = 1  # 1: grey, 3: RGB
  # Evaluation view: the shorter side resized to image_size / crop_fraction, then the
  # centre crop (0.875: 256 -> 224). Training view, where min_scale < 1 or flip: a
  # random crop of min_scale..1 of the area, aspect 3/4..4/3, random flips (the
  # paper: 0.81, True).
  c.data.crop_fraction = 1.0
  c.data.min_scale = 1.0
  c.data.flip = False
  # data.mean and data.std: normalise as the teachers were trained (ImageNet
  # teachers: (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225)).
  return c
