"""VGG for XLA's CPU backend: convolutions by `layers.Conv` (1x1 as matmuls, 3x3 by Winograd
where it pays), max pooling whose gradient writes the window offsets out, dense layers with few
rows by `layers.Dense`, the cross-entropy of `softmax`, and Eigen for the library kernels."""

import flax.linen as nn
import jax.numpy as jnp

from fathom_jax.tuned import layers, softmax
from fathom_jax.workloads import base, vgg, vision


Options = layers.ConvOptions


class VGG(nn.Module):
  config: vgg.Config
  dtype: jnp.dtype = jnp.float32
  options: Options = Options()

  @nn.compact
  def __call__(self, images, train: bool):
    c = self.config
    x = images.astype(self.dtype)
    for convs, factor in zip(vgg.BLOCKS[c.depth], vgg.WIDTH_FACTORS):
      for _ in range(convs):
        conv = layers.Conv(c.base_width * factor, (3, 3), padding=[(1, 1), (1, 1)],
                           dtype=self.dtype, kernel_init=vision.CONV_INIT,
                           winograd=self.options.winograd)
        x = nn.relu(conv(x))
      x = layers.max_pool(x, 2, 2, replicated=layers.param_element(conv, "kernel"))
    x = vision.adaptive_avg_pool(x, c.pooled_size)
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      x = nn.relu(layers.Dense(c.fc_width, dtype=self.dtype, kernel_init=vision.HIDDEN_INIT,
                               few_rows=True)(x))
      x = nn.Dropout(c.dropout, deterministic=not train)(x)
    return layers.Dense(c.num_classes, dtype=self.dtype, kernel_init=vision.CLASSIFIER_INIT,
                        few_rows=True)(x)


def build(config: vgg.Config, dtype: str, options: Options = Options()) -> base.Model:
  return vision.build_classifier(
      VGG(config, jnp.dtype(dtype), options), config, softmax.classifier_loss,
      {("cpu", "train"): layers.EIGEN_CONVOLUTIONS, ("cpu", "infer"): layers.EIGEN_ONLY})
