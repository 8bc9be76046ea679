"""Datasets: finding, downloading and reading MNIST, CIFAR-10 and Tiny-ImageNet.

:func:`load_split` returns a whole split as uint8 images and int32 labels. It tries, in order:

1. A TFDS copy that is already prepared (``tfds.data_source``, random access, no TensorFlow
   needed). TFDS is imported only when a prepared copy exists on disk (or the caller has
   imported TFDS, e.g. under ``tfds.testing.mock_data``), and its warnings about dataset
   folders that do not exist are kept quiet.
2. The datasets' standard distribution files in a local directory, searched in
   ``data_dir``, then ``$CRMJAX_DATA_DIR``, then the download cache
   (``$XDG_CACHE_HOME/crmjax``, default ``~/.cache/crmjax``), then the repository's vendored
   ``data/`` folder (which ships MNIST).
3. With ``download=True``: TFDS where it can prepare the dataset (TensorFlow installed, a
   TFDS builder exists, no mirror given); otherwise (or if TFDS fails) the dataset's
   canonical distribution files (CIFAR-10 python tarball, Tiny-ImageNet zip, MNIST IDX
   files), checked against their published checksums and unpacked atomically into
   ``data_dir`` (else ``$CRMJAX_DATA_DIR``, else the cache) by :mod:`crmjax.download`.

Otherwise a :class:`FileNotFoundError` explains every way to provide the data. Batching and
augmentation live in :mod:`crmjax.input_pipeline`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gzip
import importlib.util
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from crmjax import download as download_lib

__all__ = [
  "DATA_DIR_ENV",
  "DOWNLOAD_URL_ENV",
  "KNOWN_DATASETS",
  "DatasetInfo",
  "cache_dir",
  "dataset_info",
  "load_split",
  "read_idx",
]

log = logging.getLogger(__name__)

DATA_DIR_ENV = "CRMJAX_DATA_DIR"
DOWNLOAD_URL_ENV = "CRMJAX_DOWNLOAD_URL"
KNOWN_DATASETS = ("mnist", "cifar10", "tiny_imagenet")
_SPLITS = ("train", "test")
_VENDORED_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


# ---------------------------------------------------------------------------
# Dataset metadata
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset.

  Attributes:
    num_classes: number of labels; labels are in ``[0, num_classes)``.
    image_shape: ``(H, W, C)`` of one image.
  """

  num_classes: int
  image_shape: tuple[int, int, int]


_INFOS = {
  "mnist": DatasetInfo(num_classes=10, image_shape=(28, 28, 1)),
  "cifar10": DatasetInfo(num_classes=10, image_shape=(32, 32, 3)),
  "tiny_imagenet": DatasetInfo(num_classes=200, image_shape=(64, 64, 3)),
}

# Expected local layouts, quoted in the "not found" error message.
_LAYOUTS = {
  "mnist": (
    "<dir>/mnist/train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"
    " t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (the four IDX"
    " files may also sit directly in <dir>)"
  ),
  "cifar10": (
    "<dir>/cifar-10-batches-py/data_batch_1 ... data_batch_5 and"
    " test_batch (the python version of CIFAR-10, cifar-10-python.tar.gz,"
    " extracted)"
  ),
  "tiny_imagenet": (
    "<dir>/tiny-imagenet-200/wnids.txt, train/<wnid>/images/*.JPEG,"
    " val/images/*.JPEG and val/val_annotations.txt (tiny-imagenet-200.zip"
    " extracted)"
  ),
}


def _check_name(name: str) -> None:
  if name not in _INFOS:
    raise ValueError(f"Unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")


def dataset_info(name: str) -> DatasetInfo:
  """Returns the :class:`DatasetInfo` of ``name`` (one of KNOWN_DATASETS)."""
  _check_name(name)
  return _INFOS[name]


# ---------------------------------------------------------------------------
# Canonical distribution files (what ``download=True`` fetches)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Distribution:
  """Where a dataset's standard files come from and where they go.

  Attributes:
    remotes: the published files, with their checksums.
    folder: the sub-folder (of the data directory) that plain, non-archive files go to.
    members: what ends up in the data directory, per remote (the extracted top folder of
      an archive, or ``folder/<filename>``).
  """

  remotes: tuple[download_lib.Remote, ...]
  folder: str
  members: tuple[str, ...]


def _mnist_remote(filename: str, size: int, sha256: str) -> download_lib.Remote:
  return download_lib.Remote(
    filename,
    f"https://storage.googleapis.com/cvdf-datasets/mnist/{filename}",
    size=size,
    sha256=sha256,
    source="TFDS (tensorflow_datasets/url_checksums/mnist.txt)",
  )


# Checksums and sizes as published:
# * MNIST: TFDS 4.9's url_checksums/mnist.txt (its mirror of yann.lecun.com's files);
# * CIFAR-10: sha256 from Keras (keras.datasets.cifar10.load_data's file_hash), md5 from
#   torchvision (torchvision.datasets.CIFAR10.tgz_md5) and the dataset page;
# * Tiny-ImageNet: md5 as used by every loader of the cs231n zip (e.g. avalanche's and
#   the torchvision-style TinyImageNet datasets); no SHA-256 is published.
_DISTRIBUTIONS: dict[str, _Distribution] = {
  "mnist": _Distribution(
    remotes=(
      _mnist_remote(
        "train-images-idx3-ubyte.gz",
        9912422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
      ),
      _mnist_remote(
        "train-labels-idx1-ubyte.gz",
        28881,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
      ),
      _mnist_remote(
        "t10k-images-idx3-ubyte.gz",
        1648877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
      ),
      _mnist_remote(
        "t10k-labels-idx1-ubyte.gz",
        4542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
      ),
    ),
    folder="mnist",
    members=(
      "mnist/train-images-idx3-ubyte.gz",
      "mnist/train-labels-idx1-ubyte.gz",
      "mnist/t10k-images-idx3-ubyte.gz",
      "mnist/t10k-labels-idx1-ubyte.gz",
    ),
  ),
  "cifar10": _Distribution(
    remotes=(
      download_lib.Remote(
        "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        size=170498071,
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        md5="c58f30108f718f92721af3b95e74349a",
        source="Keras (sha256) and torchvision (md5)",
      ),
    ),
    folder="",
    members=("cifar-10-batches-py",),
  ),
  "tiny_imagenet": _Distribution(
    remotes=(
      download_lib.Remote(
        "tiny-imagenet-200.zip",
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        size=248100043,
        md5="90528d7ca1a48142e341f4ef8d21d0de",
        source="the Tiny-ImageNet loaders of avalanche and torchvision-style datasets",
      ),
    ),
    folder="",
    members=("tiny-imagenet-200",),
  ),
}


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_split(
  name: str,
  split: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  download: bool = False,
  download_url: str | None = None,
  progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split into host memory, downloading it first if asked to.

  Args:
    name: one of ``"mnist"``, ``"cifar10"``, ``"tiny_imagenet"``.
    split: ``"train"`` or ``"test"`` (for Tiny-ImageNet, ``"test"`` is the
      labelled validation set).
    data_dir: optional directory searched first, both as a TFDS data dir and
      for the standard distribution files; downloads go there too.
    download: if True and nothing is found locally, download the dataset (see the module
      docstring); it stays on disk for the next call. If False, never touch the network.
    download_url: base URL of a mirror holding the canonical file names (e.g.
      ``https://host/path/`` + ``cifar-10-python.tar.gz``); default
      ``$CRMJAX_DOWNLOAD_URL``, else the canonical sources. The checksums are the same.
    progress: show download / extraction progress bars.

  Returns:
    ``(images, labels)``: ``images`` uint8 of shape (N, H, W, C) and
    ``labels`` int32 of shape (N,).

  Raises:
    ValueError: unknown ``name`` / ``split``, or a corrupt local file.
    FileNotFoundError: the data is not available offline and ``download`` is False, or the
      download failed (no network, interrupted, wrong checksum); the message says why and
      how to provide the data. A failed download leaves nothing behind.
  """
  _check_name(name)
  if split not in _SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {_SPLITS}")

  result = _load_tfds(name, split, data_dir=data_dir, download=False)
  if result is not None:
    return result

  searched = _local_dirs(data_dir)
  result = _load_local(name, split, searched)
  if result is not None:
    return result

  mirror = download_url or os.environ.get(DOWNLOAD_URL_ENV) or None
  if not download:
    raise FileNotFoundError(_missing_message(name, split, searched, data_dir, mirror, reason=None))
  try:
    return _download(name, split, data_dir=data_dir, mirror=mirror, progress=progress)
  except download_lib.DownloadError as e:
    raise FileNotFoundError(
      _missing_message(name, split, searched, data_dir, mirror, reason=str(e))
    ) from e


def cache_dir() -> Path:
  """Where downloads go when neither ``data_dir`` nor ``$CRMJAX_DATA_DIR`` is given.

  ``$XDG_CACHE_HOME/crmjax``, by default ``~/.cache/crmjax``.
  """
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return Path(base).expanduser() / "crmjax"


def _download_dir(data_dir: str | os.PathLike[str] | None) -> Path:
  if data_dir is not None:
    return Path(data_dir).expanduser()
  if os.environ.get(DATA_DIR_ENV):
    return Path(os.environ[DATA_DIR_ENV]).expanduser()
  return cache_dir()


def _local_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
  """Existing local directories, in search order (duplicates dropped)."""
  candidates = []
  if data_dir is not None:
    candidates.append(Path(data_dir).expanduser())
  if os.environ.get(DATA_DIR_ENV):
    candidates.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
  candidates.append(cache_dir())
  candidates.append(_VENDORED_DATA_DIR)
  dirs: list[Path] = []
  for c in candidates:
    if c.is_dir() and all(c.resolve() != d.resolve() for d in dirs):
      dirs.append(c)
  return dirs


def _load_local(name: str, split: str, dirs: list[Path]) -> tuple[np.ndarray, np.ndarray] | None:
  for root in dirs:
    result = _LOCAL_LOADERS[name](root, split)
    if result is not None:
      log.info("Loaded %s/%s from local files under %s", name, split, root)
      return _validated(name, *result, source=root)
  return None


def _download(
  name: str,
  split: str,
  *,
  data_dir: str | os.PathLike[str] | None,
  mirror: str | None,
  progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
  """Downloads ``name`` (TFDS if it can prepare it, else the distribution files)."""
  dist = _DISTRIBUTIONS[name]
  if mirror is None and _tfds_can_prepare(name):
    download_lib.probe(dist.remotes[0])  # No network: fail now, not inside TFDS's retries.
    _say(
      f"{name}: no local copy; preparing it with TFDS (tfds.data_source(...,"
      " download=True)); --config.download=False stays offline",
      progress,
    )
    try:
      result = _load_tfds(name, split, data_dir=data_dir, download=True)
    except Exception as e:  # pylint: disable=broad-except
      log.warning(
        "TFDS could not prepare %s (%s: %s); downloading %s instead",
        name,
        type(e).__name__,
        str(e)[:300],
        dist.remotes[0].filename,
      )
      result = None
    if result is not None:
      return result

  target = _download_dir(data_dir)
  wanted = [(r, m) for r, m in zip(dist.remotes, dist.members) if not (target / m).exists()]
  if not wanted:  # Everything is there, yet unreadable: never overwrite a user's files.
    raise download_lib.DownloadError(
      f"{', '.join(str(target / m) for m in dist.members)} exist but do not hold the"
      f" {split} split of {name} (incomplete?); remove them to download afresh"
    )
  remotes = tuple(r for r, _ in wanted)
  total = sum(r.size or 0 for r in remotes)
  _say(
    f"{name}: no local copy; downloading"
    f" {', '.join(download_lib.resolve_url(r, mirror) for r in remotes)}"
    f" ({total / 2**20:.1f} MiB) into {target}; --config.download=False stays offline",
    progress,
  )
  download_lib.install(
    remotes,
    target,
    members=tuple(m for _, m in wanted),
    folder=dist.folder,
    mirror=mirror,
    progress=progress,
  )
  result = _LOCAL_LOADERS[name](target, split)
  if result is None:
    raise download_lib.DownloadError(
      f"the downloaded files under {target} do not hold the {split} split of {name}"
    )
  return _validated(name, *result, source=target)


def _say(message: str, progress: bool) -> None:
  """A line the user should see even when logging is at WARNING (absl's default in main)."""
  if progress:
    tqdm.tqdm.write(message, file=sys.stderr)
  log.info(message)


def _missing_message(
  name: str,
  split: str,
  searched: list[Path],
  data_dir: str | os.PathLike[str] | None,
  mirror: str | None,
  *,
  reason: str | None,
) -> str:
  where = ", ".join(str(d) for d in searched) or "(no existing directory)"
  dist = _DISTRIBUTIONS[name]
  urls = ", ".join(download_lib.resolve_url(r, mirror) for r in dist.remotes)
  if reason is None:
    status = "Downloading is off (--config.download=False / download=False)."
  else:
    status = f"Downloading it failed: {reason}"
  fixes = [
    "Run with internet access and --config.download=True (the default of the experiment"
    f" configs; load_split(..., download=True)): it downloads {urls}, checks the published"
    f" checksum and unpacks it into {_download_dir(data_dir)} for every later run."
    f" A mirror with the same file names: --config.download_url=<base URL> or"
    f" ${DOWNLOAD_URL_ENV}=<base URL>.",
    "Put the standard distribution files under a directory <dir> and pass it as"
    f" --config.data_dir or set ${DATA_DIR_ENV}=<dir>. Expected layout: {_LAYOUTS[name]}.",
  ]
  tfds_name = _TFDS_NAMES[name]
  if tfds_name is None:
    fixes.append("(TFDS has no builder for this dataset, so it cannot prepare it.)")
  else:
    fixes.append(
      "Prepare it with TFDS on a machine with internet:"
      f" `tfds.data_source({tfds_name!r}, split={_tfds_split(name, split)!r},"
      " data_dir=..., download=True)`, then pass that TFDS data dir as --config.data_dir"
      " (or use the default ~/tensorflow_datasets / $TFDS_DATA_DIR)."
    )
  return (
    f"Dataset {name!r} (split {split!r}) is not available offline:"
    f" TFDS has no prepared copy (data_dir={data_dir and os.fspath(data_dir)!r}) and no"
    f" standard files were found in: {where}. {status}\nTo get it, either:\n"
    + "\n".join(f"  {i}. {fix}" for i, fix in enumerate(fixes, 1))
  )


def _validated(
  name: str, images: np.ndarray, labels: np.ndarray, *, source: Any = None
) -> tuple[np.ndarray, np.ndarray]:
  """Checks dtype, shape and label range against ``dataset_info(name)`` (the one check)."""
  info = _INFOS[name]
  images = np.asarray(images)
  labels = np.asarray(labels).astype(np.int32, copy=False)
  origin = f" (read from {source}; check the files there or --config.data_dir)" if source else ""
  if images.dtype != np.uint8 or images.shape[1:] != info.image_shape:
    raise ValueError(
      f"{name}: expected uint8 images of shape (N, *{info.image_shape}),"
      f" got {images.dtype} {images.shape}{origin}"
    )
  if labels.shape != (images.shape[0],):
    raise ValueError(f"{name}: {images.shape[0]} images but labels of shape {labels.shape}{origin}")
  if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
    raise ValueError(
      f"{name}: labels outside [0, {info.num_classes}): [{labels.min()}, {labels.max()}]{origin}"
    )
  return images, labels


# --- TFDS -------------------------------------------------------------------

# TFDS builder names; None means "no TFDS builder", skip TFDS.
_TFDS_NAMES: dict[str, str | None] = {
  "mnist": "mnist",
  "cifar10": "cifar10",
  "tiny_imagenet": None,
}
_TFDS_CHUNK = 1024


def _tfds_split(name: str, split: str) -> str:
  del name  # Both TFDS builders we use call their splits train/test.
  return split


def _tfds_data_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
  if data_dir is not None:
    return [Path(data_dir).expanduser()]
  return [Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()]


def _tfds_prepared_on_disk(tfds_name: str, data_dir: str | os.PathLike[str] | None) -> bool:
  """Whether some ``<tfds dir>/<name>/[<config>/]<version>/dataset_info.json`` exists."""
  for root in _tfds_data_dirs(data_dir):
    base = root / tfds_name
    if base.is_dir() and (
      any(base.glob("*/dataset_info.json")) or any(base.glob("*/*/dataset_info.json"))
    ):
      return True
  return False


def _tfds_can_prepare(name: str) -> bool:
  """TFDS has a builder and TensorFlow (which its preparation needs) is installed."""
  return (
    _TFDS_NAMES[name] is not None
    and importlib.util.find_spec("tensorflow") is not None
    and importlib.util.find_spec("tensorflow_datasets") is not None
  )


class _DropTfdsChatter(logging.Filter):
  """Drops TFDS's INFO / WARNING records (e.g. "Variant folder ... has no dataset_info.json")."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (
      record.levelno <= logging.WARNING and "tensorflow_datasets" in (record.pathname or "")
    )


@contextlib.contextmanager
def _quiet_tfds():
  logger = logging.getLogger("absl")  # TFDS logs through absl.logging.
  chatter = _DropTfdsChatter()
  logger.addFilter(chatter)
  try:
    yield
  finally:
    logger.removeFilter(chatter)


def _load_tfds(
  name: str,
  split: str,
  *,
  data_dir: str | os.PathLike[str] | None,
  download: bool,
) -> tuple[np.ndarray, np.ndarray] | None:
  """Reads a split through ``tfds.data_source``; None if unavailable.

  Without ``download``, TFDS is asked only when a prepared copy exists on disk or the
  caller has already imported ``tensorflow_datasets`` (e.g. ``tfds.testing.mock_data``):
  otherwise importing it costs time and prints warnings about folders that do not exist.
  """
  tfds_name = _TFDS_NAMES[name]
  if tfds_name is None:
    return None
  if (
    not download
    and sys.modules.get("tensorflow_datasets") is None
    and not _tfds_prepared_on_disk(tfds_name, data_dir)
  ):
    return None
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    log.info("tensorflow_datasets is not installed; skipping TFDS")
    return None
  # Errors TFDS raises when a dataset is not prepared (locally) in a
  # random-access format: unknown builder, empty split list (KeyError),
  # TFRecord-only preparation (NotImplementedError), missing files.
  not_found = (
    tfds.core.DatasetNotFoundError,
    KeyError,
    NotImplementedError,
    FileNotFoundError,
    AssertionError,
  )
  try:
    with contextlib.nullcontext() if download else _quiet_tfds():
      source = tfds.data_source(
        tfds_name,
        split=_tfds_split(name, split),
        data_dir=None if data_dir is None else os.fspath(data_dir),
        download=download,
      )
  except not_found as e:
    if download:
      raise
    log.info("TFDS %s/%s unavailable: %s", tfds_name, split, str(e)[:200])
    return None
  images, labels = _read_data_source(source)
  log.info("Loaded %s/%s from TFDS (%d examples)", name, split, len(labels))
  return _validated(name, images, labels, source="TFDS")


def _read_data_source(source: Any) -> tuple[np.ndarray, np.ndarray]:
  """Materialises a TFDS data source of {'image', 'label'} records."""
  n = len(source)
  if n == 0:
    raise ValueError("TFDS data source is empty")
  first = source[0]
  images = np.empty((n, *np.shape(first["image"])), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _TFDS_CHUNK):
    keys = list(range(start, min(start + _TFDS_CHUNK, n)))
    try:
      records = source.__getitems__(keys)  # Batched read (ArrayRecord).
    except TypeError:
      # `tfds.testing.mock_data` patches the reader with a function that
      # does not accept batched keys; fall back to per-record reads.
      records = [source[k] for k in keys]
    for k, record in zip(keys, records):
      images[k] = record["image"]
      labels[k] = record["label"]
  return images, labels


# --- MNIST (IDX) ------------------------------------------------------------

_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Parses an IDX file (optionally gzip-compressed, by a ``.gz`` suffix).

  Raises:
    ValueError: naming the file, if it is truncated, corrupt or not IDX.
  """
  path = Path(path)
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      raw = path.read_bytes()
  except (EOFError, gzip.BadGzipFile, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"Corrupt or truncated IDX file {path}: {e}") from e

  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number)")
  dtype = _IDX_DTYPES[raw[2]]
  ndim = raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise ValueError(f"Corrupt or truncated IDX header in {path}")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  expected = header + int(np.prod(dims)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(
      f"Corrupt or truncated IDX file {path}: header says dims {dims}"
      f" ({expected} bytes) but the file has {len(raw)} bytes"
    )
  data = np.frombuffer(raw, dtype, offset=header).reshape(dims)
  return data.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(root: Path, stem: str) -> Path | None:
  for folder in (root / "mnist", root):
    for fname in (stem + ".gz", stem):
      if (folder / fname).is_file():
        return folder / fname
  return None


def _load_mnist_local(root: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
  prefix = "train" if split == "train" else "t10k"
  image_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
  label_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
  if image_path is None or label_path is None:
    return None
  images = read_idx(image_path)
  labels = read_idx(label_path)
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(
      f"MNIST files {image_path} / {label_path} have incompatible shapes"
      f" {images.shape} / {labels.shape}"
    )
  return images[..., None].astype(np.uint8), labels


# --- CIFAR-10 (python pickles) ----------------------------------------------


def _load_cifar10_local(root: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
  folder = root / "cifar-10-batches-py"
  names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
  paths = [folder / n for n in names]
  if not all(p.is_file() for p in paths):
    return None
  images, labels = [], []
  for p in paths:
    try:
      with open(p, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
      data = np.asarray(_get(batch, "data"), np.uint8)
      batch_labels = np.asarray(_get(batch, "labels"), np.int32)
      images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
      raise ValueError(f"Corrupt CIFAR-10 batch file {p}: {e!r}") from e
    if len(batch_labels) != len(images[-1]):
      raise ValueError(f"Corrupt CIFAR-10 batch file {p}: length mismatch")
    labels.append(batch_labels)
  return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _get(d: dict[Any, Any], key: str) -> Any:
  return d[key.encode()] if key.encode() in d else d[key]


# --- Tiny-ImageNet (JPEG folders) ---------------------------------------------

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _load_tiny_imagenet_local(root: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
  folder = root / "tiny-imagenet-200"
  wnids_file = folder / "wnids.txt"
  if not wnids_file.is_file():
    return None
  wnids = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
  index = {w: i for i, w in enumerate(wnids)}

  files: list[Path] = []
  labels: list[int] = []
  if split == "train":
    for wnid in wnids:
      image_dir = folder / "train" / wnid / "images"
      if not image_dir.is_dir():
        return None
      for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() in _IMAGE_SUFFIXES:
          files.append(p)
          labels.append(index[wnid])
  else:
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
      return None
    for line in annotations.read_text().splitlines():
      fields = line.split("\t")
      if not line.strip():
        continue
      if len(fields) < 2 or fields[1] not in index:
        raise ValueError(f"Bad line in {annotations}: {line!r}")
      files.append(folder / "val" / "images" / fields[0])
      labels.append(index[fields[1]])

  images = np.empty((len(files), 64, 64, 3), np.uint8)
  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    for i, image in enumerate(pool.map(_read_rgb64, files)):
      images[i] = image
  return images, np.asarray(labels, np.int32)


def _read_rgb64(path: Path) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as im:
      image = np.asarray(im.convert("RGB"))
  except OSError as e:  # Includes PIL.UnidentifiedImageError, missing files.
    raise ValueError(f"Cannot read Tiny-ImageNet image {path}: {e}") from e
  if image.shape != (64, 64, 3):
    raise ValueError(f"{path}: expected a 64x64 image, got {image.shape}")
  return image


_LOCAL_LOADERS = {
  "mnist": _load_mnist_local,
  "cifar10": _load_cifar10_local,
  "tiny_imagenet": _load_tiny_imagenet_local,
}
