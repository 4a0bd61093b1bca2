"""Per-prompt advantage normalisation (DDPO's ``PerPromptStatTracker``), on the host.

Each prompt key (the trainer uses ``f"{instruction}|{example_id}"``) owns a numpy ring buffer
of its most recent rewards. ``update`` pushes a batch of rewards, then normalises each one as
``(r - mean) / (std + 1e-6)`` where mean/std (population std, ddof=0) are those of the key's
buffer once it holds at least ``min_count`` values, and those of the whole batch before that.
The state is a JSON-serialisable dict, so a checkpoint restores the tracker exactly.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np

STD_EPSILON = 1e-6  # added to every std, as in DDPO


def _checked(keys: Sequence[str], rewards: Any):
  """(keys as str, rewards (N,) float64, finite mask, advantages all NaN) of a batch.

  Raises:
    ValueError: rewards is not 1-D, or its length differs from the number of keys.
  """
  rewards = np.asarray(rewards, np.float64)
  keys = [str(k) for k in keys]
  if rewards.ndim != 1 or rewards.shape[0] != len(keys):
    raise ValueError(f"rewards of shape {rewards.shape} and {len(keys)} keys: expected one "
                     "reward per key, as a 1-D array (gather all samples first).")
  return keys, rewards, np.isfinite(rewards), np.full(rewards.shape, np.nan, np.float64)


class _RingBuffer:
  """The last ``capacity`` float64 values pushed, oldest first in ``values()``."""

  def __init__(self, capacity: int):
    self._data = np.zeros((capacity,), np.float64)
    self._count = 0  # values held (<= capacity)
    self._next = 0  # slot the next value goes to

  def push(self, values: np.ndarray) -> None:
    for value in values:
      self._data[self._next] = value
      self._next = (self._next + 1) % len(self._data)
      self._count = min(self._count + 1, len(self._data))

  def values(self) -> np.ndarray:
    """(count,) float64, oldest first."""
    if self._count < len(self._data):
      return self._data[:self._count].copy()
    return np.concatenate([self._data[self._next:], self._data[:self._next]])

  def __len__(self) -> int:
    return self._count


class PerPromptStatTracker:
  """Ring buffers of rewards keyed by prompt, and DDPO's advantage rule.

  Args:
    buffer_size: values kept per key (older ones are dropped), >= 1.
    min_count: a key uses its own statistics once its buffer holds this many values
      (1 <= min_count <= buffer_size); before that the batch statistics are used.
  """

  def __init__(self, buffer_size: int, min_count: int):
    if int(buffer_size) != buffer_size or buffer_size < 1:
      raise ValueError(f"buffer_size={buffer_size!r}: expected an integer >= 1.")
    if int(min_count) != min_count or not 1 <= min_count <= buffer_size:
      raise ValueError(f"min_count={min_count!r} with buffer_size={buffer_size}: expected "
                       "1 <= min_count <= buffer_size, otherwise a key could never use its own "
                       "statistics (raise stat_buffer_size or lower stat_min_count).")
    self.buffer_size = int(buffer_size)
    self.min_count = int(min_count)
    self._buffers: Dict[str, _RingBuffer] = {}

  def __len__(self) -> int:
    """Number of keys seen."""
    return len(self._buffers)

  def buffer(self, key: str) -> np.ndarray:
    """(n,) float64 rewards currently held for ``key`` (oldest first; empty if unseen)."""
    ring = self._buffers.get(key)
    return np.zeros((0,), np.float64) if ring is None else ring.values()

  def update(self, keys: Sequence[str], rewards: Any) -> np.ndarray:
    """Pushes a batch of rewards and returns their normalised advantages.

    Non-finite rewards are not pushed into any buffer (they would poison it for
    ``buffer_size`` updates), are left out of the batch statistics, and get a NaN advantage,
    so the PPO step that sees them counts a non-finite update instead of learning from it.

    Args:
      keys: N prompt keys (str), e.g. ``f"{instruction}|{example_id}"``; repeats allowed.
      rewards: (N,) rewards, any float dtype.

    Returns:
      (N,) float32 advantages.

    Raises:
      ValueError: rewards is not 1-D, or its length differs from the number of keys.
    """
    keys, rewards, finite, advantages = _checked(keys, rewards)
    if not finite.any():
      return advantages.astype(np.float32)
    batch_mean = rewards[finite].mean()
    batch_std = rewards[finite].std() + STD_EPSILON
    unique_keys = list(dict.fromkeys(k for k, ok in zip(keys, finite) if ok))
    key_array = np.asarray(keys, dtype=object)
    for key in unique_keys:
      rows = np.flatnonzero((key_array == key) & finite)
      ring = self._buffers.setdefault(key, _RingBuffer(self.buffer_size))
      ring.push(rewards[rows])
      if len(ring) < self.min_count:
        mean, std = batch_mean, batch_std
      else:
        held = ring.values()
        mean, std = held.mean(), held.std() + STD_EPSILON
      advantages[rows] = (rewards[rows] - mean) / std
    return advantages.astype(np.float32)

  def state_dict(self) -> Dict[str, Any]:
    """JSON-serialisable state: sizes and every buffer (Python floats, oldest first)."""
    return {
        "buffer_size": self.buffer_size,
        "min_count": self.min_count,
        "buffers": {k: [float(v) for v in ring.values()] for k, ring in self._buffers.items()},
    }

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any]) -> "PerPromptStatTracker":
    """Rebuilds a tracker from :meth:`state_dict` (e.g. after a JSON round trip).

    Raises:
      ValueError: a field is missing, or a buffer is longer than ``buffer_size``.
    """
    missing = [k for k in ("buffer_size", "min_count", "buffers") if k not in state]
    if missing:
      raise ValueError(f"Stat tracker state lacks {missing}: expected the dict written by "
                       "PerPromptStatTracker.state_dict().")
    tracker = cls(state["buffer_size"], state["min_count"])
    for key, values in state["buffers"].items():
      values = np.asarray(values, np.float64).reshape(-1)
      if len(values) > tracker.buffer_size:
        raise ValueError(f"Stat tracker state: buffer {key!r} holds {len(values)} values but "
                         f"buffer_size is {tracker.buffer_size}.")
      ring = _RingBuffer(tracker.buffer_size)
      ring.push(values)
      tracker._buffers[str(key)] = ring  # pylint: disable=protected-access
    return tracker


def group_advantages(keys: Sequence[str], rewards: Any, std: str = "group",
                     skip_zero_spread: bool = False) -> np.ndarray:
  """GRPO's advantages: each reward against the other samples of its prompt in this batch.

  ``(r - mean_group) / (s + 1e-6)`` with s the group's population std (``std="group"``) or
  the whole batch's (``"global"``). With ``skip_zero_spread`` a group whose rewards are all
  equal gets 0 (with "group" std its advantages are already 0; with "global" too, since
  r = mean_group; the flag also zeroes groups of one sample). Non-finite rewards get NaN
  and are left out of every statistic, as in ``PerPromptStatTracker.update``.

  Args:
    keys: N prompt keys; the samples of one key form a group.
    rewards: (N,) rewards.
    std: "group" or "global".
    skip_zero_spread: zero the advantages of groups without reward spread.
  Returns:
    (N,) float32 advantages.
  Raises:
    ValueError: shapes disagree, or ``std`` is unknown.
  """
  if std not in ("group", "global"):
    raise ValueError(f"std={std!r}: expected 'group' or 'global'.")
  keys, rewards, finite, advantages = _checked(keys, rewards)
  if not finite.any():
    return advantages.astype(np.float32)
  global_std = rewards[finite].std() + STD_EPSILON
  key_array = np.asarray(keys, dtype=object)
  for key in dict.fromkeys(k for k, ok in zip(keys, finite) if ok):
    rows = np.flatnonzero((key_array == key) & finite)
    values = rewards[rows]
    spread = values.max() - values.min()
    if skip_zero_spread and (len(rows) < 2 or spread == 0):
      advantages[rows] = 0.0
      continue
    scale = values.std() + STD_EPSILON if std == "group" else global_std
    advantages[rows] = (values - values.mean()) / scale
  return advantages.astype(np.float32)
