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
