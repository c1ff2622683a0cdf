import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from kamal_jax import losses

RNG = np.random.default_rng(0)


def test_mse_is_per_sample_over_all_trailing_axes():
  a, b = RNG.normal(size=(2, 3, 4, 4, 5)), RNG.normal(size=(2, 3, 4, 4, 5))
  got = losses.mse(jnp.asarray(a), jnp.asarray(b), batch_dims=2)
  np.testing.assert_allclose(got, ((a - b) ** 2).mean(axis=(2, 3, 4)), rtol=1e-5)
  got = losses.mse(jnp.asarray(a[0]), jnp.asarray(b[0]))
  np.testing.assert_allclose(got, ((a[0] - b[0]) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)


def test_kd_kl_matches_numpy():
  s, t = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 5))
  temperature = 4.0
  p = special.softmax(t / temperature, axis=-1)
  log_q = special.log_softmax(s / temperature, axis=-1)
  expected = temperature**2 * np.sum(p * (np.log(p) - log_q), axis=-1)
  got = losses.kd_kl(jnp.asarray(s), jnp.asarray(t), temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  np.testing.assert_allclose(losses.kd_kl(jnp.asarray(t), jnp.asarray(t)), 0, atol=1e-6)


def test_weight_norm_penalty_uses_output_channels_as_rows():
  kernel = RNG.normal(size=(1, 1, 6, 4))  # Flax [kh, kw, Cin, Cout]
  row_norms = np.sum(kernel.reshape(6, 4) ** 2, axis=0)  # one per output channel
  expected = np.mean((row_norms - 1) ** 2)
  np.testing.assert_allclose(losses.weight_norm_penalty(jnp.asarray(kernel)), expected,
                             rtol=1e-5)
  unit = np.eye(4)[None, None]  # every output channel has norm 1
  assert float(losses.weight_norm_penalty(jnp.asarray(unit))) == 0.0
  zero = jnp.zeros((1, 1, 6, 4))  # the collapse the penalty stops
  assert float(losses.weight_norm_penalty(zero)) == 1.0


def test_masked_mean_counts_only_selected_entries():
  values = RNG.normal(size=(3, 8))  # [K, B]
  mask = np.eye(3)[RNG.integers(0, 3, size=8)]  # [B, K] one-hot
  expected = np.mean([values[mask[b].argmax(), b] for b in range(8)])
  np.testing.assert_allclose(losses.masked_mean(jnp.asarray(values), jnp.asarray(mask)),
                             expected, rtol=1e-6)


def test_masked_mean_gradient_is_zero_off_the_mask():
  values = jnp.asarray(RNG.normal(size=(2, 4)))
  mask = jnp.array([[1.0, 0.0]] * 4)  # every sample picks teacher 0
  grad = jax.grad(lambda v: losses.masked_mean(v, mask))(values)
  np.testing.assert_array_equal(grad[1], 0.0)
  np.testing.assert_allclose(grad[0], 0.25)
