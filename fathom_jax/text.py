"""Plain text for the language model: a UTF-8 file, or a folder of *.txt files, as byte tokens.

The vocabulary is the 256 byte values and an end-of-text token between files, so any text reads
without a tokenizer; the token stream is cut into training sequences one context long.
"""

import os

import numpy as np

from fathom_jax import config as config_lib
from fathom_jax import data as data_lib
from fathom_jax.errors import DataError

END_OF_TEXT = 256
VOCAB_SIZE = 257  # bytes and END_OF_TEXT


def text_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise DataError(f"{path}: neither a text file nor a folder")
  files = sorted(os.path.join(path, n) for n in os.listdir(path)
                 if n.endswith(".txt") and os.path.isfile(os.path.join(path, n)))
  if not files:
    raise DataError(f"{path}: no *.txt files in this folder")
  return files


def read_text(path: str) -> bytes:
  """The file's bytes, checked to be non-empty UTF-8."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  if not raw.strip():
    raise DataError(f"{path}: empty")
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  return raw


def load_data(config, path: str, bad_samples: str = "fail"):
  """Sequences of `config.context` byte tokens from the text at `path`. With bad_samples='skip'
  an empty or non-UTF-8 file of a folder is left out and counted."""
  files = text_files(path)
  bad = data_lib.BadSamples(bad_samples)
  pieces = []
  for name in files:
    try:
      raw = read_text(name)
    except DataError as e:
      bad.skip(e)
      continue
    pieces += [np.frombuffer(raw, np.uint8).astype(np.int32), np.array([END_OF_TEXT], np.int32)]
  bad.check_any_left(len(pieces), path)
  stream = np.concatenate(pieces)
  sequences = len(stream) // config.context
  if sequences == 0:
    raise DataError(f"{path}: {len(stream)} tokens, fewer than one context of {config.context} "
                    "(use a preset or --override=context=N that fits)")
  tokens = stream[:sequences * config.context].reshape(sequences, config.context)
  config = config_lib.replace(config, vocab_size=VOCAB_SIZE)
  source = data_lib.ArraySource({"tokens": tokens}, description=path,
                                extra={"files": len(files), "tokens": int(len(stream)),
                                       "vocab_size": VOCAB_SIZE, **bad.summary()})
  return source, config
