import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_jax import model_steps, parallel_text
from fathom_jax.errors import DataError, UsageError
from fathom_jax.tuned import seq2seq as tuned_seq2seq
from fathom_jax.workloads import seq2seq
from tests import workload_checks as checks


def lstm(in_dim, hidden):
  return (in_dim + hidden) * 4 * hidden + 4 * hidden  # one kernel over [x, h], one bias


def expected_parameters(c):
  E, H, L = c.embed_dim, c.hidden, c.layers
  embeddings = c.source_vocab * E + c.target_vocab * E
  encoder = lstm(E, H) + (L - 1) * lstm(H, H)
  decoder = lstm(E + H, H) + (L - 1) * lstm(H, H)  # first layer reads [embedding, context]
  attention = H * H + (H * H + H) + H  # W_k, W_q with bias, v
  readout = 2 * H * H + H  # tanh(W [h, context] + b)
  output = H * c.target_vocab + c.target_vocab
  return embeddings + encoder + decoder + attention + readout + output


def test_parameter_count_matches_architecture():
  c = seq2seq.PRESETS["paper"]
  count = checks.parameter_count("seq2seq")
  assert count == expected_parameters(c) == 34_436_928
  one_layer = seq2seq.Config(layers=1, source_vocab=100, target_vocab=50)
  assert checks.parameter_count("seq2seq", layers=1, source_vocab=100,
                                target_vocab=50) == expected_parameters(one_layer)


@pytest.mark.parametrize("bucket, lengths", [((0,), (5, 10)), ((3,), (40, 50)), ((7, 9), (7, 9))])
def test_buckets_set_the_shapes(bucket, lengths):
  config, model = checks.build("seq2seq", bucket=bucket)
  assert config.lengths == lengths
  shapes = jax.eval_shape(lambda k: model.synthetic_batch(k, 3), jax.random.key(0))
  S, T = lengths
  assert shapes["source"].shape == (3, S)
  assert all(shapes[k].shape == (3, T) for k in ("target_input", "target_output", "target_mask"))


@pytest.mark.parametrize("bucket", [(4,), (1, 2, 3), (5, 1), (0, 5)])
def test_bad_bucket(bucket):
  with pytest.raises(UsageError, match="bucket"):
    checks.build("seq2seq", bucket=bucket)


def test_sampled_softmax_needs_fewer_samples_than_classes():
  with pytest.raises(UsageError, match="num_samples"):
    checks.build("seq2seq", sampled_softmax=True, num_samples=36)


def test_synthetic_batch_layout():
  config, model = checks.build("seq2seq")
  batch = jax.tree.map(np.asarray, jax.jit(model.synthetic_batch, static_argnums=1)(
      jax.random.key(0), 16))
  S, T = config.lengths
  for i in range(16):
    src = batch["source"][i]
    n = (src != seq2seq.PAD).sum()
    assert 1 <= n <= S and not src[:S - n].any() and (src[S - n:] >= 4).all()  # left-padded
    m = int(batch["target_mask"][i].sum()) - 1  # words; the last predicted token is EOS
    assert 1 <= m <= T - 1
    out, inp = batch["target_output"][i], batch["target_input"][i]
    assert out[m] == seq2seq.EOS and not out[m + 1:].any() and (out[:m] >= 4).all()
    assert inp[0] == seq2seq.GO and list(inp[1:m + 1]) == list(out[:m]) and not inp[m + 1:].any()


def train(model, batch, seeds, steps):
  """Losses of `steps` jitted train steps from each seed's initial state (compiled once)."""
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


@pytest.fixture(scope="module")
def tiny():
  """The tiny model, a batch, its variables and a jitted apply(variables, batch, train)."""
  _, model = checks.build("seq2seq")
  batch = checks.synthetic_batch(model, 0, 4)
  variables = checks.init_variables(model, jax.random.key(1), batch)
  apply = jax.jit(lambda v, b, train: model.apply(v, b, train=train, rng=None)[0],
                  static_argnums=2)
  return model, batch, variables, apply


def test_loss_falls_and_deterministic():
  _, model = checks.build("seq2seq")
  batch = checks.synthetic_batch(model, 1, 8)
  losses, a, b = train(model, batch, (0, 3, 3), 30)
  assert np.isfinite(losses).all()
  # Starts near log(target_vocab) (uniform predictions), then fits the batch.
  assert abs(losses[0] - np.log(36)) < 0.2
  assert losses[-3:].mean() < 0.8 * losses[:3].mean(), losses
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, losses[:30])  # another seed, other losses


def test_bfloat16_trains_and_decodes():
  _, model = checks.build("seq2seq", dtype="bfloat16", layers=1)  # one layer: quicker to compile
  batch = checks.synthetic_batch(model, 1, 4)
  state = checks.init_train_state(model, jax.random.key(0), batch)
  step = jax.jit(model_steps.make_train_step(model))
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  out = jax.jit(lambda v, b: model.apply(v, b, train=False, rng=None)[0])(
      {"params": state["params"]}, batch)
  assert out["tokens"].shape == (4, 10) and out["tokens"].dtype == jnp.int32


def test_sampled_softmax_trains():
  _, model = checks.build("seq2seq", sampled_softmax=True, layers=1)
  batch = checks.synthetic_batch(model, 1, 4)
  (losses,) = train(model, batch, (0,), 3)
  # 1 + 8 classes, near uniform at first.
  assert np.isfinite(losses).all() and abs(losses[0] - np.log(9)) < 1.0


def test_greedy_decode_feeds_back_and_stops_at_eos():
  """A hand-made step whose logits pick a successor of the token fed in: row 0 follows
  GO->5->7->EOS, row 1 GO->6->EOS; PAD (fed after EOS) would lead to 9."""
  successor = np.full((10, 2), 9)
  successor[seq2seq.GO] = [5, 6]
  successor[5] = successor[6] = [7, seq2seq.EOS]
  successor[7] = [seq2seq.EOS, 7]
  successor = jnp.asarray(successor)

  def step(carry, previous):
    return carry, jax.nn.one_hot(successor[previous, jnp.arange(2)], 10)

  decode = jax.jit(lambda max_len: seq2seq.greedy_decode(step, (), 2, max_len), static_argnums=0)
  tokens, lengths, steps = decode(8)
  assert tokens.tolist() == [[5, 7, 2, 0, 0, 0, 0, 0], [6, 2, 0, 0, 0, 0, 0, 0]]
  assert lengths.tolist() == [3, 2] and int(steps) == 3  # the loop ends with the last sentence
  tokens, lengths, steps = decode(2)  # the length limit comes first
  assert tokens.tolist() == [[5, 7], [6, 2]] and lengths.tolist() == [2, 2] and int(steps) == 2


def test_greedy_decode_carries_state():
  def step(count, previous):  # EOS once row 0 has taken 2 steps, row 1 has taken 4
    eos_now = count >= jnp.asarray([1, 3])
    logits = jnp.where(eos_now[:, None], jax.nn.one_hot(seq2seq.EOS, 8), jax.nn.one_hot(5, 8))
    return count + 1, logits

  tokens, lengths, steps = jax.jit(
      lambda: seq2seq.greedy_decode(step, jnp.zeros((), jnp.int32), 2, 10))()
  assert tokens.tolist() == [[5, 2] + [0] * 8, [5, 5, 5, 2] + [0] * 6]
  assert lengths.tolist() == [2, 4] and int(steps) == 4


def test_model_decoder_stops_at_eos_when_forced(tiny):
  model, batch, variables, apply = tiny
  params = variables["params"]
  out_kernel = jnp.zeros_like(params["output"]["kernel"])
  bias = jnp.zeros_like(params["output"]["bias"]).at[seq2seq.EOS].set(10.0)
  forced = {"params": {**params, "output": {"kernel": out_kernel, "bias": bias}}}
  out = apply(forced, batch, False)
  assert out["tokens"].tolist() == [[seq2seq.EOS] + [seq2seq.PAD] * 9] * 4
  assert out["lengths"].tolist() == [1] * 4 and int(out["decoder_steps"]) == 1


def test_greedy_decode_agrees_with_teacher_forcing(tiny):
  """Feeding the decoded tokens back as teacher-forced inputs reproduces them as the argmax."""
  model, batch, variables, apply = tiny
  # Favour EOS a little, so that sentences end at various points.
  params = variables["params"]
  bias = params["output"]["bias"].at[seq2seq.EOS].add(0.3)
  variables = {"params": {**params, "output": {**params["output"], "bias": bias}}}
  decoded = apply(variables, batch, False)
  tokens = np.asarray(decoded["tokens"])
  forced = {**batch, "target_input": jnp.asarray(np.concatenate(
      [np.full((4, 1), seq2seq.GO), tokens[:, :-1]], 1).astype(np.int32))}
  predicted = np.asarray(apply(variables, forced, True)["logits"].argmax(-1))
  for i, n in enumerate(np.asarray(decoded["lengths"])):
    assert n >= 1
    np.testing.assert_array_equal(predicted[i, :n], tokens[i, :n])
    assert not tokens[i, n:].any()


def test_sampled_logits_by_hand():
  vocab, num_samples = 6, 3
  rng = jax.random.key(7)
  sampled = np.asarray(seq2seq.log_uniform_sample(rng, num_samples, vocab))
  hidden = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 4)), jnp.float32)
  kernel = jnp.asarray(np.random.default_rng(1).normal(size=(4, vocab)), jnp.float32)
  bias = jnp.arange(vocab, dtype=jnp.float32) / 10
  targets = jnp.asarray([[int(sampled[0]), (int(sampled[0]) + 1) % vocab]])
  got = np.asarray(seq2seq.sampled_logits({"kernel": kernel, "bias": bias}, hidden, targets, rng,
                                          num_samples))
  assert got.shape == (1, 2, 1 + num_samples)
  p = lambda k: np.log((k + 2) / (k + 1)) / np.log(vocab + 1)
  h, w = np.asarray(hidden), np.asarray(kernel)
  for t in range(2):
    y = int(targets[0, t])
    assert got[0, t, 0] == pytest.approx(h[0, t] @ w[:, y] + y / 10 - np.log(num_samples * p(y)),
                                         rel=1e-5)
    for j, k in enumerate(sampled):
      if k == y:  # an accidental hit is pushed out of the softmax
        assert got[0, t, 1 + j] < -1e30
      else:
        assert got[0, t, 1 + j] == pytest.approx(
            h[0, t] @ w[:, k] + k / 10 - np.log(num_samples * p(k)), rel=1e-5)


def test_log_uniform_sampler_follows_its_law():
  vocab = 50
  ids = np.asarray(seq2seq.log_uniform_sample(jax.random.key(0), 200_000, vocab))
  assert ids.min() >= 0 and ids.max() < vocab
  freq = np.bincount(ids, minlength=vocab) / len(ids)
  law = np.log((np.arange(vocab) + 2) / (np.arange(vocab) + 1)) / np.log(vocab + 1)
  np.testing.assert_allclose(freq[:5], law[:5], rtol=0.03)


def test_tokenize():
  assert parallel_text.tokenize("He said: \"Go (now)!\" 1984.") == [
      "He", "said", ":", '"', "Go", "(", "now", ")", "!", '"', "0000", "."]


SRC = "the cat sat .\nthe dog sat .\n\nthe cat ran away very far from the house .\na cat !\n"
TGT = "le chat .\nle chien .\nrien\nle chat .\nun chat !\n"


def write_corpus(tmp_path, src=SRC, tgt=TGT):
  (tmp_path / "train.en").write_text(src, encoding="utf-8")
  (tmp_path / "train.fr").write_text(tgt, encoding="utf-8")


def test_parallel_text_reader(tmp_path):
  write_corpus(tmp_path)
  base = checks.build("seq2seq")[0]
  source, config = parallel_text.load_data(base, str(tmp_path))
  # Line 3 has an empty source, line 4 a 10-word source (bucket (5, 10) holds 5).
  assert source.num_examples == 3
  summary = source.summary()
  assert summary["dropped_empty"] == 1 and summary["dropped_too_long"] == 1
  assert summary["lines"] == 5 and summary["bucket"] == [5, 10]
  src_vocab, tgt_vocab = source.vocabularies
  assert list(src_vocab)[:4] == list(parallel_text.SPECIAL_TOKENS)
  # Most frequent first, ties alphabetical: the(4) cat(3) .(3) sat(2) then the single words.
  assert list(src_vocab)[4:8] == ["the", ".", "cat", "sat"]
  assert config.source_vocab == len(src_vocab) == 4 + 13
  assert config.target_vocab == len(tgt_vocab) == 4 + 7
  s, t = src_vocab, tgt_vocab
  first = source.arrays
  assert first["source"][0].tolist() == [0, s["."], s["sat"], s["cat"], s["the"]]
  assert first["target_input"][0].tolist() == [1, t["le"], t["chat"], t["."]] + [0] * 6
  assert first["target_output"][0].tolist() == [t["le"], t["chat"], t["."], 2] + [0] * 6
  assert first["target_mask"][0].tolist() == [1] * 4 + [0] * 6
  # The batch matches what the model was built for.
  model = seq2seq.build(config, "float32")
  want = jax.eval_shape(lambda k: model.synthetic_batch(k, 2), jax.random.key(0))
  got = next(source.batches(2, seed=0, train=True))
  assert {k: (v.shape, str(v.dtype)) for k, v in got.items()} == {
      k: (v.shape, str(v.dtype)) for k, v in want.items()}


def test_vocabulary_cap_maps_rare_words_to_unk(tmp_path):
  write_corpus(tmp_path)
  config = checks.build("seq2seq", source_vocab=6)[0]
  source, config = parallel_text.load_data(config, str(tmp_path))
  assert config.source_vocab == 6
  src_vocab, _ = source.vocabularies
  assert list(src_vocab) == list(parallel_text.SPECIAL_TOKENS) + ["the", "."]
  first = source.arrays["source"][0].tolist()
  assert first == [0, src_vocab["."], parallel_text.UNK, parallel_text.UNK, src_vocab["the"]]


def test_source_file_path_and_languages(tmp_path):
  (tmp_path / "corpus.de").write_text("ein haus\n", encoding="utf-8")
  (tmp_path / "corpus.en").write_text("a house\n", encoding="utf-8")
  config = checks.build("seq2seq", source_lang="de", target_lang="en")[0]
  source, _ = parallel_text.load_data(config, str(tmp_path / "corpus.de"))
  assert source.num_examples == 1


@pytest.mark.parametrize("src, tgt, message", [
    ("a\nb\n", "x\n", "1 lines, but .*train.en has 2"),
    ("", "x\n", "empty file"),
    ("a b c d e f g\n", "x\n", "no sentence pair fits bucket"),
])
def test_reader_errors(tmp_path, src, tgt, message):
  write_corpus(tmp_path, src, tgt)
  with pytest.raises(DataError, match=message):
    parallel_text.load_data(checks.build("seq2seq")[0], str(tmp_path))


def test_reader_file_errors(tmp_path):
  config = checks.build("seq2seq")[0]
  (tmp_path / "train.en").write_text("a\n")
  with pytest.raises(DataError, match="train.fr: no such file"):
    parallel_text.load_data(config, str(tmp_path))
  (tmp_path / "train.fr").write_bytes(b"ok\n\xff\xfe\n")
  with pytest.raises(DataError, match=r"train.fr:2: not UTF-8"):
    parallel_text.load_data(config, str(tmp_path))
  with pytest.raises(DataError, match="want a folder"):
    parallel_text.load_data(config, str(tmp_path / "train.fr"))


def test_pairs_with_undecodable_lines_skipped_and_counted(tmp_path):
  write_corpus(tmp_path)
  tgt = (tmp_path / "train.fr").read_bytes().split(b"\n")
  tgt[1] = b"le chien \xe9tait ."  # Latin-1, not UTF-8
  (tmp_path / "train.fr").write_bytes(b"\n".join(tgt))
  config = checks.build("seq2seq")[0]
  source, _ = parallel_text.load_data(config, str(tmp_path), bad_samples="skip")
  assert source.num_examples == 2  # of the 3 that fit, the dog's pair is gone
  src_vocab, _ = source.vocabularies
  assert "dog" not in src_vocab and "cat" in src_vocab
  summary = source.summary()
  assert summary["bad_samples"] == {
      "skipped": 1, "first": [f"{tmp_path / 'train.fr'}:2: not UTF-8 text (invalid continuation "
                              "byte)"]}
  with pytest.raises(DataError, match="train.fr:2: not UTF-8") as info:
    parallel_text.load_data(config, str(tmp_path))
  assert "\n" not in str(info.value)
  (tmp_path / "train.en").write_bytes(b"\xff\n" * 5)
  with pytest.raises(DataError, match="train.en: no usable samples; 5 bad ones skipped"):
    parallel_text.load_data(config, str(tmp_path), bad_samples="skip")


def test_unicode_line_separators_do_not_split_sentences(tmp_path):
  write_corpus(tmp_path, "a\u2028b\nc\n", "x\ny\n")
  source, _ = parallel_text.load_data(checks.build("seq2seq")[0], str(tmp_path))
  assert source.num_examples == 2


def test_lstm_layer_gradient_matches_autodiff_of_its_scan():
  """The written-out backward pass (dR as one matmul after the loop) against jax.grad of the
  same scan, with steps that are not valid (left padding) holding the state."""
  S, B, H = 7, 3, 5
  k = jax.random.split(jax.random.key(0), 5)
  projected = jax.random.normal(k[0], (S, B, 4 * H))
  recurrent = 0.5 * jax.random.normal(k[1], (H, 4 * H))
  valid = (jnp.arange(S)[:, None] >= jnp.array([0, 2, 5]))[..., None]
  probes = [jax.random.normal(key, shape) for key, shape in
            zip(k[2:], [(B, H), (B, H), (S, B, H)])]

  def loss(layer):
    def f(projected, recurrent):
      (c, h), states = layer(projected, valid, recurrent)
      return sum((a * p).sum() for a, p in zip((c, h, states), probes))
    return f

  want = jax.grad(loss(lambda *a: seq2seq.lstm_scan(*a)[0]), (0, 1))(projected, recurrent)
  got = jax.jit(jax.grad(loss(tuned_seq2seq.lstm_layer), (0, 1)))(projected, recurrent)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(got[1])).sum() > 0
  # The first two steps of the last sentence are padding: the state passes through them.
  (_, _), states = tuned_seq2seq.lstm_layer(projected, valid, recurrent)
  np.testing.assert_array_equal(states[:5, 2], 0)


def test_teacher_forced_decoder_gradient_matches_autodiff_of_its_scan():
  """The decoder's written-out backward pass (every weight gradient one matmul after the loop)
  against jax.grad of the same scan: weights, encoder states, keys, initial states, gates."""
  c = seq2seq.Config(layers=2, source_vocab=30, target_vocab=20, embed_dim=6, hidden=8,
                     bucket=(5, 7))
  w = seq2seq.Seq2Seq(c).init(jax.random.key(0), jnp.ones((3, 5), jnp.int32),
                              jnp.ones((3, 7), jnp.int32), jnp.ones((3, 7), jnp.int32),
                              train=True, rng=jax.random.key(1))["params"]
  w = {k: v for k, v in w.items() if k == "attention" or k.startswith("decoder_")}
  k = jax.random.split(jax.random.key(2), 8)
  B, S, T, H = 3, 5, 7, 8
  memory = jax.random.normal(k[0], (B, S, H))
  keys = jax.random.normal(k[1], (B, S, H))
  source_valid = jnp.arange(S)[None, :] >= jnp.array([[0], [2], [4]])  # left padding
  finals = tuple((jax.random.normal(k[2 + 2 * l], (B, H)), jax.random.normal(k[3 + 2 * l], (B, H)))
                 for l in range(2))
  gates = jax.random.normal(k[6], (T, B, 4 * H))
  probe = jax.random.normal(k[7], (2, T, B, H))

  def loss(decode):
    def f(w, memory, keys, finals, gates):
      tops, contexts = decode(w, memory, keys, source_valid, finals, gates)
      return (tops * probe[0]).sum() + (contexts * probe[1]).sum()
    return f

  args = (w, memory, keys, finals, gates)
  want = jax.grad(loss(lambda *a: seq2seq.teacher_forced_scan(*a)[0]), range(5))(*args)
  got = jax.jit(jax.grad(loss(tuned_seq2seq.teacher_forced), range(5)))(*args)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * max(1.0, float(np.abs(b).max())))
  assert np.abs(np.asarray(got[0]["decoder_1"]["kernel"])).sum() > 0
