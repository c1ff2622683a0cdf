import numpy as np
import pytest

from kamal_jax import tasks
from configs import digits

DIGIT_TEACHERS = dict(digits.get_config().teachers)
DIGIT_PARTS = dict(digits.get_config().target.parts)


def _spaces(specs):
  return {name: tasks.label_space(spec, name) for name, spec in specs.items()}


def test_digits_grouping_is_found_from_label_sets():
  plan = tasks.make_plan(DIGIT_PARTS, _spaces(DIGIT_TEACHERS))
  assert [g.part.name for g in plan.groups] == ["part1", "part2"]
  assert [g.teachers for g in plan.groups] == [("t1", "t2"), ("t3", "t4")]
  for group in plan.groups:  # each teacher lists its main part first: positions 0..2
    np.testing.assert_array_equal(group.index, [[0, 1, 2], [0, 1, 2]])
  assert plan.head_sizes == (3, 3)
  assert plan.target_classes == ("0", "1", "2", "3", "4", "5")


def test_index_maps_follow_each_teachers_own_order():
  teachers = {"a": ["7", "2", "1", "0"], "b": ["1", "9", "0", "2"], "c": ["5", "6"]}
  plan = tasks.make_plan({"p": ["0", "1", "2"]}, _spaces(teachers))
  (group,) = plan.groups
  assert group.teachers == ("a", "b")  # c covers nothing of the part
  np.testing.assert_array_equal(group.index, [[3, 2, 1], [2, 0, 3]])


def test_attribute_heads_use_the_same_path():
  hair = tasks.attribute_head("Black_Hair")
  space_1 = tasks.LabelSpace((tasks.attribute_head("Attractive"), hair))
  space_2 = tasks.LabelSpace((hair, tasks.attribute_head("Blurry"),
                              tasks.attribute_head("Big_Lips")))
  plan = tasks.make_plan({"Black_Hair": hair.classes}, {"s1": space_1, "s2": space_2})
  (group,) = plan.groups
  assert group.teachers == ("s1", "s2")
  np.testing.assert_array_equal(group.index, [[2, 3], [0, 1]])


def test_mapping_spec_gives_one_head_per_entry():
  space = tasks.label_space({"hair": ["h0", "h1"], "eyes": ["e0", "e1", "e2"]}, "t")
  assert [h.name for h in space.heads] == ["hair", "eyes"]
  assert space.num_outputs == 5
  assert space.positions(["e1", "e0"]).tolist() == [3, 2]
  assert space.positions(["h0", "e0"]) is None  # a part must sit in one head


def test_uncovered_target_classes_are_named():
  with pytest.raises(ValueError, match=r"\['8'\] are covered by no teacher"):
    tasks.make_plan({"p": ["0", "8"]}, _spaces({"t": ["0", "1"]}))


def test_part_no_single_teacher_covers_is_an_empty_group():
  with pytest.raises(ValueError, match="group is empty"):
    tasks.make_plan({"p": ["0", "1"]}, _spaces({"a": ["0", "5"], "b": ["1", "5"]}))


@pytest.mark.parametrize("parts, teachers, message", [
    ({"p": ["0", "0"]}, {"t": ["0"]}, "Duplicate names \\['0'\\] in the target"),
    ({"p": ["0"], "q": ["0"]}, {"t": ["0"]}, "Duplicate names \\['0'\\] in the target"),
    ({"p": ["0"]}, {"t": ["0", "1", "0"]}, "Duplicate names \\['0'\\] in the label set of 't'"),
    ({"p": []}, {"t": ["0"]}, "part 'p' is empty"),
    ({}, {"t": ["0"]}, "no parts"),
])
def test_bad_targets_and_label_sets_are_refused(parts, teachers, message):
  with pytest.raises(ValueError, match=message):
    tasks.make_plan(parts, _spaces(teachers))


def test_label_set_must_be_a_list_or_mapping():
  with pytest.raises(ValueError, match="list of class names"):
    tasks.label_space("0123", "t")


def test_label_positions_read_every_head_of_the_dataset():
  heads = (tasks.Head("dogs", ("husky", "pug")), tasks.Head("cars", ("audi", "bmw", "fiat")))
  labels = np.array([[0, -1], [1, -1], [-1, 2], [-1, 0]])  # two dogs, two cars
  np.testing.assert_array_equal(
      tasks.label_positions(labels, heads, ("fiat", "husky", "bmw")), [1, -1, 0, -1])
  attributes = (tasks.attribute_head("Bangs"), tasks.attribute_head("Young"))
  labels = np.array([[1, 0], [0, 0], [1, 1]])  # every image has every attribute
  np.testing.assert_array_equal(
      tasks.label_positions(labels, attributes, ("Young:0", "Young:1")), [0, 0, 1])
  assert tasks.shared_head(heads, [tasks.Head("p", ("husky",)), tasks.Head("q", ("pug",))])
  assert not tasks.shared_head(heads, [tasks.Head("p", ("husky", "audi"))])
  assert not tasks.shared_head(attributes, [attributes[0], attributes[1]])
  assert not tasks.shared_head(heads, [tasks.Head("p", ("unknown",))])


TOYS = tasks.Head("toys", tuple("abcdefg"))


def _split(part, of=3, seed=5, split="toys"):
  return dict(split=split, part=part, of=of, seed=seed)


def test_split_references_resolve_to_the_seeded_parts():
  # default_rng([5, 3]).permutation(7) is [6 1 0 3 4 2 5]; in 3 parts [6 1 0] [3 4]
  # [2 5]; each part in the head's order.
  heads = (tasks.Head("other", ("x", "y")), TOYS)
  parts = tasks.resolve_splits({"p1": [_split(1)], "p3": (_split(3),)}, heads, "target")
  assert parts == {"p1": ("a", "b", "g"), "p3": ("c", "f")}
  assert tasks.resolve_splits(["x", _split(2)], heads, "t") == ("x", "d", "e")
  assert tasks.resolve_splits({"h": [_split(2)]}, heads, "t") == {"h": ("d", "e")}


@pytest.mark.parametrize("reference, message", [
    (_split(1, split="toy"), r"t\[0\].split='toy' names no head of the data: use one of "
                             r"\['toys'\]"),
    (_split(4), r"t\[0\].part=4: give the part's number, an integer from 1 to 3"),
    (_split(1, of=8), r"t\[0\].of=8: give the number of parts, an integer from 1 to 7"),
    (_split(1, seed=-1), r"t\[0\].seed=-1: give a non-negative integer"),
    ({"split": "toys", "part": 1}, r"t\[0\]=.* is no split reference: give exactly"),
])
def test_bad_split_references_name_the_field_and_the_fix(reference, message):
  with pytest.raises(ValueError, match=message):
    tasks.resolve_splits([reference], (TOYS,), "teachers.t")


def test_split_references_left_unresolved_are_refused():
  with pytest.raises(ValueError, match=r"teachers.t is a split reference .* in a list"):
    tasks.resolve_splits(_split(1), (TOYS,), "teachers.t")
  with pytest.raises(ValueError, match=r"'t' holds the split reference .*resolve_splits"):
    tasks.label_space([_split(1)], "t")
  with pytest.raises(ValueError, match=r"Target part 'p' holds the split reference"):
    tasks.make_plan({"p": [_split(1)]}, _spaces({"t": ["a"]}))
