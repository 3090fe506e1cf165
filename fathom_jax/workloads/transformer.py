"""transformer: a decoder-only language model, GPT-2 small (Radford et al. 2019).

Learned token and position embeddings; 12 pre-layer-norm blocks of causal multi-head
self-attention (12 heads) and a GELU MLP (4x width), each with a residual connection and dropout
0.1; a final layer norm; the output layer is the token embedding, transposed (tied). 124,439,808
parameters at a vocabulary of 50,257 and a context of 1,024.

Training: next-token cross-entropy over every position, AdamW (lr 6e-4, betas 0.9/0.95, weight
decay 0.1 on matrices only) after global-norm clipping at 1.0. Inference: a prompt is prefilled
into a key/value cache and new tokens are decoded greedily, one at a time, reading the cache:
one compiled program, its two phases under the named scopes 'prefill' and 'decode'.
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fathom_jax import text
from fathom_jax.errors import UsageError
from fathom_jax.workloads import base

PREFILL, DECODE = "prefill", "decode"  # named scopes of the inference program's phases


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 50257
  context: int = 1024  # positions; training sequences are this long
  width: int = 768
  layers: int = 12
  heads: int = 12
  dropout: float = 0.1
  batch_size: int = 8
  prompt_length: int = 128  # inference: tokens prefilled
  new_tokens: int = 128  # inference: tokens decoded after the prompt
  learning_rate: float = 6e-4
  weight_decay: float = 0.1
  clip_norm: float = 1.0

  def check(self):
    if self.width % self.heads:
      raise UsageError(f"config field 'width' ({self.width}) must divide into 'heads' "
                       f"({self.heads})")
    if self.prompt_length + self.new_tokens > self.context:
      raise UsageError(f"prompt_length + new_tokens ({self.prompt_length + self.new_tokens}) "
                       f"must fit the context ({self.context})")
    if not 0 <= self.dropout < 1:
      raise UsageError(f"config field 'dropout' must be in [0, 1), got {self.dropout}")


PRESETS = {
    "paper": Config(),
    "small": Config(vocab_size=8192, context=256, width=256, layers=4, heads=4, batch_size=8,
                    prompt_length=64, new_tokens=64),
    "tiny": Config(vocab_size=64, context=32, width=32, layers=2, heads=2, batch_size=4,
                   prompt_length=8, new_tokens=8, learning_rate=3e-3),
}


class SelfAttention(nn.Module):
  """Causal multi-head self-attention. With a cache ([B, T, H, D] keys and values and the
  position of x's first token), x's keys and values are written into it and the queries attend
  to every cached position up to their own."""
  config: Config
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool, cache=None):
    c = self.config
    batch, length, _ = x.shape
    head_dim = c.width // c.heads
    qkv = nn.Dense(3 * c.width, dtype=self.dtype, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(batch, length, 3 * c.heads, head_dim), 3, axis=2)
    if cache is None:
      y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      new_cache = None
    else:
      keys, values, start = cache
      keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, start, 0, 0))
      values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, start, 0, 0))
      query_positions = start + jnp.arange(length)
      visible = jnp.arange(keys.shape[1])[None, :] <= query_positions[:, None]  # [S, T]
      y = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                       mask=visible[None, None])
      new_cache = (keys, values)
    y = nn.Dense(c.width, dtype=self.dtype, name="proj")(y.reshape(batch, length, c.width))
    return nn.Dropout(c.dropout, deterministic=not train)(y), new_cache


class Block(nn.Module):
  config: Config
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool, cache=None):
    c = self.config
    y, new_cache = SelfAttention(c, self.dtype, name="attention")(
        nn.LayerNorm(dtype=self.dtype, name="ln_attention")(x), train, cache)
    x = x + y
    h = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    h = nn.gelu(nn.Dense(4 * c.width, dtype=self.dtype, name="fc")(h))
    h = nn.Dense(c.width, dtype=self.dtype, name="proj")(h)
    return x + nn.Dropout(c.dropout, deterministic=not train)(h), new_cache


class GPT(nn.Module):
  config: Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, train: bool, caches=None, start=0):
    """Logits [B, S, vocab] of tokens [B, S] at positions start.. ; with `caches` (one (keys,
    values) per block), also the updated caches."""
    c = self.config
    embed = nn.Embed(c.vocab_size, c.width, dtype=self.dtype,
                     embedding_init=nn.initializers.normal(0.02), name="token_embedding")
    positions = nn.Embed(c.context, c.width, dtype=self.dtype,
                         embedding_init=nn.initializers.normal(0.01), name="position_embedding")
    x = embed(tokens) + positions(start + jnp.arange(tokens.shape[1]))[None]
    x = nn.Dropout(c.dropout, deterministic=not train)(x)
    new_caches = []
    for i in range(c.layers):
      cache = None if caches is None else (*caches[i], start)
      x, new_cache = Block(c, self.dtype, name=f"block_{i}")(x, train, cache)
      new_caches.append(new_cache)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
    logits = embed.attend(x)  # the output layer is the token embedding, transposed
    return logits if caches is None else (logits, new_caches)


def empty_caches(config: Config, batch_size: int, length: int, dtype) -> list:
  head_dim = config.width // config.heads
  shape = (batch_size, length, config.heads, head_dim)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.layers)]


def generate(module: GPT, variables, prompt, new_tokens: int):
  """Greedy decoding: the prompt [B, P] prefilled into a cache, then `new_tokens` tokens, each
  fed back. Returns (tokens [B, new_tokens], logits [B, new_tokens, vocab])."""
  c = module.config
  batch, prompt_length = prompt.shape
  caches = empty_caches(c, batch, prompt_length + new_tokens, module.dtype)
  with jax.named_scope(PREFILL):
    logits, caches = module.apply(variables, prompt, False, caches, 0)
    first = logits[:, -1]

  def step(carry, _):
    caches, last_logits, position = carry
    token = jnp.argmax(last_logits, axis=-1).astype(prompt.dtype)
    logits, caches = module.apply(variables, token[:, None], False, caches, position)
    return (caches, logits[:, -1], position + 1), (token, last_logits)

  with jax.named_scope(DECODE):
    _, (tokens, logits) = jax.lax.scan(step, (caches, first, prompt_length), None,
                                       length=new_tokens)
  return tokens.T, jnp.swapaxes(logits, 0, 1)


def next_token_loss(logits, batch):
  tokens = batch["tokens"]
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), tokens[:, 1:])
  loss = losses.mean()
  return loss, {"perplexity": jnp.exp(loss)}


def make_optimizer(config: Config) -> optax.GradientTransformation:
  decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(config.learning_rate, b1=0.9, b2=0.95, weight_decay=config.weight_decay,
                  mask=decay_matrices))


def synthetic_batch(config: Config, rng, batch_size: int):
  """Uniformly random token ids, a whole context per sequence (inference reads its prompt from
  the start)."""
  return {"tokens": jax.random.randint(rng, (batch_size, config.context), 0, config.vocab_size,
                                       dtype=jnp.int32)}


def build(config: Config, dtype: str, module: Optional[GPT] = None) -> base.Model:
  module = module or GPT(config, jnp.dtype(dtype))

  def init(rng, batch):
    return module.init(rng, batch["tokens"][:, :1], False)

  def apply(variables, batch, *, train, rng):
    if train:
      return module.apply(variables, batch["tokens"], True, rngs={"dropout": rng}), {}
    prompt = batch["tokens"][:, :config.prompt_length]
    tokens, _ = generate(module, variables, prompt, config.new_tokens)
    return {"tokens": tokens}, {}

  return base.Model(init=init, apply=apply, loss=next_token_loss,
                    optimizer=make_optimizer(config),
                    synthetic_batch=lambda rng, n: synthetic_batch(config, rng, n))


WORKLOAD = base.Workload(
    name="transformer",
    description="GPT-2 small (Radford et al. 2019): decoder-only language model, KV-cache decoding",
    config_cls=Config,
    presets=PRESETS,
    build=build,
    load_data=text.load_data,
    example_unit="sequences",
    # Training reads a whole context per sequence; inference generates new_tokens (the prompt's
    # prefill is part of the step's time, not of its tokens).
    tokens_per_example=lambda config, mode: (config.context if mode == "train"
                                             else config.new_tokens),
    phase_tokens=lambda config, mode: ({} if mode == "train" else
                                       {PREFILL: config.prompt_length, DECODE: config.new_tokens}),
)
