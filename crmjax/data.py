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

Otherwise a :class:`FileNotFoundError` explains every way to provide the data. This module
owns the order of the sources, the directories searched, downloading and the one check of
what was read (:func:`_validated`); :mod:`crmjax.tfds_source` reads through TFDS and
:mod:`crmjax.dataset_files` reads the distribution files. Batching and augmentation live in
:mod:`crmjax.input_pipeline`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from crmjax import dataset_files, tfds_source
from crmjax import download as download_lib

__all__ = [
  "DATA_DIR_ENV",
  "DOWNLOAD_URL_ENV",
  "KNOWN_DATASETS",
  "DatasetInfo",
  "cache_dir",
  "dataset_info",
  "load_split",
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
    result = dataset_files.LOADERS[name](root, split)
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
  if mirror is None and tfds_source.can_prepare(name):
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
  result = dataset_files.LOADERS[name](target, split)
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
  tfds_name = tfds_source.TFDS_NAMES[name]
  if tfds_name is None:
    fixes.append("(TFDS has no builder for this dataset, so it cannot prepare it.)")
  else:
    fixes.append(
      "Prepare it with TFDS on a machine with internet:"
      f" `tfds.data_source({tfds_name!r}, split={tfds_source.tfds_split(name, split)!r},"
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


def _load_tfds(
  name: str, split: str, *, data_dir: str | os.PathLike[str] | None, download: bool
) -> tuple[np.ndarray, np.ndarray] | None:
  """The split read through TFDS (``tfds_source.load``), validated; None if unavailable."""
  result = tfds_source.load(name, split, data_dir=data_dir, download=download)
  return None if result is None else _validated(name, *result, source="TFDS")
