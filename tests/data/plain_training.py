"""A training loop as anyone writes it with flax and optax, profiled with jax.profiler: no
fathom_jax, no named scopes. Usage: python plain_training.py <trace_dir>"""

import sys

import flax.linen as nn
import jax
import optax


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(10)(x)


def main(trace_dir: str) -> None:
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (128, 64))
  y = jax.random.randint(jax.random.key(1), (128,), 0, 10)
  params = model.init(jax.random.key(2), x)
  optimizer = optax.adamw(1e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(params):
      logits = model.apply(params, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, loss = train_step(params, opt_state, x, y)  # compile outside the trace
  jax.block_until_ready(loss)
  with jax.profiler.trace(trace_dir):
    for _ in range(5):
      params, opt_state, loss = train_step(params, opt_state, x, y)
    jax.block_until_ready(loss)


if __name__ == "__main__":
  main(sys.argv[1])
