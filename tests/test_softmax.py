"""The softmax classifier's ops compute what jnp.argmax, optax and autodiff compute."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fathom_jax.tuned import softmax


@pytest.mark.parametrize("shape", [(7,), (3, 11), (2, 4, 50)])
def test_argmax_matches_jnp_on_random_rows(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  np.testing.assert_array_equal(jax.jit(softmax.argmax)(x), jnp.argmax(x, -1))


def test_argmax_takes_the_first_of_tied_maxima_and_a_nan_as_the_maximum():
  x = jnp.array([[1.0, 3.0, 3.0, 2.0],   # tie: the first
                 [4.0, 4.0, 4.0, 4.0],   # all tied
                 [1.0, jnp.nan, 5.0, jnp.nan],  # NaN wins, the first of them
                 [-jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf]])
  got = jax.jit(softmax.argmax)(x)
  np.testing.assert_array_equal(got, jnp.argmax(x, -1))
  np.testing.assert_array_equal(got, [1, 0, 1, 0])


def test_cross_entropy_and_its_gradient_match_optax():
  logits = 4 * jax.random.normal(jax.random.key(1), (3, 5, 37))
  labels = jax.random.randint(jax.random.key(2), (3, 5), 0, 37)
  weights = jax.random.uniform(jax.random.key(3), (3, 5))
  ours = lambda z: (softmax.cross_entropy(z, labels) * weights).sum()
  reference = lambda z: (optax.softmax_cross_entropy_with_integer_labels(z, labels)
                         * weights).sum()
  np.testing.assert_allclose(jax.jit(ours)(logits), reference(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(ours))(logits), jax.grad(reference)(logits),
                             rtol=1e-5, atol=1e-7)


def test_cross_entropy_is_stable_for_large_logits():
  logits = jnp.array([[1000.0, 0.0, -1000.0]])
  np.testing.assert_allclose(softmax.cross_entropy(logits, jnp.array([0])), [0.0], atol=1e-6)
  np.testing.assert_allclose(softmax.cross_entropy(logits, jnp.array([1])), [1000.0])
  assert np.isfinite(jax.grad(lambda z: softmax.cross_entropy(z, jnp.array([2])).sum())(logits)).all()


def test_logits_and_their_gradients_match_autodiff():
  k = jax.random.split(jax.random.key(4), 4)
  x, kernel = jax.random.normal(k[0], (2, 3, 8)), jax.random.normal(k[1], (8, 13))
  bias, probe = jax.random.normal(k[2], (13,)), jax.random.normal(k[3], (2, 3, 13))
  ours = lambda *a: (softmax.logits(*a) * probe).sum()
  reference = lambda x, w, b: ((x @ w + b) * probe).sum()
  np.testing.assert_allclose(softmax.logits(x, kernel, bias), x @ kernel + bias, rtol=1e-6)
  for got, want in zip(jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, kernel, bias),
                       jax.grad(reference, argnums=(0, 1, 2))(x, kernel, bias)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _optimized_hlo(f, *args):
  return jax.jit(f).lower(*args).compile().as_text()


def test_argmax_compiles_without_a_value_index_reduction():
  """jnp.argmax is one reduction over (value, index) pairs, which XLA's CPU backend runs an
  element at a time; ours is two plain reductions."""
  x = jnp.zeros((4, 50, 300))
  variadic = re.compile(r"= \([^)]*\) reduce\(")
  assert variadic.search(_optimized_hlo(lambda v: jnp.argmax(v, -1), x))
  assert not variadic.search(_optimized_hlo(softmax.argmax, x))


def test_cross_entropy_gradient_compiles_without_a_scatter():
  logits, labels = jnp.zeros((4, 50, 300)), jnp.zeros((4, 50), jnp.int32)
  grad = lambda ce: jax.grad(lambda z: ce(z, labels).sum())
  assert " scatter(" in _optimized_hlo(
      grad(optax.softmax_cross_entropy_with_integer_labels), logits)
  assert " scatter(" not in _optimized_hlo(grad(softmax.cross_entropy), logits)
