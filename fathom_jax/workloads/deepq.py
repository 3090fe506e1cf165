"""deepq: DQN (Mnih et al. 2015, Nature) playing Atari Breakout through the Arcade Learning Environment.

The network maps four stacked 84x84 frames to one Q-value per action: conv 8x8/4 32, conv 4x4/2
64, conv 3x3/1 64, fc 512, all ReLU. Training is the Nature algorithm: epsilon-greedy acting,
experience replay, a target network copied from the online one every `target_update_every`
updates, Huber loss on the TD error of the taken action, and RMSProp. The environment is the
data: the source plays the game, fills the replay memory and samples minibatches from it; the
measured train step is the jitted minibatch update. In inference the source plays with a small
epsilon and the measured step computes the Q-values of the states it yields (batch 1: one agent
acting, as in 2016; more: that many emulators acting in parallel).
"""

import dataclasses
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_jax import atari
from fathom_jax import config as config_lib
from fathom_jax.errors import UsageError
from fathom_jax.replay import ReplayMemory
from fathom_jax.workloads import base

TARGET = "target"  # variables collection that holds the target network's parameters


@dataclasses.dataclass(frozen=True)
class Config:
  batch_size: int = 32
  infer_batch_size: int = 1  # states per inference step: one agent acting, as in 2016
  num_actions: int = 4  # Breakout's minimal action set: NOOP, FIRE, RIGHT, LEFT
  history: int = 4
  conv_features: tuple[int, int, int] = (32, 64, 64)
  hidden: int = 512
  gamma: float = 0.99
  learning_rate: float = 2.5e-4
  rms_decay: float = 0.95
  rms_eps: float = 0.01
  target_update_every: int = 10_000  # parameter updates between target network copies
  replay_capacity: int = 1_000_000  # frames
  learning_starts: int = 50_000  # environment steps of uniform random play before learning
  update_every: int = 4  # environment steps per update
  epsilon_start: float = 1.0
  epsilon_end: float = config_lib.nonneg(0.1)
  epsilon_decay_steps: int = 1_000_000  # environment steps after learning starts
  eval_epsilon: float = config_lib.nonneg(0.05)  # acting in inference mode
  game: str = "breakout"
  frame_skip: int = 4
  noop_max: int = config_lib.nonneg(30)
  terminal_on_life_loss: bool = False
  max_episode_frames: int = 108_000

  def check(self):
    if not self.epsilon_end <= self.epsilon_start <= 1 or self.eval_epsilon > 1:
      raise UsageError("epsilons must satisfy epsilon_end <= epsilon_start <= 1 and "
                       f"eval_epsilon <= 1, got {self.epsilon_start}, {self.epsilon_end}, "
                       f"{self.eval_epsilon}")
    if self.gamma > 1:
      raise UsageError(f"config field 'gamma' must be at most 1, got {self.gamma}")
    if self.replay_capacity <= self.history:
      raise UsageError(f"replay_capacity {self.replay_capacity} must exceed history "
                       f"{self.history} to hold one transition")
    if self.learning_starts + self.update_every <= self.history:
      raise UsageError(f"learning_starts + update_every must exceed history {self.history}, so "
                       "the first minibatch has a transition to sample")


PRESETS = {
    "paper": Config(),
    "small": Config(replay_capacity=100_000, learning_starts=5_000, target_update_every=1_000,
                    epsilon_decay_steps=100_000),
    "tiny": Config(batch_size=8, conv_features=(8, 16, 16), hidden=64, replay_capacity=4_000,
                   learning_starts=200, target_update_every=10, epsilon_decay_steps=1_000),
}


class QNetwork(nn.Module):
  num_actions: int
  features: tuple[int, int, int] = (32, 64, 64)
  hidden: int = 512
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, frames):
    # Torch7's default init, which DeepMind's code used: U(+-1/sqrt(fan_in)).
    init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    x = frames.astype(self.dtype) / 255.0
    for features, kernel, stride in zip(self.features, (8, 4, 3), (4, 2, 1)):
      x = nn.Conv(features, (kernel, kernel), (stride, stride), padding="VALID", dtype=self.dtype,
                  kernel_init=init)(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=init)(x))
    return nn.Dense(self.num_actions, dtype=self.dtype, kernel_init=init)(x).astype(jnp.float32)


def huber_td_loss(config: Config, outputs, batch):
  """Huber loss (delta 1: the Nature paper's error clipping) on the TD error of the taken action,
  summed over the minibatch as DeepMind's code summed its gradients (with RMSProp's eps of 0.01
  inside the root, the gradient's scale matters)."""
  q, next_q = outputs["q"], outputs["next_q"]
  q_taken = jnp.take_along_axis(q, batch["action"][:, None].astype(jnp.int32), -1)[:, 0]
  not_terminal = 1.0 - batch["terminal"].astype(jnp.float32)
  target = batch["reward"] + config.gamma * not_terminal * next_q.max(-1)
  td = q_taken - jax.lax.stop_gradient(target)
  loss = optax.huber_loss(td, delta=1.0).sum()
  return loss, {"q_mean": q_taken.mean(), "td_abs_mean": jnp.abs(td).mean()}


def rmsprop(config: Config) -> optax.GradientTransformation:
  """DeepMind's RMSProp: centred (g2 - g^2), eps inside the square root, no momentum."""
  return optax.rmsprop(config.learning_rate, decay=config.rms_decay, eps=config.rms_eps,
                       centered=True, eps_in_sqrt=True)


def copy_target(every: int, variables, step):
  """The target network takes the online parameters after every `every`-th update."""
  with jax.named_scope("target_network_update"):
    target = jax.lax.cond(step % every == 0, lambda p, t: p, lambda p, t: t,
                          variables["params"], variables[TARGET])
  return {**variables, TARGET: target}


def synthetic_batch(config: Config, rng, batch_size: int):
  """Random transitions with the replay's shapes and ranges (frames uint8, rewards clipped)."""
  obs_rng, next_rng, a_rng, r_rng, t_rng = jax.random.split(rng, 5)
  shape = (batch_size, atari.FRAME_SIZE, atari.FRAME_SIZE, config.history)
  frames = lambda k: jax.random.randint(k, shape, 0, 256).astype(jnp.uint8)
  return {
      "obs": frames(obs_rng),
      "action": jax.random.randint(a_rng, (batch_size,), 0, config.num_actions).astype(jnp.int32),
      "reward": jax.random.randint(r_rng, (batch_size,), -1, 2).astype(jnp.float32),
      "terminal": jax.random.bernoulli(t_rng, 0.05, (batch_size,)).astype(jnp.float32),
      "next_obs": frames(next_rng),
  }


def build(config: Config, dtype: str) -> base.Model:
  module = QNetwork(config.num_actions, tuple(config.conv_features), config.hidden,
                    jnp.dtype(dtype))

  def init(rng, batch):
    params = module.init(rng, batch["obs"])["params"]
    return {"params": params, TARGET: jax.tree.map(jnp.copy, params)}

  def apply(variables, batch, *, train, rng):
    del rng  # acting's randomness lives in the data source
    q = module.apply({"params": variables["params"]}, batch["obs"])
    if not train:
      return q, {}
    next_q = module.apply({"params": variables[TARGET]}, batch["next_obs"])
    return {"q": q, "next_q": jax.lax.stop_gradient(next_q)}, {}

  return base.Model(
      init=init, apply=apply, loss=lambda out, batch: huber_td_loss(config, out, batch),
      optimizer=rmsprop(config), synthetic_batch=lambda rng, n: synthetic_batch(config, rng, n),
      on_update=lambda variables, step: copy_target(config.target_update_every, variables, step))


# --- acting: the environment as the data source ----------------------------------------------


def epsilon(config: Config, env_step: int) -> float:
  """Linear decay from epsilon_start to epsilon_end over epsilon_decay_steps, counted from the end
  of the learning-starts phase (which acts uniformly at random)."""
  if env_step < config.learning_starts:
    return 1.0
  done = min(1.0, (env_step - config.learning_starts) / config.epsilon_decay_steps)
  return config.epsilon_start + done * (config.epsilon_end - config.epsilon_start)


def env_config(config: Config) -> atari.EnvConfig:
  return atari.EnvConfig(game=config.game, frame_skip=config.frame_skip, noop_max=config.noop_max,
                         terminal_on_life_loss=config.terminal_on_life_loss,
                         max_episode_frames=config.max_episode_frames)


class _Player:
  """One emulator and its frame stack; adds each transition to `replay` when given one."""

  def __init__(self, config: Config, seed: int, rng: np.random.Generator,
               replay: Optional[ReplayMemory]):
    self.env = atari.make_env(env_config(config), seed, config.num_actions)
    self.rng, self.replay = rng, replay
    self.stack = atari.FrameStack(config.history)
    self.stack.reset(self.env.reset(rng))
    self.score = 0.0

  @property
  def state(self) -> np.ndarray:
    return self.stack.state

  def step(self, action: int) -> Optional[float]:
    """Plays one action; returns the game's score when the game ended, else None."""
    frame = self.stack.newest.copy()
    step = self.env.step(action)
    if self.replay is not None:
      self.replay.add(frame, action, atari.clip_reward(step.reward), step.terminal)
    self.score += step.reward
    if step.game_over:
      score, self.score = self.score, 0.0
      self.stack.reset(self.env.reset(self.rng))
      return score
    if step.terminal:  # a life lost, configured as terminal: the next state starts afresh
      self.stack.reset(step.frame)
    else:
      self.stack.push(step.frame)
    return None


class AgentSource:
  """Plays the game epsilon-greedily with the latest online parameters (given by `observe`).

  Train: `learning_starts` steps of uniform random play fill the replay memory, then each
  minibatch follows `update_every` environment steps. Infer: each batch is the current states of
  `batch_size` emulators, one step further each time.
  """

  def __init__(self, config: Config, model: base.Model):
    # Fail on a wrong game or action count now, before anything is compiled or run.
    atari.make_env(env_config(config), 0, config.num_actions)
    self.config = config
    self._act = jax.jit(lambda params, obs: jnp.argmax(
        model.apply({"params": params}, {"obs": obs}, train=False, rng=None)[0], -1))
    self._start(players=1, replay=None)

  def _start(self, players: int, replay: Optional[ReplayMemory]) -> None:
    self._params = None
    self._players = players  # emulators stepped together, each acting on its own state
    self.replay = replay
    self.env_steps = 0
    self.batches_out = 0
    self.greedy_actions = 0
    self.returns: list[float] = []  # game scores (unclipped) of finished games
    self._fill: Optional[tuple[int, float]] = None
    self._marks: list[tuple[float, int]] = []  # (time, env steps) at the first and latest observe

  def observe(self, state) -> None:
    params = state["params"]
    if self._params is None:  # compile acting before the loop's clock starts
      obs = np.zeros((self._players, atari.FRAME_SIZE, atari.FRAME_SIZE, self.config.history),
                     np.uint8)
      jax.block_until_ready(self._act(params, obs))
    self._params = params
    mark = (time.perf_counter(), self.env_steps)
    self._marks = [self._marks[0], mark] if self._marks else [mark]

  def _actions(self, rng: np.random.Generator, states: np.ndarray, eps: float) -> np.ndarray:
    """Epsilon-greedy actions for a batch of states; uniform random until parameters arrive."""
    n = len(states)
    explore = rng.random(n) < eps
    actions = rng.integers(0, self.config.num_actions, n)
    if self._params is not None and not explore.all():
      greedy = np.asarray(self._act(self._params, states))
      actions = np.where(explore, actions, greedy)
      self.greedy_actions += int((~explore).sum())
    return actions

  def _play(self, players, rng, eps: float) -> None:
    states = np.stack([p.state for p in players])
    for player, action in zip(players, self._actions(rng, states, eps)):
      score = player.step(int(action))
      self.env_steps += 1
      if score is not None:
        self.returns.append(score)

  def batches(self, batch_size: int, *, seed: int, train: bool):
    act_seq, sample_seq = np.random.SeedSequence([seed, 0xD9]).spawn(2)
    act_rng, sample_rng = np.random.default_rng(act_seq), np.random.default_rng(sample_seq)
    c = self.config
    count = 1 if train else batch_size
    self._start(count, ReplayMemory(c.replay_capacity, c.history) if train else None)
    players = [_Player(c, s, act_rng, self.replay) for s in atari.env_seeds(seed, count)]
    return (self._train(players, act_rng, sample_rng, batch_size) if train
            else self._infer(players, act_rng))

  def _train(self, players, act_rng, sample_rng, batch_size: int):
    c = self.config
    start = time.perf_counter()
    for _ in range(c.learning_starts):
      self._play(players, act_rng, 1.0)
    self._fill = (c.learning_starts, time.perf_counter() - start)
    while True:
      for _ in range(c.update_every):
        self._play(players, act_rng, epsilon(c, self.env_steps))
      self.batches_out += 1
      yield self.replay.sample(sample_rng, batch_size)

  def _infer(self, players, act_rng):
    # The step reads only 'obs'; the other fields keep the batch's structure (unused arguments
    # are pruned from the compiled step).
    n, c = len(players), self.config
    placeholders = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), jax.eval_shape(
        lambda: synthetic_batch(c, jax.random.key(0), n)))
    while True:
      self.batches_out += 1
      yield {**placeholders, "obs": np.stack([p.state for p in players])}
      self._play(players, act_rng, c.eval_epsilon)

  def summary(self) -> dict:
    c = self.config
    recent = self.returns[-100:]
    out = {
        "kind": "environment",
        "source": f"ALE {c.game} (ale-py), frame skip {c.frame_skip}",
        "env_steps": self.env_steps,
        "emulator_frames": self.env_steps * c.frame_skip,
        "episodes": len(self.returns),
        "episode_returns": recent,  # the last 100 games
        "mean_return": float(np.mean(recent)) if recent else None,
        "batches": self.batches_out,
        "greedy_actions": self.greedy_actions,
        "epsilon": epsilon(c, self.env_steps) if self.replay is not None else c.eval_epsilon,
    }
    if self.replay is not None:
      out.update(replay_frames=len(self.replay), replay_capacity=c.replay_capacity,
                 replay_bytes=self.replay.nbytes)
    if self._fill and self._fill[1] > 0:
      out["fill_env_steps_per_s"] = self._fill[0] / self._fill[1]
    if len(self._marks) == 2:
      (t0, n0), (t1, n1) = self._marks
      out["loop_env_steps_per_s"] = (n1 - n0) / (t1 - t0) if t1 > t0 else None
    return out


WORKLOAD = base.Workload(
    name="deepq",
    description="DQN (Mnih et al. 2015, Nature) playing Atari Breakout through ALE: replay, "
                "target network, epsilon-greedy",
    config_cls=Config,
    presets=PRESETS,
    build=build,
    load_data=None,  # the environment is the data: the runner rejects --data paths
    default_source=AgentSource,
    example_unit="states",
)
