"""memnet: end-to-end memory network (Sukhbaatar et al. 2015) for bAbI question answering.

Bag-of-words sentences with position encoding, temporal encoding of memory slots, `hops`
attention hops with adjacent weight tying (A^{k+1} = C^k, B = A^1, W^T = C^K), so the
parameters are hops + 1 embedding matrices and hops + 1 temporal matrices. Word 0 is the nil
(padding) word; empty memory slots take no attention.
"""

import dataclasses
import glob
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_jax import config as config_lib
from fathom_jax import data as data_lib
from fathom_jax.errors import DataError
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


# --- bAbI task files -------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
  return _TOKEN.findall(text.lower())


def _stories(lines: list[bytes]) -> list[list[tuple[int, bytes]]]:
  """Numbered lines grouped into stories, each starting at a line whose ID is 1."""
  stories = [[]]
  for lineno, line in enumerate(lines, 1):
    head = line.strip().partition(b" ")[0]
    if head.isdigit() and int(head) == 1 and stories[-1]:
      stories.append([])
    stories[-1].append((lineno, line))
  return stories


def _parse_story(path: str, lines: list[tuple[int, bytes]]):
  """(story sentences so far, question, answer) for every question of one story."""
  examples, story = [], []
  for lineno, raw in lines:
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                      "line)") from None
    if not line.strip():
      continue
    head, _, rest = line.strip().partition(" ")
    if not head.isdigit() or not rest:
      raise DataError(f"{path}:{lineno}: malformed bAbI line (want 'ID text'): {line[:60]!r}")
    if "\t" in rest:
      fields = rest.split("\t")
      if len(fields) < 2 or not fields[1].strip():
        raise DataError(f"{path}:{lineno}: question line without a tab-separated answer")
      question, answer = tokenize(fields[0]), fields[1].strip().lower()
      examples.append((list(story), question, answer))
    else:
      story.append(tokenize(rest))
  return examples


def parse_babi(path: str, bad: data_lib.BadSamples | None = None
               ) -> list[tuple[list[list[str]], list[str], str]]:
  """(story sentences so far, question, answer) for every question in a bAbI task file. A
  malformed line spoils its story; `bad` (a data.BadSamples, default 'fail') decides whether
  that stops the run or the story's questions are left out and the story counted."""
  bad = bad or data_lib.BadSamples()
  with open(path, "rb") as f:
    lines = f.read().splitlines()
  examples = []
  for story in _stories(lines):
    try:
      examples += _parse_story(path, story)
    except DataError as e:
      bad.skip(e)
  return examples


def _task_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  files = sorted(glob.glob(os.path.join(path, "*_train.txt")))
  if not files:
    raise DataError(f"{path}: no bAbI training files (*_train.txt) in this folder")
  return files


def load_data(config: Config, path: str, bad_samples: str = "fail"):
  """A bAbI task file, or a folder of *_train.txt task files, as padded arrays.

  The vocabulary (nil word first) and the sentence length come from the data; stories keep their
  most recent `memory_size` sentences, most recent first. With bad_samples='skip' a story with a
  malformed line is left out and counted.
  """
  files = _task_files(path)
  bad = data_lib.BadSamples(bad_samples)
  examples = [ex for f in files for ex in parse_babi(f, bad)]
  bad.check_any_left(len(examples), path)
  if not examples:
    raise DataError(f"{path}: no questions found")
  words = sorted({w for story, q, a in examples for s in story for w in s}
                 | {w for _, q, _ in examples for w in q} | {a for _, _, a in examples})
  vocab = {w: i + 1 for i, w in enumerate(words)}
  sentence_len = max(max((len(s) for st, _, _ in examples for s in st), default=1),
                     max(len(q) for _, q, _ in examples))
  n, m = len(examples), config.memory_size
  stories = np.zeros((n, m, sentence_len), np.int32)
  queries = np.zeros((n, sentence_len), np.int32)
  answers = np.zeros((n,), np.int32)
  for i, (story, question, answer) in enumerate(examples):
    for slot, sentence in enumerate(reversed(story[-m:])):
      stories[i, slot, :len(sentence)] = [vocab[w] for w in sentence]
    queries[i, :len(question)] = [vocab[w] for w in question]
    answers[i] = vocab[answer]
  config = config_lib.replace(config, vocab_size=len(vocab) + 1, sentence_len=sentence_len)
  source = data_lib.ArraySource(
      {"stories": stories, "query": queries, "answer": answers},
      description=path, extra={"files": len(files), "vocab_size": len(vocab) + 1,
                               **bad.summary()})
  return source, config


WORKLOAD = base.Workload(
    name="memnet",
    description="End-to-end memory network (Sukhbaatar et al. 2015), bAbI QA, 3 hops",
    config_cls=Config,
    presets=PRESETS,
    build=build,
    load_data=load_data,
    example_unit="questions",
)
