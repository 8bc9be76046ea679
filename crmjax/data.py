"""Datasets and host-side input pipeline.

Loading (:func:`load_split`) tries, in order:

1. TFDS random-access data sources (``tfds.data_source``, no TensorFlow
   needed) that are already prepared locally -- never downloads.
2. The datasets' standard distribution files in a local directory, searched in
   ``data_dir``, then ``$CRMJAX_DATA_DIR``, then the repository's vendored
   ``data/`` folder (which ships MNIST).
3. ``tfds.data_source(..., download=True)`` when ``download=True``.

Otherwise a :class:`FileNotFoundError` explains both ways to provide the data.

Batching (:func:`epoch_batches`) is pure numpy, deterministic in
``(seed, epoch)`` and resumable at any step of an epoch;
:func:`prefetch_to_device` overlaps it with device compute.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import logging
import os
import pickle
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = [
    "DATA_DIR_ENV",
    "KNOWN_DATASETS",
    "Augment",
    "DatasetInfo",
    "augment_batch",
    "dataset_info",
    "epoch_batches",
    "load_split",
    "prefetch_to_device",
    "read_idx",
    "steps_per_epoch",
]

log = logging.getLogger(__name__)

DATA_DIR_ENV = "CRMJAX_DATA_DIR"
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
    raise ValueError(
        f"Unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}"
    )


def dataset_info(name: str) -> DatasetInfo:
  """Returns the :class:`DatasetInfo` of ``name`` (one of KNOWN_DATASETS)."""
  _check_name(name)
  return _INFOS[name]


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_split(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split into host memory.

  Args:
    name: one of ``"mnist"``, ``"cifar10"``, ``"tiny_imagenet"``.
    split: ``"train"`` or ``"test"`` (for Tiny-ImageNet, ``"test"`` is the
      labelled validation set).
    data_dir: optional directory searched first, both as a TFDS data dir and
      for the standard distribution files.
    download: if True and nothing is found locally, download and prepare the
      dataset with TFDS (needs internet).

  Returns:
    ``(images, labels)``: ``images`` uint8 of shape (N, H, W, C) and
    ``labels`` int32 of shape (N,).

  Raises:
    ValueError: unknown ``name`` / ``split``, or a corrupt local file.
    FileNotFoundError: the data is not available offline and ``download`` is
      False (the message says how to provide it).
  """
  _check_name(name)
  if split not in _SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {_SPLITS}")

  result = _load_tfds(name, split, data_dir=data_dir, download=False)
  if result is not None:
    return result

  searched = _local_dirs(data_dir)
  for root in searched:
    result = _LOCAL_LOADERS[name](root, split)
    if result is not None:
      log.info("Loaded %s/%s from local files under %s", name, split, root)
      return _validated(name, *result)

  if download:
    result = _load_tfds(name, split, data_dir=data_dir, download=True)
    if result is not None:
      return result

  raise FileNotFoundError(_missing_message(name, split, searched, data_dir))


def _local_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
  """Existing local directories, in search order (duplicates dropped)."""
  candidates = []
  if data_dir is not None:
    candidates.append(Path(data_dir).expanduser())
  if os.environ.get(DATA_DIR_ENV):
    candidates.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
  candidates.append(_VENDORED_DATA_DIR)
  dirs: list[Path] = []
  for c in candidates:
    if c.is_dir() and all(c.resolve() != d.resolve() for d in dirs):
      dirs.append(c)
  return dirs


def _missing_message(
    name: str,
    split: str,
    searched: list[Path],
    data_dir: str | os.PathLike[str] | None,
) -> str:
  where = ", ".join(str(d) for d in searched) or "(no existing directory)"
  tfds_name = _TFDS_NAMES[name]
  if tfds_name is None:
    fix1 = (
        "  1. TFDS has no builder for this dataset, so it cannot prepare it;"
        " use option 2."
    )
  else:
    fix1 = (
        "  1. Prepare it with TFDS on a machine with internet:"
        f" `tfds.data_source({tfds_name!r}, split={_tfds_split(name, split)!r},"
        " data_dir=..., download=True)` (or call load_split(...,"
        " download=True)), then pass that TFDS data dir as --config.data_dir"
        " (or use the default ~/tensorflow_datasets / $TFDS_DATA_DIR)."
    )
  return (
      f"Dataset {name!r} (split {split!r}) is not available offline:"
      f" TFDS has no prepared copy (data_dir={data_dir!r}) and no standard"
      f" files were found in: {where}.\nEither:\n{fix1}\n"
      "  2. Put the standard distribution files under a directory <dir> and"
      f" pass it as --config.data_dir or set ${DATA_DIR_ENV}=<dir>. Expected"
      f" layout: {_LAYOUTS[name]}."
  )


def _validated(
    name: str, images: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  info = _INFOS[name]
  images = np.asarray(images)
  labels = np.asarray(labels).astype(np.int32, copy=False)
  if images.dtype != np.uint8 or images.shape[1:] != info.image_shape:
    raise ValueError(
        f"{name}: expected uint8 images of shape (N, *{info.image_shape}),"
        f" got {images.dtype} {images.shape}"
    )
  if labels.shape != (images.shape[0],):
    raise ValueError(
        f"{name}: {images.shape[0]} images but labels of shape {labels.shape}"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
    raise ValueError(
        f"{name}: labels outside [0, {info.num_classes}):"
        f" [{labels.min()}, {labels.max()}]"
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


def _load_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None,
    download: bool,
) -> tuple[np.ndarray, np.ndarray] | None:
  """Reads a split through ``tfds.data_source``; None if unavailable."""
  tfds_name = _TFDS_NAMES[name]
  if tfds_name is None:
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
    source = tfds.data_source(
        tfds_name,
        split=_tfds_split(name, split),
        data_dir=None if data_dir is None else os.fspath(data_dir),
        download=download,
    )
  except not_found as e:
    log.info("TFDS %s/%s unavailable: %s", tfds_name, split, str(e)[:200])
    return None
  images, labels = _read_data_source(source)
  log.info("Loaded %s/%s from TFDS (%d examples)", name, split, len(labels))
  return _validated(name, images, labels)


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


def _load_mnist_local(
    root: Path, split: str
) -> tuple[np.ndarray, np.ndarray] | None:
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


def _load_cifar10_local(
    root: Path, split: str
) -> tuple[np.ndarray, np.ndarray] | None:
  folder = root / "cifar-10-batches-py"
  names = (
      [f"data_batch_{i}" for i in range(1, 6)]
      if split == "train"
      else ["test_batch"]
  )
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


def _load_tiny_imagenet_local(
    root: Path, split: str
) -> tuple[np.ndarray, np.ndarray] | None:
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


# ---------------------------------------------------------------------------
# Batching and augmentation
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training-time augmentation.

  Attributes:
    random_crop_padding: zero-pad each side by this many pixels, then take a
      random crop of the original size (= a random translation by up to this
      many pixels). 0 disables it.
    horizontal_flip: flip each image left-right with probability 1/2.
  """

  random_crop_padding: int = 0
  horizontal_flip: bool = False

  def __post_init__(self):
    if self.random_crop_padding < 0:
      raise ValueError(
          f"random_crop_padding must be >= 0, got {self.random_crop_padding}"
      )


def augment_batch(
    images: np.ndarray, *, augment: Augment, rng: np.random.Generator
) -> np.ndarray:
  """Applies ``augment`` to a batch, independently per example.

  Args:
    images: (B, H, W, C) array of any dtype (padding uses zeros).
    augment: what to apply.
    rng: the randomness source (consumed).

  Returns:
    A new (B, H, W, C) array of the same dtype.
  """
  b, h, w, _ = images.shape
  p = augment.random_crop_padding
  if p == 0 and not augment.horizontal_flip:
    return images.copy()
  if p:
    images = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
  dy = rng.integers(0, 2 * p + 1, size=b)
  dx = rng.integers(0, 2 * p + 1, size=b)
  rows = dy[:, None] + np.arange(h)  # (B, H)
  cols = dx[:, None] + np.arange(w)  # (B, W)
  if augment.horizontal_flip:
    flip = rng.random(b) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return images[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def steps_per_epoch(
    num_examples: int, batch_size: int, drop_remainder: bool = True
) -> int:
  """Number of batches :func:`epoch_batches` yields per epoch."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


# Distinguishes the augmentation random stream from the permutation one.
_AUGMENT_STREAM = 0xA06


def epoch_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    augment: Augment | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields the batches of one epoch.

  The order is ``np.random.default_rng([seed, epoch]).permutation(N)``: it
  depends only on ``(seed, epoch)``, so training can resume at any epoch and,
  via ``start_step``, at any step within it. Augmentation of step ``s`` uses
  ``default_rng([seed, epoch, s, const])``, so it is resumable too.

  Args:
    images: uint8 (N, H, W, C), values 0..255.
    labels: (N,) integer labels.
    batch_size: examples per batch.
    seed: non-negative integer seed.
    epoch: non-negative epoch index.
    start_step: first step to yield (the earlier ones are skipped without
      being computed).
    shuffle: permute the examples (use False for evaluation).
    drop_remainder: drop the last partial batch; if False it is yielded,
      smaller (use False for evaluation).
    augment: optional augmentation (training only).

  Yields:
    ``(x, y)``: float32 (B, H, W, C) in [0, 1] and int32 (B,).
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"{n} images but {len(labels)} labels")
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
  steps = steps_per_epoch(n, batch_size, drop_remainder)
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step must be in [0, {steps}], got {start_step}")
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(n)
  else:
    order = np.arange(n)
  for step in range(start_step, steps):
    idx = order[step * batch_size : (step + 1) * batch_size]
    x = images[idx]
    if augment is not None:
      rng = np.random.default_rng([seed, epoch, step, _AUGMENT_STREAM])
      x = augment_batch(x, augment=augment, rng=rng)
    x = x.astype(np.float32) / np.float32(255)
    yield x, np.asarray(labels[idx], np.int32)


# ---------------------------------------------------------------------------
# Prefetching
# ---------------------------------------------------------------------------


class _End:
  pass


@dataclasses.dataclass(frozen=True)
class _Raised:
  error: BaseException


def prefetch_to_device(
    iterator: Iterable[Any],
    *,
    size: int = 2,
    sharding: jax.sharding.Sharding | None = None,
) -> Iterator[Any]:
  """Moves batches to device in a background thread, ``size`` ahead.

  Each item (any pytree of arrays) is placed with
  ``jax.device_put(item, sharding)``; with ``sharding=None`` on the default
  device. An exception raised by ``iterator`` is re-raised by the consumer.
  Closing (or dropping) the returned generator stops the thread.

  Args:
    iterator: host batches.
    size: maximum number of batches buffered ahead (>= 1).
    sharding: where to place each batch, e.g. a ``NamedSharding`` that splits
      the batch axis across devices.

  Yields:
    The items of ``iterator`` as ``jax.Array`` pytrees, in order.
  """
  if size < 1:
    raise ValueError(f"size must be >= 1, got {size}")
  buffer: queue.Queue[Any] = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def produce() -> None:
    try:
      for item in iterator:
        if not put(jax.device_put(item, sharding)):
          return
    except BaseException as e:  # pylint: disable=broad-except
      put(_Raised(e))
      return
    put(_End())

  thread = threading.Thread(target=produce, name="prefetch_to_device",
                            daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if isinstance(item, _End):
        return
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()
