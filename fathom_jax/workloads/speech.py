"""speech: Deep Speech (Hannun et al. 2014) with CTC, on 26-dimensional MFCC frames.

Layers as in the paper: h1..h3 = min(relu(W x + b), 20) per frame; a bidirectional recurrent
layer h_f[t] = g(W4 h3[t] + U_f h_f[t-1] + b4), h_b[t] = g(W4 h3[t] + U_b h_b[t+1] + b4) with
the input weights W4, b4 shared by both directions; h5 = g(W5 (h_f + h_b) + b5); then the
output layer, a softmax over 62 classes (blank = 0, the 61 TIMIT phones = 1..61). Both
directions run, in one `lax.scan` that steps forwards in time for h_f and backwards for h_b; a
padded frame holds the state at zero, so the backward direction of each utterance starts at its
own last frame; the backward pass of the recurrence is written out, so that the recurrent
matrices' gradients are one matmul over all frames rather than a sum inside the loop. The input
is one 26-dimensional frame per step (the paper also fed +-9 frames of context). Training
minimises the CTC loss (mean over utterances) with SGD (Nesterov momentum 0.9, global-norm
clipping 10) or Adam (`optimizer=adam`); inference decodes greedily (best class per frame,
repeats collapsed, blanks dropped).

A batch holds features [B, T, 26] float32 (zero after each utterance's end), feature_lengths [B]
int32, labels [B, N] int32 (0-padded) and label_lengths [B] int32. Inference returns labels
[B, T] (0-padded) and lengths [B].

Real data (`--data=DIR`): every `*.wav` file under DIR (searched recursively; extensions in any
case), 16-bit PCM at any sample rate (channels averaged), with its transcript beside it under the
same name: `<name>.txt` holding TIMIT phone symbols separated by whitespace (e.g.
"h# sh ix hh eh dcl jh ih h#"), or TIMIT's own `<name>.phn` ("start end phone" per line).
Features are computed by `fathom_jax.audio` (13 MFCCs with energy as c0, 13 deltas,
standardised per utterance). Utterances longer than `max_frames` frames or `max_labels` labels,
or too short to align their labels under CTC, are dropped and counted in the data summary.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fathom_jax import audio
from fathom_jax import config as config_lib
from fathom_jax import timit
from fathom_jax.errors import UsageError
from fathom_jax.timit import TIMIT_PHONES
from fathom_jax.workloads import base

ModuleDef = Any
BLANK = 0
OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class Config:
  features: int = audio.FEATURES
  max_frames: int = 1566
  max_labels: int = 100
  hidden: int = 1024
  num_classes: int = len(TIMIT_PHONES) + 1
  clip: float = 20.0  # g(x) = min(relu(x), clip)
  batch_size: int = 32
  optimizer: str = "sgd"
  learning_rate: float = 1e-3
  momentum: float = config_lib.nonneg(0.9)  # sgd only; Nesterov, as the paper's training
  # The CTC loss of an utterance grows with its length; without clipping SGD diverges at 1566
  # frames. 0: no clipping.
  max_grad_norm: float = config_lib.nonneg(10.0)

  def check(self):
    if self.optimizer not in OPTIMIZERS:
      raise UsageError(f"config field 'optimizer' must be one of {', '.join(OPTIMIZERS)}, got "
                       f"{self.optimizer!r}")
    if self.num_classes < 2:
      raise UsageError(f"config field 'num_classes' must be at least 2 (blank and one label), "
                       f"got {self.num_classes}")
    if self.momentum >= 1:
      raise UsageError(f"config field 'momentum' must be below 1, got {self.momentum}")


PRESETS = {
    "paper": Config(),
    "small": Config(max_frames=400, max_labels=50, hidden=256, batch_size=16),
    "tiny": Config(max_frames=24, max_labels=6, hidden=32, batch_size=4),
}


# --- model -----------------------------------------------------------------------------------


def clipped_relu_rnn(xs, valid, recurrent, clip: float):
  """h[t] = min(relu(xs[t] + h[t-1] recurrent), clip) over time from the zero state, the state
  held at zero where a frame is padding: xs [T, B, H], valid [T, B, 1]. Returns hs [T, B, H]."""
  def step(h, inputs):
    x, v = inputs
    h = jnp.where(v, jnp.minimum(nn.relu(x + h @ recurrent), clip), jnp.zeros_like(h))
    return h, h

  _, hs = jax.lax.scan(step, jnp.zeros_like(xs[0]), (xs, valid))
  return hs


def bidirectional_rnn(inputs, valid, forward, backward, clip: float):
  """Clipped-ReLU recurrences over time in both directions, summed: inputs [B, T, H] (the shared
  input projection W4 h3 + b4), valid [B, T] bool, forward and backward [H, H]."""
  xs, masks = jnp.swapaxes(inputs, 0, 1), jnp.swapaxes(valid, 0, 1)[..., None]
  h_forward = clipped_relu_rnn(xs, masks, forward, clip)
  h_backward = jnp.flip(clipped_relu_rnn(jnp.flip(xs, 0), jnp.flip(masks, 0), backward, clip), 0)
  return jnp.swapaxes(h_forward + h_backward, 0, 1)


class DeepSpeech(nn.Module):
  config: Config
  dtype: Any = jnp.float32
  dense: ModuleDef = nn.Dense
  rnn: Callable = bidirectional_rnn

  def logits(self, output: nn.Module, x):
    """The output layer applied to x."""
    return output(x)

  @nn.compact
  def __call__(self, features, lengths):
    c = self.config
    g = lambda x: jnp.minimum(nn.relu(x), c.clip)
    dense = lambda n, name: self.dense(n, dtype=self.dtype, name=name,
                                       kernel_init=nn.initializers.he_normal())
    x = features.astype(self.dtype)
    for i in range(1, 4):
      x = g(dense(c.hidden, f"dense_{i}")(x))
    projected = dense(c.hidden, "recurrent_input")(x)  # W4 h3 + b4, shared by both directions
    init = nn.initializers.orthogonal()
    forward = self.param("forward", init, (c.hidden, c.hidden)).astype(self.dtype)
    backward = self.param("backward", init, (c.hidden, c.hidden)).astype(self.dtype)
    valid = jnp.arange(features.shape[1]) < lengths[:, None]
    x = self.rnn(projected, valid, forward, backward, c.clip)
    x = g(dense(c.hidden, "dense_5")(x))
    return self.logits(dense(c.num_classes, "output"), x)


def _paddings(lengths, size: int):
  return (jnp.arange(size) >= lengths[:, None]).astype(jnp.float32)


def ctc_loss(logits, batch):
  """Mean over utterances of -log p(labels | frames), by optax's CTC (blank = 0)."""
  logits = logits.astype(jnp.float32)
  labels = batch["labels"]
  per_utterance = optax.ctc_loss(
      logits, _paddings(batch["feature_lengths"], logits.shape[1]), labels,
      _paddings(batch["label_lengths"], labels.shape[1]), blank_id=BLANK)
  per_label = per_utterance / jnp.maximum(batch["label_lengths"], 1)
  return per_utterance.mean(), {"loss_per_label": per_label.mean()}


def ctc_greedy_decode(logits, lengths):
  """Best class per frame, repeats collapsed, blanks dropped: labels [B, T] (0-padded) and
  lengths [B]. A blank between two equal classes keeps both."""
  batch, frames = logits.shape[:2]
  best = jnp.argmax(logits, -1).astype(jnp.int32)
  best = jnp.where(jnp.arange(frames) < lengths[:, None], best, BLANK)
  previous = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), best[:, :-1]], 1)
  keep = (best != BLANK) & (best != previous)
  position = jnp.where(keep, jnp.cumsum(keep, 1) - 1, frames)  # dropped ones fall off the end
  rows = jnp.arange(batch)[:, None]
  labels = jnp.zeros((batch, frames), jnp.int32).at[rows, position].set(best, mode="drop")
  return labels, keep.sum(1).astype(jnp.int32)


def synthetic_batch(config: Config, rng, batch_size: int):
  """N(0, 1) frames (standardised features), T/2..T frames, 1..max_labels labels, at most one
  label per two frames so that every utterance can be aligned."""
  f_rng, fl_rng, l_rng, ll_rng = jax.random.split(rng, 4)
  T, N = config.max_frames, config.max_labels
  frames = jax.random.randint(fl_rng, (batch_size,), max(1, T // 2), T + 1)
  features = jax.random.normal(f_rng, (batch_size, T, config.features))
  features = jnp.where((jnp.arange(T) < frames[:, None])[..., None], features, 0.0)
  label_lengths = jnp.minimum(jax.random.randint(ll_rng, (batch_size,), 1, N + 1),
                              jnp.maximum(frames // 2, 1))
  labels = jax.random.randint(l_rng, (batch_size, N), 1, config.num_classes)
  labels = jnp.where(jnp.arange(N) < label_lengths[:, None], labels, 0)
  return {"features": features.astype(jnp.float32), "feature_lengths": frames.astype(jnp.int32),
          "labels": labels.astype(jnp.int32), "label_lengths": label_lengths.astype(jnp.int32)}


def make_optimizer(config: Config) -> optax.GradientTransformation:
  if config.optimizer == "adam":
    opt = optax.adam(config.learning_rate)
  else:
    opt = optax.sgd(config.learning_rate, momentum=config.momentum or None,
                    nesterov=config.momentum > 0)
  if config.max_grad_norm:
    opt = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), opt)
  return opt


def build(config: Config, dtype: str, network: Optional[nn.Module] = None) -> base.Model:
  """The model around `network(features, lengths)` -> logits (default: `DeepSpeech`)."""
  module = network or DeepSpeech(config, jnp.dtype(dtype))

  def init(rng, batch):
    return module.init(rng, batch["features"], batch["feature_lengths"])

  def apply(variables, batch, *, train, rng):
    del rng  # no dropout or sampling
    logits = module.apply(variables, batch["features"], batch["feature_lengths"])
    if train:
      return logits, {}
    labels, lengths = ctc_greedy_decode(logits, batch["feature_lengths"])
    return {"labels": labels, "lengths": lengths}, {}

  return base.Model(init=init, apply=apply, loss=ctc_loss, optimizer=make_optimizer(config),
                    synthetic_batch=lambda rng, n: synthetic_batch(config, rng, n))


WORKLOAD = base.Workload(
    name="speech",
    description="Deep Speech (Hannun et al. 2014): 3 clipped-ReLU layers, bidirectional RNN, "
                "CTC over 61 phones + blank",
    config_cls=Config,
    presets=PRESETS,
    build=build,
    load_data=timit.load_data,
    example_unit="utterances",
    large_host_buffers=True,
)
