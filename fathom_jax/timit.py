"""WAV files with phone transcripts (TIMIT's `.phn`, or plain `.txt`) as speech's features and
CTC labels.
"""

import os

import numpy as np

from fathom_jax import audio
from fathom_jax import config as config_lib
from fathom_jax import data as data_lib
from fathom_jax.errors import DataError

TIMIT_PHONES = (
    "aa ae ah ao aw ax ax-h axr ay b bcl ch d dcl dh dx eh el em en eng epi er ey f g gcl h# hh "
    "hv ih ix iy jh k kcl l m n ng nx ow oy p pau pcl q r s sh t tcl th uh uw ux v w y z zh"
).split()
PHONE_IDS = {p: i + 1 for i, p in enumerate(TIMIT_PHONES)}  # 0 is the CTC blank

def read_transcript(path: str) -> list[int]:
  """Phone ids of a `.txt` (phones separated by whitespace) or TIMIT `.phn` transcript."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  timit = path.lower().endswith(".phn")
  ids = []
  for lineno, line in enumerate(lines, 1):
    fields = line.split()
    if not fields:
      continue
    if timit:
      if len(fields) != 3:
        raise DataError(f"{path}:{lineno}: want 'start end phone', got {line.strip()[:60]!r}")
      fields = fields[2:]
    for phone in fields:
      if phone.lower() not in PHONE_IDS:
        raise DataError(f"{path}:{lineno}: {phone!r} is not one of the 61 TIMIT phones")
      ids.append(PHONE_IDS[phone.lower()])
  if not ids:
    raise DataError(f"{path}: empty transcript")
  return ids


def _transcript_for(wav_path: str) -> str:
  stem = wav_path[:-4]
  for ext in (".txt", ".phn", ".TXT", ".PHN"):
    if os.path.isfile(stem + ext):
      return stem + ext
  raise DataError(f"{wav_path}: no transcript beside it ({os.path.basename(stem)}.txt or .phn)")


def ctc_frames_needed(labels) -> int:
  """Frames CTC needs to emit `labels`: one per label plus a blank between equal neighbours."""
  return len(labels) + sum(a == b for a, b in zip(labels, labels[1:]))


def find_wavs(path: str) -> list[str]:
  if not os.path.isdir(path):
    raise DataError(f"{path}: want a folder of .wav files with .txt or .phn transcripts")
  wavs = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                for name in names if name.lower().endswith(".wav"))
  if not wavs:
    raise DataError(f"{path}: no .wav files in this folder")
  return wavs


def load_data(config, path: str, bad_samples: str = "fail"):
  """Features and phone labels of every WAV file under `path`, padded to the config's sizes.
  With bad_samples='skip' an utterance whose WAV or transcript cannot be read is left out and
  counted."""
  wavs = find_wavs(path)
  bad = data_lib.BadSamples(bad_samples)
  kept, too_long, unalignable, rates = [], 0, 0, set()
  for wav in wavs:
    try:
      labels = read_transcript(_transcript_for(wav))
      samples, rate = audio.read_wav(wav)
    except DataError as e:
      bad.skip(e)
      continue
    rates.add(rate)
    feats = audio.speech_features(samples, rate)
    if len(feats) > config.max_frames or len(labels) > config.max_labels:
      too_long += 1
    elif len(feats) < ctc_frames_needed(labels):
      unalignable += 1
    else:
      kept.append((feats, labels))
  bad.check_any_left(len(wavs) - bad.count, path)
  if not kept:
    raise DataError(f"{path}: no utterance fits max_frames={config.max_frames} and "
                    f"max_labels={config.max_labels} ({too_long} too long, {unalignable} too "
                    "short for their labels)")
  n = len(kept)
  features = np.zeros((n, config.max_frames, audio.FEATURES), np.float32)
  labels = np.zeros((n, config.max_labels), np.int32)
  feature_lengths = np.zeros((n,), np.int32)
  label_lengths = np.zeros((n,), np.int32)
  for i, (feats, ids) in enumerate(kept):
    features[i, :len(feats)] = feats
    labels[i, :len(ids)] = ids
    feature_lengths[i], label_lengths[i] = len(feats), len(ids)
  config = config_lib.replace(config, features=audio.FEATURES, num_classes=len(PHONE_IDS) + 1)
  source = data_lib.ArraySource(
      {"features": features, "feature_lengths": feature_lengths, "labels": labels,
       "label_lengths": label_lengths},
      description=path,
      extra={"wav_files": len(wavs), "dropped_too_long": too_long,
             "dropped_unalignable": unalignable, "sample_rates": sorted(rates),
             "frames": int(feature_lengths.sum()), **bad.summary()})
  return source, config
