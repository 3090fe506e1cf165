"""The shared data interface: every source yields dicts of numpy arrays, one per batch.

A source has `batches(batch_size, *, seed, train)` returning an endless iterator, and a
`summary()` dict that goes into the run's result (examples read, samples skipped, ...).

Readers of real datasets take the user's choice for damaged samples (`BadSamples`): 'fail' stops
at the first one with its DataError; 'skip' leaves each out (one image, one story, one utterance,
one sentence pair) and counts it. Damage to a whole file is an error either way.
"""

import functools
import queue
import threading
from typing import Callable, Iterator, Mapping

import jax
import numpy as np

from fathom_jax import compiling
from fathom_jax.errors import DataError, UsageError

NumpyBatch = Mapping[str, np.ndarray]
BAD_SAMPLES = ("fail", "skip")
BAD_SAMPLES_SHOWN = 5  # messages kept for the summary; the count covers them all


class SyntheticSource:
  """Deterministic synthetic batches from a workload's `synthetic_batch`.

  A fixed pool of `pool_size` batches is generated once and cycled, so the data costs nothing
  on the hot path and a model can fit it (the loss falls).
  """

  def __init__(self, synthetic_batch: Callable[[jax.Array, int], Mapping], pool_size: int = 4):
    self._synthetic_batch = synthetic_batch
    self._pool_size = pool_size

  def _pool(self, seed, train: bool, batch_size: int) -> Mapping:
    key = jax.random.fold_in(jax.random.key(seed), 1 if train else 2)
    # Mapped over the keys, the batch's random ops compile once for the pool, in half the time
    # of one copy per batch; the values are those of batch-by-batch calls.
    return jax.vmap(lambda k: self._synthetic_batch(k, batch_size))(
        jax.random.split(key, self._pool_size))

  def batches(self, batch_size: int, *, seed: int, train: bool) -> Iterator[NumpyBatch]:
    # One program makes the pool: op by op, every random op would compile on its own.
    stacked = compiling.run_once(functools.partial(self._pool, train=train, batch_size=batch_size),
                                 seed)
    stacked = {name: np.asarray(values) for name, values in stacked.items()}
    pool = [{name: values[i] for name, values in stacked.items()} for i in range(self._pool_size)]
    i = 0
    while True:
      yield pool[i % self._pool_size]
      i += 1

  def summary(self) -> dict:
    return {"kind": "synthetic", "pool_batches": self._pool_size}


class ArraySource:
  """In-memory arrays of equal length, shuffled per epoch with a seeded generator."""

  def __init__(self, arrays: Mapping[str, np.ndarray], description: str, extra: Mapping = ()):
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"arrays of unequal length: {lengths}")
    self.arrays = dict(arrays)
    self.num_examples = lengths.pop()
    self._description = description
    self._extra = dict(extra)
    if self.num_examples == 0:
      raise DataError(f"{description}: no examples found")

  def batches(self, batch_size: int, *, seed: int, train: bool) -> Iterator[NumpyBatch]:
    rng = np.random.default_rng(seed)
    order = np.arange(self.num_examples)
    pos = self.num_examples
    while True:
      idx = []
      while len(idx) < batch_size:
        if pos >= self.num_examples:
          if train:
            rng.shuffle(order)
          pos = 0
        take = min(batch_size - len(idx), self.num_examples - pos)
        idx.extend(order[pos:pos + take])
        pos += take
      idx = np.asarray(idx)
      yield {k: v[idx] for k, v in self.arrays.items()}

  def summary(self) -> dict:
    return {"kind": "real", "source": self._description, "examples": self.num_examples,
            **self._extra}


class BadSamples:
  """A reader's policy for damaged samples and its tally of those it skipped."""

  def __init__(self, policy: str = "fail"):
    if policy not in BAD_SAMPLES:
      raise UsageError(f"unknown bad_samples {policy!r}; choices are: {', '.join(BAD_SAMPLES)}")
    self.policy = policy
    self.count = 0
    self.first: list[str] = []
    self._lock = threading.Lock()  # decoding threads may report at once

  def skip(self, error: DataError) -> None:
    """One bad sample: raises its error under 'fail'; under 'skip' counts it."""
    if self.policy == "fail":
      raise error
    with self._lock:
      self.count += 1
      if len(self.first) < BAD_SAMPLES_SHOWN:
        self.first.append(str(error))

  def check_any_left(self, left: int, what: str) -> None:
    """DataError when skipping left no sample (`left`) to run on."""
    if not left and self.count:
      raise DataError(f"{what}: no usable samples; {self.count} bad ones skipped (first: "
                      f"{self.first[0]})")

  def summary(self) -> dict:
    """The entry for a source's summary: nothing under 'fail' (a bad sample ends the run)."""
    if self.policy == "fail":
      return {}
    return {"bad_samples": {"skipped": self.count, "first": list(self.first)}}


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Runs `iterator` on a background thread, `size` items ahead, so the step never waits on it.

  Exceptions raised by the producer are re-raised in the consumer.
  """
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def produce():
    try:
      for item in iterator:
        q.put(item)
    except BaseException as e:  # handed to the consumer, which re-raises it
      q.put(e)
    q.put(done)

  threading.Thread(target=produce, daemon=True).start()
  while True:
    item = q.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
