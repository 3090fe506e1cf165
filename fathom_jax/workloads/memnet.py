"""memnet: end-to-end memory network (Sukhbaatar et al. 2015) for bAbI question answering.

Bag-of-words sentences with position encoding, temporal encoding of memory slots, `hops`
attention hops with adjacent weight tying (A^{k+1} = C^k, B = A^1, W^T = C^K), so the
parameters are hops + 1 embedding matrices and hops + 1 temporal matrices. Word 0 is the nil
(padding) word; empty memory slots take no attention.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_jax import babi
from fathom_jax.workloads import base


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 177  # the joint vocabulary of the 20 bAbI tasks, nil word included
  sentence_len: int = 12
  memory_size: int = 50
  embed_dim: int = 20
  hops: int = 3
  batch_size: int = 32
  learning_rate: float = 0.01
  max_grad_norm: float = 40.0


PRESETS = {
    "paper": Config(),
    "small": Config(vocab_size=64, memory_size=20, batch_size=32),
    "tiny": Config(vocab_size=24, sentence_len=6, memory_size=8, embed_dim=8, batch_size=8),
}


def position_encoding(sentence_len: int, embed_dim: int) -> np.ndarray:
  """l_kj = (1 - j/J) - (k/d)(1 - 2j/J), with 1-based j (word) and k (dimension)."""
  j = np.arange(1, sentence_len + 1)[:, None] / sentence_len
  k = np.arange(1, embed_dim + 1)[None, :] / embed_dim
  return ((1 - j) - k * (1 - 2 * j)).astype(np.float32)


class MemN2N(nn.Module):
  config: Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, stories, query):
    c = self.config
    init = nn.initializers.normal(0.1)
    # embeddings[0] = A^1 = B; embeddings[k] = C^k = A^{k+1}; embeddings[hops] = C^K = W^T.
    embeddings = self.param("embeddings", init, (c.hops + 1, c.vocab_size, c.embed_dim))
    temporal = self.param("temporal", init, (c.hops + 1, c.memory_size, c.embed_dim))
    embeddings, temporal = embeddings.astype(self.dtype), temporal.astype(self.dtype)
    pe = jnp.asarray(position_encoding(stories.shape[-1], c.embed_dim), self.dtype)

    def encode(words, table):
      # Sum of position-weighted word vectors; the nil word contributes nothing.
      vectors = table[words] * (words > 0)[..., None].astype(self.dtype)
      return (vectors * pe).sum(-2)

    slot_used = (stories > 0).any(-1)  # [B, M]
    u = encode(query, embeddings[0])  # [B, d]
    for k in range(c.hops):
      memory_in = encode(stories, embeddings[k]) + temporal[k]
      memory_out = encode(stories, embeddings[k + 1]) + temporal[k + 1]
      scores = jnp.einsum("bmd,bd->bm", memory_in, u)
      scores = jnp.where(slot_used, scores, jnp.finfo(self.dtype).min)
      attention = nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
      u = u + jnp.einsum("bm,bmd->bd", attention, memory_out)
    return jnp.einsum("bd,vd->bv", u, embeddings[c.hops])


def cross_entropy(logits, batch, *,
                  per_example=optax.softmax_cross_entropy_with_integer_labels,
                  argmax=lambda x: jnp.argmax(x, -1)):
  loss = per_example(logits.astype(jnp.float32), batch["answer"]).mean()
  accuracy = (argmax(logits) == batch["answer"]).mean()
  return loss, {"accuracy": accuracy}


def synthetic_batch(config: Config, rng, batch_size: int):
  """Stories of 1..memory_size sentences of 3..sentence_len words, most recent in slot 0."""
  words_rng, len_rng, slots_rng, q_rng, a_rng = jax.random.split(rng, 5)
  m, j = config.memory_size, config.sentence_len
  words = jax.random.randint(words_rng, (batch_size, m, j), 1, config.vocab_size)
  lengths = jax.random.randint(len_rng, (batch_size, m, 1), min(3, j), j + 1)
  slots = jax.random.randint(slots_rng, (batch_size, 1, 1), 1, m + 1)
  keep = (jnp.arange(j) < lengths) & (jnp.arange(m)[:, None] < slots)
  stories = jnp.where(keep, words, 0).astype(jnp.int32)
  query = jax.random.randint(q_rng, (batch_size, j), 1, config.vocab_size)
  query = jnp.where(jnp.arange(j) < min(4, j), query, 0).astype(jnp.int32)
  answer = jax.random.randint(a_rng, (batch_size,), 1, config.vocab_size).astype(jnp.int32)
  return {"stories": stories, "query": query, "answer": answer}


def build(config: Config, dtype: str) -> base.Model:
  module = MemN2N(config, jnp.dtype(dtype))

  def init(rng, batch):
    return module.init(rng, batch["stories"], batch["query"])

  def apply(variables, batch, *, train, rng):
    del train, rng  # no dropout or sampling in MemN2N
    return module.apply(variables, batch["stories"], batch["query"]), {}

  optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                          optax.adam(config.learning_rate))
  return base.Model(init=init, apply=apply, loss=cross_entropy, optimizer=optimizer,
                    synthetic_batch=lambda rng, n: synthetic_batch(config, rng, n))


WORKLOAD = base.Workload(
    name="memnet",
    description="End-to-end memory network (Sukhbaatar et al. 2015), bAbI QA, 3 hops",
    config_cls=Config,
    presets=PRESETS,
    build=build,
    load_data=babi.load_data,
    example_unit="questions",
)
