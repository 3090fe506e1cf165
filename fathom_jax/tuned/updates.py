"""Parameter updates ordered after the backward pass, where parameters are large (CPU)."""

import jax
import jax.numpy as jnp

from fathom_jax.tuned import layers

# Parameters of at least this many bytes in all: the train step orders every update after the
# backward pass (`after_backward`). Below it, a copy of the parameters costs less than the
# overlap of updates with the backward pass that the ordering gives up (deepq, 7 MB: 0.94x).
ORDERED_UPDATES_MIN_BYTES = 64 << 20


def after_backward(grads):
  """`grads` unchanged, on CPU each leaf now computed after all of them, where parameters are
  large.

  A donated parameter is updated in place, so the backward pass's reads of its old value must
  come first. Nothing orders a layer's input gradient, which reads its kernel, before the
  kernel's update, so XLA copied each such parameter every step (VGG-19: 575 MB). Adding to
  every leaf a zero that depends on all of them puts each update after the whole backward pass.
  The zero is a finite number times -0.0, which XLA cannot fold (it does not know the number is
  finite); x + -0.0 is x for every x. It is written out once, so that no update's fusion
  computes it again for each element.
  """
  leaves = jax.tree.leaves(grads)
  if len(leaves) < 2 or sum(g.size * g.dtype.itemsize for g in leaves) < ORDERED_UPDATES_MIN_BYTES:
    return grads

  def ordered(grads):
    anchor = sum(g.ravel()[0].astype(jnp.float32) for g in jax.tree.leaves(grads) if g.size)
    zero = layers.materialize(jnp.abs(jnp.where(jnp.isfinite(anchor), anchor, 0.0)) * -0.0,
                              anchor)
    return jax.tree.map(lambda g: g + zero.astype(g.dtype), grads)

  return jax.lax.platform_dependent(grads, cpu=ordered, default=lambda g: g)
