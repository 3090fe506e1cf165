import gzip

import numpy as np
import pytest

from fathom_jax.errors import DataError
from fathom_jax.workloads import autoenc
from tests import workload_checks as checks


def test_parameter_count_matches_architecture():
  # 784 -> 500 (tanh) -> 2 x 20 (mean, log-variance); 20 -> 500 (tanh) -> 784 logits.
  expected = (784 * 500 + 500) + 2 * (500 * 20 + 20) + (20 * 500 + 500) + (500 * 784 + 784)
  assert checks.parameter_count("autoenc") == expected == 815_824


def test_shapes():
  config, model = checks.build("autoenc")
  out = checks.infer_outputs(model, 5)
  assert out["reconstruction"].shape == (5, config.pixels)
  assert out["samples"].shape == (5, config.pixels)
  assert float(out["reconstruction"].min()) >= 0 and float(out["reconstruction"].max()) <= 1


def test_loss_falls_deterministic_and_jit_matches():
  _, model = checks.build("autoenc")
  checks.assert_loss_falls(model, 16, steps=60)
  checks.assert_deterministic(model, 16)
  checks.assert_jit_matches_eager(model, 16)


def test_bfloat16_runs():
  _, model = checks.build("autoenc", dtype="bfloat16")
  losses = checks.train_losses(model, 8, 3)
  assert np.all(np.isfinite(losses))


def _write_idx(path, array, magic=None):
  header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
def test_mnist_reader(tmp_path, name):
  images = np.random.default_rng(0).integers(0, 256, (10, 28, 28))
  _write_idx(str(tmp_path / name), images)
  source, config = autoenc.load_data(autoenc.PRESETS["tiny"], str(tmp_path))
  batch = next(source.batches(4, seed=0, train=True))
  assert batch["images"].shape == (4, 28, 28, 1)
  assert source.num_examples == 10 and config.image_size == 28
  np.testing.assert_allclose(np.sort(source.arrays["images"].ravel()),
                             np.sort(images.ravel() / 255.0), rtol=1e-6)


def test_mnist_reader_errors(tmp_path):
  bad_magic = tmp_path / "bad"
  _write_idx(str(bad_magic), np.zeros((2, 28, 28)), magic=b"\x12\x34\x08\x03")
  with pytest.raises(DataError, match="magic"):
    autoenc.load_data(autoenc.PRESETS["tiny"], str(bad_magic))
  with pytest.raises(DataError, match="magic"):  # damage to the file: skipping does not help
    autoenc.load_data(autoenc.PRESETS["tiny"], str(bad_magic), bad_samples="skip")
  truncated = tmp_path / "truncated"
  _write_idx(str(truncated), np.zeros((2, 28, 28)))
  truncated.write_bytes(truncated.read_bytes()[:-10])
  with pytest.raises(DataError, match="promises"):
    autoenc.load_data(autoenc.PRESETS["tiny"], str(truncated))
  with pytest.raises(DataError, match="no MNIST image file"):
    empty = tmp_path / "empty"
    empty.mkdir()
    autoenc.load_data(autoenc.PRESETS["tiny"], str(empty))
