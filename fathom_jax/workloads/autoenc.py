"""autoenc: the variational autoencoder of Kingma & Welling (2013).

MLP encoder (tanh hidden layer) to the mean and log-variance of a diagonal Gaussian posterior,
reparameterised sample, MLP decoder to Bernoulli logits over the pixels; the loss is the
negative ELBO (Bernoulli reconstruction log-likelihood plus the analytic KL to N(0, I)).
Inference reconstructs from the posterior mean and decodes samples from the prior.
"""

import dataclasses
import gzip
import os
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_jax import data as data_lib
from fathom_jax import scopes
from fathom_jax.errors import DataError
from fathom_jax.workloads import base


@dataclasses.dataclass(frozen=True)
class Config:
  image_size: int = 28
  hidden: int = 500
  latent: int = 20
  batch_size: int = 128
  learning_rate: float = 1e-3

  @property
  def pixels(self) -> int:
    return self.image_size * self.image_size


PRESETS = {
    "paper": Config(),
    "small": Config(hidden=256, latent=16, batch_size=64),
    "tiny": Config(hidden=32, latent=4, batch_size=16),
}


class VAE(nn.Module):
  config: Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    self.enc_hidden = dense(c.hidden, "enc_hidden")
    self.enc_mean = dense(c.latent, "enc_mean")
    self.enc_logvar = dense(c.latent, "enc_logvar")
    self.dec_hidden = dense(c.hidden, "dec_hidden")
    self.dec_out = dense(c.pixels, "dec_out")

  def encode(self, x):
    h = jnp.tanh(self.enc_hidden(x))
    return self.enc_mean(h), self.enc_logvar(h)

  def decode(self, z):
    return self.dec_out(jnp.tanh(self.dec_hidden(z)))

  def __call__(self, images, rng, train: bool):
    x = images.reshape(images.shape[0], -1).astype(self.dtype)
    mean, logvar = self.encode(x)
    if train:
      with jax.named_scope(scopes.RANDOM):
        eps = jax.random.normal(rng, mean.shape, mean.dtype)
      z = mean + jnp.exp(0.5 * logvar) * eps
      return {"logits": self.decode(z), "mean": mean, "logvar": logvar}
    with jax.named_scope(scopes.RANDOM):
      prior_z = jax.random.normal(rng, mean.shape, mean.dtype)
    return {"reconstruction": nn.sigmoid(self.decode(mean)),
            "samples": nn.sigmoid(self.decode(prior_z))}


def negative_elbo(outputs, batch):
  x = batch["images"].reshape(batch["images"].shape[0], -1)
  logits = outputs["logits"].astype(jnp.float32)
  mean = outputs["mean"].astype(jnp.float32)
  logvar = outputs["logvar"].astype(jnp.float32)
  # -log p(x|z) for a Bernoulli decoder with (possibly non-binary) targets in [0, 1].
  reconstruction = optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)
  kl = 0.5 * (jnp.exp(logvar) + mean**2 - 1.0 - logvar).sum(-1)
  loss = (reconstruction + kl).mean()
  return loss, {"reconstruction": reconstruction.mean(), "kl": kl.mean()}


def synthetic_batch(config: Config, rng, batch_size: int):
  """MNIST's shape and value range: mostly dark pixels, about a fifth lit with intensities in [0, 1]."""
  shape = (batch_size, config.image_size, config.image_size, 1)
  lit_rng, value_rng = jax.random.split(rng)
  lit = jax.random.bernoulli(lit_rng, 0.2, shape)
  return {"images": jnp.where(lit, jax.random.uniform(value_rng, shape), 0.0)}


def build(config: Config, dtype: str) -> base.Model:
  module = VAE(config, jnp.dtype(dtype))

  def init(rng, batch):
    param_rng, noise_rng = jax.random.split(rng)
    return module.init(param_rng, batch["images"], noise_rng, train=True)

  def apply(variables, batch, *, train, rng):
    return module.apply(variables, batch["images"], rng, train=train), {}

  return base.Model(
      init=init, apply=apply, loss=negative_elbo,
      optimizer=optax.adam(config.learning_rate),
      synthetic_batch=lambda rng, n: synthetic_batch(config, rng, n))


# --- MNIST idx files -------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGE_NAMES = ("train-images-idx3-ubyte", "train-images.idx3-ubyte")


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (raw or gzip): magic 0x0000TTNN, NN dimension sizes, then the data."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"{path}: cannot read idx file ({e})") from None
  if len(raw) < 4:
    raise DataError(f"{path}: too short to be an idx file ({len(raw)} bytes)")
  zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
  if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
    raise DataError(f"{path}: bad idx magic number 0x{raw[:4].hex()} (want 0x0000TTNN)")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: truncated idx header")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  dtype = np.dtype(_IDX_DTYPES[type_code])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise DataError(f"{path}: idx header promises {expected} data bytes for shape {shape}, "
                    f"file holds {len(raw) - header}")
  return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _find_images(path: str) -> str:
  if os.path.isfile(path):
    return path
  for name in _IMAGE_NAMES:
    for suffix in ("", ".gz"):
      candidate = os.path.join(path, name + suffix)
      if os.path.exists(candidate):
        return candidate
  raise DataError(f"{path}: no MNIST image file found (looked for "
                  f"{', '.join(n + '[.gz]' for n in _IMAGE_NAMES)})")


def load_data(config: Config, path: str, bad_samples: str = "fail"):
  """MNIST images (idx file, or a folder holding train-images-idx3-ubyte[.gz]). Records are
  fixed-size raw pixels, so damage is to the file (magic number, size) and an error whatever
  `bad_samples` says."""
  data_lib.BadSamples(bad_samples)  # validates the choice; no sample here can be skipped
  image_path = _find_images(path)
  images = read_idx(image_path)
  if images.ndim != 3:
    raise DataError(f"{image_path}: expected an idx3 image file, got {images.ndim} dimensions")
  if images.shape[1] != images.shape[2]:
    raise DataError(f"{image_path}: images are not square: {images.shape[1:]}")
  scale = 255.0 if images.dtype == np.uint8 else 1.0
  images = (images.astype(np.float32) / scale)[..., None]
  from fathom_jax import config as config_lib
  config = config_lib.replace(config, image_size=int(images.shape[1]))
  return data_lib.ArraySource({"images": images}, description=image_path), config


WORKLOAD = base.Workload(
    name="autoenc",
    description="Variational autoencoder (Kingma & Welling 2013) on 28x28 images",
    config_cls=Config,
    presets=PRESETS,
    build=build,
    load_data=load_data,
    example_unit="images",
)
