"""Per-sample losses of amalgamation and their masked reductions (pure jnp).

Per-sample functions return [...] over the leading axes and reduce everything after
the batch axis, so a stack of K teachers gives [K, B] and the selection mask decides
which entries count.
"""
import jax
import jax.numpy as jnp
import optax

__all__ = ["kd_kl", "masked_mean", "mse", "weight_norm_penalty"]


def mse(prediction: jnp.ndarray, target: jnp.ndarray, batch_dims: int = 1) -> jnp.ndarray:
  """Mean squared error over all axes after the first `batch_dims`.

  [*lead, B, ...] with batch_dims = len(lead) + 1 -> [*lead, B]. Serves feature maps
  [B, H, W, D] and logits [B, C] alike.
  """
  error = optax.losses.squared_error(prediction, target)
  return jnp.mean(error.reshape(error.shape[:batch_dims] + (-1,)), axis=-1)


def kd_kl(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
          temperature: float = 1.0) -> jnp.ndarray:
  """KL(teacher || student) of temperature-softened softmaxes, times T^2 (Hinton et
  al.), per sample: [..., C] -> [...]."""
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  p = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  return temperature**2 * optax.losses.kl_divergence(log_q, p)


def weight_norm_penalty(kernel: jnp.ndarray) -> jnp.ndarray:
  """mean over output channels of (||w_out||^2 - 1)^2 for a Flax conv kernel
  [kh, kw, Cin, Cout]; keeps a teacher-side bridge from collapsing to the zero map."""
  rows = kernel.reshape(-1, kernel.shape[-1])  # [kh * kw * Cin, Cout]
  return jnp.mean((jnp.sum(rows**2, axis=0) - 1.0) ** 2)


def masked_mean(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """sum_b sum_k mask[b, k] * values[k, b] / B for values [K, B], mask [B, K]."""
  return jnp.sum(mask.T * values) / values.shape[1]
