"""deepq for XLA's CPU backend: Eigen for its convolutions."""

import dataclasses

from fathom_jax.tuned import layers
from fathom_jax.workloads import base, deepq


def build(config: deepq.Config, dtype: str) -> base.Model:
  return dataclasses.replace(deepq.build(config, dtype),
                             compiler_options={("cpu", "train"): layers.EIGEN_CONVOLUTIONS})
