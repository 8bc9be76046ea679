"""Reading a dataset through TensorFlow Datasets (``tfds.data_source``: random access, no
TensorFlow needed to read a prepared copy; preparing one needs it).

TFDS is imported only when a prepared copy exists on disk, the caller has imported it (e.g.
under ``tfds.testing.mock_data``) or a download is asked for; its warnings about dataset
folders that do not exist are kept quiet. :mod:`crmjax.data` decides when to ask.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# TFDS builder names; None means "no TFDS builder", skip TFDS.
TFDS_NAMES: dict[str, str | None] = {
  "mnist": "mnist",
  "cifar10": "cifar10",
  "tiny_imagenet": None,
}
_TFDS_CHUNK = 1024


def tfds_split(name: str, split: str) -> str:
  """The TFDS split name of ``split``."""
  del name  # Both TFDS builders we use call their splits train/test.
  return split


def _data_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
  if data_dir is not None:
    return [Path(data_dir).expanduser()]
  return [Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()]


def _prepared_on_disk(tfds_name: str, data_dir: str | os.PathLike[str] | None) -> bool:
  """Whether some ``<tfds dir>/<name>/[<config>/]<version>/dataset_info.json`` exists."""
  for root in _data_dirs(data_dir):
    base = root / tfds_name
    if base.is_dir() and (
      any(base.glob("*/dataset_info.json")) or any(base.glob("*/*/dataset_info.json"))
    ):
      return True
  return False


def can_prepare(name: str) -> bool:
  """TFDS has a builder and TensorFlow (which its preparation needs) is installed."""
  return (
    TFDS_NAMES[name] is not None
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
def _quiet():
  logger = logging.getLogger("absl")  # TFDS logs through absl.logging.
  chatter = _DropTfdsChatter()
  logger.addFilter(chatter)
  try:
    yield
  finally:
    logger.removeFilter(chatter)


def load(
  name: str,
  split: str,
  *,
  data_dir: str | os.PathLike[str] | None,
  download: bool,
) -> tuple[np.ndarray, np.ndarray] | None:
  """Reads a split through ``tfds.data_source`` (unchecked: ``crmjax.data`` validates it);
  None if unavailable.

  Without ``download``, TFDS is asked only when a prepared copy exists on disk or the
  caller has already imported ``tensorflow_datasets`` (e.g. ``tfds.testing.mock_data``):
  otherwise importing it costs time and prints warnings about folders that do not exist.
  """
  tfds_name = TFDS_NAMES[name]
  if tfds_name is None:
    return None
  if (
    not download
    and sys.modules.get("tensorflow_datasets") is None
    and not _prepared_on_disk(tfds_name, data_dir)
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
    with contextlib.nullcontext() if download else _quiet():
      source = tfds.data_source(
        tfds_name,
        split=tfds_split(name, split),
        data_dir=None if data_dir is None else os.fspath(data_dir),
        download=download,
      )
  except not_found as e:
    if download:
      raise
    log.info("TFDS %s/%s unavailable: %s", tfds_name, split, str(e)[:200])
    return None
  images, labels = read_data_source(source)
  log.info("Loaded %s/%s from TFDS (%d examples)", name, split, len(labels))
  return images, labels


def read_data_source(source: Any) -> tuple[np.ndarray, np.ndarray]:
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
