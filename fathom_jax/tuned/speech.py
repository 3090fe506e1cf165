"""Deep Speech for XLA's CPU backend: the bidirectional recurrence as one scan over both
directions with states as columns and its backward pass written out (the recurrent matrices'
gradient one matmul over all frames after the loop), dense layers by `layers.Dense`, the output
written out before the loss, and the library kernels chosen per product."""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fathom_jax.tuned import layers
from fathom_jax.workloads import base, speech


def _recurrence(xs, masks, recurrent, clip):
  """hs[t] = mask[t] * g(xs[t] + recurrent^T hs[t-1]) per direction d, each state a column:
  xs [T, D, H, B], masks [T, D, 1, B], recurrent [D, H, H].

  Columns rather than rows for the library that multiplies them: with the batch of 8 as rows,
  [8, 1024] x [1024, 1024] for both directions took 197 us a frame in Eigen and 161 in YNNPACK;
  as columns, U^T h with the matrix first, 123 us in YNNPACK.
  """
  transposed = jnp.swapaxes(recurrent, 1, 2)  # once, not in every step

  def step(h, inputs_t):
    x, mask = inputs_t
    h = jnp.minimum(nn.relu(x + jnp.einsum("dkh,dhb->dkb", transposed, h)), clip)
    h = jnp.where(mask, h, jnp.zeros_like(h))  # padding: state stays zero
    return h, h

  _, hs = jax.lax.scan(step, jnp.zeros_like(xs[0]), (xs, masks))
  return hs


# Autodiff of the scan would add each step's h dz^T into the recurrent matrices' gradient inside
# the loop (a read and write of every H x H matrix per frame); the backward pass below keeps only
# U dz in the loop and forms dU as one matmul over all frames afterwards.
_clipped_recurrence = jax.custom_vjp(_recurrence, nondiff_argnums=(3,))


def _recurrence_fwd(xs, masks, recurrent, clip):
  hs = _recurrence(xs, masks, recurrent, clip)
  return hs, (hs, masks, recurrent)


def _recurrence_bwd(clip, residuals, grads):
  hs, masks, recurrent = residuals
  active = (hs > 0) & (hs < clip) & masks  # where g passes gradient; padding never does

  def step(dh_next, inputs_t):
    g, act = inputs_t
    dz = jnp.where(act, g + dh_next, jnp.zeros_like(g))
    return jnp.einsum("dhk,dkb->dhb", recurrent, dz), dz

  _, dzs = jax.lax.scan(step, jnp.zeros_like(grads[0]), (grads, active), reverse=True)
  return dzs, None, _outer_products_over_frames(hs[:-1], dzs[1:]).astype(recurrent.dtype)


def _outer_products_over_frames(hs, dzs):
  """sum over frames t and batch b of hs[t, d, :, b] dzs[t, d, :, b]^T, per direction d:
  [T, D, H, B] x [T, D, K, B] -> [D, H, K] (the state before each frame against its dz).

  As one einsum over (t, b) XLA ordered the contraction b-major, t-minor, and transposed hs to
  it reading one float per 64 KB stride: 60 ms at 3.4 GB/s, and the dot and both transposes
  took 193 ms alone. With the (t, b) order written out, the transposes move runs of B floats:
  131 ms (batch 8, 1566 frames, both directions)."""
  _, d, h, b = hs.shape
  rows = jnp.transpose(hs, (1, 2, 0, 3)).reshape(d, h, -1)  # [D, H, T*B]
  columns = jnp.transpose(dzs, (1, 0, 3, 2)).reshape(d, -1, dzs.shape[2])  # [D, T*B, K]
  return jnp.einsum("dhn,dnk->dhk", rows, columns, preferred_element_type=jnp.float32)


_clipped_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def bidirectional_rnn(inputs, valid, forward, backward, clip: float):
  """Clipped-ReLU recurrences over time in both directions.

  inputs [B, T, H] (the shared input projection W4 h3 + b4), valid [B, T] bool, forward and
  backward [H, H]. Returns h_f + h_b [B, T, H]. One scan runs both: step k advances h_f at time
  k and h_b at time T-1-k, as one batched matmul.
  """
  xs = jnp.stack([inputs, jnp.flip(inputs, 1)])  # [2, B, T, H]
  masks = jnp.stack([valid, jnp.flip(valid, 1)])[:, :, :, None]  # [2, B, T, 1]
  to_columns = lambda a: jnp.transpose(a, (2, 0, 3, 1))  # [2, B, T, H] -> [T, 2, H, B]
  hs = _clipped_recurrence(to_columns(xs), to_columns(masks), jnp.stack([forward, backward]),
                           float(clip))
  hs = jnp.transpose(hs, (1, 3, 0, 2))  # [2, B, T, H]
  return hs[0] + jnp.flip(hs[1], 1)


class DeepSpeech(speech.DeepSpeech):
  """The reference network with Eigen's dense layers, the recurrence above, and its output
  written out."""
  dense: speech.ModuleDef = layers.Dense
  rnn: Callable = bidirectional_rnn

  def logits(self, output: nn.Module, x):
    # Written out: otherwise YNNPACK's fusion of the loss's first reduction (a max over the
    # classes) took in the [12528, 1024] x [1024, 62] product and ran it at 63 GFLOP/s.
    return layers.materialize(output(x), layers.param_element(output, "bias"))


def build(config: speech.Config, dtype: str) -> base.Model:
  # The recurrence's products (above) run faster in YNNPACK, the dense layers' in Eigen
  # (`layers.eigen_matmul`, which needs convolutions left to XLA).
  options = layers.ynnpack("dot", "reduce")
  model = speech.build(config, dtype, DeepSpeech(config, jnp.dtype(dtype)))
  return dataclasses.replace(model, compiler_options={("cpu", "train"): options,
                                                      ("cpu", "infer"): options})
