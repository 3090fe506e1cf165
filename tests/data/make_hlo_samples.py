"""Writes the HLO samples in this folder by compiling small real programs on the CPU.

  python tests/data/make_hlo_samples.py

Each sample is what jax 0.10.2 / XLA:CPU printed for the program below of the same name:
`<name>.hlo.txt` is the optimised module (compiled.as_text()), `conv_net.unoptimized.hlo.txt`
the pre-optimisation one (lowered.as_text(dialect="hlo")). The collective runs in a subprocess
with two CPU devices, since the device count must be set before JAX starts.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def conv_net():
  import jax
  import jax.numpy as jnp
  from fathom_jax import scopes

  def loss(params, x, y):
    h = jax.lax.conv_general_dilated(x, params["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h)
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    logits = h.reshape(h.shape[0], -1) @ params["w"]
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, -1))

  def step(params, x, y):
    grads = jax.grad(loss)(params, x, y)
    with jax.named_scope(scopes.OPTIMIZATION):
      return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  params = {"k": jnp.ones((3, 3, 2, 4)), "w": jnp.ones((4 * 4 * 4, 3))}
  x, y = jnp.ones((2, 8, 8, 2)), jnp.ones((2, 3))
  lowered = jax.jit(step).lower(params, x, y)
  return lowered, (params, x, y)


def dot():
  import jax
  import jax.numpy as jnp
  f = lambda a, b, c: jnp.tanh(a @ b + c)
  return jax.jit(f).lower(jnp.ones((16, 32)), jnp.ones((32, 8)), jnp.ones((8,))), None


def while_loop():
  import jax
  import jax.numpy as jnp

  def f(x, w):
    return jax.lax.fori_loop(0, 5, lambda i, c: jnp.tanh(c @ w), x).sum()

  return jax.jit(f).lower(jnp.ones((8, 8)), jnp.ones((8, 8))), None


def reduce_window():
  import jax
  import jax.numpy as jnp

  def f(x):
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")

  return jax.jit(f).lower(jnp.ones((2, 9, 9, 4))), None


def random_sampling():
  import jax
  import jax.numpy as jnp
  from fathom_jax import scopes

  def f(key, x):
    with jax.named_scope(scopes.RANDOM):
      noise = jax.random.uniform(key, x.shape)
    return x + noise

  return jax.jit(f).lower(jax.random.key(0), jnp.ones((4, 4))), None


COLLECTIVE = """
import jax, jax.numpy as jnp, numpy as np, sys
jax.config.update("jax_num_cpu_devices", 2)
from jax.sharding import Mesh, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("d",))
f = jax.shard_map(lambda x: jax.lax.psum(x * 2.0, "d"), mesh=mesh, in_specs=P("d"),
                  out_specs=P())
sys.stdout.write(jax.jit(f).lower(jnp.ones((8, 4))).compile().as_text())
"""


def main():
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  for name in ("conv_net", "dot", "while_loop", "reduce_window", "random_sampling"):
    lowered, _ = globals()[name]()
    with open(os.path.join(HERE, f"{name}.hlo.txt"), "w") as f:
      f.write(lowered.compile().as_text())
    if name == "conv_net":
      with open(os.path.join(HERE, f"{name}.unoptimized.hlo.txt"), "w") as f:
        f.write(lowered.as_text(dialect="hlo"))
  text = subprocess.run([sys.executable, "-c", COLLECTIVE], check=True, capture_output=True,
                        text=True).stdout
  with open(os.path.join(HERE, "collective.hlo.txt"), "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
