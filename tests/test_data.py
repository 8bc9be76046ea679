"""Tests for crmjax.data: finding and reading datasets (TFDS, local files); see also
test_download.py (downloads) and test_input_pipeline.py (batching)."""

import gzip
import hashlib
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from crmjax import data, dataset_files, tfds_source
from tests import fake_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Published class counts and first labels of MNIST (LeCun et al.; e.g. the first training
# digits are the well-known 5 0 4 1 9 2 1 3 1 4).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_FIRST_LABELS = {
  "train": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4],
  "test": [7, 2, 1, 0, 4, 1, 4, 9, 5, 9],
}
# The usual normalisation constants of MNIST's training images (mean 0.1307, std 0.3081).
MNIST_TRAIN_MEAN_STD = (0.1307, 0.3081)
# SHA-256 of the decoded arrays (images as (N, 28, 28, 1) uint8 in C order, labels as
# uint8), pinned from the vendored files, whose labels, counts and statistics match the
# published values above.
MNIST_SHA256 = {
  "train": (
    "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
  ),
  "test": (
    "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
  ),
}


@pytest.fixture(autouse=True)
def _isolated_dirs(monkeypatch, tmp_path):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.delenv(data.DOWNLOAD_URL_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # An empty download cache.


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------


def test_dataset_info():
  assert data.dataset_info("mnist") == data.DatasetInfo(10, (28, 28, 1))
  assert data.dataset_info("cifar10") == data.DatasetInfo(10, (32, 32, 3))
  assert data.dataset_info("tiny_imagenet") == data.DatasetInfo(200, (64, 64, 3))
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


def _check_mnist(split, images, labels):
  """Asserts the published facts of an MNIST split (and the pinned array checksums)."""
  counts = MNIST_TRAIN_COUNTS if split == "train" else MNIST_TEST_COUNTS
  n = sum(counts)
  assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (n,) and labels.dtype == np.int32
  np.testing.assert_array_equal(
    labels[:10], MNIST_FIRST_LABELS[split], err_msg="first labels differ from the published ones"
  )
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), counts)
  assert images.max() == 255 and images.min() == 0
  _check_orientation(images, labels)
  if split == "train":
    np.testing.assert_allclose(
      [images.mean() / 255, images.std() / 255], MNIST_TRAIN_MEAN_STD, atol=1e-4
    )
  image_sha = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
  label_sha = hashlib.sha256(labels.astype(np.uint8).tobytes()).hexdigest()
  assert (image_sha, label_sha) == MNIST_SHA256[split], "decoded arrays changed"


def _check_orientation(images, labels):
  """The mean "1" is an upright stroke leaning right: catches transposes and flips."""
  ones = images[labels == 1, :, :, 0].astype(np.float64).mean(axis=0)
  r = np.arange(28)

  def spread(profile):
    mean = (profile * r).sum() / profile.sum()
    return (profile * (r - mean) ** 2).sum() / profile.sum()

  vertical, horizontal = spread(ones.sum(axis=1)), spread(ones.sum(axis=0))
  assert vertical > 3 * horizontal, f"the mean 1 is not upright ({vertical}, {horizontal})"

  def centre_column(rows):
    return (rows.sum(axis=0) * r).sum() / rows.sum()

  top, bottom = centre_column(ones[4:10]), centre_column(ones[18:24])
  assert top > bottom + 2, f"the mean 1 does not lean right ({top}, {bottom})"


@pytest.mark.parametrize("split", ["train", "test"])
def test_vendored_mnist(split):
  images, labels = data.load_split("mnist", split)
  _check_mnist(split, images, labels)


def _mnist_file(name):
  return data._VENDORED_DATA_DIR / "mnist" / name


def test_mnist_files_directly_in_dir(tmp_path, monkeypatch):
  for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    (tmp_path / name).write_bytes(_mnist_file(name).read_bytes())
  monkeypatch.setattr(data, "_VENDORED_DATA_DIR", tmp_path / "nothing")
  images, labels = data.load_split("mnist", "test", data_dir=tmp_path)
  _check_mnist("test", images, labels)


def test_mnist_idx_files_written_by_hand(tmp_path, monkeypatch):
  # Values and order of a small, known IDX pair come back exactly (not only shapes).
  files, arrays = fake_datasets.mnist_files(np.random.default_rng(0))
  (tmp_path / "mnist").mkdir()
  for name, payload in files.items():
    (tmp_path / "mnist" / name).write_bytes(payload)
  monkeypatch.setattr(data, "_VENDORED_DATA_DIR", tmp_path / "nothing")
  for split in ("train", "test"):
    images, labels = data.load_split("mnist", split, data_dir=tmp_path)
    np.testing.assert_array_equal(images, arrays[split][0])
    np.testing.assert_array_equal(labels, arrays[split][1])


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
  path.write_bytes(fake_datasets.idx_gz(good))
  np.testing.assert_array_equal(dataset_files.read_idx(path), good)

  short = tmp_path / "short-idx2-ubyte.gz"  # Valid gzip, too few bytes.
  short.write_bytes(gzip.compress(header + good.tobytes()[:-1]))
  with pytest.raises(ValueError, match="truncated.*short-idx2-ubyte.gz"):
    dataset_files.read_idx(short)

  magic = tmp_path / "magic-idx2-ubyte"
  magic.write_bytes(b"\x12\x34\x08\x02" + header[4:] + good.tobytes())
  with pytest.raises(ValueError, match="magic-idx2-ubyte.*magic"):
    dataset_files.read_idx(magic)


def test_wrong_shapes_or_labels_are_refused_naming_the_files(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_VENDORED_DATA_DIR", tmp_path / "nothing")
  rng = np.random.default_rng(0)
  for name, images, labels, match in [
    ("shape", rng.integers(0, 256, (4, 32, 32)), np.zeros(4), r"shape.*shape"),
    ("labels", rng.integers(0, 256, (4, 28, 28)), np.full(4, 12), r"\[0, 10\)"),
  ]:
    folder = tmp_path / name / "mnist"
    folder.mkdir(parents=True)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(fake_datasets.idx_gz(images))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(fake_datasets.idx_gz(labels))
    with pytest.raises(ValueError, match=match) as info:
      data.load_split("mnist", "test", data_dir=tmp_path / name)
    assert str(tmp_path / name) in str(info.value)


# --------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------


def test_cifar10_local_files_chw_to_hwc(tmp_path):
  written = fake_datasets.write_cifar(tmp_path, np.random.default_rng(0))
  images, labels = data.load_split("cifar10", "train", data_dir=tmp_path)
  expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
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
  written = fake_datasets.write_cifar(tmp_path, np.random.default_rng(1), per_batch=2)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  images, _ = data.load_split("cifar10", "test")
  np.testing.assert_array_equal(images, written["test_batch"][0])


def test_cifar10_from_download_cache(tmp_path):
  written = fake_datasets.write_cifar(data.cache_dir(), np.random.default_rng(2))
  assert data.cache_dir() == tmp_path / "cache" / "crmjax"
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
    images, labels = tfds_source.read_data_source(source)
    for i in range(4):
      np.testing.assert_array_equal(images[i], source[i]["image"])
      assert labels[i] == source[i]["label"]


# --------------------------------------------------------------------------
# TFDS: imported only when useful, quiet, optional
# --------------------------------------------------------------------------


def test_tfds_is_not_imported_and_prints_nothing_without_a_prepared_copy(tmp_path):
  # A fresh process, as a command starts: no ~/tensorflow_datasets, no TFDS import, no
  # "Variant folder ... has no dataset_info.json" warnings.
  code = (
    "import sys; from crmjax import data; x, _ = data.load_split('mnist', 'test');"
    " print(len(x), 'tensorflow_datasets' in sys.modules)"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("TFDS_DATA_DIR", data.DATA_DIR_ENV)}
  out = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**env, "HOME": str(tmp_path)},
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["10000", "False"]
  assert "Variant folder" not in out.stderr and "WARNING" not in out.stderr, out.stderr


def test_tfds_probe_of_an_unprepared_folder_is_quiet(tmp_path, caplog):
  tfds = pytest.importorskip("tensorflow_datasets")
  del tfds
  # A version folder without dataset_info.json makes TFDS warn "Variant folder ...".
  (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
  with caplog.at_level(logging.INFO):
    images, _ = data.load_split("mnist", "test", data_dir=tmp_path)  # The vendored copy.
  assert len(images) == 10000
  assert not [r for r in caplog.records if "tensorflow_datasets" in r.pathname], [
    r.getMessage() for r in caplog.records
  ]


def test_runs_without_tensorflow_datasets_installed(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
  (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)  # Looks prepared: TFDS is tried.
  (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
  written = fake_datasets.write_cifar(tmp_path, np.random.default_rng(3))
  images, _ = data.load_split("cifar10", "test", data_dir=tmp_path)
  np.testing.assert_array_equal(images, written["test_batch"][0])
  assert not tfds_source.can_prepare("cifar10")


# --------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------


def test_tiny_imagenet_folder(tmp_path):
  fake_datasets.write_tiny_imagenet(tmp_path)
  colors = fake_datasets.TINY_COLORS
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
  np.testing.assert_allclose(images[3], 128, atol=2)  # Grayscale comes back as RGB.


# --------------------------------------------------------------------------
# Missing data
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "tiny_imagenet", "mnist"])
def test_missing_data_offline_names_every_fix(name, tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_VENDORED_DATA_DIR", tmp_path / "no-vendored")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as info:
    data.load_split(name, "train", data_dir=empty)
  message = str(info.value)
  assert "Downloading is off" in message and "--config.download=True" in message
  assert data._DISTRIBUTIONS[name].remotes[0].url in message
  assert "TFDS" in message
  assert "--config.data_dir" in message and "$CRMJAX_DATA_DIR" in message
  if name != "tiny_imagenet":
    assert "tfds.data_source" in message
  layout = {
    "mnist": "train-images-idx3-ubyte.gz",
    "cifar10": "cifar-10-batches-py/data_batch_1",
    "tiny_imagenet": "tiny-imagenet-200/wnids.txt",
  }[name]
  assert layout in message
  assert list(empty.iterdir()) == []  # Nothing was written there.


def test_missing_cifar10_ignores_vendored_mnist(tmp_path):
  # The vendored data/ folder only holds MNIST; cifar10 must still fail.
  with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
    data.load_split("cifar10", "test", data_dir=tmp_path)


def test_published_checksums_are_recorded():
  # What download=True verifies: every canonical file has a published checksum and size.
  for name in data.KNOWN_DATASETS:
    for remote in data._DISTRIBUTIONS[name].remotes:
      assert remote.sha256 or remote.md5, remote
      assert remote.size and remote.source and remote.url.endswith("/" + remote.filename)
  cifar = data._DISTRIBUTIONS["cifar10"].remotes[0]
  assert cifar.sha256 == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
  assert cifar.md5 == "c58f30108f718f92721af3b95e74349a"
