"""Tests for crmjax.data: loading (TFDS, local files), batching, prefetching."""

import gzip
import pickle
import threading

import jax
import numpy as np
import pytest
from PIL import Image

from crmjax import data

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------


def test_dataset_info():
  assert data.dataset_info("mnist") == data.DatasetInfo(10, (28, 28, 1))
  assert data.dataset_info("cifar10") == data.DatasetInfo(10, (32, 32, 3))
  assert data.dataset_info("tiny_imagenet") == data.DatasetInfo(
      200, (64, 64, 3)
  )
  with pytest.raises(ValueError, match="mnist, cifar10, tiny_imagenet"):
    data.dataset_info("imagenet")


def test_unknown_name_and_split():
  with pytest.raises(ValueError, match="known datasets"):
    data.load_split("svhn", "train")
  with pytest.raises(ValueError, match="split"):
    data.load_split("mnist", "validation")


# --------------------------------------------------------------------------
# MNIST (vendored IDX files)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "split, counts",
    [("train", MNIST_TRAIN_COUNTS), ("test", MNIST_TEST_COUNTS)],
)
def test_vendored_mnist(split, counts):
  images, labels = data.load_split("mnist", split)
  n = sum(counts)
  assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (n,) and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), counts)
  assert images.max() == 255 and images.min() == 0


def _mnist_file(name):
  return data._VENDORED_DATA_DIR / "mnist" / name


def test_mnist_files_directly_in_dir(tmp_path, monkeypatch):
  for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    (tmp_path / name).write_bytes(_mnist_file(name).read_bytes())
  monkeypatch.setattr(data, "_VENDORED_DATA_DIR", tmp_path / "nothing")
  images, labels = data.load_split("mnist", "test", data_dir=tmp_path)
  assert images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(labels), MNIST_TEST_COUNTS)


def test_truncated_idx_gzip_raises_clear_error(tmp_path):
  raw = _mnist_file("t10k-labels-idx1-ubyte.gz").read_bytes()
  (tmp_path / "mnist").mkdir()
  (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(
      _mnist_file("t10k-images-idx3-ubyte.gz").read_bytes()
  )
  bad = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
  bad.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
    data.load_split("mnist", "test", data_dir=tmp_path)


def test_idx_parsing_errors(tmp_path):
  good = np.arange(6, dtype=np.uint8).reshape(2, 3)
  header = bytes([0, 0, 0x08, 2]) + np.array([2, 3], ">u4").tobytes()

  path = tmp_path / "ok-idx2-ubyte.gz"
  path.write_bytes(gzip.compress(header + good.tobytes()))
  np.testing.assert_array_equal(data.read_idx(path), good)

  short = tmp_path / "short-idx2-ubyte.gz"  # Valid gzip, too few bytes.
  short.write_bytes(gzip.compress(header + good.tobytes()[:-1]))
  with pytest.raises(ValueError, match="truncated.*short-idx2-ubyte.gz"):
    data.read_idx(short)

  magic = tmp_path / "magic-idx2-ubyte"
  magic.write_bytes(b"\x12\x34\x08\x02" + header[4:] + good.tobytes())
  with pytest.raises(ValueError, match="magic-idx2-ubyte.*magic"):
    data.read_idx(magic)


# --------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------


def _write_cifar(root, rng, per_batch=3):
  """Writes a tiny cifar-10-batches-py; returns {file: (hwc_images, labels)}."""
  folder = root / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  written = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    hwc = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, per_batch).tolist()
    # Real format: rows of 3072 = 1024 R, then 1024 G, then 1024 B values.
    rows = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
    batch = {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": rows,
        b"filenames": [b"x.png"] * per_batch,
    }
    with open(folder / name, "wb") as f:
      pickle.dump(batch, f)
    written[name] = (hwc, np.asarray(labels))
  return written


def test_cifar10_local_files_chw_to_hwc(tmp_path):
  written = _write_cifar(tmp_path, np.random.default_rng(0))
  images, labels = data.load_split("cifar10", "train", data_dir=tmp_path)
  expected = np.concatenate(
      [written[f"data_batch_{i}"][0] for i in range(1, 6)]
  )
  assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(images, expected)
  np.testing.assert_array_equal(
      labels,
      np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)]),
  )

  images, labels = data.load_split("cifar10", "test", data_dir=tmp_path)
  np.testing.assert_array_equal(images, written["test_batch"][0])
  np.testing.assert_array_equal(labels, written["test_batch"][1])
  # Pixel-exact spot check of the layout: red channel = first 1024 values.
  with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
    row = pickle.load(f)[b"data"][1]
  assert images[1, 0, 5, 0] == row[5]
  assert images[1, 2, 0, 1] == row[1024 + 2 * 32]
  assert images[1, 31, 31, 2] == row[3071]


def test_cifar10_from_env_dir(tmp_path, monkeypatch):
  written = _write_cifar(tmp_path, np.random.default_rng(1), per_batch=2)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  images, _ = data.load_split("cifar10", "test")
  np.testing.assert_array_equal(images, written["test_batch"][0])


def test_cifar10_tfds_mock_data_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5):
    images, labels = data.load_split("cifar10", "train", data_dir=tmp_path)
  assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (5,) and labels.dtype == np.int32
  assert ((labels >= 0) & (labels < 10)).all()


def test_tfds_data_source_reader_matches_records(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4):
    source = tfds.data_source("mnist", split="test", data_dir=tmp_path)
    images, labels = data._read_data_source(source)
    for i in range(4):
      np.testing.assert_array_equal(images[i], source[i]["image"])
      assert labels[i] == source[i]["label"]


# --------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------


def test_tiny_imagenet_folder(tmp_path):
  root = tmp_path / "tiny-imagenet-200"
  wnids = ["n03", "n01", "n02"]  # Class index = position in sorted order.
  (root / "val" / "images").mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
  colors = {"n01": (250, 0, 0), "n02": (0, 250, 0), "n03": (0, 0, 250)}
  for wnid in wnids:
    image_dir = root / "train" / wnid / "images"
    image_dir.mkdir(parents=True)
    for k in range(2):
      Image.new("RGB", (64, 64), colors[wnid]).save(
          image_dir / f"{wnid}_{k}.JPEG", quality=95
      )
  val = [("val_0.JPEG", "n02"), ("val_1.JPEG", "n03"), ("val_2.JPEG", "n01")]
  for fname, wnid in val:
    # A grayscale image must come back as RGB.
    Image.new("RGB", (64, 64), colors[wnid]).save(root / "val" / "images" / fname)
  Image.new("L", (64, 64), 128).save(root / "val" / "images" / "val_3.JPEG")
  val.append(("val_3.JPEG", "n01"))
  (root / "val" / "val_annotations.txt").write_text(
      "".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in val)
  )

  images, labels = data.load_split("tiny_imagenet", "train", data_dir=tmp_path)
  assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
  mean_colors = images.reshape(6, -1, 3).mean(axis=1)
  np.testing.assert_allclose(
      mean_colors[::2], [colors["n01"], colors["n02"], colors["n03"]], atol=4
  )

  images, labels = data.load_split("tiny_imagenet", "test", data_dir=tmp_path)
  assert images.shape == (4, 64, 64, 3)
  np.testing.assert_array_equal(labels, [1, 2, 0, 0])
  np.testing.assert_allclose(images[3], 128, atol=2)


# --------------------------------------------------------------------------
# Missing data
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "tiny_imagenet", "mnist"])
def test_missing_data_offline_names_both_fixes(name, tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_VENDORED_DATA_DIR", tmp_path / "no-vendored")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as info:
    data.load_split(name, "train", data_dir=empty)
  message = str(info.value)
  assert "TFDS" in message
  assert "--config.data_dir" in message and "$CRMJAX_DATA_DIR" in message
  if name != "tiny_imagenet":
    assert "download=True" in message
  layout = {
      "mnist": "train-images-idx3-ubyte.gz",
      "cifar10": "cifar-10-batches-py/data_batch_1",
      "tiny_imagenet": "tiny-imagenet-200/wnids.txt",
  }[name]
  assert layout in message
  assert list(empty.iterdir()) == []  # TFDS did not write anything there.


def test_download_without_tfds_builder_still_explains(tmp_path):
  # No TFDS builder for Tiny-ImageNet, so download=True cannot help.
  with pytest.raises(FileNotFoundError, match="tiny-imagenet-200"):
    data.load_split("tiny_imagenet", "test", data_dir=tmp_path, download=True)


def test_missing_cifar10_ignores_vendored_mnist(tmp_path):
  # The vendored data/ folder only holds MNIST; cifar10 must still fail.
  with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
    data.load_split("cifar10", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------
# Batching and augmentation
# --------------------------------------------------------------------------


def _toy(n=23, shape=(6, 5, 2)):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  # Encode the example index in pixel [0, 0, 0] and the label.
  images[:, 0, 0, 0] = np.arange(n)
  labels = np.arange(n, dtype=np.int64) % 7
  return images, labels


def _ids(batches):
  return [np.round(x[:, 0, 0, 0] * 255).astype(int) for x, _ in batches]


def test_steps_per_epoch():
  assert data.steps_per_epoch(23, 5) == 4
  assert data.steps_per_epoch(23, 5, drop_remainder=False) == 5
  assert data.steps_per_epoch(20, 5, False) == 4
  with pytest.raises(ValueError):
    data.steps_per_epoch(10, 0)


def test_epoch_batches_types_and_determinism():
  images, labels = _toy()
  kw = dict(batch_size=5, seed=3, epoch=2)
  a = list(data.epoch_batches(images, labels, **kw))
  b = list(data.epoch_batches(images, labels, **kw))
  assert len(a) == 4
  for (xa, ya), (xb, yb) in zip(a, b):
    assert xa.dtype == np.float32 and xa.shape == (5, 6, 5, 2)
    assert ya.dtype == np.int32 and ya.shape == (5,)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert 0.0 <= xa.min() and xa.max() <= 1.0
  # Values and labels stay paired with their example.
  for x, y in a:
    ids = np.round(x[:, 0, 0, 0] * 255).astype(int)
    np.testing.assert_array_equal(y, labels[ids])
    np.testing.assert_allclose(x, images[ids] / 255.0, rtol=1e-6)


def test_epochs_and_seeds_differ():
  images, labels = _toy()
  kw = dict(batch_size=5)
  e0 = _ids(data.epoch_batches(images, labels, seed=0, epoch=0, **kw))
  e1 = _ids(data.epoch_batches(images, labels, seed=0, epoch=1, **kw))
  s1 = _ids(data.epoch_batches(images, labels, seed=1, epoch=0, **kw))
  assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
  assert not np.array_equal(np.concatenate(e0), np.concatenate(s1))
  # Epoch order only depends on (seed, epoch).
  expected = np.random.default_rng([0, 1]).permutation(23)[:20]
  np.testing.assert_array_equal(np.concatenate(e1), expected)


def test_start_step_resume_equals_slice():
  images, labels = _toy()
  augment = data.Augment(random_crop_padding=2, horizontal_flip=True)
  kw = dict(batch_size=4, seed=7, epoch=5, augment=augment)
  full = list(data.epoch_batches(images, labels, **kw))
  resumed = list(data.epoch_batches(images, labels, start_step=3, **kw))
  assert len(resumed) == len(full) - 3
  for (xf, yf), (xr, yr) in zip(full[3:], resumed):
    np.testing.assert_array_equal(xf, xr)
    np.testing.assert_array_equal(yf, yr)
  assert list(data.epoch_batches(images, labels, start_step=5, **kw)) == []
  with pytest.raises(ValueError):
    next(data.epoch_batches(images, labels, start_step=6, **kw))


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_once_per_epoch(shuffle):
  images, labels = _toy()
  batches = list(
      data.epoch_batches(
          images, labels, batch_size=5, seed=0, epoch=0, shuffle=shuffle,
          drop_remainder=False,
      )
  )
  assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
  ids = np.concatenate(_ids(batches))
  np.testing.assert_array_equal(np.sort(ids), np.arange(23))
  if not shuffle:
    np.testing.assert_array_equal(ids, np.arange(23))


def test_augment_flip_only():
  images, labels = _toy(n=40)
  kw = dict(batch_size=40, seed=0, epoch=0, shuffle=False)
  (x, _), = data.epoch_batches(
      images, labels, augment=data.Augment(horizontal_flip=True), **kw
  )
  ref = images / np.float32(255)
  same = np.all(x == ref, axis=(1, 2, 3))
  flipped = np.all(x == ref[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | flipped)
  assert same.any() and flipped.any()


def test_augment_crop_is_a_shifted_window_and_deterministic():
  images, labels = _toy(n=16)
  p = 2
  augment = data.Augment(random_crop_padding=p, horizontal_flip=True)
  kw = dict(batch_size=8, seed=1, epoch=3, augment=augment)
  a = list(data.epoch_batches(images, labels, **kw))
  b = list(data.epoch_batches(images, labels, **kw))
  for (xa, _), (xb, _) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    assert xa.dtype == np.float32 and 0.0 <= xa.min() and xa.max() <= 1.0
  order = np.random.default_rng([1, 3]).permutation(16)
  x = np.concatenate([x for x, _ in a])
  padded = np.pad(images[order], ((0, 0), (p, p), (p, p), (0, 0))) / 255.0
  h, w = images.shape[1:3]
  for i in range(len(x)):
    windows = [
        win
        for dy in range(2 * p + 1)
        for dx in range(2 * p + 1)
        for win in (padded[i, dy : dy + h, dx : dx + w],
                    padded[i, dy : dy + h, dx : dx + w][:, ::-1])
    ]
    assert any(np.allclose(x[i], win) for win in windows)
  # Some example was actually shifted (i.e. has a padded zero border).
  assert not np.allclose(x, images[order] / 255.0)
  with pytest.raises(ValueError):
    data.Augment(random_crop_padding=-1)


# --------------------------------------------------------------------------
# Prefetching
# --------------------------------------------------------------------------


def test_prefetch_to_device_same_values():
  images, labels = _toy()
  kw = dict(batch_size=4, seed=0, epoch=0)
  plain = list(data.epoch_batches(images, labels, **kw))
  fetched = list(
      data.prefetch_to_device(data.epoch_batches(images, labels, **kw), size=2)
  )
  assert len(fetched) == len(plain)
  for (x, y), (fx, fy) in zip(plain, fetched):
    assert isinstance(fx, jax.Array) and isinstance(fy, jax.Array)
    np.testing.assert_array_equal(np.asarray(fx), x)
    np.testing.assert_array_equal(np.asarray(fy), y)


def test_prefetch_to_device_with_sharding():
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("batch",))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("batch")
  )
  n = len(devices)
  batches = [(np.full((n, 3), i, np.float32), np.arange(n)) for i in range(3)]
  out = list(data.prefetch_to_device(iter(batches), sharding=sharding))
  for (x, y), (fx, fy) in zip(batches, out):
    assert fx.sharding == sharding
    np.testing.assert_array_equal(np.asarray(fx), x)
    np.testing.assert_array_equal(np.asarray(fy), y)


def test_prefetch_to_device_reraises_source_exception():
  def source():
    yield np.zeros(2)
    yield np.ones(2)
    raise RuntimeError("boom in source")

  it = data.prefetch_to_device(source(), size=1)
  np.testing.assert_array_equal(np.asarray(next(it)), np.zeros(2))
  np.testing.assert_array_equal(np.asarray(next(it)), np.ones(2))
  with pytest.raises(RuntimeError, match="boom in source"):
    next(it)


def test_prefetch_to_device_stops_cleanly_on_close():
  def endless():
    i = 0
    while True:
      yield np.full(2, i)
      i += 1

  it = data.prefetch_to_device(endless(), size=2)
  assert int(np.asarray(next(it))[0]) == 0
  assert int(np.asarray(next(it))[0]) == 1
  it.close()
  assert not any(
      t.name == "prefetch_to_device" and t.is_alive()
      for t in threading.enumerate()
  )
  with pytest.raises(ValueError):
    next(data.prefetch_to_device(iter([]), size=0))
