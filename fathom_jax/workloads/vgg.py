"""vgg: Simonyan & Zisserman (2014), configurations A (11), B (13), D (16) and E (19 layers).

Five blocks of 3x3 convolutions (stride 1, padding 1, ReLU) each followed by 2x2/2 max pooling,
widths 64-128-256-512-512; (adaptive average pool to 7x7); fc 4096 - fc 4096 - fc classes with
ReLU and dropout 0.5 on the hidden fc layers. VGG-19 has 143,667,240 parameters at 224x224 and
1000 classes, VGG-16 138,357,544.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fathom_jax import config as config_lib
from fathom_jax.errors import UsageError
from fathom_jax.workloads import base, vision

ModuleDef = Any

nonneg = config_lib.nonneg

# Convolutions per block, by depth (conv layers + 3 fc layers).
BLOCKS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
WIDTH_FACTORS = (1, 2, 4, 8, 8)


@dataclasses.dataclass(frozen=True)
class Config:
  depth: int = 19
  image_size: int = 224
  num_classes: int = 1000
  base_width: int = 64  # first block's channels; later blocks 2x, 4x, 8x, 8x
  fc_width: int = 4096
  pooled_size: int = 7  # spatial size fed to the first fc layer (7x7 at 224x224)
  dropout: float = nonneg(0.5)
  batch_size: int = 8
  optimizer: str = "sgd"
  learning_rate: float = 0.01  # SGD's rate at a batch of lr_batch_size (the paper's)
  lr_batch_size: int = 256  # SGD's rate scales linearly with batch_size / lr_batch_size
  momentum: float = nonneg(0.9)
  weight_decay: float = nonneg(5e-4)

  def check(self):
    vision.check_optimizer(self.optimizer)
    if self.depth not in BLOCKS:
      raise UsageError(f"config field 'depth' must be one of {', '.join(map(str, BLOCKS))}, "
                       f"got {self.depth}")
    if self.dropout >= 1:
      raise UsageError(f"config field 'dropout' must be below 1, got {self.dropout}")
    vision.check_image_size(self.image_size, [(2, 2, 0)] * 5, "vgg")


PRESETS = {
    "paper": Config(),
    "small": Config(image_size=64, num_classes=10, base_width=16, fc_width=512, pooled_size=2,
                    batch_size=16),
    "tiny": Config(image_size=32, num_classes=4, base_width=4, fc_width=128, pooled_size=1,
                   batch_size=8, lr_batch_size=8),
}


class VGG(nn.Module):
  config: Config
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  dense: ModuleDef = nn.Dense

  @nn.compact
  def __call__(self, images, train: bool):
    c = self.config
    conv = functools.partial(self.conv, kernel_size=(3, 3), padding=[(1, 1), (1, 1)],
                             dtype=self.dtype, kernel_init=vision.CONV_INIT)
    x = images.astype(self.dtype)
    for convs, factor in zip(BLOCKS[c.depth], WIDTH_FACTORS):
      for _ in range(convs):
        x = nn.relu(conv(c.base_width * factor)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = vision.adaptive_avg_pool(x, c.pooled_size)
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      x = nn.relu(self.dense(c.fc_width, dtype=self.dtype, kernel_init=vision.HIDDEN_INIT)(x))
      x = nn.Dropout(c.dropout, deterministic=not train)(x)
    return self.dense(c.num_classes, dtype=self.dtype, kernel_init=vision.CLASSIFIER_INIT)(x)


def build(config: Config, dtype: str) -> base.Model:
  return vision.build_classifier(VGG(config, jnp.dtype(dtype)), config)


WORKLOAD = base.Workload(
    name="vgg",
    description="VGG (Simonyan & Zisserman 2014), configuration E (19 layers) by default; 224x224",
    config_cls=Config,
    presets=PRESETS,
    build=build,
    load_data=vision.load_data,
    example_unit="images",
    large_host_buffers=True,
)
