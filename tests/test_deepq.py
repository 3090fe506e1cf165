import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_jax import atari, model_steps, runner
from fathom_jax.errors import UsageError
from fathom_jax.workloads import deepq
from tests import workload_checks as checks


def test_parameter_count_matches_architecture():
  # 84x84x4 -> conv 8x8/4 -> 20x20x32 -> conv 4x4/2 -> 9x9x64 -> conv 3x3/1 -> 7x7x64 = 3136.
  conv1 = 8 * 8 * 4 * 32 + 32  # 8,224
  conv2 = 4 * 4 * 32 * 64 + 64  # 32,832
  conv3 = 3 * 3 * 64 * 64 + 64  # 36,928
  fc = 7 * 7 * 64 * 512 + 512  # 1,606,144
  out = 512 * 4 + 4  # 2,052
  assert conv1 + conv2 + conv3 + fc + out == 1_686_180
  assert checks.parameter_count("deepq") == 1_686_180
  # The target network is a second copy, outside the trainable parameters.
  _, model = checks.build("deepq", "paper")
  shapes = jax.eval_shape(lambda k: model.init(k, model.synthetic_batch(k, 1)), jax.random.key(0))
  assert jax.tree.map(lambda x: x.shape, shapes["target"]) == jax.tree.map(
      lambda x: x.shape, shapes["params"])


def test_td_loss_by_hand():
  config = deepq.PRESETS["tiny"]
  q = jnp.array([[1.0, 2.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
  next_q = jnp.array([[0.0, 3.0, 1.0, 0.0], [9.0, 0.0, 0.0, 0.0]])
  batch = {"action": jnp.array([1, 0]), "reward": jnp.array([1.0, -1.0]),
           "terminal": jnp.array([0.0, 1.0])}
  loss, metrics = deepq.huber_td_loss(config, {"q": q, "next_q": next_q}, batch)
  td1 = 2.0 - (1.0 + 0.99 * 3.0)  # -1.97: |td| > 1, linear part of the Huber loss
  td2 = 0.5 - (-1.0)  # terminal: no bootstrap from next_q; 1.5
  huber = lambda d: 0.5 * d * d if abs(d) <= 1 else abs(d) - 0.5
  assert float(loss) == pytest.approx(huber(td1) + huber(td2), rel=1e-6)
  assert float(metrics["td_abs_mean"]) == pytest.approx((abs(td1) + abs(td2)) / 2, rel=1e-6)


def test_target_network_copied_every_n_updates():
  _, model = checks.build("deepq", target_update_every=3, learning_rate=1e-2)
  batch = checks.synthetic_batch(model, 1, 8)
  state = checks.init_train_state(model, jax.random.key(0), batch)
  step = jax.jit(model_steps.make_train_step(model))
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                 jax.tree.leaves(b)))
  assert same(state["params"], state["model_state"]["target"])
  last_copy = state["params"]
  for n in range(1, 8):
    state, _ = step(state, batch)
    target = state["model_state"]["target"]
    if n % 3 == 0:
      assert same(target, state["params"]), n
      last_copy = state["params"]
    else:
      assert same(target, last_copy) and not same(target, state["params"]), n


def test_loss_falls_and_jit_matches():
  # A fixed batch and a fixed target network: plain regression, so the loss must fall.
  _, model = checks.build("deepq", target_update_every=1000, learning_rate=1e-3)
  checks.assert_loss_falls(model, 8, steps=30, factor=0.7)
  checks.assert_jit_matches_eager(model, 8)


def test_bfloat16_and_inference_outputs():
  config, model = checks.build("deepq", dtype="bfloat16")
  q = checks.infer_outputs(model, 3)
  assert q.shape == (3, config.num_actions) and q.dtype == jnp.float32
  assert np.all(np.isfinite(checks.train_losses(model, 4, 2)))


def test_epsilon_schedule():
  c = deepq.PRESETS["tiny"]  # learning_starts 200, decay over 1000 steps, 1.0 -> 0.1
  assert deepq.epsilon(c, 0) == 1.0 and deepq.epsilon(c, 199) == 1.0
  assert deepq.epsilon(c, 200) == pytest.approx(1.0)
  assert deepq.epsilon(c, 700) == pytest.approx(0.55)
  assert deepq.epsilon(c, 1200) == pytest.approx(0.1)
  assert deepq.epsilon(c, 10**6) == pytest.approx(0.1)


def test_environment_pipeline():
  env = atari.make_env(atari.EnvConfig(noop_max=0), seed=3, num_actions=4)
  first = env.reset(np.random.default_rng(0))
  assert first.shape == (84, 84) and first.dtype == np.uint8
  rng, frames, lives_lost = np.random.default_rng(1), [first], 0
  life_env = atari.AtariEnv(atari.EnvConfig(noop_max=0, terminal_on_life_loss=True), seed=3)
  life_env.reset(np.random.default_rng(0))
  for _ in range(400):
    action = int(rng.integers(4))
    step, life_step = env.step(action), life_env.step(action)
    frames.append(step.frame)
    assert not step.terminal or step.game_over  # life losses end nothing by default
    np.testing.assert_array_equal(step.frame, life_step.frame)  # the same emulator stream
    if life_step.terminal and not life_step.game_over:
      lives_lost += 1
    if step.game_over:
      break
  assert env.frames == 4 * (len(frames) - 1)  # frame skip 4
  assert lives_lost >= 1
  assert len({f.tobytes() for f in frames}) > 10  # the game moves
  with pytest.raises(UsageError, match="5 outputs"):
    atari.make_env(atari.EnvConfig(), seed=0, num_actions=5)
  with pytest.raises(UsageError, match="unknown Atari game"):
    atari.make_env(atari.EnvConfig(game="nonesuch"), seed=0)
  assert [atari.clip_reward(r) for r in (-3.0, 0.0, 7.0)] == [-1.0, 0.0, 1.0]


def test_frame_stack_starts_with_zeros():
  stack = atari.FrameStack(4)
  f = lambda v: np.full((84, 84), v, np.uint8)
  assert list(stack.reset(f(5))[0, 0]) == [0, 0, 0, 5]
  stack.push(f(6))
  assert list(stack.push(f(7))[0, 0]) == [0, 5, 6, 7]


def test_agent_acts_greedily_on_the_states_it_stores():
  # Epsilon reaches 0 one step after the fill: later actions are the argmax of the observed
  # network's Q-values, on exactly the states the replay memory rebuilds for those steps.
  config, model = checks.build("deepq", learning_starts=20, epsilon_end=0.0,
                               epsilon_decay_steps=1)
  source = deepq.AgentSource(config, model)
  batches = source.batches(4, seed=0, train=True)
  variables = checks.init_variables(model, jax.random.key(0), next(batches))
  source.observe(variables)
  for _ in range(3):
    next(batches)
  assert source.env_steps == 20 + 4 * 4 and source.greedy_actions == 4 * 3
  states = source.replay.stack(np.arange(24, 36))
  q, _ = model.apply(variables, {"obs": states}, train=False, rng=None)
  np.testing.assert_array_equal(source.replay.actions[24:36], np.argmax(q, -1))
  assert states[..., -1].any()  # real screens, not placeholders


def _train(seed: int):
  spec = runner.RunSpec(workload="deepq", preset="tiny", steps=20, warmup_steps=2, seed=seed,
                        output_dir=None, quiet=True)
  resolved = runner.resolve(spec)
  return runner.execute(spec, resolved), resolved.source


def test_plays_breakout_and_learns_deterministically():
  record, source = _train(seed=5)
  c = deepq.PRESETS["tiny"]
  data, losses = record["data"], record["figures"]["losses"]
  assert data["env_steps"] == c.learning_starts + 22 * c.update_every == 288
  assert source.replay.count == 288 and data["batches"] == 22
  assert len(losses) == 20 and np.all(np.isfinite(losses))
  assert data["loop_env_steps_per_s"] > 0 and data["fill_env_steps_per_s"] > 0
  assert 0 < data["greedy_actions"] < 88  # epsilon ~0.95 over the 88 steps after the fill
  again, source_again = _train(seed=5)
  assert again["figures"]["losses"] == losses
  assert again["data"]["episode_returns"] == data["episode_returns"]
  assert again["data"]["greedy_actions"] == data["greedy_actions"]
  np.testing.assert_array_equal(source_again.replay.frames, source.replay.frames)
  np.testing.assert_array_equal(source_again.replay.actions, source.replay.actions)
  assert len({f.tobytes() for f in source.replay.frames[:288]}) > 20  # real, moving frames


def test_inference_acts_batch_one_by_default_and_batched():
  spec = runner.RunSpec(workload="deepq", mode="infer", preset="paper")
  assert runner.resolve(spec).batch_size == 1  # one agent acting per step, as in 2016
  spec = runner.RunSpec(workload="deepq", mode="infer", preset="tiny", steps=3, warmup_steps=1,
                        batch_size=2, output_dir=None, quiet=True)
  record = runner.execute(spec)
  assert record["config"]["batch_size"] == 2
  assert record["data"]["env_steps"] == 6  # two emulators, one step per batch after the first
  assert record["data"]["greedy_actions"] > 0


def test_data_path_is_a_usage_error(tmp_path):
  for path in (str(tmp_path), str(tmp_path / "missing")):
    with pytest.raises(UsageError, match="deepq reads no dataset"):
      runner.resolve(runner.RunSpec(workload="deepq", data=path))


@pytest.mark.parametrize("override, message", [
    ("epsilon_end=2", "epsilon"),
    ("replay_capacity=3", "replay_capacity"),
    ("gamma=1.5", "gamma"),
    ("num_actions=5", "breakout has 4 actions"),
])
def test_bad_config_is_a_usage_error(override, message):
  with pytest.raises(UsageError, match=message):
    runner.resolve(runner.RunSpec(workload="deepq", preset="tiny", overrides=(override,)))
