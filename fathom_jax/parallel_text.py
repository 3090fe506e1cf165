"""Parallel text for seq2seq: one sentence per line in a source and a target file, tokenised
as the TensorFlow translate tutorial did, with vocabularies of the most frequent words.
"""

import collections
import os
import re

import numpy as np

from fathom_jax import config as config_lib
from fathom_jax import data as data_lib
from fathom_jax.errors import DataError

PAD, GO, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("_PAD", "_GO", "_EOS", "_UNK")

_PUNCTUATION = re.compile(r"([.,!?\"':;)(])")
_DIGIT = re.compile(r"\d")


def tokenize(line: str) -> list[str]:
  words = [w for piece in line.split() for w in _PUNCTUATION.split(piece) if w]
  return [_DIGIT.sub("0", w) for w in words]


def read_lines(path: str) -> tuple[list[str], dict[int, DataError]]:
  """Lines of a UTF-8 file, split on '\\n' only (str.splitlines would also split on Unicode
  separators that occur inside sentences and misalign a parallel corpus), and the errors of the
  lines that are not UTF-8, by line index (such a line reads as '')."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  if not raw:
    raise DataError(f"{path}: empty file")
  pieces = raw.split(b"\n")
  if pieces[-1] == b"":
    pieces.pop()
  lines, errors = [], {}
  for i, piece in enumerate(pieces):
    try:
      lines.append(piece.decode("utf-8").rstrip("\r"))
    except UnicodeDecodeError as e:
      errors[i] = DataError(f"{path}:{i + 1}: not UTF-8 text ({e.reason})")
      lines.append("")
  return lines, errors


def build_vocabulary(sentences: list[list[str]], size: int) -> dict[str, int]:
  """Special tokens, then the `size - 4` most frequent words (ties broken alphabetically)."""
  counts = collections.Counter(w for s in sentences for w in s)
  words = sorted(counts, key=lambda w: (-counts[w], w))[:size - len(SPECIAL_TOKENS)]
  return {w: i for i, w in enumerate(SPECIAL_TOKENS + tuple(words))}


def parallel_files(config, path: str) -> tuple[str, str]:
  src_ext, tgt_ext = "." + config.source_lang, "." + config.target_lang
  if os.path.isdir(path):
    files = (os.path.join(path, "train" + src_ext), os.path.join(path, "train" + tgt_ext))
  elif path.endswith(src_ext):
    files = (path, path[:-len(src_ext)] + tgt_ext)
  else:
    raise DataError(f"{path}: want a folder holding train{src_ext} and train{tgt_ext}, or a "
                    f"source file ending in {src_ext}")
  for f in files:
    if not os.path.isfile(f):
      raise DataError(f"{f}: no such file (parallel text wants train{src_ext} and "
                      f"train{tgt_ext}; set source_lang / target_lang for other names)")
  return files


def load_data(config, path: str, bad_samples: str = "fail"):
  """Parallel text as bucketed arrays; the vocabulary sizes come from the data, capped at the
  configured ones. With bad_samples='skip' a pair with a line that is not UTF-8 is left out and
  counted."""
  src_path, tgt_path = parallel_files(config, path)
  bad = data_lib.BadSamples(bad_samples)
  (src_lines, src_errors), (tgt_lines, tgt_errors) = read_lines(src_path), read_lines(tgt_path)
  if bad.policy == "fail" and (src_errors or tgt_errors):  # the first file's first bad line
    raise next(iter((src_errors or tgt_errors).values()))
  if len(src_lines) != len(tgt_lines):
    raise DataError(f"{tgt_path}: {len(tgt_lines)} lines, but {src_path} has "
                    f"{len(src_lines)}; parallel files must align line by line")
  bad_pairs = {**tgt_errors, **src_errors}  # one error per pair: the source side's if both
  for i in sorted(bad_pairs):
    bad.skip(bad_pairs[i])
  bad.check_any_left(len(src_lines) - len(bad_pairs), src_path)
  src_tokens = [tokenize(s) for i, s in enumerate(src_lines) if i not in bad_pairs]
  tgt_tokens = [tokenize(s) for i, s in enumerate(tgt_lines) if i not in bad_pairs]
  src_vocab = build_vocabulary(src_tokens, config.source_vocab)
  tgt_vocab = build_vocabulary(tgt_tokens, config.target_vocab)
  S, T = config.lengths
  pairs, too_long, empty = [], 0, 0
  for src, tgt in zip(src_tokens, tgt_tokens):
    if not src or not tgt:
      empty += 1
    elif len(src) > S or len(tgt) > T - 1:
      too_long += 1
    else:
      pairs.append(([src_vocab.get(w, UNK) for w in src], [tgt_vocab.get(w, UNK) for w in tgt]))
  if not pairs:
    raise DataError(f"{src_path}: no sentence pair fits bucket ({S}, {T}) ({too_long} too long, "
                    f"{empty} with an empty side)")
  n = len(pairs)
  source = np.full((n, S), PAD, np.int32)
  target_input = np.full((n, T), PAD, np.int32)
  target_output = np.full((n, T), PAD, np.int32)
  target_mask = np.zeros((n, T), np.float32)
  for i, (src, tgt) in enumerate(pairs):
    source[i, S - len(src):] = src[::-1]
    target_input[i, :len(tgt) + 1] = [GO] + tgt
    target_output[i, :len(tgt) + 1] = tgt + [EOS]
    target_mask[i, :len(tgt) + 1] = 1.0
  config = config_lib.replace(config, source_vocab=len(src_vocab), target_vocab=len(tgt_vocab))
  source_ = data_lib.ArraySource(
      {"source": source, "target_input": target_input, "target_output": target_output,
       "target_mask": target_mask},
      description=f"{src_path} + {tgt_path}",
      extra={"lines": len(src_lines), "dropped_too_long": too_long, "dropped_empty": empty,
             "bucket": [S, T], "source_vocab": len(src_vocab), "target_vocab": len(tgt_vocab),
             **bad.summary()})
  source_.vocabularies = (src_vocab, tgt_vocab)
  return source_, config
