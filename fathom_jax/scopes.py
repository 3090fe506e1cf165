"""Scopes that state a Fathom class: the one convention between a measured program and the
analysis that reads it.

Some work lowers to HLO that does not say what it is: an optimizer's update and random sampling
are plain elementwise ops, a convolution computed by Winograd's algorithm is matmuls, a matmul
handed to a convolution kernel is a convolution. Any JAX program states the class of such code
by running it under a named scope from here:

    with jax.named_scope(scopes.OPTIMIZATION):
      updates, opt_state = optimizer.update(grads, opt_state, params)

The scope's name ("fathom.optimization", ...) reaches the `op_name` metadata of every HLO
instruction traced inside it, before and after optimisation, and the analysis
(`fathom_jax.analysis.categories`) files those instructions under that class. The innermost
such scope wins. Nothing else about a program's names is read.
"""

import re
from typing import Optional

PREFIX = "fathom."

OPTIMIZATION = PREFIX + "optimization"  # a parameter update
RANDOM = PREFIX + "random"  # drawing random numbers
CONVOLUTION = PREFIX + "convolution"  # a convolution, however it is computed
MATRIX = PREFIX + "matrix"  # a matrix product, however it is computed

SCOPES = (OPTIMIZATION, RANDOM, CONVOLUTION, MATRIX)

_SCOPE = re.compile(r"(?:^|/)(" + "|".join(re.escape(s) for s in SCOPES) + r")(?=/|$)")


def innermost(op_name: Optional[str]) -> Optional[str]:
  """The innermost class scope in an op_name ('jit(step)/fathom.optimization/add'), or None."""
  found = _SCOPE.findall(op_name or "")
  return found[-1] if found else None
