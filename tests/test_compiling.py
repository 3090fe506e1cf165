"""One-shot programs: the values jit gives, to float32 rounding, and the same every time."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fathom_jax import compiling


def _init(rng, shape):
  a, b = jax.random.split(rng)
  return {"normal": jax.random.normal(a, shape), "bits": jax.random.bits(b, shape),
          "scaled": jax.random.truncated_normal(b, -2.0, 2.0, shape) * 0.02}


def test_run_once_gives_jits_values_and_repeats_them():
  init = functools.partial(_init, shape=(64, 32))
  key = jax.random.key(3)
  once, again, jitted = compiling.run_once(init, key), compiling.run_once(init, key), \
      jax.jit(init)(key)
  np.testing.assert_array_equal(once["bits"], jitted["bits"])  # integer work: exact
  for name in ("normal", "scaled"):
    np.testing.assert_allclose(once[name], jitted[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(once[name], again[name])


def test_run_once_places_the_result_as_asked():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  out = compiling.run_once(lambda x: x * 2, jnp.arange(4.0), out_shardings=replicated)
  assert out.sharding == replicated
  np.testing.assert_array_equal(out, [0.0, 2.0, 4.0, 6.0])


def test_one_shot_options_are_valid_for_their_platform():
  # A misspelt option would fail every run's initialisation on that platform.
  for platform, options in compiling.ONE_SHOT_COMPILER_OPTIONS.items():
    if platform == jax.default_backend():
      jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options=options)
