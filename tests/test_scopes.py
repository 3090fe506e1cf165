"""The class-scope convention: what a program states in a scope is what the analysis reads."""

import jax
import jax.numpy as jnp
import pytest

from fathom_jax import scopes
from fathom_jax.analysis import categories, hlo


@pytest.mark.parametrize("op_name, want", [
    ("jit(step)/fathom.optimization/mul", scopes.OPTIMIZATION),
    ("jit(f)/fathom.random/jit(_uniform)/slice", scopes.RANDOM),
    ("jit(f)/fathom.optimization/fathom.random/add", scopes.RANDOM),  # the innermost wins
    ("jit(f)/fathom.matrix", scopes.MATRIX),
    ("jit(f)/fathom.convolutions/add", None),  # a scope's name is matched whole
    ("jit(f)/my.fathom.matrix/add", None),
    ("jit(f)/optimizer/add", None), (None, None), ("", None)])
def test_innermost_scope(op_name, want):
  assert scopes.innermost(op_name) == want


def test_every_scope_states_a_class():
  assert set(categories.SCOPE_CLASSES) == set(scopes.SCOPES)
  assert set(categories.SCOPE_CLASSES.values()) <= set(categories.CLASSES)


def test_any_program_states_its_classes_through_the_scopes():
  # A plain JAX program, no fathom_jax code in it but the scope names: a matmul stated to be a
  # convolution, a convolution stated to be a matrix product, an update stated as optimization.
  def step(w, x):
    with jax.named_scope(scopes.CONVOLUTION):
      y = jnp.tanh(x @ w)
    with jax.named_scope(scopes.MATRIX):
      z = jax.lax.conv_general_dilated(y[None, :, None, :], w[None, None], (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    loss = z.sum()
    with jax.named_scope(scopes.OPTIMIZATION):
      return w - 0.1 * loss * w
  w, x = jnp.ones((8, 8)), jnp.ones((4, 8))
  module = hlo.parse_module(jax.jit(step).lower(w, x).compile().as_text())
  stated, dots = set(), set()
  for comp in module.computations.values():
    for inst in comp.instructions:
      scope = scopes.innermost(inst.op_name)
      if scope is not None:
        assert categories.fathom_class(inst) == categories.SCOPE_CLASSES[scope], inst.name
        stated.add(scope)
      if inst.opcode == "dot":
        dots.add(categories.fathom_class(inst))
  assert stated == {scopes.CONVOLUTION, scopes.MATRIX, scopes.OPTIMIZATION}
  assert categories.CONVOLUTION in dots  # the matmul, stated to be a convolution
