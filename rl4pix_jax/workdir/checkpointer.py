"""Orbax checkpoints of a training run: device state plus host-side state, written atomically.

A checkpoint of epoch ``e`` holds two items:
  - ``state``: the device pytree (params, optimizer state, step, ...), saved by every process
    collectively (Orbax ``StandardSave``) and restored with the shardings of an abstract
    target, so a run restores onto a different mesh or process count;
  - ``host``: a JSON dict (epoch, PRNG key, per-prompt statistics, data-iterator position,
    counters) written by process 0.
Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
crash mid-write leaves the previous checkpoint as the latest usable one; incomplete folders
are ignored (and cleaned up) on the next start.

A complete checkpoint can still be unreadable (a data file cut short by a full disk, a bad
copy). ``RunCheckpointer.restore`` without an epoch then falls back to the newest readable
one, with one warning naming both; ``move_aside`` lets a resuming run put the unreadable ones
under ``<checkpoints>/../checkpoints_unreadable/`` so it can write those epochs again.
"""

from __future__ import annotations

import gc
import logging as std_logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

# Orbax writes this file last when it finalises a checkpoint folder.
COMPLETION_MARKER = "_CHECKPOINT_METADATA"
# Where ``RunCheckpointer.move_aside`` puts unreadable checkpoints (beside the checkpoint root).
UNREADABLE_SUFFIX = "_unreadable"


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or read as asked."""


def all_finite(tree: Any) -> bool:
  """True when every floating leaf of ``tree`` is finite (checked before each save)."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.floating)]
  return all(bool(jax.numpy.isfinite(x).all()) for x in leaves)


class Checkpointer:
  """Saves and restores named items (array pytrees and JSON dicts) under ``<directory>/<step>``.

  The one Orbax wrapper of the project: the RL run (``RunCheckpointer``: items ``state`` and
  ``host``) and the supervised stages (``workdir.stages``: ``params``, ``opt_state``,
  ``progress``) both write through it.

  Args:
    directory: checkpoint root (a local path or ``gs://...``).
    keep: how many of the newest checkpoints to keep.
    item_names: the names of the items, when fixed (None: whatever each save writes).
    cleanup_tmp_directories: remove unfinished temporary folders on start.
    read_only: create nothing and clean nothing up (for commands that only read a run).
  """

  def __init__(self, directory: str, keep: int = 3, item_names: Optional[Sequence[str]] = None,
               cleanup_tmp_directories: bool = True, read_only: bool = False):
    if keep < 1:
      raise CheckpointError(f"keep={keep}: keep at least one checkpoint.")
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only,
        cleanup_tmp_directories=cleanup_tmp_directories and not read_only)
    self._manager = ocp.CheckpointManager(
        directory, options=options, item_names=tuple(item_names) if item_names else None)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def latest_step(self) -> Optional[int]:
    """The newest step Orbax knows of (complete or not; see ``RunCheckpointer.all_epochs``)."""
    return self._manager.latest_step()

  def reload(self) -> None:
    """Re-reads the checkpoint folder (after another process changed it)."""
    self._manager.reload()

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def save_items(self, step: int, arrays: Dict[str, Any],
                 json_items: Optional[Dict[str, dict]] = None) -> None:
    """Writes the array pytrees and JSON dicts of ``step`` and waits until they are on disk."""
    items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
    items.update({name: ocp.args.JsonSave(value) for name, value in (json_items or {}).items()})
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()

  def restore_items(self, step: int, arrays: Dict[str, Any],
                    json_names: Sequence[str] = ()) -> Dict[str, Any]:
    """Restores the named items of ``step``.

    Args:
      arrays: item name -> a pytree of arrays or ``jax.ShapeDtypeStruct`` (with ``sharding``)
        giving structure, dtypes and placement, or None to restore as saved.
      json_names: the JSON items to restore.
    """
    items = {name: ocp.args.StandardRestore(
        None if like is None else jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like))
             for name, like in arrays.items()}
    items.update({name: ocp.args.JsonRestore() for name in json_names})
    return dict(self._manager.restore(step, args=ocp.args.Composite(**items)))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class RunCheckpointer(Checkpointer):
  """Saves and restores (state, host) pairs under ``<directory>`` keyed by epoch.

  Args:
    directory: checkpoint root (a local path or ``gs://...``).
    keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
    super().__init__(directory, keep, item_names=("state", "host"), read_only=read_only)
    # Epochs found unreadable by the last ``restore`` (newest first), and the one it used.
    self.unreadable: List[int] = []
    self.restored_epoch: Optional[int] = None

  def _is_complete(self, epoch: int) -> bool:
    return (epath.Path(self.directory) / str(epoch) / COMPLETION_MARKER).exists()

  def all_epochs(self) -> list:
    """Epochs of complete checkpoints (a folder without Orbax's metadata file is skipped)."""
    epochs = sorted(self._manager.all_steps())
    complete = [e for e in epochs if self._is_complete(e)]
    for epoch in sorted(set(epochs) - set(complete)):
      logging.warning("Ignoring incomplete checkpoint folder %s/%d (no %s).", self.directory,
                      epoch, COMPLETION_MARKER)
    return complete

  def latest_epoch(self) -> Optional[int]:
    """The newest complete checkpoint's epoch, or None."""
    epochs = self.all_epochs()
    return epochs[-1] if epochs else None

  def save(self, epoch: int, state: Any, host: dict) -> None:
    """Writes a checkpoint and waits until it is complete on disk.

    Raises:
      CheckpointError: when ``state`` holds a non-finite value (never checkpoint a broken
        model: the previous checkpoint stays the latest).
    """
    if not all_finite(state):
      raise CheckpointError(f"Refusing to checkpoint epoch {epoch}: the state holds NaN or "
                            "inf values; the previous checkpoint stays the latest.")
    if epoch in self._manager.all_steps():
      if self._is_complete(epoch):
        raise CheckpointError(f"A checkpoint for epoch {epoch} already exists in "
                              f"{self.directory!r}.")
      logging.warning("Replacing incomplete checkpoint folder of epoch %d.", epoch)
      (epath.Path(self.directory) / str(epoch)).rmtree()
      self._manager.reload()
    self.save_items(epoch, {"state": state}, {"host": host})

  def restore(self, abstract_state: Any, epoch: Optional[int] = None) -> Tuple[Any, dict]:
    """Restores (state, host) of ``epoch``, or of the newest readable checkpoint.

    Without ``epoch``, checkpoints are tried newest first; when some cannot be read, one
    warning names them and the epoch used (``self.unreadable``, ``self.restored_epoch``).

    Args:
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) or arrays
        giving the structure, dtypes and placement to restore into.
      epoch: which checkpoint (no fallback when given).
    Raises:
      CheckpointError: no checkpoint, no such epoch, or none readable (one line each).
    """
    epochs = self.all_epochs()
    if not epochs:
      raise CheckpointError(f"No checkpoint in {self.directory!r}.")
    if epoch is not None and epoch not in epochs:
      raise CheckpointError(f"No checkpoint for epoch {epoch} in {self.directory!r}; "
                            f"available: {epochs}.")
    candidates = [epoch] if epoch is not None else sorted(epochs, reverse=True)
    self.unreadable, self.restored_epoch = [], None
    reasons = []
    _filter_abandoned_read_noise()
    for candidate in candidates:
      try:
        restored = self.restore_items(candidate, {"state": abstract_state}, ("host",))
      except Exception as e:  # pylint: disable=broad-except  (TensorStore, OSError, ...)
        _collect_abandoned_reads()
        self.unreadable.append(candidate)
        reasons.append(f"epoch {candidate}: {first_line(e)}")
        continue
      self.restored_epoch = candidate
      if self.unreadable:
        logging.warning(
            "Checkpoint(s) of epoch %s in %s cannot be read (%s); using epoch %d, the newest "
            "readable one.", ", ".join(map(str, self.unreadable)), self.directory,
            reasons[0], candidate)
      return restored["state"], restored["host"]
    if epoch is not None:
      raise CheckpointError(f"The checkpoint of epoch {epoch} in {self.directory!r} cannot be "
                            f"read ({reasons[0]}); available: {epochs}.")
    raise CheckpointError(f"No checkpoint in {self.directory!r} can be read ({'; '.join(reasons)}"
                          "); delete the run folder or restore its checkpoints from a copy.")

  def move_aside(self, epochs: Sequence[int]) -> str:
    """Moves the folders of ``epochs`` to ``<directory>_unreadable/`` (kept, not deleted), so
    a resuming run can write those epochs again. Returns that folder."""
    target = epath.Path(self.directory.rstrip("/") + UNREADABLE_SUFFIX)
    target.mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
      destination = target / str(epoch)
      if destination.exists():
        destination.rmtree()
      (epath.Path(self.directory) / str(epoch)).rename(destination)
    self._manager.reload()
    return os.fspath(target)


def _is_abandoned_read_error(error: Optional[BaseException]) -> bool:
  """Whether ``error`` comes from a read a failed restore abandoned: a TensorStore error
  (its message carries a ``tensorstore_spec`` or names the array being read), or a late
  callback into Orbax's already closed event loop."""
  if error is None:
    return False
  text = str(error)
  return ("tensorstore" in text.lower() or "reading array index" in text
          or (isinstance(error, RuntimeError) and "Event loop is closed" in text))


def _is_abandoned_read_noise(unraisable) -> bool:
  """An exception Python reports (``sys.unraisablehook``) from an abandoned read."""
  return _is_abandoned_read_error(unraisable.exc_value)


class _AbandonedReadLogFilter(std_logging.Filter):
  """Drops asyncio's "Future exception was never retrieved" records for abandoned reads.

  When one array of a restore fails, asyncio logs every other failed read future on the
  ``asyncio`` logger as it is garbage-collected (whenever that is), each with a
  TensorStore traceback; other asyncio records pass."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is None and isinstance(getattr(record, "args", None), dict):
      error = record.args.get("exception")
    return not _is_abandoned_read_error(error)


_ASYNCIO_FILTER = _AbandonedReadLogFilter()


def _filter_abandoned_read_noise() -> None:
  """From now on drops Python's reports of the reads a failed restore abandons (one per
  array, each a traceback with a TensorStore spec or a closed event loop), through
  ``sys.unraisablehook``, ``sys.excepthook`` and the ``asyncio`` logger; any other report
  passes as usual. Idempotent."""
  previous = sys.unraisablehook
  if not getattr(previous, "_rl4pix_filter", False):
    def hook(unraisable):
      if not _is_abandoned_read_noise(unraisable):
        previous(unraisable)
    hook._rl4pix_filter = True  # pylint: disable=protected-access
    sys.unraisablehook = hook
  previous_excepthook = sys.excepthook
  if not getattr(previous_excepthook, "_rl4pix_filter", False):
    # TensorStore's I/O threads report their late callbacks with PyErr_Print (sys.excepthook).
    def excepthook(kind, value, tb):
      if not (isinstance(value, RuntimeError) and "Event loop is closed" in str(value)):
        previous_excepthook(kind, value, tb)
    excepthook._rl4pix_filter = True  # pylint: disable=protected-access
    sys.excepthook = excepthook
  asyncio_logger = std_logging.getLogger("asyncio")
  if _ASYNCIO_FILTER not in asyncio_logger.filters:
    asyncio_logger.addFilter(_ASYNCIO_FILTER)


def _collect_abandoned_reads() -> None:
  """Collects the read coroutines a failed restore leaves behind (quietly, see above)."""
  _filter_abandoned_read_noise()
  gc.collect()


def first_line(error: BaseException, limit: int = 200) -> str:
  """The first line of an exception's message, at most ``limit`` characters (TensorStore
  errors run to hundreds of lines)."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text if len(text) <= limit else text[:limit - 3] + "..."
