"""ResNet for XLA's CPU backend: convolutions by `layers.Conv` (1x1 as matmuls, 3x3 by Winograd
where it pays), batch norm with its gradient in closed form, each ReLU written to memory once,
max pooling whose gradient writes the window offsets out, the training step's early stages
stored channels first (CHWN), the cross-entropy of `softmax`, and Eigen's convolutions."""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fathom_jax import config as config_lib
from fathom_jax.errors import UsageError
from fathom_jax.tuned import layers, softmax
from fathom_jax.workloads import base, residual, vision


@dataclasses.dataclass(frozen=True)
class Options(layers.ConvOptions):
  # The stages (0-3) whose activations the train step stores CHWN, not NHWC, so that each 1x1
  # kernel gradient contracts two operands contiguous along the pixels (same parameters and
  # arithmetic; inference keeps NHWC, whose products ran faster).
  channels_first_stages: tuple[int, ...] = config_lib.nonneg((0, 1, 2))

  def check(self):
    if not set(self.channels_first_stages) <= {0, 1, 2, 3}:
      raise UsageError("option 'channels_first_stages' takes stage numbers 0-3, got "
                       f"{self.channels_first_stages}")


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
  config: residual.Config
  dtype: jnp.dtype = jnp.float32
  options: Options = Options()

  @nn.compact
  def __call__(self, images, train: bool):
    c = self.config
    base_conv = functools.partial(layers.Conv, use_bias=False, dtype=self.dtype,
                                  kernel_init=vision.CONV_INIT, winograd=self.options.winograd)
    base_norm = functools.partial(layers.BatchNorm, use_running_average=not train,
                                  momentum=c.bn_momentum, epsilon=c.bn_epsilon, dtype=self.dtype)
    bottleneck, stages = residual.DEPTHS[c.depth]
    x = images.astype(self.dtype)
    stem_bn = base_norm()
    x = relu(stem_bn(base_conv(c.base_width, (7, 7), (2, 2), [(3, 3), (3, 3)])(x)), stem_bn)
    x = layers.max_pool(x, 3, 2, 1, replicated=layers.param_element(stem_bn, "scale"))
    first = False
    for i, blocks in enumerate(stages):
      if (train and i in self.options.channels_first_stages) != first:
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


def build(config: residual.Config, dtype: str, options: Options = Options()) -> base.Model:
  eigen = layers.EIGEN_CONVOLUTIONS
  return vision.build_classifier(ResNet(config, jnp.dtype(dtype), options), config,
                                 softmax.classifier_loss,
                                 {("cpu", "train"): eigen, ("cpu", "infer"): eigen})
