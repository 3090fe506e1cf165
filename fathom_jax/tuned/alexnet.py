"""AlexNet for XLA's CPU backend: convolutions by `layers.Conv`, the local response
normalisation as shifted slices with its gradient written out, max pooling whose gradient writes
the window offsets out (its input written out first), dense layers with few rows by
`layers.Dense`, the cross-entropy of `softmax`, and Eigen for the library kernels."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from fathom_jax.tuned import layers, softmax
from fathom_jax.workloads import alexnet, base, vision


def _window_sum(x, size: int):
  """Sum over a window of `size` channels centred on each channel (zero beyond the edges), as
  shifted slices: XLA fuses them into elementwise loops, where a reduce-window ran at 3-4
  GFLOP/s on CPU."""
  r, channels = size // 2, x.shape[-1]
  padded = jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((r, r),))
  return sum(padded[..., i:i + channels] for i in range(size))


def local_response_norm(x, size: int, bias: float, alpha: float, beta: float, replicated=None):
  """Krizhevsky's normalisation across channels: x * t^-beta, t = bias + alpha * (window sum of
  x^2). t^-beta is exp(-beta log t), which XLA vectorises (its pow ran per element).

  `replicated`, a scalar every device holds whole (as `layers.materialize` takes), has the
  incoming gradient written out once on CPU before the backward pass reads it twice. Coming
  from a max pool, that gradient is a sum of nine strided shares, and XLA wrote each share out
  separately for its two readers: conv1's LRN and pool took 15.7 ms forward and backward, 10.4
  with the gradient written out."""
  if replicated is None:
    replicated = jnp.zeros((), x.dtype)  # known at compile time: nothing is written out
  return _local_response_norm(x, replicated, size, bias, alpha, beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _local_response_norm(x, replicated, size, bias, alpha, beta):
  del replicated
  return _lrn_fwd(x, None, size, bias, alpha, beta)[0]


def _lrn_fwd(x, replicated, size, bias, alpha, beta):
  t = bias + alpha * _window_sum(x * x, size)
  scale = jnp.exp(-beta * jnp.log(t))
  return x * scale, (x, t, scale, replicated)


def _lrn_bwd(size, bias, alpha, beta, residuals, g):
  # d/dx_j of x_i t_i^-beta: g t^-beta on the diagonal, and -2 alpha beta x_j times the window
  # sum (the window is symmetric) of g x t^(-beta - 1). Written out so that XLA does not fuse
  # the forward's exp and log into each of the window's slices of the gradient.
  x, t, scale, replicated = residuals
  g = layers.materialize(g, replicated)
  dx = g * scale - (2 * alpha * beta) * x * _window_sum(g * x * scale / t, size)
  return dx, jnp.zeros_like(replicated)


_local_response_norm.defvjp(_lrn_fwd, _lrn_bwd)


Options = layers.ConvOptions


class AlexNet(nn.Module):
  config: alexnet.Config
  dtype: jnp.dtype = jnp.float32
  options: Options = Options()

  @nn.compact
  def __call__(self, images, train: bool):
    c = self.config
    conv = lambda n, k, s, p: layers.Conv(n, (k, k), (s, s), [(p, p), (p, p)], dtype=self.dtype,
                                          kernel_init=vision.CONV_INIT,
                                          winograd=self.options.winograd)
    lrn = lambda x, after: local_response_norm(x, c.lrn_size, c.lrn_bias, c.lrn_alpha, c.lrn_beta,
                                                layers.param_element(after, "kernel"))

    def pool(x, after):  # overlapping pooling; `after` is the convolution before it
      replicated = layers.param_element(after, "kernel")
      # Written out first: fused into the pool's nine window taps, the LRN before it was
      # computed again for each tap that read it.
      return layers.max_pool(layers.materialize(x, replicated), 3, 2, replicated=replicated)

    c1, c2, c3, c4, c5 = c.conv_channels
    x = images.astype(self.dtype)
    x = pool(lrn(nn.relu((conv1 := conv(c1, 11, 4, 2))(x)), conv1), conv1)
    x = pool(lrn(nn.relu((conv2 := conv(c2, 5, 1, 2))(x)), conv2), conv2)
    x = nn.relu(conv(c3, 3, 1, 1)(x))
    x = nn.relu(conv(c4, 3, 1, 1)(x))
    x = pool(nn.relu((conv5 := conv(c5, 3, 1, 1))(x)), conv5)
    x = vision.adaptive_avg_pool(x, c.pooled_size)
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      x = nn.Dropout(c.dropout, deterministic=not train)(x)
      x = nn.relu(layers.Dense(c.fc_width, dtype=self.dtype, kernel_init=vision.HIDDEN_INIT,
                               few_rows=True)(x))
    return layers.Dense(c.num_classes, dtype=self.dtype, kernel_init=vision.CLASSIFIER_INIT,
                        few_rows=True)(x)


def build(config: alexnet.Config, dtype: str, options: Options = Options()) -> base.Model:
  return vision.build_classifier(
      AlexNet(config, jnp.dtype(dtype), options), config, softmax.classifier_loss,
      {("cpu", "train"): layers.EIGEN_CONVOLUTIONS, ("cpu", "infer"): layers.EIGEN_ONLY})
