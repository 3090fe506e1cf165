"""Pieces shared by the three image classifiers (alexnet, vgg, residual).

Images are NHWC float32, normalised with the ImageNet mean and standard deviation; labels are
int32 class indices. Loss is mean softmax cross-entropy; the optimizer is SGD with momentum (or
Adam) with L2 weight decay, as in the papers.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_jax import config as config_lib
from fathom_jax import images as images_lib
from fathom_jax.errors import UsageError
from fathom_jax.workloads import base

OPTIMIZERS = ("sgd", "adam")

# He et al. 2015 ("Delving deep into rectifiers"), fan-out as in the torchvision reference models.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
HIDDEN_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
CLASSIFIER_INIT = nn.initializers.normal(0.01)


def synthetic_batch(image_size: int, num_classes: int, rng, batch_size: int):
  """Uniform pixels in [0, 1], normalised like ImageNet images; uniform int32 labels."""
  image_rng, label_rng = jax.random.split(rng)
  pixels = jax.random.uniform(image_rng, (batch_size, image_size, image_size, 3))
  images = (pixels - images_lib.MEAN) / images_lib.STD
  labels = jax.random.randint(label_rng, (batch_size,), 0, num_classes, jnp.int32)
  return {"images": images, "labels": labels}


def cross_entropy(logits, batch, *,
                  per_example=optax.softmax_cross_entropy_with_integer_labels,
                  argmax=lambda x: jnp.argmax(x, -1)):
  """Mean softmax cross-entropy over the batch, and the top-1 accuracy."""
  logits = logits.astype(jnp.float32)
  loss = per_example(logits, batch["labels"]).mean()
  accuracy = (argmax(logits) == batch["labels"]).mean()
  return loss, {"accuracy": accuracy}


def make_optimizer(config) -> optax.GradientTransformation:
  """L2 weight decay added to the gradient, then SGD with momentum (the papers) or Adam.

  `config.learning_rate` is SGD's rate at the papers' batch of `config.lr_batch_size`; it is
  scaled linearly to `config.batch_size` (Goyal et al. 2017), so small benchmark batches train
  stably. Adam takes `learning_rate` as it is.
  """
  if config.optimizer == "sgd":
    rate = config.learning_rate * config.batch_size / config.lr_batch_size
    step = optax.sgd(rate, momentum=config.momentum or None)
  elif config.optimizer == "adam":
    step = optax.adam(config.learning_rate)
  else:
    check_optimizer(config.optimizer)
  if config.weight_decay:
    return optax.chain(optax.add_decayed_weights(config.weight_decay), step)
  return step


def check_optimizer(name: str) -> None:
  if name not in OPTIMIZERS:
    raise UsageError(f"config field 'optimizer' must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def window_output(size: int, window: int, stride: int, padding: int = 0) -> int:
  """Output length of a convolution or pooling window along one axis (0 if it does not fit)."""
  return max(0, (size + 2 * padding - window) // stride + 1)


def check_image_size(image_size: int, layers: Sequence[tuple[int, int, int]], model: str) -> int:
  """Walks (window, stride, padding) layers from `image_size`; rejects sizes that vanish."""
  size = image_size
  for window, stride, padding in layers:
    size = window_output(size, window, stride, padding)
    if size < 1:
      raise UsageError(f"config field 'image_size' = {image_size} is too small for {model}")
  return size


def _pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """Row i averages input positions [floor(i*in/out), ceil((i+1)*in/out)): adaptive pooling."""
  m = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, size: int):
  """Average-pools NHWC `x` to size x size, as torch's AdaptiveAvgPool2d.

  At the paper's image size the feature map already has this size and nothing is emitted; when
  the size divides evenly it is a plain average pool; otherwise the (exact) bin averages are
  taken with two small pooling matrices.
  """
  h, w = x.shape[1:3]
  if (h, w) == (size, size):
    return x
  if h % size == 0 and w % size == 0:
    return nn.avg_pool(x, (h // size, w // size), strides=(h // size, w // size))
  ph = jnp.asarray(_pool_matrix(h, size), x.dtype)
  pw = jnp.asarray(_pool_matrix(w, size), x.dtype)
  return jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x)


def load_data(config, path: str, bad_samples: str = "fail"):
  """An ImageNet-style folder; the number of classes comes from its sub-folders. A damaged image
  is found when first drawn and, with bad_samples='skip', left out and counted."""
  source = images_lib.ImageFolder(path, config.image_size, bad_samples=bad_samples)
  return source, config_lib.replace(config, num_classes=source.num_classes)


def build_classifier(module: nn.Module, config, loss=cross_entropy,
                     compiler_options=None) -> base.Model:
  """Model of an image classifier: `module(images, train)` -> logits. In training, dropout
  draws from `rng` and batch statistics (if any) come back as state updates."""

  def init(rng, batch):
    return module.init(rng, batch["images"], train=False)

  def apply(variables, batch, *, train, rng):
    if not train:
      return module.apply(variables, batch["images"], train=False), {}
    rngs = {"dropout": rng} if rng is not None else {}
    logits, updates = module.apply(variables, batch["images"], train=True, rngs=rngs,
                                   mutable=["batch_stats"])
    return logits, dict(updates)

  return base.Model(
      init=init, apply=apply, loss=loss, optimizer=make_optimizer(config),
      synthetic_batch=lambda rng, n: synthetic_batch(
          config.image_size, config.num_classes, rng, n),
      compiler_options=compiler_options or {})
