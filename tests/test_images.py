import itertools
import os
import threading

import numpy as np
import pytest
from PIL import Image

from fathom_jax import images, results, runner
from fathom_jax.errors import DataError, UsageError
from fathom_jax.workloads import alexnet, residual

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "zebra": (0, 0, 255)}  # sorted: 0, 1, 2


def write_folder(root, per_class=3, sizes=((40, 30), (30, 50), (64, 64))):
  """root/<class>/<n>.jpg (the last one .png): solid class colour; the 64x64 ones framed in black."""
  for name, colour in COLOURS.items():
    os.makedirs(root / name)
    for n in range(per_class):
      w, h = sizes[n % len(sizes)]
      pixels = np.zeros((h, w, 3), np.uint8)
      frame = 8 if (w, h) == (64, 64) else 0
      pixels[frame:h - frame, frame:w - frame] = colour
      ext = "png" if n == per_class - 1 else "jpg"
      Image.fromarray(pixels).save(root / name / f"{n}.{ext}", quality=95)
  return str(root)


def take(source, n, batch_size, seed=0, train=True):
  return list(itertools.islice(source.batches(batch_size, seed=seed, train=train), n))


def dominant_class(image):
  """The class whose colour channel is brightest in the middle of a normalised image."""
  h, w = image.shape[:2]
  middle = image[h // 3:2 * h // 3, w // 3:2 * w // 3] * images.STD + images.MEAN
  return int(middle.mean((0, 1)).argmax())


def test_shapes_labels_and_normalisation(tmp_path):
  source = images.ImageFolder(write_folder(tmp_path), 24)
  assert source.classes == ["cat", "dog", "zebra"] and source.num_examples == 9
  for train in (True, False):
    for batch in take(source, 3, 4, train=train):  # 12 > 9 examples: runs into a second epoch
      assert batch["images"].shape == (4, 24, 24, 3) and batch["images"].dtype == np.float32
      assert batch["labels"].dtype == np.int32
      for image, label in zip(batch["images"], batch["labels"]):
        assert dominant_class(image) == label
  # Inference: the middle of a solid red image is exactly red after normalisation (JPEG aside).
  image = take(source, 1, 1, train=False)[0]["images"][0]
  np.testing.assert_allclose(image[12, 12], (np.array([1.0, 0, 0]) - images.MEAN) / images.STD,
                             atol=0.1)
  assert source.summary()["classes"] == 3 and source.summary()["images_decoded"] >= 12


def test_inference_order_and_centre_crop(tmp_path):
  source = images.ImageFolder(write_folder(tmp_path), 28)
  batches = take(source, 3, 3, train=False)
  labels = np.concatenate([b["labels"] for b in batches])
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])  # folder order, no shuffle
  # Same output whatever the seed; the framed square is centred, so the crop is symmetric.
  other = take(source, 3, 3, seed=7, train=False)
  for a, b in zip(batches, other):
    np.testing.assert_array_equal(a["images"], b["images"])
  square = batches[0]["images"][2]  # 64x64 png: resized to 32, centre 28 kept, 2 px of frame
  np.testing.assert_allclose(square, square[::-1, ::-1], atol=1e-5)
  assert square[0, 0].sum() < square[14, 14].sum()


def test_training_is_deterministic_and_augmented(tmp_path):
  root = write_folder(tmp_path)
  a = take(images.ImageFolder(root, 16), 4, 3, seed=1)
  b = take(images.ImageFolder(root, 16, workers=1), 4, 3, seed=1)
  c = take(images.ImageFolder(root, 16), 4, 3, seed=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["images"], y["images"])
    np.testing.assert_array_equal(x["labels"], y["labels"])
  assert not all(np.array_equal(x["images"], z["images"]) for x, z in zip(a, c))
  # Each epoch is a permutation of all examples (shuffled, none dropped or repeated).
  first_epoch = np.concatenate([x["labels"] for x in a[:3]])
  assert sorted(first_epoch) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_flip_and_random_crop(tmp_path):
  """A left-to-right ramp: inference keeps it; training flips about half the crops."""
  pixels = np.repeat(np.repeat((np.arange(64) * 4).astype(np.uint8)[None, :, None], 48, 0), 3, 2)
  os.makedirs(tmp_path / "only")
  Image.fromarray(pixels).save(tmp_path / "only" / "ramp.png")
  source = images.ImageFolder(str(tmp_path), 16)
  side = lambda im: np.sign(im[:, 8:].mean() - im[:, :8].mean())
  infer = take(source, 4, 1, train=False)
  assert {side(b["images"][0]) for b in infer} == {1.0}
  sides = [side(b["images"][0]) for b in take(source, 40, 1, seed=3)]
  assert 0 not in sides and 8 <= sides.count(-1.0) <= 32  # flipped: bright side on the left
  crops = {b["images"].tobytes() for b in take(source, 10, 1, seed=3)}
  assert len(crops) == 10


def test_random_resized_crop_box():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = images.random_resized_crop_box(200, 100, rng)
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
    assert 0.07 * 200 * 100 <= w * h <= 200 * 100
    assert 0.7 <= w / h <= 1.4
  # No crop of ratio 3/4..4/3 with area >= 8% fits a 1000x10 strip: the fallback is the largest
  # centred crop of ratio 4/3.
  assert images.random_resized_crop_box(1000, 10, np.random.default_rng(0)) == (493, 0, 506, 10)


def test_decoding_runs_off_the_main_thread(tmp_path, monkeypatch):
  source = images.ImageFolder(write_folder(tmp_path), 8)
  threads = set()
  decode = images.decode

  def recording_decode(path):
    threads.add(threading.current_thread().name)
    return decode(path)

  monkeypatch.setattr(images, "decode", recording_decode)
  take(source, 2, 4)
  assert threads and threading.main_thread().name not in threads


def test_corrupt_images_are_data_errors_naming_the_file(tmp_path):
  root = write_folder(tmp_path)
  good = (tmp_path / "cat" / "0.jpg").read_bytes()
  (tmp_path / "dog" / "truncated.jpg").write_bytes(good[:len(good) // 3])
  source = images.ImageFolder(root, 16)
  with pytest.raises(DataError, match="truncated.jpg"):
    take(source, 3, 4, train=False)
  (tmp_path / "dog" / "truncated.jpg").unlink()
  (tmp_path / "zebra" / "noise.jpeg").write_bytes(b"not an image at all" * 10)
  with pytest.raises(DataError, match="noise.jpeg"):
    take(images.ImageFolder(root, 16), 3, 4, train=True)


def add_corrupt_images(root):
  good = (root / "cat" / "0.jpg").read_bytes()
  (root / "dog" / "truncated.jpg").write_bytes(good[:len(good) // 3])
  (root / "zebra" / "noise.jpeg").write_bytes(b"not an image at all" * 10)


def test_corrupt_images_skipped_and_counted(tmp_path):
  root = write_folder(tmp_path)
  add_corrupt_images(tmp_path)
  source = images.ImageFolder(root, 16, bad_samples="skip")
  assert source.num_examples == 11
  # Inference reads in folder order; each bad image's slot goes to the next one, across epochs.
  batches = take(source, 7, 3, train=False)
  labels = np.concatenate([b["labels"] for b in batches])
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2] * 2 + [0, 0, 0])
  for batch in batches:
    assert [dominant_class(im) for im in batch["images"]] == batch["labels"].tolist()
  bad = source.summary()["bad_samples"]
  assert bad["skipped"] == 2  # counted once, though the second epoch passed them again
  assert [m.split(": ")[0] for m in bad["first"]] == [
      str(tmp_path / "dog" / "truncated.jpg"), str(tmp_path / "zebra" / "noise.jpeg")]
  assert all("cannot decode image" in m for m in bad["first"])
  # Training stays the same bit for bit whatever the threads, and every epoch holds the 9 good.
  a = take(images.ImageFolder(root, 16, bad_samples="skip"), 6, 3, seed=1)
  b = take(images.ImageFolder(root, 16, workers=1, bad_samples="skip"), 6, 3, seed=1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["images"], y["images"])
  assert sorted(np.concatenate([x["labels"] for x in a[:3]])) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  # With 'fail' (the default) the first bad image drawn is a one-line error naming it.
  with pytest.raises(DataError, match="truncated.jpg: cannot decode image") as info:
    take(images.ImageFolder(root, 16), 4, 3, train=False)
  assert "\n" not in str(info.value)
  assert "bad_samples" not in images.ImageFolder(root, 16).summary()


def test_all_images_bad_is_an_error_even_when_skipping(tmp_path):
  os.makedirs(tmp_path / "only")
  for n in range(3):
    (tmp_path / "only" / f"{n}.jpg").write_bytes(b"\xff\xd8 broken" * n)
  source = images.ImageFolder(str(tmp_path), 16, bad_samples="skip")
  with pytest.raises(DataError, match="no usable samples; 3 bad ones skipped") as info:
    take(source, 1, 2)
  assert str(info.value).startswith(str(tmp_path)) and "\n" not in str(info.value)
  with pytest.raises(UsageError, match="unknown bad_samples 'drop'"):
    images.ImageFolder(str(tmp_path), 16, bad_samples="drop")


def test_bad_folders_are_data_errors(tmp_path):
  with pytest.raises(DataError, match="no such image folder"):
    images.ImageFolder(str(tmp_path / "missing"), 16)
  with pytest.raises(DataError, match="no class sub-folders"):
    images.ImageFolder(str(tmp_path), 16)
  os.makedirs(tmp_path / "empty_class")
  (tmp_path / "empty_class" / "notes.txt").write_text("no images here")
  with pytest.raises(DataError, match="empty_class.*no images"):
    images.ImageFolder(str(tmp_path), 16)


def test_workloads_read_image_folders(tmp_path):
  root = write_folder(tmp_path)
  source, config = residual.WORKLOAD.load_data(residual.PRESETS["tiny"], root)
  assert config.num_classes == 3 and config.image_size == residual.PRESETS["tiny"].image_size
  batch = take(source, 1, 2)[0]
  assert batch["images"].shape == (2, config.image_size, config.image_size, 3)
  # End to end through the runner: real batches, prefetched, into an inference run; a corrupt
  # image among them is skipped and shown in the record and the printed summary.
  add_corrupt_images(tmp_path)
  record = runner.execute(runner.RunSpec(workload="alexnet", mode="infer", preset="tiny",
                                         data=root, steps=2, warmup_steps=0, output_dir=None,
                                         quiet=True, bad_samples="skip"))
  assert record["data"]["kind"] == "real" and record["data"]["classes"] == 3
  assert record["config"]["num_classes"] == 3 and record["data"]["images_decoded"] >= 4
  assert alexnet.PRESETS["tiny"].num_classes != 3  # the folder, not the preset, decided
  assert record["data"]["bad_samples"]["skipped"] == 2  # 16 images drawn of 11, in order
  assert record["spec"]["bad_samples"] == "skip"
  (line,) = [l for l in results.format_summary(record).splitlines() if "bad samples" in l]
  assert line.startswith("  bad samples  2 skipped: ") and "truncated.jpg" in line
  assert "noise.jpeg" in line
