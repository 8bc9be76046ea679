"""All checkpoint I/O of crmjax, behind one small wrapper around Orbax.

A checkpoint step holds two items:

* ``"state"`` -- the train-state pytree (params, optax state, power-iteration
 vectors, step counter, raw ``uint32`` RNG key data, ...), written with
 ``ocp.args.StandardSave`` and read back with ``ocp.args.StandardRestore``
 into the structure, dtypes and shardings of a caller-supplied target;
* ``"meta"`` -- a small JSON dict (architecture name, epoch, config, ...),
 written with ``ocp.args.JsonSave`` / read with ``ocp.args.JsonRestore``;
* optional extra pytree items (``EXTRA_ITEMS``: ``"rescaling"``, the training rescaling
 ``log D``; ``"pairwise_bound"``, the bound reused between two computations), saved only
 when given (``save(..., extra=...)``) and read with :meth:`Checkpointer.restore_extra`,
 which returns ``None`` for a step without the item.
 They are separate items, not part of ``"state"``, so the state's tree -- and every
 checkpoint written before the item existed -- is unchanged.

Failure modes are turned into actionable errors instead of raw Orbax / TensorStore
tracebacks (``crmjax.checkpoint_checks``: :class:`CheckpointMismatchError`,
:class:`CorruptCheckpointError`, :func:`check_writable`).

Orbax behaviour relied on (orbax-checkpoint 0.12.x, verified empirically):

* A step is written to ``<dir>/<step>.orbax-checkpoint-tmp...`` and renamed to
 ``<dir>/<step>`` only after a ``commit_success.txt`` marker has been written
 into it; Orbax's own step listing ignores ``*.orbax-checkpoint-tmp*`` dirs,
 and a leftover tmp dir of a step is deleted when that step is saved again.
 A bare ``<dir>/<step>`` directory *without* the marker is, however, still
 listed by Orbax, so :meth:`Checkpointer.latest_step` additionally requires
 the commit marker (or a ``commit_timestamp_nsecs`` in the step's
 ``_CHECKPOINT_METADATA``).
* ``CheckpointManager.save`` of an already existing step returns ``False``
 without writing (and raises ``StepAlreadyExistsError`` with ``force=True``);
 :meth:`Checkpointer.save` skips such saves with a warning.
* ``CheckpointManager.item_metadata`` only returns the array metadata tree if
 the manager knows the item handlers, hence ``item_handlers=`` below.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from crmjax import checkpoint_checks as checks
from crmjax.checkpoint_checks import (
  DEFAULT_MIN_FREE_BYTES,
  CheckpointError,
  CheckpointMismatchError,
  CorruptCheckpointError,
  check_writable,
)

__all__ = [
  "CheckpointError",
  "CheckpointMismatchError",
  "CorruptCheckpointError",
  "Checkpointer",
  "check_writable",
  "DEFAULT_MIN_FREE_BYTES",
  "EXTRA_ITEMS",
]

logger = logging.getLogger(__name__)

PyTree = Any

_STATE = "state"
_META = "meta"
#: Optional pytree items a step may hold next to ``"state"`` (``Checkpointer.restore_extra``).
#: ``"rescaling"``: the training rescaling's ``log D``; ``"pairwise_bound"``: the ``(K, K)``
#: bound reused by the steps between two bound computations (``config.bound_every_steps``).
EXTRA_ITEMS: tuple[str, ...] = ("rescaling", "pairwise_bound")


class Checkpointer:
  """Saves/restores ``(state, meta)`` pairs per training step.

  Wraps ``ocp.CheckpointManager`` with two items, ``"state"`` (a pytree,
  ``StandardSave``/``StandardRestore``) and ``"meta"`` (a JSON dict,
  ``JsonSave``/``JsonRestore``), combined with ``ocp.args.Composite``.

  Usage::

    with Checkpointer(workdir / "ckpt", max_to_keep=3) as ckpt:
      if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state, expected_meta={"architecture": "4C3F"})
      ...
      ckpt.save(step, state, {"architecture": "4C3F", "epoch": epoch})
  """

  def __init__(
    self,
    directory: str | os.PathLike[str],
    *,
    max_to_keep: int = 3,
    async_save: bool = False,
  ) -> None:
    """Opens (creating if needed) the checkpoint directory.

    Args:
     directory: where step sub-directories ``<dir>/<step>`` live.
     max_to_keep: number of most recent steps kept; older ones are deleted
      after each successful save.
     async_save: write array data in a background thread; call
      :meth:`wait` (or :meth:`close`) before relying on the files.
    """
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self._directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
      self._directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=async_save,
      ),
      # Needed for item_metadata() to return the stored array tree.
      item_handlers={
        _STATE: ocp.StandardCheckpointHandler(),
        _META: ocp.JsonCheckpointHandler(),
        **{name: ocp.StandardCheckpointHandler() for name in EXTRA_ITEMS},
      },
    )
    self._closed = False

  # -- introspection -----------------------------------------------------

  @property
  def directory(self) -> str:
    """Absolute path of the checkpoint directory."""
    return self._directory

  def step_dir(self, step: int) -> str:
    """Directory of ``step`` (whether or not it exists)."""
    return os.path.join(self._directory, str(step))

  def all_steps(self) -> list[int]:
    """Sorted steps with a fully committed checkpoint (interrupted writes excluded)."""
    return sorted(s for s in self._manager.all_steps() if checks.is_committed(self.step_dir(s)))

  def latest_step(self) -> int | None:
    """Latest fully committed step, or ``None`` if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  # -- save ----------------------------------------------------------------

  def save(
    self,
    step: int,
    state: PyTree,
    meta: Mapping[str, Any],
    *,
    force: bool = False,
    extra: Mapping[str, PyTree] | None = None,
  ) -> bool:
    """Saves ``state`` and ``meta`` (and the ``extra`` items) as checkpoint ``step``.

    Never overwrites: if ``step`` already exists, or (unless ``force``) is not
    newer than the latest step, nothing is written and a warning is issued.

    Args:
     step: training step (non-negative int) naming the checkpoint.
     state: the pytree to save (jax/numpy arrays, Python scalars).
     meta: JSON-serialisable dict stored next to it.
     force: save even if ``step`` is older than the latest saved step.
     extra: pytrees to save as separate items, keyed by a name of ``EXTRA_ITEMS``
      (read back with :meth:`restore_extra`).

    Returns:
     Whether a checkpoint was written (or, with ``async_save``, started).
    """
    self._check_open()
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    unknown = set(extra or {}) - set(EXTRA_ITEMS)
    if unknown:
      raise ValueError(f"unknown extra checkpoint items {sorted(unknown)}: use {EXTRA_ITEMS}")
    try:
      json.dumps(dict(meta))
    except (TypeError, ValueError) as e:
      raise TypeError(f"Checkpoint meta must be a JSON-serialisable dict: {e}") from e
    if step in self._manager.all_steps():
      warnings.warn(
        f"Checkpoint step {step} already exists in {self._directory}; not overwriting it.",
        stacklevel=2,
      )
      return False
    saved = self._manager.save(
      step,
      args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(dict(meta))},
        **{name: ocp.args.StandardSave(tree) for name, tree in (extra or {}).items()},
      ),
      force=force,
    )
    if not saved:
      warnings.warn(
        f"Checkpoint step {step} was not saved to {self._directory} "
        f"(latest step is {self._manager.latest_step()}; pass force=True to save "
        "an older step).",
        stacklevel=2,
      )
    return bool(saved)

  # -- restore -------------------------------------------------------------

  def _corrupt(self, step: int, what: str, cause: BaseException | None = None):
    return checks.corrupt_error(step, self.step_dir(step), what, cause)

  def _mismatch(self, step: int, problem: str, n: int, meta: Mapping[str, Any] | None):
    return checks.mismatch_error(self._directory, step, problem, n, meta)

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON meta of ``step`` (default: the latest committed step), no state read.

    Raises:
     FileNotFoundError: there is no (such) checkpoint.
     CorruptCheckpointError: the step is unreadable or was never committed.
    """
    return self._read_meta(step)[1]

  def _read_meta(self, step: int | None) -> tuple[int, dict[str, Any]]:
    self._check_open()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No complete checkpoint found in {self._directory}.")
    step = int(step)
    if not os.path.isdir(self.step_dir(step)):
      raise FileNotFoundError(
        f"Checkpoint step {step} does not exist in {self._directory}; "
        f"available steps: {self.all_steps()}."
      )
    if not checks.is_committed(self.step_dir(step)):
      raise self._corrupt(step, "the write was interrupted: no commit marker")
    if step not in self._manager.all_steps():
      self._manager.reload()  # written by another process after we opened
    try:
      meta = self._manager.restore(
        step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
      )[_META]
    except Exception as e:  # noqa: BLE001 - any read failure means a corrupt step
      raise self._corrupt(step, f"cannot read item {_META!r}", e) from e
    if not isinstance(meta, dict):
      raise self._corrupt(step, f"item {_META!r} is {type(meta).__name__}, not a dict")
    return step, meta

  def restore(
    self,
    target_state: PyTree,
    *,
    step: int | None = None,
    expected_meta: Mapping[str, Any] | None = None,
  ) -> tuple[PyTree, dict[str, Any]]:
    """Restores ``(state, meta)`` of ``step`` (default: the latest committed step).

    Arrays are restored with the structure, shapes, dtypes and shardings of
    ``target_state`` (concrete arrays or ``jax.ShapeDtypeStruct`` leaves).

    Args:
     target_state: pytree with the same structure as the saved state.
     step: step to restore; ``None`` means :meth:`latest_step`.
     expected_meta: entries (e.g. ``{"architecture": "4C3F"}``) that the
      stored meta must contain with equal values.

    Returns:
     ``(state, meta)``.

    Raises:
     FileNotFoundError: there is no (such) checkpoint.
     CheckpointMismatchError: structure / shape / dtype / expected meta differ.
     CorruptCheckpointError: the step is unreadable or was never committed.
    """
    step, meta = self._read_meta(step)
    checks.check_expected_meta(meta, expected_meta, step=step, directory=self._directory)
    return self._restore_tree(step, _STATE, target_state, meta), meta

  def restore_extra(self, name: str, target: PyTree, *, step: int | None = None) -> PyTree | None:
    """Restores the extra item ``name`` of ``step`` (default: the latest committed step).

    Like :meth:`restore` (structure, shapes, dtypes and shardings of ``target``; the same
    errors), but returns ``None`` when the step does not hold the item (a checkpoint
    written without it, e.g. before the item existed).
    """
    if name not in EXTRA_ITEMS:
      raise ValueError(f"unknown extra checkpoint item {name!r}: use one of {EXTRA_ITEMS}")
    step, meta = self._read_meta(step)
    if not os.path.isdir(os.path.join(self.step_dir(step), name)):
      return None
    return self._restore_tree(step, name, target, meta)

  def _restore_tree(
    self, step: int, item: str, target_state: PyTree, meta: Mapping[str, Any]
  ) -> PyTree:
    """Steps 2-4 of :meth:`restore` for one pytree item."""
    # 2. Compare the stored array metadata with the target before reading data.
    try:
      item_md = self._manager.item_metadata(step)[item]
    except Exception as e:  # noqa: BLE001
      raise self._corrupt(step, f"cannot read the metadata of item {item!r}", e) from e
    ckpt_tree = getattr(item_md, "tree", item_md)
    if ckpt_tree is None:
      logger.warning(
        "Checkpoint step %d in %s has no readable array metadata; validating after restore only.",
        step,
        self._directory,
      )
    else:
      mm = checks.first_mismatch(checks.leaf_specs(ckpt_tree), checks.leaf_specs(target_state))
      if mm is not None:
        raise self._mismatch(step, *mm, meta)

    # 3. Read the arrays into the target's structure and shardings.
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
      state = self._manager.restore(
        step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)})
      )[item]
    except Exception as e:  # noqa: BLE001
      msg = str(e)
      if (
        ckpt_tree is None
        and isinstance(e, ValueError)
        and ("mismatch" in msg.lower() or "not compatible" in msg)
      ):
        raise self._mismatch(step, msg.splitlines()[0][:300], 1, meta) from e
      raise self._corrupt(step, f"cannot read item {item!r}", e) from e

    # 4. Post-check: the result must have exactly the target's layout.
    checks.check_restored(state, target_state, step=step, directory=self._directory, meta=meta)
    return state

  # -- lifecycle -------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until pending (async) saves are committed; re-raises their errors."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager. Idempotent."""
    if self._closed:
      return
    try:
      self._manager.wait_until_finished()
    finally:
      self._manager.close()
      self._closed = True

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"Checkpointer for {self._directory} is closed.")

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"Checkpointer({self._directory!r}, steps={self.all_steps()})"
