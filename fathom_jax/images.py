"""ImageNet-style image folders: root/<class>/<image>.jpg|jpeg|png, one sub-folder per class.

Class indices follow the sorted sub-folder names. Images are decoded with Pillow and transformed
as ImageNet classifiers are trained and evaluated:
  train: random resized crop (area 8%-100%, aspect ratio 3/4-4/3) to size x size, then a
         horizontal flip with probability 1/2;
  infer: resize the shorter side to size / 0.875 (256 for 224), then a centre crop;
then scaled to [0, 1] and normalised with the ImageNet mean and standard deviation (NHWC float32).
Every example's randomness comes from (seed, epoch, position in the epoch), so batches are the
same bit for bit whatever the threads do. Decoding runs on a small thread pool (Pillow releases
the GIL) and batches are assembled on a background thread, ahead of the consumer.

Images are decoded as batches need them, so a damaged one is found when it is first drawn: under
bad_samples='fail' its DataError ends the run; under 'skip' it is counted, never drawn again,
and its batch slot goes to the next image of the order (still the same bit for bit).
"""

import concurrent.futures
import itertools
import math
import os
import threading
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from fathom_jax import data as data_lib
from fathom_jax.errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png")
MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
STD = np.asarray([0.229, 0.224, 0.225], np.float32)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CENTRE_FRACTION = 0.875  # 224 of 256


def scan(root: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(class names, [(path, class index)]) of an image folder; DataError if it holds no images."""
  if not os.path.isdir(root):
    raise DataError(f"{root}: no such image folder")
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
  if not classes:
    raise DataError(f"{root}: no class sub-folders (want {root}/<class>/<image>.jpg)")
  samples = []
  for index, name in enumerate(classes):
    folder = os.path.join(root, name)
    files = sorted(f for f in os.listdir(folder)
                   if f.lower().endswith(EXTENSIONS) and not f.startswith("."))
    if not files:
      raise DataError(f"{folder}: class folder holds no images ({', '.join(EXTENSIONS)})")
    samples.extend((os.path.join(folder, f), index) for f in files)
  return classes, samples


def decode(path: str) -> Image.Image:
  """The image at `path` as RGB; DataError naming the file if Pillow cannot decode it."""
  try:
    with Image.open(path) as image:
      return image.convert("RGB")  # forces the full decode, so truncated files fail here
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DataError(f"{path}: cannot decode image ({e})") from None


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator):
  """(left, top, right, bottom) of torchvision's RandomResizedCrop: up to 10 tries at a random
  area fraction and log-uniform aspect ratio, else the largest centred crop of clamped ratio."""
  area = width * height
  log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
  for _ in range(10):
    target = area * rng.uniform(*CROP_SCALE)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  ratio = width / height
  if ratio < CROP_RATIO[0]:
    w, h = width, int(round(width / CROP_RATIO[0]))
  elif ratio > CROP_RATIO[1]:
    w, h = int(round(height * CROP_RATIO[1])), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def train_transform(image: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
  box = random_resized_crop_box(image.width, image.height, rng)
  out = image.resize((size, size), Image.BILINEAR, box=box)
  if rng.random() < 0.5:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def infer_transform(image: Image.Image, size: int) -> np.ndarray:
  shorter = int(size / CENTRE_FRACTION)
  scale = shorter / min(image.width, image.height)
  if image.width <= image.height:
    new = (shorter, int(image.height * scale))
  else:
    new = (int(image.width * scale), shorter)
  out = image.resize(new, Image.BILINEAR)
  left = int(round((new[0] - size) / 2))
  top = int(round((new[1] - size) / 2))
  return np.asarray(out.crop((left, top, left + size, top + size)))


def normalise(pixels: np.ndarray) -> np.ndarray:
  return (pixels.astype(np.float32) / 255.0 - MEAN) / STD


class ImageFolder:
  """A data source (see fathom_jax.data) over an ImageNet-style folder."""

  def __init__(self, root: str, image_size: int, workers: Optional[int] = None,
               prefetch_batches: int = 2, bad_samples: str = "fail"):
    self.bad = data_lib.BadSamples(bad_samples)
    self._bad_indices: set[int] = set()
    self.root = root
    self.image_size = image_size
    self.classes, self.samples = scan(root)
    self.num_classes = len(self.classes)
    self.num_examples = len(self.samples)
    self.workers = workers or min(8, os.cpu_count() or 1)  # Pillow decodes without the GIL
    self.prefetch_batches = prefetch_batches
    self._decoded = 0
    self._lock = threading.Lock()

  def example(self, index: int, *, seed: int, epoch: int, position: int,
              train: bool) -> np.ndarray:
    """The transformed, normalised image of sample `index` (HWC float32)."""
    path, _ = self.samples[index]
    image = decode(path)
    if train:
      rng = np.random.default_rng([seed, epoch, position])
      pixels = train_transform(image, self.image_size, rng)
    else:
      pixels = infer_transform(image, self.image_size)
    with self._lock:
      self._decoded += 1
    return normalise(pixels)

  def _order(self, seed: int, train: bool) -> Iterator[tuple[int, int, int]]:
    """Endless (sample index, epoch, position) in reading order, running across epochs and
    leaving out the images found bad so far. Training reshuffles every epoch; inference reads
    the folder in order."""
    for epoch in itertools.count():
      order = (np.random.default_rng([seed, epoch]).permutation(self.num_examples) if train
               else np.arange(self.num_examples))
      for position, index in enumerate(order):
        if int(index) not in self._bad_indices:
          yield int(index), epoch, position

  def _attempt(self, item: tuple[int, int, int], seed: int, train: bool):
    """The example of `item`, or the DataError of its damaged image."""
    index, epoch, position = item
    try:
      return self.example(index, seed=seed, epoch=epoch, position=position, train=train)
    except DataError as e:
      return e

  def _generate(self, batch_size: int, seed: int, train: bool) -> Iterator[dict]:
    labels = np.asarray([label for _, label in self.samples], np.int32)
    order = self._order(seed, train)
    with concurrent.futures.ThreadPoolExecutor(self.workers,
                                               thread_name_prefix="image-decode") as pool:
      while True:
        images, indices = [], []
        while len(images) < batch_size:  # a bad image's slot goes to the next in the order
          items = list(itertools.islice(order, batch_size - len(images)))
          for (index, _, _), result in zip(items, pool.map(
              lambda item: self._attempt(item, seed, train), items)):
            if isinstance(result, DataError):
              if index not in self._bad_indices:  # drawn twice in a chunk that spans epochs
                self.bad.skip(result)
                self._bad_indices.add(index)
                self.bad.check_any_left(self.num_examples - len(self._bad_indices), self.root)
            else:
              images.append(result)
              indices.append(index)
        yield {"images": np.stack(images), "labels": labels[indices]}

  def batches(self, batch_size: int, *, seed: int, train: bool) -> Iterator[dict]:
    return data_lib.prefetch(self._generate(batch_size, seed, train), self.prefetch_batches)

  def summary(self) -> dict:
    return {"kind": "real", "source": self.root, "format": "image folder",
            "examples": self.num_examples, "classes": self.num_classes,
            "image_size": self.image_size, "images_decoded": self._decoded,
            **self.bad.summary()}
