"""Speech features in numpy: WAV reading and 13 MFCCs (energy as c0) plus 13 deltas.

The pipeline is the classic one (as in HTK and python_speech_features): pre-emphasis 0.97, 25 ms
frames every 10 ms (the last frame zero-padded), Hamming window, power spectrum of an FFT of the
next power of two at or above the frame length, 26 triangular mel filters from 0 Hz to Nyquist,
log, orthonormal DCT-II keeping 13 cepstra, c0 replaced by the log frame energy; deltas by
linear regression over +-2 frames; each of the 26 dimensions standardised over the utterance.
"""

import struct
import wave

import numpy as np

from fathom_jax.errors import DataError

FRAME_S = 0.025
STEP_S = 0.010
PREEMPHASIS = 0.97
NUM_FILTERS = 26
NUM_CEPSTRA = 13
DELTA_WINDOW = 2
FEATURES = 2 * NUM_CEPSTRA
_FLOOR = np.finfo(np.float64).eps  # log(0) guard for silent frames

_WAV_ENCODINGS = {1: "PCM", 2: "Microsoft ADPCM", 3: "IEEE float", 6: "A-law", 7: "mu-law",
                  0x11: "IMA ADPCM", 0x55: "MP3", 0xFFFE: "extensible"}


def _wav_format_tag(path: str):
  """The format tag of a RIFF/WAVE file's fmt chunk, or None if there is none to read."""
  try:
    with open(path, "rb") as f:
      head = f.read(12)
      if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
      while True:
        chunk = f.read(8)
        if len(chunk) < 8:
          return None
        name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if name == b"fmt ":
          body = f.read(2)
          return struct.unpack("<H", body)[0] if len(body) == 2 else None
        f.seek(size + (size & 1), 1)
  except OSError:
    return None


def read_wav(path: str) -> tuple[np.ndarray, int]:
  """Samples of a 16-bit PCM WAV file as float64 in [-1, 1), channels averaged, and the rate."""
  try:
    with wave.open(path, "rb") as w:
      channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
      raw = w.readframes(w.getnframes())
  except wave.Error as e:
    tag = _wav_format_tag(path)
    if tag is not None and tag != 1:
      name = _WAV_ENCODINGS.get(tag, f"format code {tag}")
      raise DataError(f"{path}: WAV encoding is {name}; want 16-bit PCM") from None
    raise DataError(f"{path}: not a readable WAV file ({e})") from None
  except (EOFError, OSError) as e:
    raise DataError(f"{path}: not a readable WAV file ({e or 'truncated'})") from None
  if width != 2:
    raise DataError(f"{path}: WAV encoding is {8 * width}-bit PCM; want 16-bit PCM")
  usable = len(raw) // (2 * channels) * 2 * channels  # a truncated last frame is dropped
  samples = np.frombuffer(raw[:usable], "<i2").reshape(-1, channels)
  if samples.shape[0] == 0:
    raise DataError(f"{path}: WAV file holds no samples")
  return samples.mean(axis=1) / 32768.0, rate


def frame_signal(signal: np.ndarray, frame_len: int, step: int) -> np.ndarray:
  """[num_frames, frame_len]: frames every `step` samples; the last is zero-padded, so every
  sample lands in a frame and a signal shorter than one frame still gives one."""
  n = len(signal)
  num_frames = 1 if n <= frame_len else 1 + int(np.ceil((n - frame_len) / step))
  padded = np.zeros((num_frames - 1) * step + frame_len)
  padded[:n] = signal
  index = np.arange(frame_len)[None, :] + step * np.arange(num_frames)[:, None]
  return padded[index]


def hz_to_mel(hz):
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(num_filters: int, nfft: int, rate: int) -> np.ndarray:
  """[num_filters, nfft // 2 + 1] triangles, equally spaced in mel from 0 Hz to rate / 2, each
  peaking at 1 on its centre frequency (evaluated at the FFT bins' exact frequencies)."""
  edges = mel_to_hz(np.linspace(0.0, hz_to_mel(rate / 2), num_filters + 2))
  freqs = np.arange(nfft // 2 + 1) * rate / nfft
  low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  rising = (freqs - low) / (centre - low)
  falling = (high - freqs) / (high - centre)
  return np.maximum(0.0, np.minimum(rising, falling))


def dct_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] orthonormal DCT-II (scipy.fft.dct(x, norm='ortho')[:n_out] == M @ x)."""
  k = np.arange(n_out)[:, None]
  n = np.arange(n_in)[None, :]
  m = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
  m[0] /= np.sqrt(2.0)
  return m


def power_spectrum(signal: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
  """[num_frames, nfft // 2 + 1] power spectra of the pre-emphasised, windowed frames, and nfft."""
  frame_len, step = int(round(FRAME_S * rate)), int(round(STEP_S * rate))
  emphasised = np.append(signal[:1], signal[1:] - PREEMPHASIS * signal[:-1])
  frames = frame_signal(emphasised, frame_len, step) * np.hamming(frame_len)
  nfft = 1 << (frame_len - 1).bit_length()
  return np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft, nfft


def mfcc(signal: np.ndarray, rate: int) -> np.ndarray:
  """[num_frames, 13]: MFCCs with c0 replaced by the log energy of the frame."""
  power, nfft = power_spectrum(signal, rate)
  energies = power @ mel_filterbank(NUM_FILTERS, nfft, rate).T
  cepstra = np.log(np.maximum(energies, _FLOOR)) @ dct_matrix(NUM_FILTERS, NUM_CEPSTRA).T
  cepstra[:, 0] = np.log(np.maximum(power.sum(axis=1), _FLOOR))
  return cepstra


def deltas(features: np.ndarray, window: int = DELTA_WINDOW) -> np.ndarray:
  """d_t = sum_n n (c_{t+n} - c_{t-n}) / (2 sum_n n^2), n = 1..window, edges repeated."""
  t = len(features)
  padded = np.pad(features, ((window, window), (0, 0)), mode="edge")
  total = sum(n * (padded[window + n:window + n + t] - padded[window - n:window - n + t])
              for n in range(1, window + 1))
  return total / (2 * sum(n * n for n in range(1, window + 1)))


def standardise(features: np.ndarray) -> np.ndarray:
  """Zero mean, unit variance per dimension over the utterance (constant dimensions -> 0)."""
  std = features.std(axis=0)
  return (features - features.mean(axis=0)) / np.where(std > 0, std, 1.0)


def speech_features(signal: np.ndarray, rate: int) -> np.ndarray:
  """[num_frames, 26] float32: 13 MFCCs (energy as c0) and their deltas, standardised."""
  cepstra = mfcc(signal, rate)
  return standardise(np.concatenate([cepstra, deltas(cepstra)], axis=1)).astype(np.float32)
