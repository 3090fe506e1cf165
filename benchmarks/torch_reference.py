#!/usr/bin/env python3
"""The image classifiers' steps in PyTorch, timed on the same machine: the reference the JAX
steps are judged against.

The same architectures as fathom_jax's `paper` presets (parameter counts are printed and must
match: ResNet-50 25,557,032; VGG-19 143,667,240; AlexNet with LRN 61,100,840), the same train
step (forward, softmax cross-entropy, backward, SGD with momentum and weight decay) and
inference step (forward in eval mode), float32, each timed eager in NCHW and in channels-last
(oneDNN's preferred layout for convolutions on CPU), with torch.mm's peak measured just before
each row. PyTorch is not a dependency of fathom_jax: run this in an environment that has it.

  python benchmarks/torch_reference.py --workloads=residual,vgg,alexnet
"""

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F


def matmul_peak(repeats: int = 5, n: int = 2048) -> float:
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
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


def _time_steps(step, steps: int, warmup: int, min_time_s: float) -> list:
  for _ in range(warmup):
    step()
  times = []
  while len(times) < steps or sum(times) < min_time_s:
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def bench(name: str, mode: str, layout: str, args) -> dict:
  build, batch, weight_decay = MODELS[name]
  torch.manual_seed(0)
  model = build()
  fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
  model = model.to(memory_format=fmt)
  images = torch.randn(batch, 3, 224, 224).contiguous(memory_format=fmt)
  labels = torch.randint(0, 1000, (batch,))
  params = sum(p.numel() for p in model.parameters())
  if mode == "train":
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=weight_decay)

    def step():
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(images), labels)
      loss.backward()
      opt.step()
  else:
    model.eval()

    def step():
      with torch.inference_mode():
        model(images)
  peak = matmul_peak()
  times = _time_steps(step, args.steps, args.warmup_steps, args.min_time_s)
  return {"params": params, "batch": batch, "median_s": statistics.median(times),
          "steps": len(times), "peak": peak}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workloads", default="residual,vgg,alexnet")
  parser.add_argument("--modes", default="train,infer")
  parser.add_argument("--layouts", default="nchw,channels_last")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup_steps", type=int, default=2)
  parser.add_argument("--min_time_s", type=float, default=2.0)
  parser.add_argument("--reuse_host_memory", action=argparse.BooleanOptionalAction, default=True,
                      help="keep freed host memory for reuse, as fathom_jax's runs do")
  args = parser.parse_args()
  kept = False
  if args.reuse_host_memory:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fathom_jax import host_memory  # no JAX import: ctypes only
    kept = host_memory.keep_freed_memory()
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, float32, eager; "
        f"mm peak measured before each row; freed host memory "
        f"{'kept' if kept else 'returned to the kernel'}")
  print(f"{'workload':<9} {'mode':<5} {'layout':<13} {'batch':>5} {'params':>12} "
        f"{'step ms':>9} {'steps':>5} {'images/s':>9} {'mm peak':>8}")
  for name in args.workloads.split(","):
    for mode in args.modes.split(","):
      for layout in args.layouts.split(","):
        r = bench(name, mode, layout, args)
        print(f"{name:<9} {mode:<5} {layout:<13} {r['batch']:>5} {r['params']:>12,} "
              f"{r['median_s'] * 1e3:>9.2f} {r['steps']:>5} {r['batch'] / r['median_s']:>9.1f} "
              f"{r['peak'] / 1e9:>8.0f}", flush=True)


if __name__ == "__main__":
  main()
