"""Layers written for XLA's CPU backend (the image models' layers and speech's dense layers),
and the XLA options of its library kernels.

Each computes what its flax counterpart computes, with the same variables (names, shapes,
initialisers), but is written so that XLA compiles its training gradient well on CPU; the
docstrings say what the flax form compiles to and what it costs there (ResNet-50 at batch 8
unless they name another model).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fathom_jax import scopes
from fathom_jax.tuned.winograd import CHANNELS_FIRST_DIMENSIONS  # CHWN x HWIO -> CHWN
from fathom_jax.tuned.winograd import DIMENSIONS  # NHWC x HWIO -> NHWC
from fathom_jax.tuned.winograd import conv3x3 as winograd_conv3x3


_YNN_KINDS = {"convolution": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
              "dot": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "reduce": "LIBRARY_FUSION_TYPE_REDUCE"}


def ynnpack(*kinds: str) -> dict:
  """XLA CPU compiler option: hand only these kinds of op ('convolution', 'dot', 'reduce') to
  YNNPACK, which by default gets all three; XLA compiles the others itself (convolutions and
  dots with Eigen). Which is faster depends on the model; benchmarks/NOTES.md has the figures."""
  return {"xla_cpu_experimental_ynn_fusion_type": ",".join(_YNN_KINDS[k] for k in kinds)}


# YNNPACK's convolutions made the image models' training steps 1.1-1.5x slower than Eigen's.
EIGEN_CONVOLUTIONS = ynnpack("dot", "reduce")
# Nothing to YNNPACK: AlexNet's and VGG's inference steps ran 1.07-1.28x faster.
EIGEN_ONLY = ynnpack()


@dataclasses.dataclass(frozen=True)
class ConvOptions:
  """The options of a tuned convolutional network, set with --override."""
  winograd: bool = True  # 3x3 stride-1 convolutions by Winograd's algorithm where it pays

# XLA's tree reduction rewriter splits a long reduction into a reduce-window of 32 and a
# reduction of its results, for a pairwise sum's accuracy; on CPU the reduce-window ran at
# 3 GFLOP/s (seq2seq's softmax over 40,000 words: 11.4 ms for [16, 50, 40000]). Without it
# the reduction is one vectorised pass: seq2seq's train step 1.15x faster, decoding 1.06x,
# losses equal to 5e-7 relative. Merge with `compiling.combined`.
PLAIN_REDUCTIONS = {"xla_disable_hlo_passes": "tree_reduction_rewriter"}


def conv2d(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
           winograd: bool = False, channels_first: bool = False):
  """NHWC (or, with channels_first, CHWN) x HWIO convolution. A 1x1 window is one matmul over
  the pixels: XLA lowers the kernel gradient of a 1x1 convolution to a convolution over the
  whole image of the activations transposed to CHWN, which ran at 20-50 GFLOP/s, and fused the
  batch-norm gradient into those transposes (a quarter of the step); as a matmul its gradients
  are two more matmuls. With `winograd`, a 3x3 stride-1 window is `winograd.conv3x3` (Winograd
  on CPU where it pays)."""
  kh, kw, cin, cout = kernel.shape
  if (kh, kw) == (1, 1) and all(p == (0, 0) for p in padding):
    return _conv1x1(x, kernel.reshape(cin, cout), strides, channels_first)
  if channels_first:
    direct = lambda x, k: jax.lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=CHANNELS_FIRST_DIMENSIONS)
  else:
    direct = lambda x, k: windowed_conv(x, k, strides, padding)
  if winograd and (kh, kw) == (3, 3) and tuple(strides) == (1, 1):
    return winograd_conv3x3(x, kernel, padding, direct, channels_first)
  return direct(x, kernel)


def _conv1x1(x, kernel, strides, channels_first: bool):
  """A 1x1 convolution with an [in, out] kernel. With the channels first, the kernel gradient
  x dy^T contracts two operands that are contiguous along the pixels: ResNet-50's 1x1 layers
  alone (batch 8, forward and both gradients) took 246 ms so against 320 with the channels
  last, where x^T dy ran at 130-400 GFLOP/s. Its forward product, which YNNPACK declines
  (the kernel is contracted along its rows), is slower."""
  x = x[:, ::strides[0], ::strides[1], :]
  a, h, w, b = x.shape
  if channels_first:
    y = jax.lax.dot_general(kernel, x.reshape(a, -1), (((0,), (0,)), ((), ())))
    return y.reshape(-1, h, w, b)
  return (x.reshape(-1, b) @ kernel).reshape(a, h, w, -1)


def _conv_matmul(rows, kernel, kernel_spec: str):
  """rows [n, k] times the kernel over k, as a 1x1 convolution over an image of n pixels;
  kernel_spec 'HWIO' contracts the kernel's first axis, 'HWOI' its second."""
  with jax.named_scope(scopes.MATRIX):
    image = jax.lax.conv_general_dilated(rows[None, :, None, :], kernel[None, None], (1, 1),
                                         "VALID", dimension_numbers=("NHWC", kernel_spec, "NHWC"))
  return image[0, :, 0]


def _eigen_product(rows, kernel, kernel_axis: int):
  """rows [n, k] contracted with the kernel's axis `kernel_axis` (of size k)."""
  return jax.lax.platform_dependent(
      rows, kernel, cpu=lambda a, k: _conv_matmul(a, k, ("HWIO", "HWOI")[kernel_axis]),
      default=lambda a, k: jax.lax.dot_general(a, k, (((1,), (kernel_axis,)), ((), ()))))


@jax.custom_vjp
def eigen_matmul(x, kernel):
  """x @ kernel over x's last axis, by Eigen on CPU where the compile options give XLA's dots
  to YNNPACK. Each product is written as a 1x1 convolution, which XLA rewrites into a dot (or
  keeps, for Eigen's convolution) only after YNNPACK has taken its dots, so the options must
  leave convolutions to XLA (`ynnpack('dot', 'reduce')`); the kernel gradient x^T dy is a dot
  that YNNPACK declines. Speech's dense layers ([12528, 1024] x [1024, 1024]) took 58 ms a
  product in Eigen against 68-70 in YNNPACK, which runs the recurrence's per-frame products
  faster. The input gradient transposes the kernel first, cheap for kernels of a few MB (not
  for AlexNet's 151 MB). Other platforms get dots. The convolutions run under the
  matrix scope of `fathom_jax.scopes`, so the breakdown files them under matrix operations."""
  rows = x.reshape(-1, x.shape[-1])
  return _eigen_product(rows, kernel, 0).reshape(*x.shape[:-1], kernel.shape[1])


def _eigen_matmul_bwd(residuals, g):
  x, kernel = residuals
  rows, g_rows = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dx = _eigen_product(g_rows, kernel, 1).reshape(x.shape)
  return dx, jax.lax.dot_general(rows, g_rows, (((0,), (0,)), ((), ())))


eigen_matmul.defvjp(lambda x, kernel: (eigen_matmul(x, kernel), (x, kernel)), _eigen_matmul_bwd)


@jax.custom_vjp
def few_rows_matmul(x, kernel):
  """x @ kernel over x's last axis for a few rows against a large kernel, such as AlexNet's fc
  layers (16 rows against kernels of up to 151 MB), whose products are bound by streaming the
  kernel. The forward product is Eigen's, as in `eigen_matmul`. The input gradient dy kernel^T
  is computed as kernel dy^T, written out, then transposed: YNNPACK streams a kernel it reads
  as the left operand along its rows, and ran AlexNet's first fc layer's input gradient
  ([16, 4096] x [4096, 9216]) in 5.0 ms that way against 9.1 ms with the kernel on the right.
  The kernel gradient is the dot x^T dy."""
  return eigen_matmul(x, kernel)


def _few_rows_matmul_bwd(residuals, g):
  x, kernel = residuals
  rows, g_rows = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dx_t = jax.lax.dot_general(kernel, g_rows, (((1,), (1,)), ((), ())))  # [in, rows]
  # Written out, or XLA folds the transpose back into the product's operand order.
  dx = materialize(dx_t, kernel.reshape(-1)[0]).T.reshape(x.shape)
  return dx, jax.lax.dot_general(rows, g_rows, (((0,), (0,)), ((), ())))


few_rows_matmul.defvjp(lambda x, kernel: (few_rows_matmul(x, kernel), (x, kernel)),
                       _few_rows_matmul_bwd)


class Dense(nn.Module):
  """nn.Dense (`kernel` [in, out], `bias`; same names, shapes and initialisers) computed by
  `eigen_matmul`, or with `few_rows` by `few_rows_matmul`."""
  features: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: object = nn.initializers.lecun_normal()
  bias_init: object = nn.initializers.zeros_init()
  few_rows: bool = False

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32).astype(self.dtype)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    matmul = few_rows_matmul if self.few_rows else eigen_matmul
    return matmul(x.astype(self.dtype), kernel) + bias


def _conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def windowed_conv(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
  """NHWC x HWIO convolution, with the input gradient's kernel prepared in two passes. The input
  gradient convolves with the kernel flipped in space and transposed (in <-> out); XLA's CPU
  backend fused the flip and the transpose into one loop that ran at 2-4 GB/s (2.35 ms for a
  3x3x512x512 kernel), where the flip, written out, and then the transpose take 0.7 ms."""
  return _conv(x, kernel, strides, padding)


def _windowed_conv_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _windowed_conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  flipped = materialize(kernel[::-1, ::-1], kernel.reshape(-1)[0])
  # The transposed convolution: dy dilated by the strides, padded so the result has x's size.
  pads = []
  for size, k, s, (low, _), out in zip(x.shape[1:3], (kh, kw), strides, padding, dy.shape[1:3]):
    before = k - 1 - low
    pads.append((before, size + k - 1 - (out - 1) * s - 1 - before))
  dx = jax.lax.conv_general_dilated(dy, jnp.swapaxes(flipped, 2, 3), (1, 1), pads,
                                    lhs_dilation=strides, dimension_numbers=DIMENSIONS)
  _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, strides, padding), kernel)
  return dx, kernel_vjp(dy)[0]


windowed_conv.defvjp(_windowed_conv_fwd, _windowed_conv_bwd)


class Conv(nn.Module):
  """nn.Conv (HWIO `kernel`, optional `bias`) computed by `conv2d`. `padding` is 'VALID' or one
  (low, high) pair per spatial axis."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: object = "VALID"
  use_bias: bool = True
  winograd: bool = False  # 3x3 stride-1 windows by winograd.conv3x3
  channels_first: bool = False  # CHWN input and output, not NHWC
  dtype: jnp.dtype = jnp.float32
  kernel_init: object = nn.initializers.lecun_normal()
  bias_init: object = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    channel_axis = 0 if self.channels_first else -1
    shape = (*self.kernel_size, x.shape[channel_axis], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32).astype(self.dtype)
    padding = ((0, 0), (0, 0)) if self.padding == "VALID" else tuple(map(tuple, self.padding))
    y = conv2d(x.astype(self.dtype), kernel, tuple(self.strides), padding, self.winograd,
               self.channels_first)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
      y = y + _per_channel(bias, y.ndim, channel_axis)
    return y


def param_element(module: nn.Module, name: str):
  """An element of a bound module's parameter `name`: a scalar every device holds whole, the
  `replicated` argument of `materialize` and `max_pool`."""
  return module.variables["params"][name].reshape(-1)[0]


def _written_once(x, replicated):
  # Both branches return x. The predicate is known only at run time, so XLA keeps the
  # conditional, and a conditional's operand and result are buffers that no fusion reaches into.
  # It reads a replicated scalar, not x, which may be sharded across devices.
  return jax.lax.cond(jnp.isnan(replicated), jnp.copy, lambda v: v, x)


def _materialize_cpu(x, replicated):
  return jax.lax.platform_dependent(x, replicated, cpu=_written_once,
                                    default=lambda v, _: v)


@jax.custom_vjp
def materialize(x, replicated):
  """x itself, written to memory once on CPU, where its consumers then read it. `replicated` is
  any scalar that every device holds whole (an element of a parameter).

  XLA's CPU fusion recomputes a cheap elementwise value inside every consumer rather than write
  it out, and drops optimization barriers before fusing. In ResNet-50 that recomputed each
  block's output, relu(bn(conv) + shortcut), from the convolution outputs of up to five earlier
  blocks in every fusion that read it; written once, the train step ran 1.05x and inference
  1.11x faster (batch 8). Other platforms get x unchanged (a conditional there costs a host
  round trip), and the gradient passes straight through."""
  return _materialize_cpu(x, replicated)


materialize.defvjp(lambda x, r: (_materialize_cpu(x, r), r),
                   lambda r, g: (g, jnp.zeros_like(r)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def relayout(x, permutation: tuple[int, ...], replicated):
  """x.transpose(permutation), with x written to memory before it is transposed and the gradient
  written once transposed back (on CPU, as `materialize`).

  XLA's CPU fusion otherwise fuses the transpose into its neighbours: at ResNet-50's NHWC ->
  CHWN switch after the stem, the max pool's nine window taps were read in the transposed order
  (6.7 ms for a 6.4 MB output), and on the way back the transposed gradient was recomputed
  inside each of the pool gradient's nine shares (9.6 ms); written out, 3.9 ms for both."""
  return _materialize_cpu(_materialize_cpu(x, replicated).transpose(permutation), replicated)


def _relayout_fwd(x, permutation, replicated):
  return relayout(x, permutation, replicated), replicated


def _relayout_bwd(permutation, replicated, g):
  inverse = tuple(int(i) for i in np.argsort(permutation))
  return _materialize_cpu(g.transpose(inverse), replicated), jnp.zeros_like(replicated)


relayout.defvjp(_relayout_fwd, _relayout_bwd)


def _per_channel(v, ndim: int, axis: int):
  """A per-channel vector shaped to broadcast against an array of ndim axes along `axis`."""
  axis %= ndim
  return v.reshape((-1,) + (1,) * (ndim - 1 - axis)) if axis != ndim - 1 else v


def _normalize(x, mean, var, scale, bias, epsilon: float, axis: int = -1):
  """(x - mean) * rsqrt(var + epsilon) * scale + bias per channel (flax's arithmetic)."""
  shape = functools.partial(_per_channel, ndim=x.ndim, axis=axis)
  return (x - shape(mean)) * shape(jax.lax.rsqrt(var + epsilon) * scale) + shape(bias)


def _other_axes(ndim: int, axis: int) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a != axis % ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(x, scale, bias, epsilon: float, axis: int = -1):
  """x normalised by its batch statistics over every axis but the channel axis `axis`: (y,
  mean, var), the statistics for the running averages (no gradient flows back through them as
  outputs). The variance is flax's fast one, E[x^2] - E[x]^2."""
  axes = _other_axes(x.ndim, axis)
  mean = x.mean(axes)
  var = jnp.maximum(0.0, (x * x).mean(axes) - mean * mean)
  return _normalize(x, mean, var, scale, bias, epsilon, axis), mean, var


def _batch_norm_fwd(x, scale, bias, epsilon, axis):
  y, mean, var = batch_norm(x, scale, bias, epsilon, axis)
  return (y, mean, var), (x, mean, var, scale)


def _batch_norm_bwd(epsilon, axis, residuals, grads):
  # The gradient through the batch statistics in closed form: the sums of dy and dy * x in one
  # pass over both, then dx as a per-channel affine function of (dy, x), so the normalised input
  # is never written out. Autodiff of the statistics left chains of elementwise ops that XLA
  # fused into several consumers and recomputed in each.
  x, mean, var, scale = residuals
  dy = grads[0]
  axes = _other_axes(x.ndim, axis)
  count = np.prod([x.shape[a] for a in axes])
  rstd = jax.lax.rsqrt(var + epsilon)
  d_bias = dy.sum(axes)
  d_scale = rstd * ((dy * x).sum(axes) - mean * d_bias)
  a = scale * rstd
  b = -a * rstd * d_scale / count
  c = -a * d_bias / count - b * mean
  shape = functools.partial(_per_channel, ndim=x.ndim, axis=axis)
  dx = shape(a) * dy + shape(b) * x + shape(c)
  return dx, d_scale, d_bias


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
  """nn.BatchNorm over the channel axis `axis` (`scale`, `bias`; batch_stats `mean`, `var`;
  statistics and normalisation in float32, the result in `dtype`) with the training gradient
  in closed form."""
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  axis: int = -1

  @nn.compact
  def __call__(self, x):
    features = (x.shape[self.axis],)
    scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    x = x.astype(jnp.float32)
    if self.use_running_average:
      y = _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, self.axis)
    else:
      y, mean, var = batch_norm(x, scale, bias, self.epsilon, self.axis)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype)


def _window_taps(x, window: int, stride: int, padding: int):
  """x padded with -inf, and the strided slice of it under each window offset (row-major)."""
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  xp = jnp.pad(x, pads, constant_values=-jnp.inf)
  _, h, w, _ = xp.shape
  ho, wo = (h - window) // stride + 1, (w - window) // stride + 1
  return xp, [(i, j, xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride])
              for i in range(window) for j in range(window)]


def max_pool(x, window: int, stride: int, padding: int = 0, replicated=None):
  """nn.max_pool of NHWC x over square windows, the maximum of the window's strided slices. The
  gradient goes to the first maximum of each window in row-major order, as XLA's
  select-and-scatter sends it; JAX's own gradient pairs values with indices in a reduce-window
  that ran at 2 GFLOP/s (146 ms for ResNet-50's stem pool, 19 ms written out below).

  `replicated`, a scalar every device holds whole (an element of a parameter, as `materialize`
  takes), lets the gradient write out which window offset held each maximum on CPU before
  routing the gradient by it; without it XLA fused the search for the first maximum into every
  offset's share and repeated it there (ResNet-50's stem pool: 13.4 ms against 3.2 ms)."""
  if replicated is None:
    replicated = jnp.zeros((), x.dtype)  # known at compile time: nothing is written out
  return _max_pool(x, replicated, window, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _max_pool(x, replicated, window: int, stride: int, padding: int):
  del replicated
  _, taps = _window_taps(x, window, stride, padding)
  return functools.reduce(jnp.maximum, [tap for _, _, tap in taps])


def _max_pool_fwd(x, replicated, window, stride, padding):
  y = _max_pool(x, replicated, window, stride, padding)
  return y, (x, y, replicated)


def _max_pool_bwd(window, stride, padding, residuals, g):
  x, y, replicated = residuals
  xp, taps = _window_taps(x, window, stride, padding)
  _, h, w, _ = xp.shape
  ho, wo = y.shape[1:3]
  # The first offset (row-major) whose tap equals the maximum, as a small integer per output
  # (none for a NaN maximum, as in select-and-scatter).
  first = jnp.full(y.shape, len(taps), jnp.int8)
  for t in reversed(range(len(taps))):
    first = jnp.where(taps[t][2] == y, jnp.int8(t), first)
  first = materialize(first, replicated)
  zero = jnp.zeros((), g.dtype)
  dxp = None
  for t, (i, j, _) in enumerate(taps):
    # This offset's share, put back at the strided positions it was read from.
    share = jax.lax.pad(jnp.where(first == t, g, zero), zero, (
        (0, 0, 0), (i, h - i - stride * (ho - 1) - 1, stride - 1),
        (j, w - j - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)))
    dxp = share if dxp is None else dxp + share
  return dxp[:, padding:h - padding, padding:w - padding], jnp.zeros_like(replicated)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
