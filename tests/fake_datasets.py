"""Small datasets in the standard distribution layouts, written by the tests.

Each writer returns the arrays it wrote, so a test can compare what ``crmjax.data`` reads
with the truth; the archive builders pack the same layouts as the published archives
(``cifar-10-python.tar.gz``, ``tiny-imagenet-200.zip``, the gzipped MNIST IDX files).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_batches(
  rng: np.random.Generator, per_batch: int = 3
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{batch file name: (HWC uint8 images, labels)} for the six CIFAR-10 batch files."""
  return {
    name: (
      rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8),
      rng.integers(0, 10, per_batch),
    )
    for name in CIFAR_BATCHES
  }


def _cifar_pickle(name: str, hwc: np.ndarray, labels: np.ndarray) -> bytes:
  # Real format: rows of 3072 = 1024 R, then 1024 G, then 1024 B values.
  rows = hwc.transpose(0, 3, 1, 2).reshape(len(hwc), 3072)
  return pickle.dumps(
    {
      b"batch_label": name.encode(),
      b"labels": labels.tolist(),
      b"data": rows,
      b"filenames": [b"x.png"] * len(hwc),
    }
  )


def write_cifar(
  root: Path, rng: np.random.Generator, per_batch: int = 3
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Writes ``root/cifar-10-batches-py``; returns what ``cifar_batches`` drew."""
  batches = cifar_batches(rng, per_batch)
  folder = Path(root) / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  for name, (hwc, labels) in batches.items():
    (folder / name).write_bytes(_cifar_pickle(name, hwc, labels))
  return batches


def cifar_tarball(batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
  """``cifar-10-python.tar.gz`` bytes holding ``cifar-10-batches-py/<batches>``."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as t:
    _add(t, "cifar-10-batches-py/", None)
    for name, (hwc, labels) in batches.items():
      _add(t, f"cifar-10-batches-py/{name}", _cifar_pickle(name, hwc, labels))
    _add(t, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": []}))
  return buf.getvalue()


def _add(t: tarfile.TarFile, name: str, payload: bytes | None) -> None:
  info = tarfile.TarInfo(name.rstrip("/"))
  if payload is None:
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    t.addfile(info)
  else:
    info.size, info.mode = len(payload), 0o644
    t.addfile(info, io.BytesIO(payload))


def tarball(entries: dict[str, bytes]) -> bytes:
  """A ``.tar.gz`` of regular files ``{name: payload}`` (names taken as given)."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as t:
    for name, payload in entries.items():
      _add(t, name, payload)
  return buf.getvalue()


TINY_WNIDS = ["n03", "n01", "n02"]  # Class index = position in sorted order.
TINY_COLORS = {"n01": (250, 0, 0), "n02": (0, 250, 0), "n03": (0, 0, 250)}
# (file, wnid) of the validation images; the last one is grayscale (must come back as RGB).
TINY_VAL = [
  ("val_0.JPEG", "n02"),
  ("val_1.JPEG", "n03"),
  ("val_2.JPEG", "n01"),
  ("val_3.JPEG", "n01"),
]


def _jpeg(color, mode: str = "RGB") -> bytes:
  buf = io.BytesIO()
  Image.new(mode, (64, 64), color).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def tiny_imagenet_files(per_class: int = 2) -> dict[str, bytes]:
  """``{path: bytes}`` of a ``tiny-imagenet-200`` folder as in the published zip.

  Train: ``per_class`` uniform images per class of colour ``TINY_COLORS[wnid]``; val: the
  ``TINY_VAL`` images (the last one a gray 128 image); labels in sorted-wnid order.
  """
  root = "tiny-imagenet-200"
  files = {
    f"{root}/wnids.txt": ("\n".join(TINY_WNIDS) + "\n").encode(),
    f"{root}/words.txt": b"".join(f"{w}\tthing {w}\n".encode() for w in TINY_WNIDS),
  }
  for wnid in TINY_WNIDS:
    for k in range(per_class):
      files[f"{root}/train/{wnid}/images/{wnid}_{k}.JPEG"] = _jpeg(TINY_COLORS[wnid])
    files[f"{root}/train/{wnid}/{wnid}_boxes.txt"] = b""
  for fname, wnid in TINY_VAL[:-1]:
    files[f"{root}/val/images/{fname}"] = _jpeg(TINY_COLORS[wnid])
  files[f"{root}/val/images/{TINY_VAL[-1][0]}"] = _jpeg(128, mode="L")
  files[f"{root}/val/val_annotations.txt"] = "".join(
    f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in TINY_VAL
  ).encode()
  files[f"{root}/test/images/test_0.JPEG"] = _jpeg((7, 7, 7))
  return files


def write_tiny_imagenet(root: Path, per_class: int = 2) -> None:
  for name, payload in tiny_imagenet_files(per_class).items():
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def tiny_imagenet_zip(per_class: int = 2) -> bytes:
  """``tiny-imagenet-200.zip`` bytes (directory entries included, as in the real zip)."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    files = tiny_imagenet_files(per_class)
    dirs = sorted(
      {str(Path(n).parent) + "/" for n in files} | {p + "/" for n in files for p in _parents(n)}
    )
    for d in dirs:
      z.writestr(d, b"")
    for name, payload in files.items():
      z.writestr(name, payload)
  return buf.getvalue()


def _parents(name: str) -> list[str]:
  parts = name.split("/")[:-1]
  return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def idx_gz(array: np.ndarray) -> bytes:
  """A gzipped uint8 IDX file of ``array``."""
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
    f">{array.ndim}I", *array.shape
  )
  return gzip.compress(header + np.asarray(array, np.uint8).tobytes())


def mnist_files(
  rng: np.random.Generator, n_train: int = 12, n_test: int = 6
) -> tuple[dict[str, bytes], dict[str, tuple[np.ndarray, np.ndarray]]]:
  """({IDX file name: gz bytes}, {split: (images (N, 28, 28, 1), labels)})."""
  files, arrays = {}, {}
  for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    files[f"{prefix}-images-idx3-ubyte.gz"] = idx_gz(images)
    files[f"{prefix}-labels-idx1-ubyte.gz"] = idx_gz(labels)
    arrays[split] = (images[..., None], labels.astype(np.int32))
  return files, arrays
