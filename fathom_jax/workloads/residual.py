"""residual: deep residual networks (He, Zhang, Ren & Sun 2015), ImageNet layout.

Stem conv 7x7/2 64 - BN - ReLU - max pool 3x3/2, then four stages of residual blocks at widths
64-128-256-512 (bottleneck blocks expand 4x), the first block of stages 2-4 downsampling with
stride 2 and a projection shortcut (1x1 conv + BN, option B) wherever the shape changes; global
average pool; fc classes. Batch normalisation after every convolution: batch statistics in
training (the running averages are returned as state updates), running averages in inference.
Depth 50 ([3, 4, 6, 3] bottlenecks) has 25,557,032 trainable parameters at 1000 classes.
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

# depth -> (bottleneck?, blocks per stage)
DEPTHS = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}


@dataclasses.dataclass(frozen=True)
class Config:
  depth: int = 50
  image_size: int = 224
  num_classes: int = 1000
  base_width: int = 64  # stem and first stage; later stages 2x, 4x, 8x
  # He et al. stride the first 1x1 conv of a downsampling bottleneck; torchvision ("v1.5")
  # strides its 3x3 conv instead. Same parameters, different FLOPs.
  stride_in_3x3: bool = False
  bn_momentum: float = 0.9  # running average decay (torch momentum 0.1)
  bn_epsilon: float = 1e-5
  batch_size: int = 16
  optimizer: str = "sgd"
  learning_rate: float = 0.1  # SGD's rate at a batch of lr_batch_size (the paper's)
  lr_batch_size: int = 256  # SGD's rate scales linearly with batch_size / lr_batch_size
  momentum: float = nonneg(0.9)
  weight_decay: float = nonneg(1e-4)

  def check(self):
    vision.check_optimizer(self.optimizer)
    if self.depth not in DEPTHS:
      raise UsageError(f"config field 'depth' must be one of {', '.join(map(str, DEPTHS))}, "
                       f"got {self.depth}")
    if not 0 < self.bn_momentum < 1:
      raise UsageError(f"config field 'bn_momentum' must be in (0, 1), got {self.bn_momentum}")
    # stem conv, max pool, then three stride-2 stages.
    vision.check_image_size(self.image_size, [(7, 2, 3), (3, 2, 1)] + [(3, 2, 1)] * 3, "residual")


PRESETS = {
    "paper": Config(),
    "small": Config(image_size=64, num_classes=10, base_width=16, batch_size=16),
    "tiny": Config(image_size=32, num_classes=4, base_width=4, batch_size=8,
                   learning_rate=0.03, lr_batch_size=8),
}


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""
  width: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    s = self.stride
    y = nn.relu(self.norm()(self.conv(self.width, (3, 3), (s, s), [(1, 1), (1, 1)])(x)))
    y = self.norm()(self.conv(self.width, (3, 3), (1, 1), [(1, 1), (1, 1)])(y))
    return nn.relu(y + shortcut(x, self.width, s, self.conv, self.norm))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (4x) (ResNet-50/101/152)."""
  width: int
  stride: int
  stride_in_3x3: bool
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    s = self.stride
    s1, s3 = (1, s) if self.stride_in_3x3 else (s, 1)
    y = nn.relu(self.norm()(self.conv(self.width, (1, 1), (s1, s1), "VALID")(x)))
    y = nn.relu(self.norm()(self.conv(self.width, (3, 3), (s3, s3), [(1, 1), (1, 1)])(y)))
    y = self.norm()(self.conv(4 * self.width, (1, 1), (1, 1), "VALID")(y))
    return nn.relu(y + shortcut(x, 4 * self.width, s, self.conv, self.norm))


def shortcut(x, features: int, stride: int, conv: ModuleDef, norm: ModuleDef):
  """Identity where shapes agree, else a strided 1x1 projection with batch norm."""
  if stride == 1 and x.shape[-1] == features:
    return x
  return norm()(conv(features, (1, 1), (stride, stride), "VALID")(x))


class ResNet(nn.Module):
  config: Config
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, images, train: bool):
    c = self.config
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=vision.CONV_INIT)
    norm = functools.partial(self.norm, use_running_average=not train, momentum=c.bn_momentum,
                             epsilon=c.bn_epsilon, dtype=self.dtype)
    bottleneck, stages = DEPTHS[c.depth]
    x = images.astype(self.dtype)
    x = nn.relu(norm()(conv(c.base_width, (7, 7), (2, 2), [(3, 3), (3, 3)])(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(stages):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        width = c.base_width * 2**i
        if bottleneck:
          x = Bottleneck(width, stride, c.stride_in_3x3, conv, norm)(x)
        else:
          x = BasicBlock(width, stride, conv, norm)(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(c.num_classes, dtype=self.dtype)(x)


def build(config: Config, dtype: str) -> base.Model:
  return vision.build_classifier(ResNet(config, jnp.dtype(dtype)), config)


WORKLOAD = base.Workload(
    name="residual",
    description="ResNet-50 (He et al. 2015) with batch norm, bottleneck blocks [3, 4, 6, 3]; 224x224",
    config_cls=Config,
    presets=PRESETS,
    build=build,
    load_data=vision.load_data,
    example_unit="images",
    large_host_buffers=True,
)
