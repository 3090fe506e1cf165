"""alexnet: Krizhevsky, Sutskever & Hinton (2012), single-tower layout.

conv 11x11/4 64 - LRN - max pool 3/2 - conv 5x5 192 - LRN - max pool 3/2 - conv 3x3 384 -
conv 3x3 256 - conv 3x3 256 - max pool 3/2 - (adaptive average pool to 6x6) - fc 4096 - fc 4096 -
fc classes, ReLU after every hidden layer, dropout 0.5 before the two hidden fc layers.
Local response normalisation as in the paper: b = a / (k + alpha * sum over n channels of a^2)^beta
with n = 5, k = 2, alpha = 1e-4, beta = 0.75. 61,100,840 parameters at 224x224 and 1000 classes.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from fathom_jax import config as config_lib
from fathom_jax.errors import UsageError
from fathom_jax.workloads import base, layers, vision

nonneg = config_lib.nonneg


@dataclasses.dataclass(frozen=True)
class Config:
  image_size: int = 224
  num_classes: int = 1000
  conv_channels: tuple[int, int, int, int, int] = (64, 192, 384, 256, 256)
  fc_width: int = 4096
  pooled_size: int = 6  # spatial size fed to the first fc layer (6x6 at 224x224)
  dropout: float = nonneg(0.5)
  lrn_size: int = 5  # n: channels in the normalisation window (odd)
  lrn_bias: float = nonneg(2.0)  # k
  lrn_alpha: float = nonneg(1e-4)
  lrn_beta: float = nonneg(0.75)
  batch_size: int = 64
  optimizer: str = "sgd"
  learning_rate: float = 0.01  # SGD's rate at a batch of lr_batch_size (the paper's)
  lr_batch_size: int = 128  # SGD's rate scales linearly with batch_size / lr_batch_size
  momentum: float = nonneg(0.9)
  weight_decay: float = nonneg(5e-4)
  winograd: bool = True  # 3x3 stride-1 convolutions by Winograd's algorithm on CPU, where it pays

  # (window, stride, padding) of every layer that changes the spatial size.
  LAYERS = ((11, 4, 2), (3, 2, 0), (5, 1, 2), (3, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1),
            (3, 2, 0))

  def check(self):
    vision.check_optimizer(self.optimizer)
    if self.lrn_size % 2 == 0:
      raise UsageError(f"config field 'lrn_size' must be odd, got {self.lrn_size}")
    if self.dropout >= 1:
      raise UsageError(f"config field 'dropout' must be below 1, got {self.dropout}")
    vision.check_image_size(self.image_size, self.LAYERS, "alexnet")


PRESETS = {
    "paper": Config(),
    "small": Config(image_size=64, num_classes=10, conv_channels=(32, 96, 192, 128, 128),
                    fc_width=512, pooled_size=1, batch_size=32),
    "tiny": Config(image_size=64, num_classes=4, conv_channels=(8, 16, 24, 16, 16), fc_width=128,
                   pooled_size=1, batch_size=8, lr_batch_size=8),
}


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


class AlexNet(nn.Module):
  config: Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool):
    c = self.config
    conv = lambda n, k, s, p: layers.Conv(n, (k, k), (s, s), [(p, p), (p, p)], dtype=self.dtype,
                                          kernel_init=vision.CONV_INIT, winograd=c.winograd)
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


def build(config: Config, dtype: str) -> base.Model:
  return vision.build_classifier(AlexNet(config, jnp.dtype(dtype)), config, {
      ("cpu", "train"): layers.EIGEN_CONVOLUTIONS, ("cpu", "infer"): layers.EIGEN_ONLY})


WORKLOAD = base.Workload(
    name="alexnet",
    description="AlexNet (Krizhevsky et al. 2012), single tower, LRN, dropout; 224x224 ImageNet",
    config_cls=Config,
    presets=PRESETS,
    build=build,
    load_data=vision.load_data,
    example_unit="images",
    large_host_buffers=True,
)
