import os
import struct
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_jax import audio, model_steps, timit
from fathom_jax.errors import DataError, UsageError
from fathom_jax.tuned import speech as tuned_speech
from fathom_jax.workloads import speech
from tests import workload_checks as checks


def expected_parameters(c):
  F, H, K = c.features, c.hidden, c.num_classes
  dense = lambda i, o: i * o + o
  # h1..h3; the recurrent layer's shared input W4, b4 and its two recurrent matrices; h5; output.
  return dense(F, H) + 2 * dense(H, H) + dense(H, H) + 2 * H * H + dense(H, H) + dense(H, K)


def test_parameter_count_matches_architecture():
  c = speech.PRESETS["paper"]
  assert checks.parameter_count("speech") == expected_parameters(c) == 6_386_750
  assert checks.parameter_count("speech", hidden=8) == expected_parameters(
      speech.Config(hidden=8))


def test_timit_phone_set():
  assert len(timit.TIMIT_PHONES) == len(set(timit.TIMIT_PHONES)) == 61
  assert speech.PRESETS["paper"].num_classes == 62
  assert min(timit.PHONE_IDS.values()) == 1 and speech.BLANK == 0


def test_bad_optimizer():
  with pytest.raises(UsageError, match="optimizer"):
    checks.build("speech", optimizer="rmsprop")


@pytest.fixture(scope="module")
def tiny():
  """The tiny model, a batch, its variables and a jitted apply(variables, batch, train)."""
  _, model = checks.build("speech")
  batch = checks.synthetic_batch(model, 0, 4)
  variables = checks.init_variables(model, jax.random.key(1), batch)
  apply = jax.jit(lambda v, b, train: model.apply(v, b, train=train, rng=None)[0],
                  static_argnums=2)
  return model, batch, variables, apply


def test_synthetic_batch_and_shapes(tiny):
  model, batch, variables, apply = tiny
  c = speech.PRESETS["tiny"]
  frames, labels = np.asarray(batch["feature_lengths"]), np.asarray(batch["label_lengths"])
  assert ((frames >= c.max_frames // 2) & (frames <= c.max_frames)).all()
  assert ((labels >= 1) & (2 * labels <= frames)).all()  # alignable under CTC
  for i in range(4):
    assert not np.asarray(batch["features"])[i, frames[i]:].any()
    assert not np.asarray(batch["labels"])[i, labels[i]:].any()
    assert (np.asarray(batch["labels"])[i, :labels[i]] >= 1).all()
  assert apply(variables, batch, True).shape == (4, c.max_frames, 62)
  out = apply(variables, batch, False)
  assert out["labels"].shape == (4, c.max_frames) and out["lengths"].shape == (4,)


def train(model, batch, seeds, steps):
  step = jax.jit(model_steps.make_train_step(model))
  runs = []
  for seed in seeds:
    state = checks.init_train_state(model, jax.random.key(seed), batch)
    losses = []
    for _ in range(steps):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    runs.append(np.asarray(losses))
  return runs


def test_loss_falls_and_deterministic():
  _, model = checks.build("speech")
  batch = checks.synthetic_batch(model, 1, 4)
  losses, a, b = train(model, batch, (0, 3, 3), 30)
  assert np.isfinite(losses).all()
  assert losses[-3:].mean() < 0.5 * losses[:3].mean(), losses
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, losses[:30])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_bfloat16_trains(optimizer):
  _, model = checks.build("speech", dtype="bfloat16", optimizer=optimizer)
  batch = checks.synthetic_batch(model, 1, 4)
  (losses,) = train(model, batch, (0,), 4)
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


BIDIRECTIONAL = pytest.mark.parametrize(
    "bidirectional_rnn", [speech.bidirectional_rnn, tuned_speech.bidirectional_rnn],
    ids=["reference", "tuned"])


@BIDIRECTIONAL
def test_bidirectional_rnn_matches_a_loop(bidirectional_rnn):
  rng = np.random.default_rng(0)
  B, T, H, clip = 2, 6, 3, 1.5
  x = rng.normal(size=(B, T, H))
  lengths = [6, 4]
  forward, backward = rng.normal(size=(2, H, H))
  valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
  got = np.asarray(bidirectional_rnn(jnp.asarray(x, jnp.float32), jnp.asarray(valid),
                                     jnp.asarray(forward, jnp.float32),
                                     jnp.asarray(backward, jnp.float32), clip))
  g = lambda v: np.minimum(np.maximum(v, 0), clip)
  want = np.zeros((B, T, H))
  for b, n in enumerate(lengths):
    h = np.zeros(H)
    for t in range(n):
      h = g(x[b, t] + h @ forward)
      want[b, t] += h
    h = np.zeros(H)
    for t in reversed(range(n)):  # starts at this utterance's own last frame
      h = g(x[b, t] + h @ backward)
      want[b, t] += h
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@BIDIRECTIONAL
def test_bidirectional_rnn_gradient_matches_autodiff_of_a_loop(bidirectional_rnn):
  """The scans' gradients (the tuned one's backward pass written out, dU as one matmul after the
  loop) against jax.grad of a Python loop over frames."""
  rng = np.random.default_rng(1)
  B, T, H, clip = 3, 6, 4, 1.0
  x = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
  forward, backward = jnp.asarray(rng.normal(size=(2, H, H)) * 0.7, jnp.float32)
  weights = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
  lengths = np.asarray([6, 3, 1])
  valid = jnp.asarray(np.arange(T)[None, :] < lengths[:, None])
  g = lambda v: jnp.minimum(jnp.maximum(v, 0), clip)

  def loop(x, forward, backward):
    total = 0.0
    for b, n in enumerate(lengths):
      h, outs = jnp.zeros(H), [jnp.zeros(H)] * T
      for t in range(n):
        h = g(x[b, t] + h @ forward)
        outs[t] = outs[t] + h
      h = jnp.zeros(H)
      for t in reversed(range(n)):
        h = g(x[b, t] + h @ backward)
        outs[t] = outs[t] + h
      total = total + (jnp.stack(outs) * weights[b]).sum()
    return total

  fast = lambda x, f, bw: (bidirectional_rnn(x, valid, f, bw, clip) * weights).sum()
  want = jax.grad(loop, (0, 1, 2))(x, forward, backward)
  got = jax.jit(jax.grad(fast, (0, 1, 2)))(x, forward, backward)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got[2])).sum() > 0  # the backward direction gets gradient


def test_padding_is_ignored_and_future_frames_matter(tiny):
  model, batch, variables, apply = tiny
  batch = {**batch, "feature_lengths": jnp.asarray([10, 24, 16, 5], jnp.int32)}
  logits = np.asarray(apply(variables, batch, True))
  garbage = batch["features"].at[0, 10:].set(7.0).at[3, 5:].set(-3.0)
  changed = np.asarray(apply(variables, {**batch, "features": garbage}, True))
  np.testing.assert_allclose(changed[0, :10], logits[0, :10], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(changed[3, :5], logits[3, :5], rtol=1e-5, atol=1e-5)
  # The backward direction carries the last frame back to the first.
  late = batch["features"].at[1, 23].add(5.0)
  moved = np.asarray(apply(variables, {**batch, "features": late}, True))
  assert not np.allclose(moved[1, 0], logits[1, 0])


def one_hot_logits(paths, classes=5):
  return jnp.asarray(np.eye(classes)[np.asarray(paths)] * 4.0, jnp.float32)


def test_ctc_greedy_decoder():
  paths = [[1, 1, 0, 2, 2, 2, 0, 0],  # repeats collapse, blanks go
           [1, 0, 1, 1, 0, 0, 0, 0],  # a blank between repeats keeps both
           [0, 0, 0, 0, 0, 0, 0, 0],  # nothing
           [3, 4, 3, 4, 3, 4, 3, 4],  # every change is a new label
           [2, 2, 3, 3, 4, 4, 1, 1]]  # only 4 frames are real
  lengths = jnp.asarray([8, 8, 8, 8, 4], jnp.int32)
  labels, n = speech.ctc_greedy_decode(one_hot_logits(paths), lengths)
  assert n.tolist() == [2, 2, 0, 8, 2]
  assert labels.tolist() == [[1, 2] + [0] * 6, [1, 1] + [0] * 6, [0] * 8,
                             [3, 4, 3, 4, 3, 4, 3, 4], [2, 3] + [0] * 6]


def test_ctc_loss_by_hand():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 3))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  # Utterance 0: 2 frames (the third is padding), label "1": paths 11, 10, 01.
  p0 = p[0, 0, 1] * p[0, 1, 1] + p[0, 0, 1] * p[0, 1, 0] + p[0, 0, 0] * p[0, 1, 1]
  # Utterance 1: 3 frames, labels "2 2": the only path is 2 blank 2.
  p1 = p[1, 0, 2] * p[1, 1, 0] * p[1, 2, 2]
  batch = {"feature_lengths": jnp.asarray([2, 3]), "labels": jnp.asarray([[1, 0], [2, 2]]),
           "label_lengths": jnp.asarray([1, 2])}
  loss, metrics = speech.ctc_loss(jnp.asarray(logits, jnp.float32), batch)
  assert float(loss) == pytest.approx(-(np.log(p0) + np.log(p1)) / 2, rel=1e-5)
  assert float(metrics["loss_per_label"]) == pytest.approx(
      (-np.log(p0) - np.log(p1) / 2) / 2, rel=1e-5)


# --- reader ----------------------------------------------------------------------------------

RATE = 16000


def write_wav(path, seconds, freq=440.0, width=2, channels=1, rate=RATE):
  t = np.arange(int(seconds * rate)) / rate
  signal = 0.3 * np.sin(2 * np.pi * freq * t)
  if width == 2:
    raw = np.repeat((signal * 32767).astype("<i2")[:, None], channels, 1).tobytes()
  else:
    raw = ((signal + 1) * 127).astype(np.uint8).tobytes()
  with wave.open(str(path), "wb") as w:
    w.setnchannels(channels)
    w.setsampwidth(width)
    w.setframerate(rate)
    w.writeframes(raw)


def write_float_wav(path):
  data = np.zeros(100, "<f4").tobytes()
  fmt = struct.pack("<HHIIHH", 3, 1, RATE, RATE * 4, 4, 32)
  body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack(
      "<I", len(data)) + data
  path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_wav_reader(tmp_path):
  write_wav(tmp_path / "a.wav", 0.2)
  (tmp_path / "a.txt").write_text("h# sh ix\nh#\n")
  os.mkdir(tmp_path / "dr1")
  write_wav(tmp_path / "dr1" / "B.WAV", 0.15, freq=1000.0, channels=2)
  (tmp_path / "dr1" / "B.PHN").write_text("0 800 h#\n800 1600 AA\n1600 2400 h#\n")
  write_wav(tmp_path / "long.wav", 0.5)  # 49 frames > max_frames
  (tmp_path / "long.txt").write_text("aa")
  write_wav(tmp_path / "short.wav", 0.03)  # 2 frames cannot hold "aa aa" (needs 3)
  (tmp_path / "short.txt").write_text("aa aa")
  base = checks.build("speech")[0]
  source, config = timit.load_data(base, str(tmp_path))
  assert config.num_classes == 62 and config.features == 26
  summary = source.summary()
  assert source.num_examples == 2
  assert summary["wav_files"] == 4 and summary["dropped_too_long"] == 1
  assert summary["dropped_unalignable"] == 1 and summary["sample_rates"] == [RATE]
  arrays = source.arrays
  ids = timit.PHONE_IDS
  # Sorted paths: a.wav before dr1/B.WAV.
  assert arrays["labels"][0].tolist() == [ids["h#"], ids["sh"], ids["ix"], ids["h#"], 0, 0]
  assert arrays["labels"][1].tolist() == [ids["h#"], ids["aa"], ids["h#"], 0, 0, 0]
  assert arrays["label_lengths"].tolist() == [4, 3]
  # 3200 samples: frames at 0, 160, ... the last zero-padded: 1 + ceil((3200 - 400) / 160).
  assert arrays["feature_lengths"].tolist() == [19, 1 + int(np.ceil((2400 - 400) / 160))]
  samples, rate = audio.read_wav(str(tmp_path / "a.wav"))
  np.testing.assert_allclose(arrays["features"][0, :19], audio.speech_features(samples, rate))
  assert not arrays["features"][0, 19:].any()
  batch = next(source.batches(4, seed=0, train=True))
  model = speech.build(config, "float32")
  want = jax.eval_shape(lambda k: model.synthetic_batch(k, 4), jax.random.key(0))
  assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == {
      k: (v.shape, str(v.dtype)) for k, v in want.items()}


@pytest.mark.parametrize("setup, message", [
    (lambda d: (write_wav(d / "x.wav", 0.1, width=1), (d / "x.txt").write_text("aa")),
     r"x.wav: WAV encoding is 8-bit PCM; want 16-bit PCM"),
    (lambda d: (write_float_wav(d / "x.wav"), (d / "x.txt").write_text("aa")),
     r"x.wav: WAV encoding is IEEE float; want 16-bit PCM"),
    (lambda d: ((d / "x.wav").write_bytes(b"not a wav at all"), (d / "x.txt").write_text("aa")),
     r"x.wav: not a readable WAV file"),
    (lambda d: write_wav(d / "x.wav", 0.1), r"x.wav: no transcript beside it"),
    (lambda d: (write_wav(d / "x.wav", 0.1), (d / "x.txt").write_text("aa\nbb zz\n")),
     r"x.txt:2: 'bb' is not one of the 61 TIMIT phones"),
    (lambda d: (write_wav(d / "x.wav", 0.1), (d / "x.phn").write_text("0 10 aa\n10 h#\n")),
     r"x.phn:2: want 'start end phone'"),
    (lambda d: (write_wav(d / "x.wav", 0.1), (d / "x.txt").write_text(" \n")),
     r"x.txt: empty transcript"),
    (lambda d: None, r"no .wav files"),
    (lambda d: (write_wav(d / "x.wav", 1.0), (d / "x.txt").write_text("aa")),
     r"no utterance fits max_frames=24"),
])
def test_reader_errors(tmp_path, setup, message):
  setup(tmp_path)
  with pytest.raises(DataError, match=message):
    timit.load_data(checks.build("speech")[0], str(tmp_path))


def test_unreadable_utterances_skipped_and_counted(tmp_path):
  write_wav(tmp_path / "a.wav", 0.2)
  (tmp_path / "a.txt").write_text("h# sh ix h#")
  write_wav(tmp_path / "b.wav", 0.1, width=1)  # 8-bit PCM
  (tmp_path / "b.txt").write_text("aa")
  write_float_wav(tmp_path / "c.wav")
  (tmp_path / "c.txt").write_text("aa")
  write_wav(tmp_path / "d.wav", 0.1)  # no transcript
  base = checks.build("speech")[0]
  source, _ = timit.load_data(base, str(tmp_path), bad_samples="skip")
  assert source.num_examples == 1
  summary = source.summary()
  assert summary["wav_files"] == 4 and summary["bad_samples"]["skipped"] == 3
  assert summary["bad_samples"]["first"] == [
      f"{tmp_path / 'b.wav'}: WAV encoding is 8-bit PCM; want 16-bit PCM",
      f"{tmp_path / 'c.wav'}: WAV encoding is IEEE float; want 16-bit PCM",
      f"{tmp_path / 'd.wav'}: no transcript beside it (d.txt or .phn)"]
  with pytest.raises(DataError, match="b.wav: WAV encoding is 8-bit PCM") as info:
    timit.load_data(base, str(tmp_path))
  assert "\n" not in str(info.value)
  os.remove(tmp_path / "a.wav")
  with pytest.raises(DataError, match="no usable samples; 3 bad ones skipped"):
    timit.load_data(base, str(tmp_path), bad_samples="skip")


def test_reader_wants_a_folder(tmp_path):
  write_wav(tmp_path / "x.wav", 0.1)
  with pytest.raises(DataError, match="want a folder"):
    timit.load_data(checks.build("speech")[0], str(tmp_path / "x.wav"))
