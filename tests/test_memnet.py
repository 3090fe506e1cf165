import numpy as np
import pytest

from fathom_jax import babi, results, runner
from fathom_jax.errors import DataError, UsageError
from fathom_jax.workloads import memnet
from tests import workload_checks as checks

BABI = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Sandra moved to the garden.
6 Where is Daniel? \thallway\t4
1 Sandra travelled to the office.
2 Where is Sandra? \toffice\t1
"""


def test_parameter_count_matches_architecture():
  # Adjacent tying: hops + 1 word embeddings (V x d) and hops + 1 temporal encodings (M x d).
  c = memnet.PRESETS["paper"]
  assert checks.parameter_count("memnet") == (c.hops + 1) * (c.vocab_size + c.memory_size) * c.embed_dim
  assert checks.parameter_count("memnet", hops=1) == 2 * (177 + 50) * 20


def test_shapes():
  config, model = checks.build("memnet")
  logits = checks.infer_outputs(model, 3)
  assert logits.shape == (3, config.vocab_size)


def test_loss_falls_deterministic_and_jit_matches():
  _, model = checks.build("memnet")
  checks.assert_loss_falls(model, 8, steps=40, factor=0.5)
  checks.assert_deterministic(model, 8)
  checks.assert_jit_matches_eager(model, 8)


def test_empty_memory_slots_take_no_attention():
  """An empty slot's temporal encoding must not reach the answer: changing it changes nothing."""
  import jax
  _, model = checks.build("memnet")
  batch = checks.synthetic_batch(model, 0, 4)
  stories = np.array(batch["stories"])
  stories[:, -1] = 0  # last slot empty in every story
  batch = {**batch, "stories": stories}
  variables = checks.init_variables(model, jax.random.key(1), batch)
  before, _ = model.apply(variables, batch, train=False, rng=None)
  temporal = variables["params"]["temporal"].at[:, -1].add(5.0)
  changed = {"params": {**variables["params"], "temporal": temporal}}
  after, _ = model.apply(changed, batch, train=False, rng=None)
  np.testing.assert_allclose(np.asarray(before), np.asarray(after), rtol=1e-6)
  temporal_used = variables["params"]["temporal"].at[:, 0].add(5.0)
  moved, _ = model.apply({"params": {**variables["params"], "temporal": temporal_used}}, batch,
                         train=False, rng=None)
  assert not np.allclose(np.asarray(before), np.asarray(moved))


def test_position_encoding_formula():
  pe = memnet.position_encoding(4, 2)
  j, k, J, d = 2, 1, 4, 2
  assert pe[j - 1, k - 1] == pytest.approx((1 - j / J) - (k / d) * (1 - 2 * j / J))


def test_babi_reader(tmp_path):
  path = tmp_path / "qa1_single-supporting-fact_train.txt"
  path.write_text(BABI)
  source, config = babi.load_data(memnet.PRESETS["tiny"], str(tmp_path))
  assert source.num_examples == 3
  words = sorted({"mary", "moved", "to", "the", "bathroom", "john", "went", "hallway", "where",
                  "is", "daniel", "back", "sandra", "garden", "travelled", "office"})
  assert config.vocab_size == len(words) + 1
  vocab = {w: i + 1 for i, w in enumerate(words)}
  stories, queries, answers = (source.arrays[k] for k in ("stories", "query", "answer"))
  # Second question: four sentences of story, most recent ("sandra moved to the garden") first.
  assert list(stories[1, 0, :5]) == [vocab[w] for w in "sandra moved to the garden".split()]
  assert list(stories[1, 3, :4]) == [vocab[w] for w in "mary moved to the".split()]
  assert not stories[1, 4:].any()
  assert answers[1] == vocab["hallway"] and answers[2] == vocab["office"]
  # A new story (ID 1) forgets the old one.
  assert not stories[2, 1:].any()
  assert list(queries[2, :3]) == [vocab["where"], vocab["is"], vocab["sandra"]]
  _, model = checks.build("memnet", preset="tiny", vocab_size=config.vocab_size,
                          sentence_len=config.sentence_len)
  batch = next(source.batches(2, seed=0, train=True))
  import jax
  variables = checks.init_variables(model, jax.random.key(0), batch)
  logits, _ = model.apply(variables, batch, train=False, rng=None)
  assert logits.shape == (2, config.vocab_size)


@pytest.mark.parametrize("text, message", [
    ("one Mary moved.\n", "malformed"),
    ("1 Where is Mary?\t\t1\n", "answer"),
])
def test_babi_reader_errors(tmp_path, text, message):
  path = tmp_path / "bad_train.txt"
  path.write_text(text)
  with pytest.raises(DataError, match=message) as info:
    babi.load_data(memnet.PRESETS["tiny"], str(path))
  assert "bad_train.txt:1" in str(info.value)


def test_malformed_story_skipped_and_counted(tmp_path):
  # The first story's line 4 lost its ID; a later story has a byte that is not UTF-8.
  lines = BABI.splitlines()
  lines[3] = "Daniel went back to the hallway."
  text = ("\n".join(lines) + "\n").encode() + b"1 Bill went \xff home.\n2 Where is Bill?\thome\t1\n"
  path = tmp_path / "qa1_train.txt"
  path.write_bytes(text)
  source, config = babi.load_data(memnet.PRESETS["tiny"], str(tmp_path), bad_samples="skip")
  assert source.num_examples == 1  # only the middle story's question is left
  assert config.vocab_size == len({"sandra", "travelled", "to", "the", "office", "where",
                                   "is"}) + 1
  bad = source.summary()["bad_samples"]
  assert bad["skipped"] == 2
  assert bad["first"][0].startswith(f"{path}:4: malformed bAbI line")
  assert bad["first"][1].startswith(f"{path}:9: not UTF-8 text")
  with pytest.raises(DataError, match="qa1_train.txt:4: malformed") as info:
    babi.load_data(memnet.PRESETS["tiny"], str(tmp_path))
  assert "\n" not in str(info.value)


def test_skipped_stories_in_the_run_summary(tmp_path):
  stories = "".join("1 Mary moved.\n2 Where is Mary? \tbathroom\t1\n" for _ in range(3))
  broken = "".join("1 Sandra ran.\nnoid\n2 Where is Sandra?\tgarden\t1\n" for _ in range(7))
  (tmp_path / "qa1_train.txt").write_text(stories + broken)
  record = runner.execute(runner.RunSpec(workload="memnet", preset="tiny", data=str(tmp_path),
                                         steps=1, warmup_steps=0, output_dir=None, quiet=True,
                                         bad_samples="skip"))
  assert record["data"]["examples"] == 3
  bad = record["data"]["bad_samples"]
  assert bad["skipped"] == 7 and len(bad["first"]) == 5
  assert bad["first"][0].endswith("qa1_train.txt:8: malformed bAbI line (want 'ID text'): 'noid'")
  (line,) = [l for l in results.format_summary(record).splitlines() if "bad samples" in l]
  assert line.startswith("  bad samples  7 skipped: ") and line.endswith("; 2 more")
  with pytest.raises(UsageError, match="unknown bad_samples 'ignore'"):
    runner.resolve(runner.RunSpec(workload="memnet", data=str(tmp_path), bad_samples="ignore"))


def test_every_story_bad_is_an_error_even_when_skipping(tmp_path):
  path = tmp_path / "bad_train.txt"
  path.write_text("one Mary moved.\n1 Where is Mary?\t\t1\n")
  with pytest.raises(DataError, match="no usable samples; 2 bad ones skipped") as info:
    babi.load_data(memnet.PRESETS["tiny"], str(path), bad_samples="skip")
  assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_babi_folder_without_tasks(tmp_path):
  with pytest.raises(DataError, match="no bAbI training files"):
    babi.load_data(memnet.PRESETS["tiny"], str(tmp_path))
