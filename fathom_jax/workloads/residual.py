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
from fathom_jax.workloads import base, layers, vision

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
  winograd: bool = True  # 3x3 stride-1 convolutions by Winograd's algorithm on CPU, where it pays
  # Stages (0-3) whose activations the train step stores CHWN, not NHWC: each 1x1 kernel
  # gradient then contracts two operands contiguous along the pixels (`layers.conv2d`). Same
  # parameters and arithmetic. Inference keeps NHWC, whose forward products ran faster.
  channels_first_stages: tuple[int, ...] = nonneg((0, 1, 2))

  def check(self):
    vision.check_optimizer(self.optimizer)
    if not set(self.channels_first_stages) <= {0, 1, 2, 3}:
      raise UsageError("config field 'channels_first_stages' takes stage numbers 0-3, got "
                       f"{self.channels_first_stages}")
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
  conv: Any
  norm: Any
  channel_axis: int  # 0 for CHWN activations, -1 for NHWC

  @nn.compact
  def __call__(self, x):
    s = self.stride
    y = bn_relu(self.norm, self.conv(self.width, (3, 3), (s, s), [(1, 1), (1, 1)])(x))
    bn = self.norm()
    y = bn(self.conv(self.width, (3, 3), (1, 1), [(1, 1), (1, 1)])(y))
    return relu(y + shortcut(x, self.width, s, self.conv, self.norm, self.channel_axis), bn)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (4x) (ResNet-50/101/152)."""
  width: int
  stride: int
  stride_in_3x3: bool
  conv: Any
  norm: Any
  channel_axis: int  # 0 for CHWN activations, -1 for NHWC

  @nn.compact
  def __call__(self, x):
    s = self.stride
    s1, s3 = (1, s) if self.stride_in_3x3 else (s, 1)
    y = bn_relu(self.norm, self.conv(self.width, (1, 1), (s1, s1), "VALID")(x))
    y = bn_relu(self.norm, self.conv(self.width, (3, 3), (s3, s3), [(1, 1), (1, 1)])(y))
    bn = self.norm()
    y = bn(self.conv(4 * self.width, (1, 1), (1, 1), "VALID")(y))
    return relu(y + shortcut(x, 4 * self.width, s, self.conv, self.norm, self.channel_axis),
                bn)


def relu(x, bn):
  """nn.relu(x), written to memory once on CPU (`layers.materialize`)."""
  return layers.materialize(nn.relu(x), layers.param_element(bn, "scale"))


def bn_relu(norm, x):
  bn = norm()
  return relu(bn(x), bn)


def shortcut(x, features: int, stride: int, conv, norm, channel_axis: int):
  """Identity where shapes agree, else a strided 1x1 projection with batch norm."""
  if stride == 1 and x.shape[channel_axis] == features:
    return x
  return norm()(conv(features, (1, 1), (stride, stride), "VALID")(x))


class ResNet(nn.Module):
  config: Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool):
    c = self.config
    base_conv = functools.partial(layers.Conv, use_bias=False, dtype=self.dtype,
                                  kernel_init=vision.CONV_INIT, winograd=c.winograd)
    base_norm = functools.partial(layers.BatchNorm, use_running_average=not train,
                                  momentum=c.bn_momentum, epsilon=c.bn_epsilon, dtype=self.dtype)
    bottleneck, stages = DEPTHS[c.depth]
    x = images.astype(self.dtype)
    stem_bn = base_norm()
    x = relu(stem_bn(base_conv(c.base_width, (7, 7), (2, 2), [(3, 3), (3, 3)])(x)), stem_bn)
    x = layers.max_pool(x, 3, 2, 1, replicated=layers.param_element(stem_bn, "scale"))
    first = False
    for i, blocks in enumerate(stages):
      if (train and i in c.channels_first_stages) != first:
        first = not first
        # NHWC <-> CHWN, each side written out whole
        x = layers.relayout(x, (3, 1, 2, 0), layers.param_element(stem_bn, "scale"))
      channel_axis = 0 if first else -1
      conv = functools.partial(base_conv, channels_first=first)
      norm = functools.partial(base_norm, axis=channel_axis)
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        width = c.base_width * 2**i
        if bottleneck:
          x = Bottleneck(width, stride, c.stride_in_3x3, conv, norm, channel_axis)(x)
        else:
          x = BasicBlock(width, stride, conv, norm, channel_axis)(x)
    x = x.mean(axis=(1, 2))  # (batch, channels), or (channels, batch) from CHWN
    if first:
      x = x.T
    return nn.Dense(c.num_classes, dtype=self.dtype)(x)


def build(config: Config, dtype: str) -> base.Model:
  module = ResNet(config, jnp.dtype(dtype))

  def init(rng, batch):
    return module.init(rng, batch["images"], train=False)

  def apply(variables, batch, *, train, rng):
    del rng  # no dropout or sampling
    if train:
      logits, updates = module.apply(variables, batch["images"], train=True,
                                     mutable=["batch_stats"])
      return logits, dict(updates)
    return module.apply(variables, batch["images"], train=False), {}

  return base.Model(
      init=init, apply=apply, loss=vision.cross_entropy,
      optimizer=vision.make_optimizer(config),
      synthetic_batch=lambda rng, n: vision.synthetic_batch(
          config.image_size, config.num_classes, rng, n),
      compiler_options={("cpu", "train"): layers.EIGEN_CONVOLUTIONS,
                        ("cpu", "infer"): layers.EIGEN_CONVOLUTIONS})


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
