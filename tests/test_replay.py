import numpy as np
import pytest

from fathom_jax.replay import ReplayMemory

SIZE = 3  # small frames: the memory does not care about their size


def frame(value: int) -> np.ndarray:
  return np.full((SIZE, SIZE), value, np.uint8)


def filled(capacity: int, terminals: list[bool]) -> ReplayMemory:
  """Frame t holds the value t + 1 (mod 255, never 0), so a stack shows where it came from."""
  memory = ReplayMemory(capacity, history=4, frame_shape=(SIZE, SIZE))
  for t, terminal in enumerate(terminals):
    memory.add(frame(t % 255 + 1), action=t % 4, reward=float(t), terminal=terminal)
  return memory


def stacked_values(memory: ReplayMemory, index: int) -> list[int]:
  stack = memory.stack(np.array([index]))[0]  # [H, W, history]
  assert stack.shape == (SIZE, SIZE, 4)
  assert (stack == stack[:1, :1]).all()  # each frame is constant
  return [int(v) for v in stack[0, 0]]


def test_stacks_mid_episode_and_at_episode_starts():
  # Episode A: t = 0..5 (terminal at 5); episode B: t = 6..9 (terminal at 9); C from 10.
  terminals = [t in (5, 9) for t in range(14)]
  memory = filled(100, terminals)
  assert stacked_values(memory, 4) == [2, 3, 4, 5]  # frames t-3..t, oldest first
  assert stacked_values(memory, 5) == [3, 4, 5, 6]
  assert stacked_values(memory, 6) == [0, 0, 0, 7]  # first frame of episode B
  assert stacked_values(memory, 7) == [0, 0, 7, 8]
  assert stacked_values(memory, 8) == [0, 7, 8, 9]
  assert stacked_values(memory, 9) == [7, 8, 9, 10]
  assert stacked_values(memory, 10) == [0, 0, 0, 11]
  # An episode shorter than the history: zeros before its start, nothing from its predecessor.
  memory = filled(100, [t in (3, 5) for t in range(10)])
  assert stacked_values(memory, 5) == [0, 0, 5, 6]
  assert stacked_values(memory, 6) == [0, 0, 0, 7]


def test_sample_pairs_state_action_reward_and_next_state():
  memory = filled(100, [t == 9 for t in range(20)])
  batch = memory.sample(np.random.default_rng(0), 64)
  for obs, next_obs, action, reward, terminal in zip(
      batch["obs"], batch["next_obs"], batch["action"], batch["reward"], batch["terminal"]):
    t = int(reward)  # the reward of slot t is t
    assert action == t % 4 and terminal == (t == 9)
    assert obs[0, 0, -1] == t + 1
    assert next_obs[0, 0, -1] == t + 2
    if t != 9:  # the next state continues the episode: the same frames, shifted by one
      np.testing.assert_array_equal(next_obs[..., :-1], obs[..., 1:])
    else:  # past a terminal transition the next state holds only the next episode's first frame
      assert not next_obs[..., :-1].any()
  assert batch["obs"].dtype == np.uint8 and batch["terminal"].dtype == np.float32


def test_capacity_wraps_around():
  capacity = 10
  memory = filled(capacity, [False] * 25)
  assert len(memory) == capacity and memory.count == 25
  # Slots hold the newest `capacity` frames, t = 15..24, at t % capacity.
  assert [int(memory.frames[t % capacity, 0, 0]) for t in range(15, 25)] == list(range(16, 26))
  # The oldest stored frame cannot end a state (its predecessors are gone); the newest cannot
  # start a transition (its successor is not stored yet).
  assert memory.valid_range() == (18, 24)
  assert stacked_values(memory, 18) == [16, 17, 18, 19]
  assert stacked_values(memory, 24) == [22, 23, 24, 25]
  indices = memory.sample_indices(np.random.default_rng(0), 2000)
  assert set(indices.tolist()) == set(range(18, 24))
  batch = memory.sample(np.random.default_rng(1), 500)
  assert batch["obs"][:, 0, 0, 0].min() >= 16  # nothing overwritten ever appears
  assert batch["next_obs"][:, 0, 0, -1].max() == 25


def test_sampled_states_never_cross_episode_boundaries():
  rng = np.random.default_rng(0)
  capacity = 200
  memory = ReplayMemory(capacity, history=4, frame_shape=(2, 2))
  episode, episodes = 0, []
  for t in range(700):  # wraps around more than three times
    terminal = bool(rng.random() < 0.15)
    f = np.zeros((2, 2), np.uint8)
    f[0, 0] = episode % 250 + 1  # episode id
    f[0, 1] = t % 251 + 1  # time
    memory.add(f, 0, 0.0, terminal)
    episodes.append(episode)
    episode += terminal
  batch = memory.sample(np.random.default_rng(1), 3000)
  for obs, next_obs, terminal in zip(batch["obs"], batch["next_obs"], batch["terminal"]):
    for stack in (obs, next_obs):
      ids = stack[0, 0]
      present = ids > 0
      # Zero frames only before the episode's first frame, and one episode in the stack.
      assert (np.diff(present.astype(int)) >= 0).all()
      assert len(set(ids[present].tolist())) == 1
      times = stack[0, 1][present].astype(int)
      assert (np.diff(times) % 251 == 1).all()  # consecutive frames
    if not terminal:
      assert next_obs[0, 0, -1] == obs[0, 0, -1]
  # A boundary sits inside the window of some sampled states, so the zeroing was exercised.
  assert (batch["obs"][:, 0, 0, 0] == 0).any()


def test_sampling_is_seeded_and_needs_a_transition():
  memory = filled(50, [False] * 30)
  a = memory.sample(np.random.default_rng(7), 16)
  b = memory.sample(np.random.default_rng(7), 16)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  with pytest.raises(ValueError, match="too few"):
    filled(50, [False] * 4).sample(np.random.default_rng(0), 1)
  with pytest.raises(ValueError, match="cannot hold"):
    ReplayMemory(4, history=4)


def test_each_frame_stored_once():
  # 84x84 uint8 frames plus action (int32), reward (float32) and terminal flag per slot: the
  # paper's 1,000,000 frames take 1e6 * (7056 + 9) bytes = 7.065 GB.
  memory = ReplayMemory(1000)
  assert memory.nbytes == 1000 * (84 * 84 + 4 + 4 + 1)
