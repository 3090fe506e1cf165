"""Experience replay that stores each frame once (Mnih et al. 2015, as in DeepMind's and Dopamine's
circular buffers).

Slot t holds observation o_t (one 84x84 uint8 frame), the action a_t taken from the state ending
at o_t, the clipped reward r_t and whether that transition was terminal. A state is the
`history` frames ending at a slot; frames from before an episode's start are zero, so a stack
never mixes two episodes. The frame after a terminal transition opens the next episode, so its
next state is all zeros but the last frame; the loss masks it anyway. At 84x84 a million frames
take 7.06 GB, against 56 GB if every transition stored both of its four-frame states.

Slots are addressed by logical index (the number of adds before it); slot t lives at
t % capacity. Index t can be sampled when its whole window t-history+1 .. t+1 is still stored.
"""

import numpy as np

from fathom_jax.atari import FRAME_SIZE


class ReplayMemory:

  def __init__(self, capacity: int, history: int = 4, frame_shape=(FRAME_SIZE, FRAME_SIZE)):
    if capacity < history + 1:
      raise ValueError(f"replay capacity {capacity} cannot hold one transition of "
                       f"{history}-frame states")
    self.capacity, self.history = capacity, history
    # np.zeros maps pages lazily: a large memory costs only what has been written.
    self.frames = np.zeros((capacity, *frame_shape), np.uint8)
    self.actions = np.zeros((capacity,), np.int32)
    self.rewards = np.zeros((capacity,), np.float32)
    self.terminals = np.zeros((capacity,), np.bool_)
    self.count = 0  # frames ever added

  def __len__(self) -> int:
    return min(self.count, self.capacity)

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in (self.frames, self.actions, self.rewards, self.terminals))

  def add(self, frame: np.ndarray, action: int, reward: float, terminal: bool) -> None:
    """Stores o_t with the action taken from its state, the reward and terminal flag that followed."""
    i = self.count % self.capacity
    self.frames[i] = frame
    self.actions[i] = action
    self.rewards[i] = reward
    self.terminals[i] = terminal
    self.count += 1

  def valid_range(self) -> tuple[int, int]:
    """[lo, hi) of the logical indices that can be sampled now."""
    oldest = max(0, self.count - self.capacity)
    return oldest + self.history - 1, self.count - 1

  def num_valid(self) -> int:
    lo, hi = self.valid_range()
    return max(0, hi - lo)

  def sample_indices(self, rng: np.random.Generator, n: int) -> np.ndarray:
    lo, hi = self.valid_range()
    if hi <= lo:
      raise ValueError(f"replay holds {self.count} frames: too few to sample a transition")
    return rng.integers(lo, hi, size=n)

  def stack(self, indices: np.ndarray) -> np.ndarray:
    """[n, H, W, history] states ending at logical `indices`, zeros before an episode start."""
    indices = np.asarray(indices)
    h = self.history
    window = indices[:, None] + np.arange(1 - h, 1)  # [n, h] oldest first
    frames = self.frames[window % self.capacity]  # [n, h, H, W]
    # Frame k is dropped if a terminal transition lies between it and the newest frame.
    ended = self.terminals[window[:, :-1] % self.capacity]  # [n, h-1]
    after_end = np.flip(np.cumsum(np.flip(ended, 1), 1), 1) > 0
    keep = np.concatenate([~after_end, np.ones((len(indices), 1), np.bool_)], 1)
    frames = frames * keep[:, :, None, None].astype(np.uint8)
    return np.ascontiguousarray(frames.transpose(0, 2, 3, 1))

  def sample(self, rng: np.random.Generator, n: int) -> dict:
    """A minibatch of n transitions (s, a, r, terminal, s'), indices uniform over valid slots."""
    idx = self.sample_indices(rng, n)
    slots = idx % self.capacity
    return {
        "obs": self.stack(idx),
        "action": self.actions[slots],
        "reward": self.rewards[slots],
        "terminal": self.terminals[slots].astype(np.float32),
        "next_obs": self.stack(idx + 1),
    }
