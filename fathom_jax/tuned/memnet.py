"""memnet for XLA's CPU backend: the cross-entropy and argmax of `softmax`, and YNNPACK for
products only."""

import dataclasses
import functools

from fathom_jax.tuned import layers, softmax
from fathom_jax.workloads import base, memnet


def build(config: memnet.Config, dtype: str) -> base.Model:
  # YNNPACK's reductions (the position-weighted sums of word vectors) were the slower ones.
  options = layers.ynnpack("convolution", "dot")
  model = memnet.build(config, dtype)
  loss = functools.partial(memnet.cross_entropy, per_example=softmax.cross_entropy,
                           argmax=softmax.argmax)
  return dataclasses.replace(model, loss=loss, compiler_options={("cpu", "train"): options,
                                                                ("cpu", "infer"): options})
