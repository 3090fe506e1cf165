"""seq2seq: encoder-decoder translation (Sutskever et al. 2014) with additive attention (Bahdanau
et al. 2015), at the sizes of the TensorFlow translation model the 2016 suite used.

Encoder: embedding, `layers` LSTM layers over the reversed source sentence. Decoder: embedding,
`layers` LSTM layers started from the encoder's final states; at each step the top decoder state
of the previous step queries the top encoder states (score v^T tanh(W_k k_s + W_q q + b)), the
context joins the word embedding as the first layer's input, and tanh(W [h, context] + b) is
projected onto the target vocabulary. Training uses teacher forcing and cross-entropy over the
full vocabulary, or sampled softmax (`sampled_softmax=true`: `num_samples` classes drawn from a
log-uniform distribution once per step, with the log-expected-count correction and accidental
hits removed, as TensorFlow's sampled_softmax_loss). Inference is greedy decoding inside the
compiled program: each step is fed its own previous prediction, a sentence that has produced EOS
emits PAD from then on, and the loop ends when every sentence has ended or the bucket's target
length is reached; it returns tokens [B, T], lengths [B] and the decoder steps run. Every recurrence is a `lax.scan` / `lax.while_loop`.

Shapes come from one bucket (`bucket`: an index into BUCKETS, or a (source, target) pair); each
bucket is its own compiled step. A batch holds
  source        [B, S] int32  word ids reversed and left-padded: PAD..PAD w_n .. w_1
  target_input  [B, T] int32  GO w_1 .. w_m PAD..PAD  (m <= T - 1)
  target_output [B, T] int32  w_1 .. w_m EOS PAD..PAD
  target_mask   [B, T] float32  1 on the m + 1 predicted positions
Token ids: PAD 0, GO 1, EOS 2, UNK 3, then words by falling frequency.

Real data (`--data=PATH`): parallel text, one sentence per line, line i of the source file
translating line i of the target file. PATH is a folder holding `train.<source_lang>` and
`train.<target_lang>` (default `train.en`, `train.fr`), or the source file itself, whose target
is the file beside it with the target language's extension. UTF-8 text, tokenised on whitespace
with the punctuation . , ! ? " ' : ; ( ) split off and digits mapped to 0; each vocabulary keeps
the most frequent words up to its configured size (ties alphabetical), the rest map to UNK.
Pairs with an empty side, or too long for the bucket (source > S words, target > T - 1 words),
are dropped and counted in the run's data summary.
"""

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_jax import config as config_lib
from fathom_jax import parallel_text
from fathom_jax.parallel_text import EOS, GO, PAD, SPECIAL_TOKENS
from fathom_jax import scopes
from fathom_jax.errors import UsageError
from fathom_jax.workloads import base

BUCKETS = ((5, 10), (10, 15), (20, 25), (40, 50))
FORGET_BIAS = 1.0  # added to the forget gate, as TensorFlow's BasicLSTMCell


@dataclasses.dataclass(frozen=True)
class Config:
  source_vocab: int = 40_000
  target_vocab: int = 40_000
  embed_dim: int = 256
  hidden: int = 256
  layers: int = 3
  bucket: tuple[int, ...] = config_lib.nonneg((40, 50))  # index into BUCKETS, or (S, T)
  batch_size: int = 64
  learning_rate: float = 0.5
  max_grad_norm: float = 5.0
  sampled_softmax: bool = False
  num_samples: int = 512
  source_lang: str = "en"
  target_lang: str = "fr"

  @property
  def lengths(self) -> tuple[int, int]:
    """(source length S, target length T) of the bucket."""
    return BUCKETS[self.bucket[0]] if len(self.bucket) == 1 else tuple(self.bucket)

  def check(self):
    if len(self.bucket) == 1:
      if self.bucket[0] >= len(BUCKETS):
        raise UsageError(f"config field 'bucket' index must be below {len(BUCKETS)}, got "
                         f"{self.bucket[0]}")
    elif len(self.bucket) != 2 or self.bucket[0] < 1 or self.bucket[1] < 2:
      raise UsageError("config field 'bucket' must be an index into "
                       f"{', '.join(map(str, BUCKETS))} or a pair source>=1,target>=2, "
                       f"got {self.bucket!r}")
    for name in ("source_vocab", "target_vocab"):
      if getattr(self, name) <= len(SPECIAL_TOKENS):
        raise UsageError(f"config field {name!r} must exceed the {len(SPECIAL_TOKENS)} special "
                         f"tokens, got {getattr(self, name)}")
    if self.sampled_softmax and self.num_samples >= self.target_vocab:
      raise UsageError(f"config field 'num_samples' ({self.num_samples}) must be below "
                       f"target_vocab ({self.target_vocab}) for sampled softmax")


PRESETS = {
    "paper": Config(),
    "small": Config(source_vocab=10_000, target_vocab=10_000, embed_dim=128, hidden=128,
                    bucket=(1,), batch_size=32, num_samples=256),
    # A higher rate than the paper's 0.5 so that a few steps show learning.
    "tiny": Config(source_vocab=40, target_vocab=36, embed_dim=32, hidden=32, layers=2,
                   bucket=(0,), batch_size=8, learning_rate=1.0, num_samples=8),
}


# --- model -----------------------------------------------------------------------------------

_INITS = {
    "glorot": nn.initializers.glorot_uniform(),
    "embedding": nn.initializers.normal(1.0),
    "zeros": nn.initializers.zeros_init(),
    "vector": lambda key, shape, dtype=jnp.float32: (
        jax.random.normal(key, shape, dtype) / np.sqrt(shape[0])),
}


class Weights(nn.Module):
  """A named group of parameters, returned as a dict: the recurrences use plain arrays inside
  lax loops, where flax submodules cannot be called."""
  specs: tuple  # (name, shape, initializer name) triples

  @nn.compact
  def __call__(self):
    return {name: self.param(name, _INITS[init], shape) for name, shape, init in self.specs}


def lstm_specs(in_dim: int, hidden: int) -> tuple:
  # One kernel over [input, h] for the four gates (i, g, f, o), as TensorFlow's BasicLSTMCell.
  return (("kernel", (in_dim + hidden, 4 * hidden), "glorot"), ("bias", (4 * hidden,), "zeros"))


def lstm_gates(z, c):
  """New (c, h) from the gate pre-activations z = [i, g, f, o]; c stays float32."""
  i, g, f, o = jnp.split(z, 4, axis=-1)
  c = nn.sigmoid(f + FORGET_BIAS) * c + nn.sigmoid(i) * jnp.tanh(g)
  c = c.astype(jnp.float32)
  return c, nn.sigmoid(o) * jnp.tanh(c).astype(z.dtype)


def lstm_scan(projected, valid, recurrent):
  """One LSTM layer over time from the zero state: projected [S, B, 4H] (the input's share of
  the gates, bias included), valid [S, B, 1], recurrent [H, 4H]. A step that is not valid leaves
  the state as it was. Returns (final (c, h), states [S, B, H]) and, for the backward pass,
  each step's gate pre-activations and incoming state."""
  batch, hidden = projected.shape[1], recurrent.shape[0]

  def step(carry, inputs):
    c, h = carry
    p, v = inputs
    z = p + h @ recurrent
    c_new, h_new = lstm_gates(z, c)
    new = (jnp.where(v, c_new, c), jnp.where(v, h_new, h))
    return new, (new[1], z, c, h)

  zeros = (jnp.zeros((batch, hidden), jnp.float32), jnp.zeros((batch, hidden), projected.dtype))
  final, (states, zs, cs, hs) = jax.lax.scan(step, zeros, (projected, valid))
  return (final, states), (zs, cs, hs)


def lstm_layer(projected, valid, recurrent):
  """`lstm_scan`'s (final (c, h), states [S, B, H])."""
  return lstm_scan(projected, valid, recurrent)[0]


def encode(w, source, num_layers: int, dtype, lstm=lstm_layer):
  """Top-layer states [B, S, H] and each layer's final (c, h). PAD steps leave the state as it
  was, so the final state is that after the last word whatever the padding."""
  valid = (source != PAD).T[..., None]  # [S, B, 1]
  xs = w["source_embedding"]["table"][source.T].astype(dtype)  # [S, B, E]
  finals = []
  for layer in range(num_layers):
    kernel = w[f"encoder_{layer}"]["kernel"].astype(dtype)
    in_dim = xs.shape[-1]
    # The input projection of every step is one matmul outside the loop.
    projected = xs @ kernel[:in_dim] + w[f"encoder_{layer}"]["bias"].astype(dtype)
    final, xs = lstm(projected, valid, kernel[in_dim:])
    finals.append(final)
  return jnp.swapaxes(xs, 0, 1), tuple(finals)


def attention(q, keys, memory, v, source_valid):
  """Additive attention: context [B, H] over the encoder states `memory` [B, S, H], for the
  projected query q [B, H] (W_q query + b) and keys [B, S, H] (W_k memory)."""
  scores = jnp.tanh(keys + q[:, None, :]) @ v  # [B, S]
  scores = jnp.where(source_valid, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  weights = nn.softmax(scores, axis=-1).astype(memory.dtype)
  return jnp.einsum("bs,bsh->bh", weights, memory)


def decoder_step(w, memory, keys, source_valid, carry, embedded_gates):
  """One decoder step. `embedded_gates` is the word embedding's share of the first layer's gate
  pre-activations (bias included); returns the new carry and (top state, context)."""
  new_carry, outputs, _ = _decoder_step(w, memory, keys, source_valid, carry, embedded_gates)
  return new_carry, outputs


def _decoder_step(w, memory, keys, source_valid, carry, embedded_gates):
  """decoder_step, and what its backward pass reads: the attention query q, and each layer's
  [input, h] (its matmul's left operand) and gate pre-activations z."""
  weights = w["attention"]
  q = carry[-1][1] @ weights["query_kernel"] + weights["query_bias"]
  context = attention(q, keys, memory, weights["v"], source_valid)
  new_carry, below, operands, zs = [], context, [], []
  for layer, (c, h) in enumerate(carry):
    kernel, operand = w[f"decoder_{layer}"]["kernel"], jnp.concatenate([below, h], -1)
    if layer == 0:  # [context, h]; the embedding's rows are in embedded_gates
      z = embedded_gates + operand @ kernel[kernel.shape[0] - operand.shape[-1]:]
    else:
      z = operand @ kernel + w[f"decoder_{layer}"]["bias"]
    c, h = lstm_gates(z, c)
    new_carry.append((c, h))
    operands.append(operand)
    zs.append(z)
    below = h
  return tuple(new_carry), (below, context), (q, tuple(operands), tuple(zs))


def teacher_forced_decode(w, memory, keys, source_valid, finals, gates,
                          scan=lambda *args: teacher_forced_scan(*args)[0]):
  """The decoder over the whole target, fed the reference words: gates [T, B, 4H] (their
  embeddings' share of the first layer's gates). Returns (top states, contexts), each
  [T, B, H]."""
  weights = {k: w[k] for k in ["attention", *(f"decoder_{l}" for l in range(len(finals)))]}
  return scan(weights, memory, keys, source_valid, finals, gates)


def teacher_forced_scan(w, memory, keys, source_valid, finals, gates):
  def step(carry, gates_t):
    new_carry, outputs, saved = _decoder_step(w, memory, keys, source_valid, carry, gates_t)
    return new_carry, (outputs, saved, carry)

  _, (outputs, saved, carries) = jax.lax.scan(step, finals, gates)
  return outputs, (saved, carries)


def readout(w, top, context):
  return jnp.tanh(jnp.concatenate([top, context], -1) @ w["kernel"] + w["bias"])


def log_uniform_sample(rng, num_samples: int, vocab: int):
  """Class ids drawn with replacement from P(k) = log((k + 2) / (k + 1)) / log(V + 1), a
  Zipf-like law that suits vocabularies sorted by frequency."""
  with jax.named_scope(scopes.RANDOM):
    u = jax.random.uniform(rng, (num_samples,))
  return jnp.clip(jnp.floor(jnp.exp(u * jnp.log(vocab + 1.0))) - 1, 0, vocab - 1).astype(jnp.int32)


def log_expected_count(ids, num_samples: int, vocab: int):
  """log(num_samples * P(k)): the logit correction of sampled softmax."""
  ids = ids.astype(jnp.float32)
  p = (jnp.log(ids + 2.0) - jnp.log(ids + 1.0)) / jnp.log(vocab + 1.0)
  return jnp.log(num_samples * p)


def sampled_logits(out_w, hidden, targets, rng, num_samples: int):
  """[B, T, 1 + num_samples] logits whose class 0 is the target (TensorFlow's sampled softmax)."""
  kernel, bias = out_w["kernel"], out_w["bias"]
  vocab = kernel.shape[1]
  sampled = log_uniform_sample(rng, num_samples, vocab)
  true = (jnp.einsum("bth,bth->bt", hidden, kernel.T[targets]) + bias[targets]
          - log_expected_count(targets, num_samples, vocab).astype(hidden.dtype))
  negatives = (hidden @ kernel[:, sampled] + bias[sampled]
               - log_expected_count(sampled, num_samples, vocab).astype(hidden.dtype))
  negatives = jnp.where(sampled == targets[..., None], jnp.finfo(negatives.dtype).min / 2,
                        negatives)  # an accidental hit is not a negative
  return jnp.concatenate([true[..., None], negatives], -1)


def greedy_decode(step, carry, batch_size: int, max_len: int, argmax=lambda x: jnp.argmax(x, -1)):
  """Greedy decoding in a lax.while_loop: step(carry, previous tokens [B]) -> (carry, logits).

  Starts from GO; a sentence that has emitted EOS emits PAD afterwards; stops when every
  sentence has ended or after `max_len` tokens. Returns tokens [B, max_len], lengths [B]
  (tokens up to and including EOS) and the number of steps run.
  """
  def cond(state):
    t, _, _, finished, _ = state
    return (t < max_len) & ~jnp.all(finished)

  def body(state):
    t, carry, previous, finished, tokens = state
    carry, logits = step(carry, previous)
    token = jnp.where(finished, PAD, argmax(logits))
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
    return t + 1, carry, token, finished | (token == EOS), tokens

  start = (jnp.zeros((), jnp.int32), carry, jnp.full((batch_size,), GO, jnp.int32),
           jnp.zeros((batch_size,), bool), jnp.full((batch_size, max_len), PAD, jnp.int32))
  steps, _, _, _, tokens = jax.lax.while_loop(cond, body, start)
  return tokens, (tokens != PAD).sum(-1).astype(jnp.int32), steps


@dataclasses.dataclass(frozen=True)
class Ops:
  """The pieces an implementation may compute its own way (fathom_jax.tuned.seq2seq), with these
  signatures and values: an LSTM layer over time, the teacher-forced decoder over the target,
  the output layer's logits, the top word, and the per-token cross-entropy."""
  lstm_layer: Callable = lstm_layer
  teacher_forced: Callable = lambda *args: teacher_forced_scan(*args)[0]
  logits: Callable = lambda x, kernel, bias: x @ kernel + bias
  argmax: Callable = lambda x: jnp.argmax(x, -1)
  cross_entropy: Callable = optax.softmax_cross_entropy_with_integer_labels


class Seq2Seq(nn.Module):
  config: Config
  dtype: jnp.dtype = jnp.float32
  ops: Ops = Ops()

  def weights(self):
    c = self.config
    E, H = c.embed_dim, c.hidden
    groups = {
        "source_embedding": (("table", (c.source_vocab, E), "embedding"),),
        "target_embedding": (("table", (c.target_vocab, E), "embedding"),),
        "attention": (("key_kernel", (H, H), "glorot"), ("query_kernel", (H, H), "glorot"),
                      ("query_bias", (H,), "zeros"), ("v", (H,), "vector")),
        "readout": (("kernel", (2 * H, H), "glorot"), ("bias", (H,), "zeros")),
        "output": (("kernel", (H, c.target_vocab), "glorot"), ("bias", (c.target_vocab,), "zeros")),
    }
    for layer in range(c.layers):
      groups[f"encoder_{layer}"] = lstm_specs(E if layer == 0 else H, H)
      # The first decoder layer reads [embedding, context].
      groups[f"decoder_{layer}"] = lstm_specs(E + H if layer == 0 else H, H)
    return {name: Weights(specs, name=name)() for name, specs in groups.items()}

  @nn.compact
  def __call__(self, source, target_input, target_output, *, train: bool, rng=None):
    c, dtype = self.config, self.dtype
    w = self.weights()
    # Embedding tables are gathered before the cast; every other weight is cast once here.
    cast = {k: (v if k.endswith("_embedding") else jax.tree.map(lambda a: a.astype(dtype), v))
            for k, v in w.items()}
    memory, finals = encode(cast, source, c.layers, dtype, self.ops.lstm_layer)
    keys = memory @ cast["attention"]["key_kernel"]
    source_valid = source != PAD
    first = cast["decoder_0"]
    embed_gates = lambda tokens: (
        w["target_embedding"]["table"][tokens].astype(dtype) @ first["kernel"][:c.embed_dim]
        + first["bias"])
    step = lambda carry, gates: decoder_step(cast, memory, keys, source_valid, carry, gates)

    if not train:
      def predict(carry, previous):
        carry, (top, context) = step(carry, embed_gates(previous))
        logits = readout(cast["readout"], top, context) @ cast["output"]["kernel"]
        return carry, logits + cast["output"]["bias"]
      tokens, lengths, steps = greedy_decode(predict, finals, source.shape[0],
                                             target_input.shape[1], self.ops.argmax)
      return {"tokens": tokens, "lengths": lengths, "decoder_steps": steps}

    tops, contexts = teacher_forced_decode(cast, memory, keys, source_valid, finals,
                                           embed_gates(target_input.T), self.ops.teacher_forced)
    hidden = jnp.swapaxes(readout(cast["readout"], tops, contexts), 0, 1)  # [B, T, H]
    if c.sampled_softmax:
      return {"sampled_logits": sampled_logits(cast["output"], hidden, target_output, rng,
                                               c.num_samples)}
    return {"logits": self.ops.logits(hidden, cast["output"]["kernel"], cast["output"]["bias"])}


def sequence_loss(outputs, batch, ops: Ops = Ops()):
  """Cross-entropy per target token, averaged over the unpadded tokens of the batch."""
  mask = batch["target_mask"].astype(jnp.float32)
  tokens = jnp.maximum(mask.sum(), 1.0)
  if "logits" in outputs:
    logits, labels = outputs["logits"].astype(jnp.float32), batch["target_output"]
  else:  # sampled softmax: the target is class 0
    logits = outputs["sampled_logits"].astype(jnp.float32)
    labels = jnp.zeros(logits.shape[:-1], jnp.int32)
  ce = ops.cross_entropy(logits, labels)
  loss = (ce * mask).sum() / tokens
  metrics = {"tokens": mask.sum()}
  if "logits" in outputs:
    metrics["accuracy"] = ((ops.argmax(logits) == labels) * mask).sum() / tokens
  return loss, metrics


def synthetic_batch(config: Config, rng, batch_size: int):
  """Random words (special tokens excluded), source 1..S and target 1..T-1 words long."""
  S, T = config.lengths
  len_rng, src_rng, tlen_rng, tgt_rng = jax.random.split(rng, 4)
  first = len(SPECIAL_TOKENS)
  source_len = jax.random.randint(len_rng, (batch_size, 1), 1, S + 1)
  words = jax.random.randint(src_rng, (batch_size, S), first, config.source_vocab)
  source = jnp.where(jnp.arange(S) >= S - source_len, words, PAD)
  target_len = jax.random.randint(tlen_rng, (batch_size, 1), 1, T)
  words = jax.random.randint(tgt_rng, (batch_size, T), first, config.target_vocab)
  pos = jnp.arange(T)
  target_output = jnp.where(pos < target_len, words, jnp.where(pos == target_len, EOS, PAD))
  shifted = jnp.concatenate([jnp.full((batch_size, 1), GO), target_output[:, :-1]], 1)
  return {"source": source.astype(jnp.int32),
          "target_input": jnp.where(pos <= target_len, shifted, PAD).astype(jnp.int32),
          "target_output": target_output.astype(jnp.int32),
          "target_mask": (pos <= target_len).astype(jnp.float32)}


def build(config: Config, dtype: str, ops: Ops = Ops()) -> base.Model:
  module = Seq2Seq(config, jnp.dtype(dtype), ops)

  def init(rng, batch):
    param_rng, sample_rng = jax.random.split(rng)
    return module.init(param_rng, batch["source"], batch["target_input"], batch["target_output"],
                       train=True, rng=sample_rng)

  def apply(variables, batch, *, train, rng):
    return module.apply(variables, batch["source"], batch["target_input"],
                        batch["target_output"], train=train, rng=rng), {}

  optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                          optax.sgd(config.learning_rate))
  return base.Model(init=init, apply=apply,
                    loss=functools.partial(sequence_loss, ops=ops), optimizer=optimizer,
                    synthetic_batch=lambda rng, n: synthetic_batch(config, rng, n))


WORKLOAD = base.Workload(
    name="seq2seq",
    description="Encoder-decoder translation with attention (Sutskever 2014, Bahdanau 2015), "
                "3-layer LSTM 256, vocab 40k/40k",
    config_cls=Config,
    presets=PRESETS,
    build=build,
    load_data=parallel_text.load_data,
    example_unit="sentences",
    large_host_buffers=True,
)
