"""The paper's attribute setup: CelebA, each attribute a 2-way head.

  kamal-jax --config=configs/attribute_setup.py:target=hair \
      --config.data.data_dir=~/tensorflow_datasets --workdir=runs/hair

The argument (`configs/arguments.py`): target= hair (the default), eye or face. Each
target attribute is covered by 2-3 multi-task source nets that also predict
unrelated attributes (the sets below; those the paper names for Black_Hair and
Blond_Hair are its own, the rest are ours); the label sets are written out here,
since CelebA's attribute names need no dataset to know. Every net is a label space
of 2-way heads {attribute: (attribute:0, attribute:1)}, so grouping, selection (the
entropy of the shared attribute's head), the losses, the steps and the report are
exactly those of the class setup; only this configuration differs. The parts are
the target attributes (one student head each); a joint accuracy is not reported,
since attributes are not exclusive classes.
"""
import ml_collections

from kamal_jax import tasks
from kamal_jax.configs import arguments, class_setup

SOURCE_NETS = {
    "hair": {
        "Black_Hair": [("Arched_Eyebrows", "Attractive", "Big_Lips"),
                       ("Bags_Under_Eyes", "Blurry")],
        "Blond_Hair": [("Pale_Skin", "Receding_Hairline"), ("High_Cheekbones",)],
        "Brown_Hair": [("Big_Nose", "Chubby"), ("Double_Chin", "Goatee"),
                       ("Gray_Hair", "Wearing_Hat")],
        "Bangs": [("Male", "Mustache"), ("No_Beard", "Pointy_Nose")],
    },
    "eye": {
        "Bags_Under_Eyes": [("Attractive", "Big_Lips"), ("Blurry", "Male")],
        "Bushy_Eyebrows": [("Chubby", "Goatee"), ("Mouth_Slightly_Open", "Smiling")],
        "Narrow_Eyes": [("Pale_Skin", "Sideburns"), ("Straight_Hair", "Wavy_Hair")],
    },
    "face": {
        "Oval_Face": [("Big_Nose", "Blurry"), ("Double_Chin", "Rosy_Cheeks")],
        "Young": [("Gray_Hair", "Bald"), ("Wearing_Necklace", "Wearing_Lipstick")],
        "Heavy_Makeup": [("Male", "Pointy_Nose"), ("Wearing_Earrings", "No_Beard")],
    },
}


def _heads(attributes) -> dict:
  return {a: tasks.attribute_head(a).classes for a in attributes}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  settings = arguments.parse(arg, dict(target="hair"), dict(target=tuple(SOURCE_NETS)))
  target = settings["target"]
  c = class_setup.get_config()
  c.data.update(datasets=("celeb_a",), min_scale=1.0, pool="all")
  c.target = ml_collections.ConfigDict(dict(parts=_heads(SOURCE_NETS[target])))
  c.teachers = ml_collections.ConfigDict({
      f"{attribute}_{k + 1}": _heads((attribute, *others))
      for attribute, nets in SOURCE_NETS[target].items()
      for k, others in enumerate(nets)})
  for stage in (c.teacher_training, c.stage1, c.stage2):
    stage.optimizer.learning_rate = stage.optimizer.bridge_learning_rate = 1e-4
    stage.optimizer.tap_learning_rates = ()
  return c
