import wave

import numpy as np
import pytest
import scipy.fft

from fathom_jax import audio
from fathom_jax.errors import DataError

RATE = 16000


def sine(freq, seconds=0.1, amplitude=0.3, rate=RATE):
  t = np.arange(int(seconds * rate)) / rate
  return amplitude * np.sin(2 * np.pi * freq * t)


def test_framing():
  signal = np.arange(1, 1001, dtype=float)
  frames = audio.frame_signal(signal, 400, 160)
  assert frames.shape == (1 + int(np.ceil((1000 - 400) / 160)), 400)
  np.testing.assert_array_equal(frames[1], signal[160:560])
  np.testing.assert_array_equal(frames[-1, :1000 - 640], signal[640:])
  assert not frames[-1, 1000 - 640:].any()  # zero-padded tail
  assert audio.frame_signal(signal[:100], 400, 160).shape == (1, 400)


def test_mel_scale():
  assert audio.hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.1)  # the scale's anchor
  hz = np.array([0.0, 300.0, 4000.0, 8000.0])
  np.testing.assert_allclose(audio.mel_to_hz(audio.hz_to_mel(hz)), hz, atol=1e-9)


def test_mel_filterbank_triangles():
  bank = audio.mel_filterbank(26, 512, RATE)
  assert bank.shape == (26, 257)
  assert bank.min() >= 0 and bank.max() <= 1
  centres = bank.argmax(1)
  assert (np.diff(centres) >= 0).all()
  # Neighbouring triangles cross-fade: between the first and last centres they sum to 1.
  inner = bank[:, centres[0] + 1:centres[-1]].sum(0)
  np.testing.assert_allclose(inner, 1.0, atol=1e-9)


def test_dct_matches_scipy():
  x = np.random.default_rng(0).normal(size=26)
  np.testing.assert_allclose(audio.dct_matrix(26, 13) @ x,
                             scipy.fft.dct(x, type=2, norm="ortho")[:13], atol=1e-12)


def test_power_spectrum_peaks_at_the_tone():
  power, nfft = audio.power_spectrum(sine(1000.0), RATE)
  assert nfft == 512  # 25 ms at 16 kHz is 400 samples
  assert (power.argmax(1)[1:-1] == round(1000.0 * nfft / RATE)).all()


def test_gain_moves_only_c0():
  """Scaling the signal by a adds 2 log a to every log energy; an orthonormal DCT puts a
  constant into c0 alone, and c0 (the log frame energy) rises by the same 2 log a."""
  signal = sine(300.0) + sine(2500.0, amplitude=0.1)
  quiet, loud = audio.mfcc(signal, RATE), audio.mfcc(2.0 * signal, RATE)
  assert quiet.shape == (1 + int(np.ceil((1600 - 400) / 160)), 13)
  np.testing.assert_allclose(loud[:, 0] - quiet[:, 0], 2 * np.log(2.0), rtol=1e-9)
  np.testing.assert_allclose(loud[:, 1:], quiet[:, 1:], atol=1e-9)


def test_deltas_of_a_ramp():
  ramp = np.outer(np.arange(10.0), [1.0, -2.0])
  d = audio.deltas(ramp)
  np.testing.assert_allclose(d[2:-2], [[1.0, -2.0]] * 6)
  assert abs(d[0, 0]) < 1.0  # edges repeat the end frames


def test_speech_features_standardised():
  feats = audio.speech_features(sine(440.0, 0.3) + sine(3000.0, 0.3, 0.05), RATE)
  assert feats.shape == (1 + int(np.ceil((4800 - 400) / 160)), 26)
  assert feats.dtype == np.float32
  np.testing.assert_allclose(feats.mean(0), 0.0, atol=1e-5)
  varying = feats.std(0) > 0
  np.testing.assert_allclose(feats.std(0)[varying], 1.0, rtol=1e-4)


def write(path, frames, channels=1, width=2):
  with wave.open(str(path), "wb") as w:
    w.setnchannels(channels)
    w.setsampwidth(width)
    w.setframerate(8000)
    w.writeframes(frames)


def test_read_wav_averages_channels(tmp_path):
  write(tmp_path / "s.wav", np.array([1000, 3000, -2000, 0], "<i2").tobytes(), channels=2)
  samples, rate = audio.read_wav(str(tmp_path / "s.wav"))
  assert rate == 8000
  np.testing.assert_allclose(samples, np.array([2000, -1000]) / 32768.0)


def test_read_wav_errors(tmp_path):
  write(tmp_path / "e.wav", b"")
  with pytest.raises(DataError, match="e.wav: WAV file holds no samples"):
    audio.read_wav(str(tmp_path / "e.wav"))
  write(tmp_path / "w.wav", b"\x00" * 12, width=3)
  with pytest.raises(DataError, match="w.wav: WAV encoding is 24-bit PCM"):
    audio.read_wav(str(tmp_path / "w.wav"))
  (tmp_path / "t.wav").write_bytes(b"RIFF\x00\x00")
  with pytest.raises(DataError, match="t.wav: not a readable WAV file"):
    audio.read_wav(str(tmp_path / "t.wav"))
