"""bAbI question-answering task files (Weston et al. 2015) as padded arrays for memnet.

A task file holds numbered lines: statements, and questions with a tab-separated answer (and
supporting fact ids); a line whose ID is 1 starts a new story. Words are lowercased letters and
digits.
"""

import glob
import os
import re

import numpy as np

from fathom_jax import config as config_lib
from fathom_jax import data as data_lib
from fathom_jax.errors import DataError

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


def load_data(config, path: str, bad_samples: str = "fail"):
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
