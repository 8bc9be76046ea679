"""Reading the datasets' standard distribution files from a local directory.

``LOADERS[name](root, split)`` reads a split of MNIST (IDX files, :func:`read_idx`),
CIFAR-10 (python pickles) or Tiny-ImageNet (JPEG folders) from under ``root``, or returns
None when the files are not there; a file that is there but unreadable raises ``ValueError``
naming it. Finding the directories, downloading and checking what was read:
:mod:`crmjax.data`.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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


def load_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
  """The MNIST IDX files under ``root`` (or ``root/mnist``), gzipped or not."""
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


def load_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
  """The CIFAR-10 python batches under ``root/cifar-10-batches-py``."""
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


def load_tiny_imagenet(root: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
  """The Tiny-ImageNet JPEG folders under ``root/tiny-imagenet-200`` (``test``: the labelled
  validation set)."""
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


#: Dataset name -> ``(root, split) -> (images, labels)``, or None when ``root`` lacks the files.
LOADERS: dict[str, Callable[[Path, str], tuple[np.ndarray, np.ndarray] | None]] = {
  "mnist": load_mnist,
  "cifar10": load_cifar10,
  "tiny_imagenet": load_tiny_imagenet,
}
