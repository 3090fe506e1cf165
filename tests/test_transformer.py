import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_jax import results, text
from fathom_jax.errors import DataError, UsageError
from fathom_jax.workloads import transformer
from tests import workload_checks as checks


def test_gpt2_small_parameter_count():
  width, layers, vocab, context = 768, 12, 50257, 1024
  block = (2 * 2 * width  # two layer norms
           + width * 3 * width + 3 * width + width * width + width  # attention
           + width * 4 * width + 4 * width + 4 * width * width + width)  # MLP
  # Tied output layer: the token embedding is counted once.
  expected = vocab * width + context * width + layers * block + 2 * width
  assert checks.parameter_count("transformer") == expected == 124_439_808


def _model_and_variables():
  config, model = checks.build("transformer")
  batch = checks.synthetic_batch(model, 1, 2)
  return config, transformer.GPT(config), checks.init_variables(model, jax.random.key(0), batch), \
      batch


def test_attention_is_causal():
  config, module, variables, batch = _model_and_variables()
  tokens = batch["tokens"]
  changed = tokens.at[:, 20].set((tokens[:, 20] + 1) % config.vocab_size)
  apply = jax.jit(lambda t: module.apply(variables, t, False))
  before, after = apply(tokens), apply(changed)
  np.testing.assert_array_equal(before[:, :20], after[:, :20])  # the past never sees the future
  assert not np.allclose(before[:, 20:], after[:, 20:])


def test_cached_decoding_equals_recomputing_the_whole_sequence():
  config, module, variables, batch = _model_and_variables()
  prompt = batch["tokens"][:, :config.prompt_length]
  tokens, logits = jax.jit(lambda v, p: transformer.generate(module, v, p, config.new_tokens))(
      variables, prompt)
  assert tokens.shape == (2, config.new_tokens)
  apply = jax.jit(lambda t: module.apply(variables, t, False)[:, -1])
  sequence = prompt
  for i in range(config.new_tokens):
    want = apply(sequence)
    np.testing.assert_allclose(logits[:, i], want, rtol=1e-5, atol=1e-5)
    sequence = jnp.concatenate([sequence, jnp.argmax(want, -1)[:, None].astype(prompt.dtype)], 1)
  np.testing.assert_array_equal(tokens, sequence[:, config.prompt_length:])


def test_inference_decodes_greedily_from_the_prompt():
  config, model = checks.build("transformer")
  out = checks.infer_outputs(model, 3)
  assert out["tokens"].shape == (3, config.new_tokens)
  assert out["tokens"].dtype == jnp.int32
  assert int(out["tokens"].min()) >= 0 and int(out["tokens"].max()) < config.vocab_size


def test_loss_falls_and_is_deterministic():
  _, model = checks.build("transformer")
  checks.assert_loss_falls(model, 4, steps=40, factor=0.8)
  checks.assert_deterministic(model, 4)


def test_weight_decay_applies_to_matrices_only():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  # With zero gradients only the decay moves a parameter: the kernel, not the bias.
  _, model = checks.build("transformer", learning_rate=1.0, weight_decay=0.5)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = model.optimizer.update(zero, model.optimizer.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.5 * np.ones((2, 2)))
  np.testing.assert_allclose(updates["bias"], np.zeros(2))


@pytest.mark.parametrize("changes, message", [
    ({"width": 30, "heads": 4}, "divide"),
    ({"prompt_length": 30, "new_tokens": 8}, "fit the context"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_configs_are_usage_errors(changes, message):
  with pytest.raises(UsageError, match=message):
    checks.build("transformer", **changes)


def _text_config(context=16):
  return dataclasses.replace(transformer.PRESETS["tiny"], context=context, prompt_length=4,
                             new_tokens=4)


def test_text_reads_as_byte_tokens_with_end_of_text_between_files(tmp_path):
  (tmp_path / "a.txt").write_text("héllo wörld, " * 3)
  (tmp_path / "b.txt").write_text("second file\n")
  (tmp_path / "notes.md").write_text("not read")
  source, config = text.load_data(_text_config(), str(tmp_path))
  stream = list("héllo wörld, ".encode() * 3) + [text.END_OF_TEXT] + list(b"second file\n") + [
      text.END_OF_TEXT]
  assert config.vocab_size == text.VOCAB_SIZE == 257
  tokens = source.arrays["tokens"]
  assert tokens.shape == (len(stream) // 16, 16) and tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens.ravel(), stream[:tokens.size])
  assert source.summary()["files"] == 2


def test_bad_text_fails_in_one_line_or_is_skipped(tmp_path):
  (tmp_path / "good.txt").write_text("enough text to fill a context or two " * 2)
  (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1\n")
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(DataError, match=r"bad.txt: not UTF-8 text"):
    text.load_data(_text_config(), str(tmp_path))
  source, _ = text.load_data(_text_config(), str(tmp_path), bad_samples="skip")
  assert source.summary()["bad_samples"]["skipped"] == 2
  with pytest.raises(DataError, match="empty"):
    text.load_data(_text_config(), str(tmp_path / "empty.txt"))
  (tmp_path / "short.txt").write_text("short")
  with pytest.raises(DataError, match="fewer than one context of 16"):
    text.load_data(_text_config(), str(tmp_path / "short.txt"))
  (tmp_path / "nothing").mkdir()
  with pytest.raises(DataError, match="no \\*.txt files"):
    text.load_data(_text_config(), str(tmp_path / "nothing"))


def test_throughput_is_also_stated_in_tokens():
  config = transformer.PRESETS["paper"]
  count = transformer.WORKLOAD.tokens_per_example
  assert count(config, "train") == 1024 and count(config, "infer") == config.new_tokens == 128
  figures = results.summarise({"step_times_s": [0.2, 0.1, 0.1], "tokens_per_example": 8}, 4)
  assert figures["tokens_per_s"] == pytest.approx(4 * 8 / 0.1)
  assert figures["time_per_token_s"] == pytest.approx(0.1 / 8)


def test_prefill_and_decode_are_timed_and_broken_down_apart(tmp_path):
  from fathom_jax import runner
  spec = runner.RunSpec("transformer", mode="infer", preset="tiny", batch_size=2, steps=2,
                        warmup_steps=1, output_dir=str(tmp_path), quiet=True, profile=True)
  record = runner.execute(spec)
  config = transformer.PRESETS["tiny"]
  profile = record["figures"]["profile"]
  phases = profile["phases"]
  assert list(phases) == [transformer.PREFILL, transformer.DECODE]
  assert phases["prefill"]["tokens_per_step"] == 2 * config.prompt_length
  assert phases["decode"]["tokens_per_step"] == 2 * config.new_tokens
  for v in phases.values():
    assert v["time_per_step_s"] > 0 and v["bytes_per_token"] > 0 and v["flops_per_step"] > 0
    assert v["time_per_token_s"] == pytest.approx(v["time_per_step_s"] / v["tokens_per_step"])
    assert sum(v["by_class_s"].values()) == pytest.approx(v["time_per_step_s"])
  # The phases are parts of the step the ops cover; decoding a token reads the weights again,
  # where prefill reads them once for the whole prompt: more bytes per token, fewer FLOPs a byte.
  assert phases["prefill"]["share_of_step"] + phases["decode"]["share_of_step"] <= \
      profile["coverage"] + 1e-9
  assert phases["decode"]["bytes_per_token"] > phases["prefill"]["bytes_per_token"]
  assert phases["decode"]["flops_per_byte"] < phases["prefill"]["flops_per_byte"]
  # Attention is a named part of each phase, with the classes it holds, all blocks summed.
  import json, os
  from fathom_jax.analysis import breakdown
  with open(os.path.join(record["run_dir"], breakdown.BREAKDOWN_FILE)) as f:
    kinds = json.load(f)["by_component_kind"]
  for phase in (transformer.PREFILL, transformer.DECODE):
    attention = kinds[f"{phase}/GPT/block_*/attention"]
    assert attention["time_per_step_s"] > 0 and len(attention["by_class_s"]) >= 2
  # The study's report reads the phases from the run's record, against the machine's peaks.
  from fathom_jax import study
  from fathom_jax.study import report
  run = report.Run(study.Point("suite", "transformer", "infer"), "completed", record=record)
  peaks = {"matmul_flops_per_s": 1e11, "copy_bytes_per_s": 1e10}  # balance: 10 FLOP/byte
  rows = report.phase_rows([run], peaks)
  assert [r["phase"] for r in rows] == ["prefill", "decode"]
  decode = rows[1]
  assert decode["bound"] == "memory" and decode["flops_per_byte"] < 10
  assert decode["share_of_copy_peak"] == pytest.approx(phases["decode"]["bytes_per_s"] / 1e10)
  assert decode["us_per_token"] == pytest.approx(phases["decode"]["time_per_token_s"] * 1e6)
  assert 0 < decode["top_class_share"] <= 1
