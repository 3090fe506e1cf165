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


def _mlp(params, x):
  hidden = jax.nn.relu(x @ params["w1"])  # (batch, 256): the largest product
  return hidden @ params["w2"]  # (batch, 8)


def _mlp_shapes(batch):
  params = {"w1": jax.ShapeDtypeStruct((32, 256), jnp.float32),
            "w2": jax.ShapeDtypeStruct((256, 8), jnp.float32),
            "unused": jax.ShapeDtypeStruct((1000, 1000), jnp.float32)}
  return params, jax.ShapeDtypeStruct((batch, 32), jnp.float32)


def test_memory_floor_counts_read_arguments_and_the_largest_product():
  params, x = _mlp_shapes(64)
  traced = jax.jit(_mlp).trace(params, x)
  weights, batch, hidden = (32 * 256 + 256 * 8) * 4, 64 * 32 * 4, 64 * 256 * 4
  assert compiling.memory_floor_bytes(traced.jaxpr, (params, x), (1,)) == \
      weights + batch + hidden
  # Split across devices: the batch and the values it makes, not the weights.
  assert compiling.memory_floor_bytes(traced.jaxpr, (params, x), (1,), num_devices=4) == \
      weights + (batch + hidden) // 4


def test_memory_floor_looks_inside_loops_and_never_exceeds_the_compilers_figure():
  def scanned(params, xs):
    def body(carry, x):
      return carry + _mlp(params, x).sum(), None
    return jax.lax.scan(body, 0.0, xs)[0]
  params, x = _mlp_shapes(64)
  xs = jax.ShapeDtypeStruct((5,) + x.shape, x.dtype)
  for fn, args in ((_mlp, (params, x)), (scanned, (params, xs)),
                   (jax.grad(lambda p, x: _mlp(p, x).sum()), (params, x))):
    traced = jax.jit(fn).trace(*args)
    floor = compiling.memory_floor_bytes(traced.jaxpr, args, (1,))
    assert floor >= 64 * 256 * 4  # the hidden layer, inside the loop too
    memory = compiling.memory_analysis(traced.lower().compile())
    assert floor <= compiling.bytes_needed(memory), (fn, floor, memory)
