import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kamal_jax import models


def _shapes(module, image_shape):
  x = jnp.zeros((2,) + image_shape)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  outputs = jax.eval_shape(lambda v: module.apply(v, x), variables)
  return outputs.logits.shape, [f.shape for f in outputs.feats]


def test_digits_resnet_taps_stem_and_every_stage():
  logits, feats = _shapes(models.create("resnet10_digits", 4), (8, 8, 1))
  assert logits == (2, 4)
  assert feats == [(2, 8, 8, 16), (2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 64),
                   (2, 1, 1, 128)]


def test_resnet18_taps_at_imagenet_resolution():
  logits, feats = _shapes(models.create("resnet18", 10), (224, 224, 3))
  assert logits == (2, 10)
  assert feats == [(2, 112, 112, 64), (2, 56, 56, 64), (2, 28, 28, 128),
                   (2, 14, 14, 256), (2, 7, 7, 512)]


@pytest.mark.parametrize("arch, params", [("resnet18", 11_689_512),
                                          ("resnet34", 21_797_672),
                                          ("resnet50", 25_557_032)])
def test_parameter_counts_match_torchvision(arch, params):
  """torchvision's published counts at 1,000 classes (batch-norm statistics aside)."""
  module = models.create(arch, 1000)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                                 jnp.zeros((1, 64, 64, 3))))
  assert sum(np.prod(v.shape) for v in jax.tree.leaves(variables["params"])) == params


def test_resnet50_taps_are_bottleneck_stage_outputs():
  _, feats = _shapes(models.create("resnet50", 10), (64, 64, 3))
  assert feats == [(2, 32, 32, 64), (2, 16, 16, 256), (2, 8, 8, 512), (2, 4, 4, 1024),
                   (2, 2, 2, 2048)]


def test_width_scale_widens_every_layer():
  module = models.create("resnet10_digits", 6, width_scale=1.125)
  assert module.widths == (18, 18, 36, 72, 144)


def test_unknown_model_names_the_choices():
  with pytest.raises(ValueError, match="resnet10_digits.*resnet18"):
    models.create("vgg16", 10)


@pytest.fixture(scope="module")
def tiny():
  module = models.create("resnet10_digits", 3, width_scale=0.25)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  variables = jax.jit(lambda: module.init(jax.random.key(0, impl="rbg"), x))()
  # Random running statistics and BN scales, so that stage outputs are not trivial.
  variables = jax.tree.map(
      lambda v: v + 0.5 * jax.random.normal(jax.random.key(1), v.shape), variables)
  return module, variables, x


def test_stem_tap_is_the_raw_convolution(tiny):
  module, variables, x = tiny
  outputs = module.apply(variables, x)
  kernel = variables["params"]["stem_conv"]["kernel"]
  expected = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(outputs.feats[0], expected, rtol=1e-5, atol=1e-5)


def test_stage_taps_are_taken_before_the_final_relu(tiny):
  module, variables, x = tiny
  outputs = module.apply(variables, x)
  for tap in outputs.feats[1:]:
    assert float(jnp.min(tap)) < 0.0  # a post-ReLU tap could not be negative


def test_teachers_of_one_architecture_stack_along_a_new_axis():
  from kamal_jax import tasks, teachers
  module = models.create("resnet10_digits", 4, width_scale=0.25)
  x = jnp.zeros((1, 8, 8, 1))
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  space = tasks.label_space(["0", "1", "2", "3"], "t")
  stack = teachers.stack([teachers.Teacher(n, module, variables, space) for n in "ab"])
  assert stack.names == ("a", "b")
  assert stack.variables["params"]["head"]["kernel"].shape == (2, 32, 4)
  other = models.create("resnet10_digits", 4, width_scale=0.5)
  with pytest.raises(ValueError, match="different architectures"):
    teachers.stack([teachers.Teacher("a", module, variables, space),
                    teachers.Teacher("b", other, variables, space)])


def test_stacked_networks_give_the_same_outputs_every_way():
  from kamal_jax import teachers
  module = models.create("resnet10_digits", 4, width_scale=0.25)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 1)), jnp.float32)
  keys = jax.random.split(jax.random.key(0, impl="rbg"), 3)
  variables = jax.jit(jax.vmap(lambda k: module.init(k, x[:1])))(keys)
  apply = lambda v: module.apply(v, x)
  outputs = {(way, chunk): jax.jit(lambda v, way=way, chunk=chunk: teachers.map_stacked(
      apply, v, in_step=False, way=way, chunk=chunk))(variables)
             for way in teachers.WAYS for chunk in (0, 2)}  # 2: a loop of one chunk, a tail
  outputs["unroll"] = outputs.pop(("unroll", 0))
  assert outputs["unroll"].logits.shape == (3, 4, 4)
  for way in outputs:
    for a, b in zip(jax.tree.leaves(outputs["unroll"]), jax.tree.leaves(outputs[way])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outputs["unroll"].logits[1], module.apply(
      jax.tree.map(lambda leaf: leaf[1], variables), x).logits, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  module = models.create("resnet10_digits", 4, width_scale=0.25, dtype="bfloat16")
  x = jnp.zeros((2, 8, 8, 1))
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  outputs = jax.eval_shape(lambda v: module.apply(v, x), variables)
  assert {leaf.dtype for leaf in jax.tree.leaves(outputs)} == {jnp.dtype("float32")}
  with pytest.raises(ValueError, match="float32.*bfloat16"):
    models.create("resnet10_digits", 4, dtype="float16")


def test_with_backbone_copies_all_but_the_head_into_every_stacked_network():
  def tree(count, classes, fill):
    shape = (count,) if count else ()
    return {"params": {"stem_conv": {"kernel": np.full(shape + (3, 3, 1, 4), fill)},
                       "head": {"kernel": np.full(shape + (4, classes), fill)}},
            "batch_stats": {"stem_bn": {"mean": np.full(shape + (4,), fill)}}}

  started = models.with_backbone(tree(2, 5, 0.0), tree(0, 1000, 1.0))
  np.testing.assert_array_equal(started["params"]["stem_conv"]["kernel"], 1.0)
  np.testing.assert_array_equal(started["batch_stats"]["stem_bn"]["mean"], 1.0)
  np.testing.assert_array_equal(started["params"]["head"]["kernel"], np.zeros((2, 4, 5)))
  other = tree(0, 5, 1.0)
  other["params"]["stem_conv"]["kernel"] = np.ones((3, 3, 3, 4))  # RGB weights
  with pytest.raises(ValueError, match="stem_conv/kernel.*input channels"):
    models.with_backbone(tree(2, 5, 0.0), other)
  del other["params"]["stem_conv"]
  with pytest.raises(ValueError, match="stem_conv/kernel.*architecture"):
    models.with_backbone(tree(2, 5, 0.0), other)


@pytest.mark.parametrize("shape, kernel, stride, live_taps", [
    ((2, 2, 2, 6), 3, 1, 9),  # 2x2 out: a product on CPU, every tap sees the image
    ((2, 3, 3, 4), 3, 2, 9),  # 2x2 out from an odd size
    ((2, 1, 1, 5), 3, 1, 1),  # 1x1 in: only the kernel's centre sees the image
    ((2, 2, 2, 5), 3, 2, 4),  # 2x2 -> 1x1: the top row and left column read padding
    ((2, 2, 2, 3), 1, 2, 1),  # a strided 1x1 shortcut
    ((2, 8, 8, 3), 3, 1, None),  # 8x8 out: left to XLA's convolution
])
def test_convolution_as_a_product_equals_xla_convolution_and_its_gradients(
    shape, kernel, stride, live_taps):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, shape[-1], 7)).astype(np.float32)
  padding = ((kernel // 2,) * 2,) * 2
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  ours = lambda x, w: models.conv.conv_general_dilated(
      x, w, (stride, stride), padding, dimension_numbers=numbers)
  xla = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), padding, dimension_numbers=numbers)
  np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
  square = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1))
  for a, b in zip(square(ours)(x, w), square(xla)(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  product = jax.make_jaxpr(ours)(x, w)
  names = [e.primitive.name for e in product.eqns]
  assert ("conv_general_dilated" in names) == (live_taps is None), product
  if live_taps:  # the product contracts only the taps that read the image
    [dot] = [e for e in product.eqns if e.primitive.name == "dot_general"]
    assert dot.invars[0].aval.shape[-1] == live_taps * shape[-1], product


def test_a_product_whose_output_reads_only_padding_is_zeros():
  x = np.ones((2, 1, 1, 3), np.float32)  # stride 3 over [pad, pixel, pad] reads the pad
  w = np.ones((1, 1, 3, 4), np.float32)
  out = models.conv.as_product(x, w, (3, 3), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(out, np.zeros((2, 1, 1, 4)))
