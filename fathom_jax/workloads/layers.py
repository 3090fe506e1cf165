"""Layers of the image models written for XLA's CPU backend.

Each computes what its flax counterpart computes, with the same variables (names, shapes,
initialisers), but is written so that XLA compiles its training gradient well on CPU; the
docstrings say what the flax form compiles to and what it costs there (ResNet-50, batch 8).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv2d(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
  """NHWC x HWIO convolution. A 1x1 window is one matmul over the pixels: XLA lowers the kernel
  gradient of a 1x1 convolution to a convolution over the whole image of the activations
  transposed to CHWN, which ran at 20-50 GFLOP/s, and fused the batch-norm gradient into those
  transposes (a quarter of the step); as a matmul its gradients are two more matmuls."""
  kh, kw, cin, cout = kernel.shape
  if (kh, kw) == (1, 1) and all(p == (0, 0) for p in padding):
    x = x[:, ::strides[0], ::strides[1], :]
    b, h, w, _ = x.shape
    return (x.reshape(-1, cin) @ kernel.reshape(cin, cout)).reshape(b, h, w, cout)
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSIONS)


class Conv(nn.Module):
  """nn.Conv (HWIO `kernel`, optional `bias`) computed by `conv2d`. `padding` is 'VALID' or one
  (low, high) pair per spatial axis."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: object = "VALID"
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  kernel_init: object = nn.initializers.lecun_normal()
  bias_init: object = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32).astype(self.dtype)
    padding = ((0, 0), (0, 0)) if self.padding == "VALID" else tuple(map(tuple, self.padding))
    y = conv2d(x.astype(self.dtype), kernel, tuple(self.strides), padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y


def _window_taps(x, window: int, stride: int, padding: int):
  """x padded with -inf, and the strided slice of it under each window offset (row-major)."""
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  xp = jnp.pad(x, pads, constant_values=-jnp.inf)
  _, h, w, _ = xp.shape
  ho, wo = (h - window) // stride + 1, (w - window) // stride + 1
  return xp, [(i, j, xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride])
              for i in range(window) for j in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int, stride: int, padding: int = 0):
  """nn.max_pool of NHWC x over square windows, the maximum of the window's strided slices. The
  gradient goes to the first maximum of each window in row-major order, as XLA's
  select-and-scatter sends it; JAX's own gradient pairs values with indices in a reduce-window
  that ran at 2 GFLOP/s (146 ms for ResNet-50's stem pool, 19 ms written out below)."""
  _, taps = _window_taps(x, window, stride, padding)
  return functools.reduce(jnp.maximum, [tap for _, _, tap in taps])


def _max_pool_fwd(x, window, stride, padding):
  y = max_pool(x, window, stride, padding)
  return y, (x, y)


def _max_pool_bwd(window, stride, padding, residuals, g):
  x, y = residuals
  xp, taps = _window_taps(x, window, stride, padding)
  _, h, w, _ = xp.shape
  ho, wo = y.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, g.dtype)
  for i, j, tap in taps:
    hit = (tap == y) & ~taken
    taken = taken | hit
    # This offset's share, put back at the strided positions it was read from.
    dxp = dxp + jax.lax.pad(jnp.where(hit, g, zero), zero, (
        (0, 0, 0), (i, h - i - stride * (ho - 1) - 1, stride - 1),
        (j, w - j - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)))
  return (dxp[:, padding:h - padding, padding:w - padding],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
