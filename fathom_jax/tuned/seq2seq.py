"""seq2seq for XLA's CPU backend: the LSTM layers' and the teacher-forced decoder's backward
passes written out (each weight gradient one matmul after the loop, not a sum inside it), the
output layer's bias gradient folded into its kernel's matmul, cross-entropy and argmax over the
vocabulary of `softmax`, and the library kernels chosen per mode."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fathom_jax import compiling
from fathom_jax.tuned import layers, softmax
from fathom_jax.workloads import base, seq2seq


# Autodiff of the scan would add each step's h^T dz into the recurrent matrix's gradient inside
# the loop; the backward pass below keeps dz @ R^T in the loop and forms dR as one matmul over
# all steps afterwards.
@jax.custom_vjp
def lstm_layer(projected, valid, recurrent):
  """`seq2seq.lstm_scan`'s (final (c, h), states [S, B, H])."""
  return seq2seq.lstm_scan(projected, valid, recurrent)[0]


def _lstm_layer_fwd(projected, valid, recurrent):
  outputs, saved = seq2seq.lstm_scan(projected, valid, recurrent)
  return outputs, (*saved, valid, recurrent)


def _lstm_layer_bwd(residuals, cotangents):
  zs, cs, hs, valid, recurrent = residuals
  final_grads, state_grads = cotangents
  transposed = recurrent.T  # once, not in every step

  def step(carry, inputs):
    dc, dh = carry
    z, c, v, dh_out = inputs
    dh = dh + dh_out
    _, gates_vjp = jax.vjp(seq2seq.lstm_gates, z, c)
    dz, dc_through = gates_vjp((jnp.where(v, dc, 0), jnp.where(v, dh, 0)))
    # An invalid step passed its incoming state through unchanged.
    return (dc_through + jnp.where(v, 0, dc), dz @ transposed + jnp.where(v, 0, dh)), dz

  _, dzs = jax.lax.scan(step, final_grads, (zs, cs, valid, state_grads), reverse=True)
  d_recurrent = jnp.einsum("sbh,sbk->hk", hs, dzs, preferred_element_type=jnp.float32)
  return dzs, None, d_recurrent.astype(recurrent.dtype)


lstm_layer.defvjp(_lstm_layer_fwd, _lstm_layer_bwd)


# Autodiff of the scan would add every step's share of each weight gradient (four matmuls'
# [input, h]^T dz, up to [512, 1024]) into the gradients inside the loop; the backward pass below
# keeps in the loop only what flows back through the states, and forms each weight gradient as
# one matmul over all steps afterwards.
@jax.custom_vjp
def teacher_forced(w, memory, keys, source_valid, finals, gates):
  return seq2seq.teacher_forced_scan(w, memory, keys, source_valid, finals, gates)[0]


def _teacher_forced_fwd(w, memory, keys, source_valid, finals, gates):
  outputs, (saved, carries) = seq2seq.teacher_forced_scan(w, memory, keys, source_valid, finals,
                                                          gates)
  return outputs, (w, memory, keys, source_valid, saved, carries)


def _teacher_forced_bwd(residuals, cotangents):
  w, memory, keys, source_valid, (qs, operands, zs), carries = residuals
  d_tops, d_contexts = cotangents
  layers, hidden = len(carries), d_tops.shape[-1]
  attention = w["attention"]
  kernels = [w[f"decoder_{layer}"]["kernel"] for layer in range(layers)]
  transposed = [k[k.shape[0] - 2 * hidden:].T for k in kernels]  # once, not in every step
  attend = functools.partial(seq2seq.attention, source_valid=source_valid)
  attention_vjp = lambda *args: jax.vjp(attend, *args)[1]

  def step(carry, inputs):
    d_state, d_keys, d_memory, d_v = carry  # d_state: each layer's (dc, dh) after this step
    q, zs_t, carry_t, d_top, d_context = inputs
    d_state, d_zs, d_above = list(d_state), [None] * layers, d_top
    for layer in reversed(range(layers)):
      dc, dh = d_state[layer]
      c, _ = carry_t[layer]
      dz, dc = jax.vjp(seq2seq.lstm_gates, zs_t[layer], c)[1]((dc, dh + d_above))
      d_operand = dz @ transposed[layer]
      d_above, dh = d_operand[:, :hidden], d_operand[:, hidden:]  # [below, h]
      d_state[layer], d_zs[layer] = (dc, dh), dz
    dq, dk, dm, dv = attention_vjp(q, keys, memory, attention["v"])(d_context + d_above)
    dc, dh = d_state[-1]
    d_state[-1] = (dc, dh + dq @ attention["query_kernel"].T)
    return (tuple(d_state), d_keys + dk, d_memory + dm, d_v + dv), (tuple(d_zs), dq)

  start = (tuple((jnp.zeros_like(c[0]), jnp.zeros_like(h[0])) for c, h in carries),
           jnp.zeros_like(keys), jnp.zeros_like(memory), jnp.zeros_like(attention["v"]))
  (d_finals, d_keys, d_memory, d_v), (d_zs, d_qs) = jax.lax.scan(
      step, start, (qs, zs, carries, d_tops, d_contexts), reverse=True)

  outer = lambda a, dz: jnp.einsum("tbi,tbo->io", a, dz, preferred_element_type=jnp.float32)
  d_w = {"attention": {
      "key_kernel": jnp.zeros_like(attention["key_kernel"]),
      "query_kernel": outer(carries[-1][1], d_qs).astype(attention["query_kernel"].dtype),
      "query_bias": d_qs.sum((0, 1)).astype(attention["query_bias"].dtype),
      "v": d_v}}
  for layer in range(layers):
    kernel, bias = kernels[layer], w[f"decoder_{layer}"]["bias"]
    d_kernel = outer(operands[layer], d_zs[layer]).astype(kernel.dtype)
    if layer == 0:  # the embedding's rows and the bias act through `gates`
      d_kernel = jnp.concatenate([jnp.zeros_like(kernel[:kernel.shape[0] - 2 * hidden]),
                                  d_kernel])
      d_bias = jnp.zeros_like(bias)
    else:
      d_bias = d_zs[layer].sum((0, 1)).astype(bias.dtype)
    d_w[f"decoder_{layer}"] = {"kernel": d_kernel, "bias": d_bias}
  return d_w, d_memory, d_keys, None, d_finals, d_zs[0]


teacher_forced.defvjp(_teacher_forced_fwd, _teacher_forced_bwd)


OPS = seq2seq.Ops(lstm_layer=lstm_layer, teacher_forced=teacher_forced, logits=softmax.logits,
                  argmax=softmax.argmax, cross_entropy=softmax.cross_entropy)


def build(config: seq2seq.Config, dtype: str) -> base.Model:
  # Reductions by XLA, as plain reductions (`layers.PLAIN_REDUCTIONS`): YNNPACK's over the
  # logits (the output bias's gradient) ran at a few GFLOP/s, and its per-token argmax in
  # decoding 1.16-1.20x slower than XLA's. Greedy decoding: its per-token products ran faster
  # as Eigen dots (training's did not).
  options = {("cpu", "train"): compiling.combined(layers.ynnpack("convolution", "dot"),
                                                  layers.PLAIN_REDUCTIONS),
             ("cpu", "infer"): compiling.combined(layers.ynnpack("convolution"),
                                                  layers.PLAIN_REDUCTIONS)}
  return dataclasses.replace(seq2seq.build(config, dtype, OPS), compiler_options=options)
