#!/usr/bin/env python3
"""fathom_jax's workloads' steps in PyTorch, timed on the same machine: the reference the JAX
steps are judged against.

The same models as fathom_jax's `paper` presets, with the same initialisers (parameter counts
are printed and must match: ResNet-50 25,557,032; VGG-19 143,667,240; AlexNet with LRN
61,100,840; speech 6,386,750; seq2seq 34,436,928), float32, eager, with torch.mm's peak measured
just before each row. PyTorch is not a dependency of fathom_jax: run this in an environment that
has it.

Image classifiers (batch 8, 2, 16; images/s): the train step is forward, softmax cross-entropy,
backward and SGD with momentum and weight decay; inference is the forward in eval mode; each is
timed in NCHW and in channels-last (oneDNN's preferred layout for convolutions on CPU).

speech (Deep Speech, batch 8; utterances/s): ours' synthetic batches (1566 frames of 26
features, T/2..T of them per utterance, up to 100 labels), three clipped-ReLU dense layers, the
bidirectional clipped-ReLU recurrence as a loop over frames (the input projection one matmul
over all frames; a backward pass written out as ours, the recurrent gradient one matmul after the
loop), CTC (torch's, blank 0, mean over utterances), SGD with Nesterov momentum 0.9 at 1e-3 after
global-norm clipping at 10; inference is the forward and greedy CTC decoding in tensor ops.

seq2seq (bucket (40, 50), vocabularies 40k/40k, batch 16; sentences/s): ours' synthetic
batches, a 3-layer LSTM 256 encoder (nn.LSTM over packed sequences) and a decoder loop with
additive attention as ours, full-softmax cross-entropy over the unpadded target tokens (and ours'
accuracy metric), SGD at 0.5 after global-norm clipping at 5; inference is greedy decoding fed
its own predictions, stopping where ours stops (all sentences at EOS, or 50 steps: the untrained
model runs all 50, and the row says how many ran). These two run once: `layout` reads "-".

On a GPU (`--device=cuda`, the image models only): the model, images and labels live on the
device, `--dtype=bfloat16` runs the steps under CUDA autocast (bfloat16 compute, float32
parameters and optimizer state, as fathom_jax's bfloat16), cuDNN picks its algorithms per shape
(`cudnn.benchmark`), each step is timed between two `torch.cuda.synchronize()` calls, and the
peak is an 8192-square matmul of the compute dtype on the device.

  python benchmarks/torch_reference.py --workloads=residual,vgg,alexnet
  python benchmarks/torch_reference.py --workloads=speech,seq2seq
  python benchmarks/torch_reference.py --device=cuda --dtype=bfloat16 --layouts=channels_last \
      --batch=residual=256 --batch=vgg=128 --batch=alexnet=512 [--compile]
"""

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import time
from typing import List

import torch
from torch import nn
import torch.nn.functional as F


def _sync(device: str) -> None:
  """Waits for the device's queued work: CUDA calls return before their kernels finish."""
  if device == "cuda":
    torch.cuda.synchronize()


def matmul_peak(repeats: int = 5, n: int = 2048, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
  if device != "cpu":
    n = 8192  # as fathom_jax.peaks on an accelerator
  a = torch.randn(n, n, device=device, dtype=dtype)
  b = torch.randn(n, n, device=device, dtype=dtype)
  torch.mm(a, b)
  _sync(device)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    _sync(device)
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


class Bottleneck(nn.Module):
  def __init__(self, cin: int, width: int, stride: int):
    super().__init__()
    cout = 4 * width
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)
    self.project = None
    if stride != 1 or cin != cout:
      self.project = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.project is None else self.project(x)))


def resnet50(num_classes: int = 1000) -> nn.Module:
  layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1)]
  cin = 64
  for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
    for i in range(blocks):
      layers.append(Bottleneck(cin, width, 2 if i == 0 and stage > 0 else 1))
      cin = 4 * width
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  return nn.Sequential(*layers)


def _classifier_head(features: int, width: int, num_classes: int, dropout_first: bool) -> list:
  """fc width - fc width - fc classes, ReLU after the hidden ones and dropout before (AlexNet)
  or after (VGG) each of them, as fathom_jax lays them out."""
  hidden = []
  for cin in (features, width):
    fc = [nn.Linear(cin, width), nn.ReLU()]
    hidden += [nn.Dropout(0.5), *fc] if dropout_first else [*fc, nn.Dropout(0.5)]
  return [nn.Flatten(), *hidden, nn.Linear(width, num_classes)]


def vgg19(num_classes: int = 1000) -> nn.Module:
  layers, cin = [], 3
  for width, convs in zip((64, 128, 256, 512, 512), (2, 2, 4, 4, 4)):
    for _ in range(convs):
      layers += [nn.Conv2d(cin, width, 3, 1, 1), nn.ReLU()]
      cin = width
    layers.append(nn.MaxPool2d(2, 2))
  layers.append(nn.AdaptiveAvgPool2d(7))
  return nn.Sequential(*layers, *_classifier_head(512 * 49, 4096, num_classes, False))


def alexnet(num_classes: int = 1000) -> nn.Module:
  # torch's LRN divides alpha by the window size: alpha = n * 1e-4 gives Krizhevsky's 1e-4.
  lrn = lambda: nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)
  layers = [nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), lrn(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, 1, 2), nn.ReLU(), lrn(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, 1, 1), nn.ReLU(), nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d(6)]
  return nn.Sequential(*layers, *_classifier_head(256 * 36, 4096, num_classes, True))


MODELS = {"residual": (resnet50, 8, 1e-4), "vgg": (vgg19, 2, 5e-4), "alexnet": (alexnet, 16, 5e-4)}


# --- speech: Deep Speech with CTC (fathom_jax/workloads/speech.py, `paper` preset) -------------

FEATURES, MAX_FRAMES, MAX_LABELS, SPEECH_HIDDEN, PHONE_CLASSES, CLIP = 26, 1566, 100, 1024, 62, 20.0
BLANK = 0


def _clip(x):
  return x.clamp(0.0, CLIP)  # g(x) = min(relu(x), 20)


# Both loops multiply by the transpose (a view) of a contiguous matrix: torch's bmm of
# [2, 8, 1024] by [2, 1024, 1024] took 277 us a frame that way and 415 us by the contiguous
# matrix itself. The forward copies U^T once per call for it.
def _rnn_forward(xs, masks, transposed, clip: float):
  """hs[t] = masks[t] * g(xs[t] + hs[t-1] @ U) for both directions at once: xs and hs
  [T, 2, B, H], masks [T, 2, B, 1] (0 on padding, which holds the state at zero), transposed
  [2, H, H] the recurrent matrices U transposed. One batched matmul and two in-place passes per
  frame."""
  hs = torch.empty_like(xs)
  h = torch.zeros_like(xs[0])
  recurrent = transposed.transpose(1, 2)
  for t in range(xs.shape[0]):
    h = torch.baddbmm(xs[t], h, recurrent, out=hs[t])
    h.clamp_(0.0, clip).mul_(masks[t])
  return hs


def _rnn_backward(grads, hs, recurrent, clip: float):
  """dz[t] = active[t] * (grads[t] + dz[t+1] @ U^T), from the last frame back: only the
  [B, H] x [H, H] product is in the loop, as in ours. recurrent: U [2, H, H]."""
  active = ((hs > 0) & (hs < clip)).to(hs.dtype)  # padding holds hs at 0: never active
  dzs = torch.empty_like(grads)
  transposed = recurrent.transpose(1, 2)
  last = grads.shape[0] - 1
  torch.mul(grads[last], active[last], out=dzs[last])
  for t in range(last - 1, -1, -1):
    torch.baddbmm(grads[t], dzs[t + 1], transposed, out=dzs[t])
    dzs[t].mul_(active[t])
  return dzs


# The loops of the speech recurrence and the seq2seq decoder, in Python (`eager`) or compiled by
# torch.jit.script (`scripted`); --loops picks. Eager was as fast or a little faster (torch 2.13,
# 2 threads, each loop alone, medians): speech's recurrence (1566 frames, batch 8) forward
# 498-513 ms eager, 494-532 ms scripted, backward 507-524 against 497-524 ms; seq2seq's
# teacher-forced decoder with the encoder, forward and backward (batch 16) 263 against 278 ms,
# greedy decoding 353 against 359 ms. A frame's work is one large matmul (speech) or about 40
# ops (seq2seq), so the interpreter's overhead is a small part of either.
LOOPS = "eager"
_SCRIPTED = {}


def _loop(fn, loops: str):
  if loops == "eager":
    return fn
  if fn not in _SCRIPTED:
    _SCRIPTED[fn] = torch.jit.script(fn)
  return _SCRIPTED[fn]


class _ClippedRecurrence(torch.autograd.Function):
  """The recurrence with ours' backward pass: the recurrent matrices' gradient is one matmul
  over all frames after the loop, not a sum of per-frame products inside it (autograd of the
  forward loop would accumulate h^T dz into both H x H gradients at every frame)."""

  @staticmethod
  def forward(ctx, xs, masks, recurrent, loops):
    hs = _loop(_rnn_forward, loops)(xs, masks, recurrent.transpose(1, 2).contiguous(), CLIP)
    ctx.save_for_backward(hs, recurrent)
    ctx.loops = loops
    return hs

  @staticmethod
  def backward(ctx, grads):
    hs, recurrent = ctx.saved_tensors
    dzs = _loop(_rnn_backward, ctx.loops)(grads.contiguous(), hs, recurrent.contiguous(), CLIP)
    d_recurrent = torch.einsum("tdbh,tdbk->dhk", hs[:-1], dzs[1:])  # the state before t=0 is 0
    return dzs, None, d_recurrent, None


class DeepSpeech(nn.Module):
  """Ours' DeepSpeech, time-major ([T, B, ...], the layout F.ctc_loss takes): three clipped
  dense layers, a bidirectional clipped-ReLU recurrence whose input projection (W4, b4) is
  shared by both directions and computed for all frames as one matmul, a clipped dense layer
  over h_f + h_b, and the output layer."""

  def __init__(self, loops: str):
    super().__init__()
    self.loops = loops
    H = SPEECH_HIDDEN
    sizes = [(FEATURES, H), (H, H), (H, H), (H, H), (H, H), (H, PHONE_CLASSES)]
    self.dense = nn.ModuleList(nn.Linear(i, o) for i, o in sizes)  # 1-3, recurrent input, 5, out
    for layer in self.dense:  # flax's he_normal kernels (a normal cut at 2 sigma), zero biases
      std = (2.0 / layer.in_features) ** 0.5 / 0.87962566103423978
      nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
      nn.init.zeros_(layer.bias)
    self.forward_recurrent = nn.Parameter(nn.init.orthogonal_(torch.empty(H, H)))
    self.backward_recurrent = nn.Parameter(nn.init.orthogonal_(torch.empty(H, H)))

  def forward(self, features, lengths):
    """features [T, B, F], lengths [B] -> logits [T, B, classes]."""
    x = features
    for layer in self.dense[:3]:
      x = _clip(layer(x))
    projected = self.dense[3](x)  # W4 h3 + b4
    valid = (torch.arange(x.shape[0])[:, None] < lengths).to(x.dtype)  # [T, B]
    xs = torch.stack([projected, projected.flip(0)], 1)  # [T, 2, B, H]: backward one reversed
    masks = torch.stack([valid, valid.flip(0)], 1)[..., None]
    recurrent = torch.stack([self.forward_recurrent, self.backward_recurrent])
    if torch.is_grad_enabled():
      hs = _ClippedRecurrence.apply(xs, masks, recurrent, self.loops)
    else:
      hs = _loop(_rnn_forward, self.loops)(xs, masks, recurrent.transpose(1, 2).contiguous(),
                                           CLIP)
    x = _clip(self.dense[4](hs[:, 0] + hs[:, 1].flip(0)))
    return self.dense[5](x)


def speech_batch(gen, batch: int) -> dict:
  """As ours' synthetic_batch: N(0, 1) frames, T/2..T of them, 1..100 labels, at most one label
  per two frames."""
  T, N = MAX_FRAMES, MAX_LABELS
  frames = torch.randint(max(1, T // 2), T + 1, (batch,), generator=gen)
  features = torch.randn(batch, T, FEATURES, generator=gen)
  features = features * (torch.arange(T) < frames[:, None])[..., None]
  label_lengths = torch.minimum(torch.randint(1, N + 1, (batch,), generator=gen),
                                (frames // 2).clamp(min=1))
  labels = torch.randint(1, PHONE_CLASSES, (batch, N), generator=gen)
  labels = labels * (torch.arange(N) < label_lengths[:, None])
  return {"features": features, "feature_lengths": frames, "labels": labels,
          "label_lengths": label_lengths}


def ctc_greedy_decode(logits, lengths):
  """logits [T, B, C] -> labels [B, T] (0-padded), lengths [B], by ours' tensor ops: best class
  per frame, repeats collapsed, blanks dropped."""
  best = logits.argmax(-1).t()  # [B, T]
  batch, frames = best.shape
  best = torch.where(torch.arange(frames) < lengths[:, None], best, BLANK)
  previous = torch.cat([torch.full((batch, 1), -1), best[:, :-1]], 1)
  keep = (best != BLANK) & (best != previous)
  position = torch.where(keep, keep.cumsum(1) - 1, frames)  # dropped ones: an extra column
  labels = torch.zeros(batch, frames + 1, dtype=best.dtype).scatter_(1, position, best)
  return labels[:, :frames], keep.sum(1)


def speech_step(mode: str, batch_size: int, loops: str):
  model = DeepSpeech(loops)
  pool = [speech_batch(torch.Generator().manual_seed(i), batch_size) for i in range(4)]
  trainable = [p for p in model.parameters() if p.requires_grad]
  count = itertools.count()

  if mode == "train":
    model.train()
    opt = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9, nesterov=True)

    def step():
      b = pool[next(count) % len(pool)]
      opt.zero_grad(set_to_none=True)
      logits = model(b["features"].transpose(0, 1), b["feature_lengths"])
      per_utterance = F.ctc_loss(F.log_softmax(logits, -1), b["labels"], b["feature_lengths"],
                                 b["label_lengths"], blank=BLANK, reduction="none")
      loss = per_utterance.mean()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(trainable, 10.0)
      opt.step()
      return {"loss": loss.detach(),
              "loss_per_label": (per_utterance.detach() / b["label_lengths"].clamp(min=1)).mean()}
  else:
    model.eval()

    def step():
      b = pool[next(count) % len(pool)]
      with torch.inference_mode():
        logits = model(b["features"].transpose(0, 1), b["feature_lengths"])
        return ctc_greedy_decode(logits, b["feature_lengths"])
  return trainable, step, None


# --- seq2seq: LSTM encoder-decoder with additive attention (fathom_jax/workloads/seq2seq.py) ---

SOURCE_LEN, TARGET_LEN, VOCAB, EMBED, S2S_HIDDEN, S2S_LAYERS = 40, 50, 40_000, 256, 256, 3
PAD, GO, EOS, FIRST_WORD = 0, 1, 2, 4
FORGET_BIAS = 1.0  # (the loops, which torch.jit.script compiles, spell out the constants)


def _attend(memory, keys, invalid, query, query_kernel, query_bias, v):
  """Additive attention: context [B, H] over memory [B, S, H]."""
  q = torch.addmm(query_bias, query, query_kernel)
  scores = torch.matmul(torch.tanh(keys + q.unsqueeze(1)), v)  # [B, S]
  weights = torch.softmax(scores.masked_fill(invalid, -3.4028234663852886e38), -1)  # f32 min
  return torch.bmm(weights.unsqueeze(1), memory).squeeze(1)


def _decoder_step(cs: List[torch.Tensor], hs: List[torch.Tensor], gates0, memory, keys, invalid,
                  attention: List[torch.Tensor], kernels: List[torch.Tensor],
                  biases: List[torch.Tensor]):
  """Ours' decoder_step: the top state of the previous step queries attention; the context
  joins the word embedding as the first layer's input (`gates0`, the embedding's share of the
  first layer's pre-activations, bias included; kernels[0] holds the [context, h] rows); gates
  (i, g, f, o) with the forget bias added. Returns the new (cs, hs) and the context."""
  context = _attend(memory, keys, invalid, hs[-1], attention[0], attention[1], attention[2])
  new_cs: List[torch.Tensor] = []
  new_hs: List[torch.Tensor] = []
  below = context
  for layer in range(len(cs)):
    if layer == 0:
      z = gates0 + torch.mm(torch.cat([context, hs[0]], 1), kernels[0])
    else:
      z = torch.addmm(biases[layer], torch.cat([below, hs[layer]], 1), kernels[layer])
    i, g, f, o = z.chunk(4, 1)
    c = torch.sigmoid(f + 1.0) * cs[layer] + torch.sigmoid(i) * torch.tanh(g)  # FORGET_BIAS
    below = torch.sigmoid(o) * torch.tanh(c)
    new_cs.append(c)
    new_hs.append(below)
  return new_cs, new_hs, context


def _decode_teacher_forced(gates0, cs: List[torch.Tensor], hs: List[torch.Tensor], memory, keys,
                           invalid, attention: List[torch.Tensor], kernels: List[torch.Tensor],
                           biases: List[torch.Tensor]):
  """Top states and contexts [T, B, H] of every target step, fed the reference words."""
  tops: List[torch.Tensor] = []
  contexts: List[torch.Tensor] = []
  # unbind: indexing gates0[t] would have each step's backward zero-fill all of gates0
  for gates in gates0.unbind(0):
    cs, hs, context = _decoder_step(cs, hs, gates, memory, keys, invalid, attention, kernels,
                                    biases)
    tops.append(hs[-1])
    contexts.append(context)
  return torch.stack(tops), torch.stack(contexts)


def _decode_greedy(cs: List[torch.Tensor], hs: List[torch.Tensor], memory, keys, invalid,
                   attention: List[torch.Tensor], kernels: List[torch.Tensor],
                   biases: List[torch.Tensor], embedding, embed_kernel, readout_kernel,
                   readout_bias, output_kernel, output_bias, max_len: int):
  """Ours' greedy_decode: from GO, each step fed its previous prediction; a sentence that has
  produced EOS emits PAD; stops when every sentence has ended or after max_len steps. Returns
  tokens [B, max_len], lengths [B] and the steps run."""
  batch = memory.shape[0]
  previous = torch.full([batch], 1, dtype=torch.long)  # GO
  finished = torch.zeros([batch], dtype=torch.bool)
  tokens = torch.full([batch, max_len], 0, dtype=torch.long)  # PAD
  steps = 0
  for t in range(max_len):
    if bool(finished.all()):
      break
    gates0 = torch.addmm(biases[0], torch.embedding(embedding, previous), embed_kernel)
    cs, hs, context = _decoder_step(cs, hs, gates0, memory, keys, invalid, attention, kernels,
                                    biases)
    hidden = torch.tanh(torch.addmm(readout_bias, torch.cat([hs[-1], context], 1),
                                    readout_kernel))
    logits = torch.addmm(output_bias, hidden, output_kernel)
    token = torch.where(finished, torch.zeros_like(previous), logits.argmax(1))  # PAD
    tokens[:, t] = token
    finished = finished | (token == 2)  # EOS
    previous = token
    steps += 1
  return tokens, (tokens != 0).sum(1), steps


def _glorot(fan_in: int, fan_out: int):
  limit = (6.0 / (fan_in + fan_out)) ** 0.5
  return nn.Parameter(torch.empty(fan_in, fan_out).uniform_(-limit, limit))


class Seq2Seq(nn.Module):
  """Ours' Seq2Seq at the `paper` sizes, with ours' initialisers. The encoder is nn.LSTM over
  packed sequences, which is ours' math: ours' PAD steps (the left padding of the reversed
  source) leave the state at zero, packing skips them; ours has one bias per layer and adds the
  forget bias as a constant, and here bias_hh is that constant (1 on the forget gate's slice,
  0 elsewhere), frozen and not counted."""

  def __init__(self, loops: str):
    super().__init__()
    self.loops = loops
    V, E, H, L = VOCAB, EMBED, S2S_HIDDEN, S2S_LAYERS
    self.source_embedding = nn.Parameter(torch.randn(V, E))
    self.target_embedding = nn.Parameter(torch.randn(V, E))
    self.encoder = nn.LSTM(E, H, L)
    for layer in range(L):
      in_dim = E if layer == 0 else H
      for kind in ("ih", "hh"):  # ours' kernel [in + H, 4H] is one Glorot-uniform matrix
        weight = getattr(self.encoder, f"weight_{kind}_l{layer}")
        limit = (6.0 / (in_dim + H + 4 * H)) ** 0.5
        nn.init.uniform_(weight, -limit, limit)
      nn.init.zeros_(getattr(self.encoder, f"bias_ih_l{layer}"))
      constant = getattr(self.encoder, f"bias_hh_l{layer}")
      constant.requires_grad_(False)
      with torch.no_grad():
        constant.zero_()[H:2 * H] = FORGET_BIAS  # torch's gate order is (i, f, g, o)
    self.key_kernel, self.query_kernel = _glorot(H, H), _glorot(H, H)
    self.query_bias = nn.Parameter(torch.zeros(H))
    self.v = nn.Parameter(torch.randn(H) / H ** 0.5)
    self.decoder_kernels = nn.ParameterList(
        _glorot(E + 2 * H if layer == 0 else 2 * H, 4 * H) for layer in range(L))
    self.decoder_biases = nn.ParameterList(nn.Parameter(torch.zeros(4 * H)) for _ in range(L))
    self.readout_kernel, self.readout_bias = _glorot(2 * H, H), nn.Parameter(torch.zeros(H))
    self.output_kernel, self.output_bias = _glorot(H, V), nn.Parameter(torch.zeros(V))

  def encode(self, source):
    """Top-layer states [B, S, H] (zero on the left padding) and each layer's final (c, h)."""
    batch, S = source.shape
    lengths = (source != PAD).sum(1)
    shift = (S - lengths)[:, None]
    columns = torch.arange(S)[None]
    words_first = source.gather(1, (columns + shift) % S)  # left padding moved to the right
    embedded = F.embedding(words_first.t(), self.source_embedding)  # [S, B, E]
    packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths, enforce_sorted=False)
    states, (h, c) = self.encoder(packed)
    states, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True, total_length=S)
    memory = states.gather(1, ((columns - shift) % S)[..., None].expand(-1, -1, S2S_HIDDEN))
    return memory, list(c.unbind(0)), list(h.unbind(0))

  def _decoder_args(self, source):
    memory, cs, hs = self.encode(source)
    keys = memory @ self.key_kernel
    attention = [self.query_kernel, self.query_bias, self.v]
    kernels = [self.decoder_kernels[0][EMBED:], *self.decoder_kernels[1:]]
    return cs, hs, memory, keys, source == PAD, attention, kernels, list(self.decoder_biases)

  def forward(self, source, target_input):
    """Teacher-forced logits [B, T, V]."""
    cs, hs, memory, keys, invalid, attention, kernels, biases = self._decoder_args(source)
    T, B = target_input.shape[1], target_input.shape[0]
    embedded = F.embedding(target_input.t(), self.target_embedding).reshape(T * B, EMBED)
    gates0 = torch.addmm(biases[0], embedded, self.decoder_kernels[0][:EMBED]).view(T, B, -1)
    tops, contexts = _loop(_decode_teacher_forced, self.loops)(
        gates0, cs, hs, memory, keys, invalid, attention, kernels, biases)
    hidden = torch.tanh(torch.addmm(self.readout_bias,
                                    torch.cat([tops, contexts], -1).view(T * B, -1),
                                    self.readout_kernel))
    hidden = hidden.view(T, B, -1).transpose(0, 1).reshape(B * T, -1)
    return torch.addmm(self.output_bias, hidden, self.output_kernel).view(B, T, -1)

  def generate(self, source, max_len: int):
    cs, hs, memory, keys, invalid, attention, kernels, biases = self._decoder_args(source)
    return _loop(_decode_greedy, self.loops)(
        cs, hs, memory, keys, invalid, attention, kernels, biases, self.target_embedding,
        self.decoder_kernels[0][:EMBED], self.readout_kernel, self.readout_bias,
        self.output_kernel, self.output_bias, max_len)


def seq2seq_batch(gen, batch: int) -> dict:
  """As ours' synthetic_batch for bucket (40, 50): random words, source 1..40 words reversed and
  left-padded, target 1..49 words then EOS."""
  S, T = SOURCE_LEN, TARGET_LEN
  source_len = torch.randint(1, S + 1, (batch, 1), generator=gen)
  words = torch.randint(FIRST_WORD, VOCAB, (batch, S), generator=gen)
  source = torch.where(torch.arange(S) >= S - source_len, words, PAD)
  target_len = torch.randint(1, T, (batch, 1), generator=gen)
  words = torch.randint(FIRST_WORD, VOCAB, (batch, T), generator=gen)
  pos = torch.arange(T)
  target_output = torch.where(pos < target_len, words,
                              torch.where(pos == target_len, EOS, PAD))
  shifted = torch.cat([torch.full((batch, 1), GO), target_output[:, :-1]], 1)
  return {"source": source, "target_input": torch.where(pos <= target_len, shifted, PAD),
          "target_output": target_output, "target_mask": (pos <= target_len).float()}


def seq2seq_step(mode: str, batch_size: int, loops: str):
  model = Seq2Seq(loops)
  pool = [seq2seq_batch(torch.Generator().manual_seed(i), batch_size) for i in range(4)]
  trainable = [p for p in model.parameters() if p.requires_grad]
  count = itertools.count()
  decoder_steps = []

  if mode == "train":
    model.train()
    opt = torch.optim.SGD(trainable, lr=0.5)

    def step():
      b = pool[next(count) % len(pool)]
      opt.zero_grad(set_to_none=True)
      logits = model(b["source"], b["target_input"])
      mask, labels = b["target_mask"], b["target_output"]
      tokens = mask.sum().clamp(min=1.0)
      ce = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), reduction="none")
      loss = (ce * mask.view(-1)).sum() / tokens
      loss.backward()
      torch.nn.utils.clip_grad_norm_(trainable, 5.0)
      opt.step()
      with torch.no_grad():  # ours' metrics, computed in its train step
        accuracy = ((logits.argmax(-1) == labels) * mask).sum() / tokens
      return {"loss": loss.detach(), "accuracy": accuracy, "tokens": mask.sum()}
  else:
    model.eval()

    def step():
      b = pool[next(count) % len(pool)]
      with torch.inference_mode():
        out = model.generate(b["source"], TARGET_LEN)
      decoder_steps.append(out[2])
      return out

  def note():
    return f"decoder steps {min(decoder_steps)}-{max(decoder_steps)}" if decoder_steps else ""
  return trainable, step, note


# Workload -> (step builder, batch): the sequence models, timed once (no layout).
SEQUENCE_MODELS = {"speech": (speech_step, 8), "seq2seq": (seq2seq_step, 16)}


def _time_steps(step, steps: int, warmup: int, min_time_s: float, device: str = "cpu") -> list:
  for _ in range(warmup):
    step()
  _sync(device)
  times = []
  while len(times) < steps or sum(times) < min_time_s:
    start = time.perf_counter()
    step()
    _sync(device)  # a step is done when its kernels are, as JAX's block_until_ready
    times.append(time.perf_counter() - start)
  return times


def _autocast(device: str, dtype: torch.dtype):
  """bfloat16 compute with float32 parameters (fathom_jax's --dtype=bfloat16), or nothing."""
  if dtype == torch.float32:
    return contextlib.nullcontext()
  return torch.autocast(device_type=device, dtype=dtype)


def image_step(name: str, mode: str, layout: str, compiled: bool = False, batch: int | None = None,
               device: str = "cpu", dtype: torch.dtype = torch.float32):
  build, default_batch, weight_decay = MODELS[name]
  batch = batch or default_batch
  model = build()
  fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
  model = model.to(device=device, memory_format=fmt)
  params = list(model.parameters())
  if compiled:  # TorchInductor: the forward (and, in training, the backward) compiled
    model = torch.compile(model)
  images = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=fmt)
  labels = torch.randint(0, 1000, (batch,), device=device)
  if mode == "train":
    model.train()
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=weight_decay)

    def step():
      opt.zero_grad(set_to_none=True)
      with _autocast(device, dtype):
        loss = F.cross_entropy(model(images), labels)
      loss.backward()
      opt.step()
  else:
    model.eval()

    def step():
      with torch.inference_mode(), _autocast(device, dtype):
        model(images)
  return params, batch, step, None


def bench(name: str, mode: str, layout: str, args) -> dict:
  torch.manual_seed(0)
  dtype = getattr(torch, args.dtype)
  if name in MODELS:
    params, batch, step, note = image_step(name, mode, layout, args.compile,
                                           args.batch.get(name), args.device, dtype)
  else:
    build, batch = SEQUENCE_MODELS[name]
    batch = args.batch.get(name, batch)
    params, step, note = build(mode, batch, args.loops)
  peak = matmul_peak(device=args.device, dtype=dtype)
  times = _time_steps(step, args.steps, args.warmup_steps, args.min_time_s, args.device)
  return {"params": sum(p.numel() for p in params), "batch": batch,
          "median_s": statistics.median(times), "steps": len(times), "peak": peak,
          "note": note() if note else ""}


def _batches(parser, items: list) -> dict:
  sizes = {}
  for item in items:
    name, _, value = item.partition("=")
    if name not in MODELS and name not in SEQUENCE_MODELS or not value.isdigit() or not int(value):
      parser.error(f"--batch takes workload=N (N > 0), got {item!r}")
    sizes[name] = int(value)
  return sizes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workloads", default="residual,vgg,alexnet")
  parser.add_argument("--modes", default="train,infer")
  parser.add_argument("--layouts", default="nchw,channels_last",
                      help="the image models' layouts; the sequence models run once")
  parser.add_argument("--loops", choices=("eager", "scripted"), default=LOOPS,
                      help="speech's recurrence and seq2seq's decoder: torch.jit.script or Python")
  parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                      help="the image models by torch.compile (TorchInductor) instead of eagerly")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup_steps", type=int, default=2)
  parser.add_argument("--min_time_s", type=float, default=2.0)
  parser.add_argument("--reuse_host_memory", action=argparse.BooleanOptionalAction, default=True,
                      help="keep freed host memory for reuse, as fathom_jax's runs do")
  parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="where the steps run; cuda: the image models only")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype; bfloat16: autocast, parameters stay float32 (the image "
                           "models only)")
  parser.add_argument("--batch", action="append", default=[],
                      help="workload=N, the batch of that workload; repeatable")
  args = parser.parse_args()
  args.batch = _batches(parser, args.batch)
  names = args.workloads.split(",")
  unknown = [n for n in names if n not in MODELS and n not in SEQUENCE_MODELS]
  if unknown:
    parser.error(f"unknown workloads: {', '.join(unknown)}")
  # The sequence models build their masks and loops on the host: they run on the CPU in float32.
  sequence = [n for n in names if n in SEQUENCE_MODELS]
  if sequence and (args.device != "cpu" or args.dtype != "float32"):
    parser.error(f"{', '.join(sequence)}: --device=cpu and --dtype=float32 only")
  if args.device == "cuda":
    if not torch.cuda.is_available():
      parser.error("--device=cuda: torch sees no CUDA device")
    torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its algorithms once
  kept = False
  if args.reuse_host_memory:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fathom_jax import host_memory  # no JAX import: ctypes only
    kept = host_memory.keep_freed_memory()
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  where = (f"{torch.cuda.get_device_name()}, " if args.device == "cuda" else "")
  print(f"# torch {torch.__version__}, {where}{torch.get_num_threads()} threads, {args.dtype}, "
        f"image models {'torch.compile' if args.compile else 'eager'} (sequence models' loops "
        f"{args.loops}); {args.device} mm peak (GFLOP/s) measured before each row; freed host "
        f"memory {'kept' if kept else 'returned to the kernel'}")
  print(f"{'workload':<9} {'mode':<5} {'layout':<13} {'batch':>5} {'params':>12} "
        f"{'step ms':>9} {'steps':>5} {'items/s':>9} {'mm peak':>8}", flush=True)
  failed = 0
  for name in names:
    for mode in args.modes.split(","):
      for layout in (args.layouts.split(",") if name in MODELS else ["-"]):
        try:
          r = bench(name, mode, layout, args)
        except Exception as e:  # on a GPU, one row out of memory need not cost the others
          if args.device == "cpu":
            raise
          failed += 1
          print(f"{name:<9} {mode:<5} {layout:<13} failed: "
                f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}",
                flush=True)
          torch._dynamo.reset()
          torch.cuda.empty_cache()
          continue
        print(f"{name:<9} {mode:<5} {layout:<13} {r['batch']:>5} {r['params']:>12,} "
              f"{r['median_s'] * 1e3:>9.2f} {r['steps']:>5} {r['batch'] / r['median_s']:>9.1f} "
              f"{r['peak'] / 1e9:>8.0f}  {r['note']}".rstrip(), flush=True)
        if args.compile:
          torch._dynamo.reset()  # the next row's model compiles afresh, the old graphs freed
        if args.device == "cuda":
          torch.cuda.empty_cache()
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  main()
