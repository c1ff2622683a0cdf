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
  data.folder.write(d.images, d.labels, d.class_names, 'digits_png')"
  kamal-jax --config=configs/folder.py --config.data.path=digits_png --workdir=W

For photos, raise data.image_size and data.channels=3 and pick ImageNet-size models
(models.teacher='resnet18', bridge widths to match), as configs/class_setup.py does.
"""
from kamal_jax.configs import digits


def get_config(arg: str | None = None):
  del arg
  c = digits.get_config()
  c.data.name = "folder"
  c.data.path = ""  # the folder: one sub-folder per class
  c.data.image_size = 8  # every image is resized to image_size x image_size
  c.data.channels = 1  # 1: grey, 3: RGB
  return c
