"""alexnet: Krizhevsky, Sutskever & Hinton (2012), single-tower layout.

conv 11x11/4 64 - LRN - max pool 3/2 - conv 5x5 192 - LRN - max pool 3/2 - conv 3x3 384 -
conv 3x3 256 - conv 3x3 256 - max pool 3/2 - (adaptive average pool to 6x6) - fc 4096 - fc 4096 -
fc classes, ReLU after every hidden layer, dropout 0.5 before the two hidden fc layers.
Local response normalisation as in the paper: b = a / (k + alpha * sum over n channels of a^2)^beta
with n = 5, k = 2, alpha = 1e-4, beta = 0.75. 61,100,840 parameters at 224x224 and 1000 classes.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fathom_jax import config as config_lib
from fathom_jax.errors import UsageError
from fathom_jax.workloads import base, vision

ModuleDef = Any

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


def local_response_norm(x, size: int, bias: float, alpha: float, beta: float):
  """Krizhevsky's normalisation across channels: x / (bias + alpha * sum of x^2 over a window
  of `size` channels centred on each)^beta, zero beyond the edges."""
  r = size // 2
  window_sum = jax.lax.reduce_window(x * x, 0.0, jax.lax.add, (1, 1, 1, size), (1, 1, 1, 1),
                                     ((0, 0), (0, 0), (0, 0), (r, r)))
  return x / (bias + alpha * window_sum) ** beta


class AlexNet(nn.Module):
  config: Config
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  dense: ModuleDef = nn.Dense

  @nn.compact
  def __call__(self, images, train: bool):
    c = self.config
    conv = lambda n, k, s, p: self.conv(n, (k, k), (s, s), [(p, p), (p, p)], dtype=self.dtype,
                                        kernel_init=vision.CONV_INIT)
    lrn = lambda x: local_response_norm(x, c.lrn_size, c.lrn_bias, c.lrn_alpha, c.lrn_beta)
    pool = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2))  # overlapping pooling
    c1, c2, c3, c4, c5 = c.conv_channels
    x = images.astype(self.dtype)
    x = pool(lrn(nn.relu(conv(c1, 11, 4, 2)(x))))
    x = pool(lrn(nn.relu(conv(c2, 5, 1, 2)(x))))
    x = nn.relu(conv(c3, 3, 1, 1)(x))
    x = nn.relu(conv(c4, 3, 1, 1)(x))
    x = pool(nn.relu(conv(c5, 3, 1, 1)(x)))
    x = vision.adaptive_avg_pool(x, c.pooled_size)
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      x = nn.Dropout(c.dropout, deterministic=not train)(x)
      x = nn.relu(self.dense(c.fc_width, dtype=self.dtype, kernel_init=vision.HIDDEN_INIT)(x))
    return self.dense(c.num_classes, dtype=self.dtype, kernel_init=vision.CLASSIFIER_INIT)(x)


def build(config: Config, dtype: str) -> base.Model:
  return vision.build_classifier(AlexNet(config, jnp.dtype(dtype)), config)


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
