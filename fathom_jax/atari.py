"""Atari through the Arcade Learning Environment (ale-py), preprocessed as in the Nature DQN paper.

Per agent step: the action is repeated for `frame_skip` emulator frames, rewards summed; the
observation is the pixel-wise max of the last two frames' grayscale screens (removing the
flicker of sprites drawn on alternate frames), resized to 84x84 by area averaging. The agent
sees the last `history` observations stacked, with zero frames before the episode's first one.
A game starts with up to `noop_max` no-op steps, drawn from a seeded generator; the emulator is
seeded too, and sticky actions are off (as in 2015), so a run is a function of its seeds.
"""

import dataclasses
import warnings
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

from fathom_jax.errors import UsageError

FRAME_SIZE = 84
NOOP = 0  # index of NOOP in every game's minimal action set


def _ale():
  from ale_py import ALEInterface, LoggerMode, roms
  ALEInterface.setLoggerMode(LoggerMode.Error)
  return ALEInterface, roms


def rom_path(game: str) -> str:
  _, roms = _ale()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ale-py warns, then returns None, for an unknown game
    path = roms.get_rom_path(game)
  if path is None:
    raise UsageError(f"unknown Atari game {game!r}; ale-py ships e.g. breakout, pong, "
                     "space_invaders")
  return path


def resize(frame: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
  """Area-averaging resize of a uint8 grayscale frame (as OpenCV's INTER_AREA)."""
  return np.asarray(Image.fromarray(frame).resize((size, size), Image.BOX))


def clip_reward(reward: float) -> float:
  """The Nature paper's reward clipping: its sign, so one learning rate fits every game."""
  return float(np.sign(reward))


class Step(NamedTuple):
  frame: np.ndarray  # [84, 84] uint8, the new observation
  reward: float  # game score gained over the skipped frames (unclipped)
  terminal: bool  # no bootstrapping past this step: game over, or a life lost when configured
  game_over: bool  # the game ended (or hit the episode frame limit): reset before stepping again


@dataclasses.dataclass(frozen=True)
class EnvConfig:
  game: str = "breakout"
  frame_skip: int = 4
  noop_max: int = 30
  terminal_on_life_loss: bool = False
  max_episode_frames: int = 108_000  # 30 minutes at 60 Hz, the usual cap; truncation ends a game


class AtariEnv:
  """One seeded emulator with the Nature preprocessing."""

  def __init__(self, config: EnvConfig, seed: int):
    ALEInterface, _ = _ale()
    self.config = config
    self._ale = ALEInterface()
    self._ale.setInt("random_seed", int(seed) % (2**31))
    self._ale.setFloat("repeat_action_probability", 0.0)
    self._ale.setInt("frame_skip", 1)
    self._ale.setInt("max_num_frames_per_episode", config.max_episode_frames)
    self._ale.loadROM(rom_path(config.game))
    self._actions = list(self._ale.getMinimalActionSet())
    height, width = self._ale.getScreenDims()
    self._screens = np.zeros((2, height, width), np.uint8)
    self._lives = 0
    self.frames = 0  # emulator frames since construction

  @property
  def num_actions(self) -> int:
    return len(self._actions)

  def _observe(self) -> np.ndarray:
    return resize(self._screens.max(axis=0))

  def reset(self, rng: np.random.Generator) -> np.ndarray:
    """Starts a new game with 1..noop_max no-op steps; returns the first observation."""
    self._ale.reset_game()
    self._lives = self._ale.lives()
    noops = int(rng.integers(1, self.config.noop_max + 1)) if self.config.noop_max else 0
    self._screens[:] = 0
    self._ale.getScreenGrayscale(self._screens[1])
    for _ in range(noops):
      step = self.step(NOOP)
      if step.game_over:  # never for a sane noop_max; start over without no-ops
        self._ale.reset_game()
        self._lives = self._ale.lives()
        break
    return self._observe()

  def step(self, action: int) -> Step:
    ale, skip = self._ale, self.config.frame_skip
    ale_action = self._actions[action]
    reward = 0.0
    game_over = False
    for i in range(skip):
      reward += ale.act(ale_action)
      self.frames += 1
      if i >= skip - 2:  # only the last two frames are seen; a game's last observation is unused
        ale.getScreenGrayscale(self._screens[i - skip + 2])
      if ale.game_over():
        game_over = True
        break
    lives = ale.lives()
    life_lost = lives < self._lives
    self._lives = lives
    terminal = game_over or (self.config.terminal_on_life_loss and life_lost)
    return Step(self._observe(), reward, terminal, game_over)


class FrameStack:
  """The agent's state: the last `history` observations, zeros before the episode's start.

  The same convention as the replay memory's stacks, so the states acted on and learned from match.
  """

  def __init__(self, history: int = 4, size: int = FRAME_SIZE):
    self._frames = np.zeros((history, size, size), np.uint8)  # oldest first; shifts are cheap

  @property
  def state(self) -> np.ndarray:
    """[size, size, history] view, channels last as the network takes it."""
    return np.moveaxis(self._frames, 0, -1)

  @property
  def newest(self) -> np.ndarray:
    return self._frames[-1]

  def reset(self, frame: np.ndarray) -> np.ndarray:
    self._frames[:-1] = 0
    self._frames[-1] = frame
    return self.state

  def push(self, frame: np.ndarray) -> np.ndarray:
    self._frames[:-1] = self._frames[1:]
    self._frames[-1] = frame
    return self.state


def env_seeds(seed: int, count: int) -> list[int]:
  """Independent emulator seeds for `count` environments from one run seed."""
  return [int(s) % (2**31) for s in np.random.SeedSequence([seed, 0xA7A21]).generate_state(count)]


def check_actions(game: str, have: int, num_actions: int) -> None:
  if have != num_actions:
    raise UsageError(f"{game} has {have} actions but the network has {num_actions} outputs; "
                     f"set num_actions={have}")


def make_env(config: EnvConfig, seed: int, num_actions: Optional[int] = None) -> AtariEnv:
  """An environment, checked against the network's number of outputs."""
  env = AtariEnv(config, seed)
  if num_actions is not None:
    check_actions(config.game, env.num_actions, num_actions)
  return env
