"""A real profiler trace, recorded in a process of its own, for the trace tests."""

import json
import subprocess
import sys

TRIPS = 7


# Recorded in a process of its own: a trace embeds the HLO of every program its process has
# compiled, and after other tests' models that is megabytes, slow to record and to read.
_RECORD = """
import json, sys, time
import jax, jax.numpy as jnp
from fathom_jax import scopes
logdir, hlo_path, steps, annotate, embed_hlo, stalled_step = json.loads(sys.argv[1])

def program(x, w):
  def body(i, c):
    return jnp.tanh(c @ w)
  y = jax.lax.fori_loop(0, %d, body, x)
  with jax.named_scope(scopes.OPTIMIZATION):
    y = y * 0.5 + 1.0
  return y.sum()

f = jax.jit(program)
x, w = jnp.ones((64, 64)), jnp.full((64, 64), 0.01)
compiled = f.lower(x, w).compile()
compiled(x, w).block_until_ready()
options = jax.profiler.ProfileOptions()
options.python_tracer_level = 0
options.enable_hlo_proto = embed_hlo
with jax.profiler.trace(logdir, profiler_options=options):
  for i in range(steps):
    if annotate:
      with jax.profiler.StepTraceAnnotation("train", step_num=i):
        compiled(x, w).block_until_ready()
        if i == stalled_step:
          time.sleep(0.3)
    else:
      compiled(x, w).block_until_ready()
with open(hlo_path, "w") as f:
  f.write(compiled.as_text())
""" % TRIPS


def record(logdir, steps=3, annotate=True, embed_hlo=True, stalled_step=None) -> str:
  """Traces `steps` runs of a jitted program (a loop of TRIPS iterations, then a named scope)
  into `logdir`; returns the compiled program's HLO text."""
  hlo_path = f"{logdir}.hlo.txt"
  arguments = json.dumps([str(logdir), hlo_path, steps, annotate, embed_hlo, stalled_step])
  subprocess.run([sys.executable, "-c", _RECORD, arguments], check=True, timeout=300)
  with open(hlo_path) as f:
    return f.read()
