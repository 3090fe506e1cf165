"""Softmax cross-entropy and the top class over the last axis, as every classifier here computes
them, written for XLA's CPU backend.

Over seq2seq's 40,000-word vocabulary ([16, 50, 40000] logits), `jnp.argmax` is a variadic
(value, index) reduction that XLA's CPU backend runs one element at a time (148 ms); and the
gradient of optax's integer-label cross-entropy scatters the one-hot term into a zeroed copy of
the logits before the softmax term is added. Both compute the same values here with plain
reductions and one fused pass.
"""

import jax
import jax.numpy as jnp

from fathom_jax.tuned import layers
from fathom_jax.workloads import vision


def argmax(x):
  """jnp.argmax(x, -1): the first index of the maximum (a NaN counts as the maximum), as two
  plain reductions: the maximum, then the least index that holds it."""
  top = jnp.max(x, -1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  holds = (x == top) | jnp.isnan(x)
  return jnp.min(jnp.where(holds, index, x.shape[-1]), -1)


@jax.custom_vjp
def logits(x, kernel, bias):
  """x @ kernel + bias over x's last axis. The bias's gradient, a sum of the logits' gradient
  over every leading position, is a row appended to the kernel's gradient matmul rather than a
  reduction of its own, which XLA's CPU backend ran at 5 GB/s over [16, 50, 40000]."""
  return x @ kernel + bias


def _logits_fwd(x, kernel, bias):
  return logits(x, kernel, bias), (x, kernel)


def _logits_bwd(residuals, g):
  x, kernel = residuals
  rows = x.reshape(-1, x.shape[-1])
  with_ones = jnp.concatenate([rows, jnp.ones_like(rows[:, :1])], -1)
  # Written out transposed, the left operand is a plain row-major matrix, and XLA's CPU backend
  # gives the product to YNNPACK (seq2seq's [257, 800] x [800, 40000]: 38.8 ms) rather than to
  # Eigen as a transposed operand (48.0 ms).
  with_ones_t = layers.materialize(with_ones.T, kernel.reshape(-1)[0])
  d_kernel_and_bias = with_ones_t @ g.reshape(-1, g.shape[-1])
  return g @ kernel.T, d_kernel_and_bias[:-1], d_kernel_and_bias[-1]


logits.defvjp(_logits_fwd, _logits_bwd)


@jax.custom_vjp
def cross_entropy(logits, labels):
  """-log softmax(logits)[label] over the last axis, for integer `labels` of logits' leading
  shape: optax.softmax_cross_entropy_with_integer_labels' values, whose gradient,
  softmax(logits) - one_hot(label), is one fused pass over the logits."""
  return _cross_entropy_fwd(logits, labels)[0]


def _cross_entropy_fwd(logits, labels):
  # The maximum is a constant shift of the log-normaliser: no gradient flows through it.
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))
  log_normaliser = jnp.log(jnp.sum(jnp.exp(shifted), -1))
  label_logit = jnp.take_along_axis(shifted, labels[..., None], -1)[..., 0]
  return log_normaliser - label_logit, (shifted, log_normaliser, labels)


def _cross_entropy_bwd(residuals, g):
  shifted, log_normaliser, labels = residuals
  index = jax.lax.broadcasted_iota(jnp.int32, shifted.shape, shifted.ndim - 1)
  probabilities = jnp.exp(shifted - log_normaliser[..., None])
  one_hot = (index == labels[..., None]).astype(shifted.dtype)
  return g[..., None] * (probabilities - one_hot), None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def classifier_loss(logits, batch):
  """The image classifiers' loss and accuracy (`vision.cross_entropy`) by this module's pieces."""
  return vision.cross_entropy(logits, batch, per_example=cross_entropy, argmax=argmax)
