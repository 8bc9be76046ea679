"""What makes a checkpoint step trustworthy, and the errors that say why one is not.

* :class:`CheckpointMismatchError` -- the checkpoint was written for another model (tree
  structure, array shape/dtype or ``meta["architecture"]`` differ from what the caller
  restores into): ``leaf_specs`` / ``first_mismatch`` compare the trees, before and after
  the arrays are read;
* :class:`CorruptCheckpointError` -- files of a step are truncated, garbage, missing, or the
  step was never committed (``is_committed``);
* :func:`check_writable` -- fail fast at start-up if the workdir cannot be created/written
  or is (nearly) full.

Each error names the fix. ``crmjax.checkpoint.Checkpointer`` raises them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

PyTree = Any

#: Default minimum free space demanded by :func:`check_writable` (100 MiB).
DEFAULT_MIN_FREE_BYTES: int = 100 * 1024 * 1024

# Written by Orbax into every step directory just before the atomic rename
# (orbax.checkpoint._src.path.atomicity_types.COMMIT_SUCCESS_FILE).
COMMIT_FILE = "commit_success.txt"
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
MISMATCH_FIX = "use a fresh --workdir, or the config that wrote this checkpoint"


class CheckpointError(Exception):
  """Base class of the checkpoint errors raised by this module."""


class CheckpointMismatchError(CheckpointError, ValueError):
  """The checkpoint does not fit the state (or metadata) it is restored into."""

  def __init__(self, message: str, *, step: int, directory: str, path: str | None = None):
    super().__init__(message)
    self.step = step
    self.directory = directory
    self.path = path


class CorruptCheckpointError(CheckpointError, RuntimeError):
  """A checkpoint step is unreadable: truncated, garbage, missing or uncommitted files."""

  def __init__(self, message: str, *, step: int, path: str):
    super().__init__(message)
    self.step = step
    self.path = path


def check_writable(
  directory: str | os.PathLike[str],
  *,
  min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
) -> str:
  """Fail fast if ``directory`` cannot hold checkpoints.

  Creates ``directory`` (with parents) if needed, writes and deletes a small
  probe file in it and checks the free space of its file system.

  Args:
   directory: the checkpoint / work directory.
   min_free_bytes: minimum free space required on its file system.

  Returns:
   The absolute path of ``directory``.

  Raises:
   OSError: with a message naming the directory and the fix, if it cannot be
    created, is not writable, or has less than ``min_free_bytes`` free.
  """
  path = os.path.abspath(os.fspath(directory))
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(
      f"Checkpoint directory {path!r} exists but is not a directory. Pass another --workdir."
    )
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OSError(
      e.errno,
      f"Cannot create checkpoint directory {path!r}: {e.strerror or e}. "
      "Pass a --workdir you can write to.",
    ) from e
  try:
    with tempfile.NamedTemporaryFile(dir=path, prefix=".crmjax_write_probe_") as f:
      f.write(b"ok")
      f.flush()
  except OSError as e:
    raise OSError(
      e.errno,
      f"Checkpoint directory {path!r} is not writable: {e.strerror or e}. "
      "Fix its permissions or pass a --workdir you can write to.",
    ) from e
  free = shutil.disk_usage(path).free
  if free < min_free_bytes:
    raise OSError(
      f"Only {free / 2**20:.1f} MiB free on the file system of checkpoint directory "
      f"{path!r}; at least {min_free_bytes / 2**20:.1f} MiB are required. "
      "Free some space or pass a --workdir on another disk."
    )
  return path


def is_committed(step_dir: str) -> bool:
  """Whether the step directory ``step_dir`` was fully written: it holds Orbax's commit
  marker, or a ``commit_timestamp_nsecs`` in its ``_CHECKPOINT_METADATA``."""
  if not os.path.isdir(step_dir):
    return False
  if os.path.exists(os.path.join(step_dir, COMMIT_FILE)):
    return True
  try:
    with open(os.path.join(step_dir, STEP_METADATA_FILE), encoding="utf-8") as f:
      return json.load(f).get("commit_timestamp_nsecs") is not None
  except (OSError, ValueError, AttributeError):
    return False


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_specs(tree: PyTree) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
  """Maps normalised key paths to ``(shape, dtype-or-None)``.

  Paths are normalised so that a flax dataclass field ``.params`` and the
  dict key ``['params']`` Orbax stores it under compare equal.
  """
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
      shape = np.shape(leaf)
    dtype = getattr(leaf, "dtype", None)
    out[tuple(_key_str(k) for k in kp)] = (tuple(shape), _norm_dtype(dtype))
  return out


def _norm_dtype(dtype: Any) -> Any:
  if dtype is None:
    return None
  try:
    return np.dtype(dtype)
  except TypeError:  # e.g. jax extended dtypes such as typed PRNG keys
    return str(dtype)


def _fmt_path(p: tuple[str, ...]) -> str:
  return "/".join(p) if p else "<root>"


def first_mismatch(
  ckpt: Mapping[tuple[str, ...], tuple[tuple[int, ...], Any]],
  target: Mapping[tuple[str, ...], tuple[tuple[int, ...], Any]],
) -> tuple[str, int] | None:
  """Returns (description of the first mismatch, number of mismatches) or None."""
  problems = []
  # Target order first (params before opt_state), then checkpoint-only leaves.
  for p in list(target) + sorted(set(ckpt) - set(target)):
    if p not in ckpt:
      problems.append(f"{_fmt_path(p)} is in the target state but not in the checkpoint")
    elif p not in target:
      problems.append(f"{_fmt_path(p)} is in the checkpoint but not in the target state")
    else:
      (cs, cd), (ts, td) = ckpt[p], target[p]
      if cs != ts:
        problems.append(
          f"{_fmt_path(p)} has shape {cs} in the checkpoint but {ts} in the target state"
        )
      elif cd is not None and td is not None and cd != td:
        problems.append(
          f"{_fmt_path(p)} has dtype {cd} in the checkpoint but {td} in the target state"
        )
  if not problems:
    return None
  return problems[0], len(problems)


def corrupt_error(
  step: int, step_dir: str, what: str, cause: BaseException | None = None
) -> CorruptCheckpointError:
  """The error of an unreadable step: what failed, its cause, and the fix."""
  detail = (
    f": {type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
    if cause
    else ""
  )
  return CorruptCheckpointError(
    f"Checkpoint step {step} at {step_dir} is corrupt or incomplete ({what}{detail}). "
    f"Fix: delete the directory {step_dir} (training then resumes from the previous step), "
    "or pass an earlier step to restore.",
    step=step,
    path=step_dir,
  )


def mismatch_error(
  directory: str, step: int, problem: str, n: int, meta: Mapping[str, Any] | None
) -> CheckpointMismatchError:
  """The error of a step that does not fit the target: the first problem of ``n``."""
  arch = ""
  if meta and "architecture" in meta:
    arch = f" (checkpoint architecture: {meta['architecture']!r})"
  more = f" [{n - 1} more mismatching leaves]" if n > 1 else ""
  return CheckpointMismatchError(
    f"Checkpoint step {step} in {directory}{arch} does not match the state being "
    f"restored: {problem}{more}. It was probably written by another architecture or "
    f"config. Fix: {MISMATCH_FIX}.",
    step=step,
    directory=directory,
    path=problem.split(" ", 1)[0],
  )


def check_expected_meta(
  meta: Mapping[str, Any], expected: Mapping[str, Any] | None, *, step: int, directory: str
) -> None:
  """Raises ``CheckpointMismatchError`` for the first entry of ``expected`` that the stored
  ``meta`` lacks or holds with another value."""
  for k, v in (expected or {}).items():
    if meta.get(k) != v:
      raise CheckpointMismatchError(
        f"Checkpoint step {step} in {directory} has meta[{k!r}] = "
        f"{meta.get(k)!r}, but {v!r} was expected. Fix: {MISMATCH_FIX}.",
        step=step,
        directory=directory,
        path=f"meta/{k}",
      )


def check_restored(
  state: PyTree, target: PyTree, *, step: int, directory: str, meta: Mapping[str, Any]
) -> None:
  """Raises ``CheckpointMismatchError`` unless the restored ``state`` has exactly the
  layout (tree structure, shapes, dtypes) of ``target``."""
  if jax.tree.structure(state) != jax.tree.structure(target):
    raise mismatch_error(
      directory,
      step,
      f"<root> restored tree structure {jax.tree.structure(state)} differs from the "
      f"target's {jax.tree.structure(target)}",
      1,
      meta,
    )
  mm = first_mismatch(leaf_specs(state), leaf_specs(target))
  if mm is not None:
    raise mismatch_error(directory, step, *mm, meta)
