"""What a training run writes for people to read: ``metrics.jsonl`` and TensorBoard events.

``MetricWriter(workdir)`` appends JSON lines to ``<workdir>/metrics.jsonl`` (one per epoch and
a final one; the record a script reads back) and writes the same scalars as TensorBoard event
files in ``<workdir>`` (``tensorboard --logdir <workdir>``, or ``%tensorboard`` in a notebook)
through ``tensorboardX``, which needs no TensorFlow. Only process 0 writes (multi-host runs).
``epoch_records(path)`` reads the per-epoch records of a ``metrics.jsonl`` back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Scalars to TensorBoard and records to ``metrics.jsonl``; a context manager.

  Args:
    workdir: the run's directory (event files and ``metrics.jsonl`` go there).
    tensorboard: write TensorBoard event files too.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.metrics_path = os.path.join(workdir, METRICS_FILE)
    self._lead = jax.process_index() == 0
    self._tb = None
    if tensorboard and self._lead:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Writes each ``tag: value`` at ``step`` to TensorBoard (no-op without it)."""
    if self._tb is None:
      return
    for tag, value in values.items():
      self._tb.add_scalar(tag, float(value), global_step=int(step))

  def record(self, record: Mapping[str, Any]) -> None:
    """Appends one JSON line to ``metrics.jsonl``."""
    if self._lead:
      with open(self.metrics_path, "a") as f:
        f.write(json.dumps(dict(record)) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def epoch_records(path: str) -> list[dict]:
  """The per-epoch records of a run's ``metrics.jsonl`` (``MetricWriter``), by epoch.

  A resumed run may log an epoch twice (once per attempt); the last record of each counts.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {path}: give the workdir of a training run (its metrics.jsonl)")
  by_epoch = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        if "epoch" in record:
          by_epoch[int(record["epoch"])] = record
  return [by_epoch[e] for e in sorted(by_epoch)]
