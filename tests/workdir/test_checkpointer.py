"""Run checkpoints: round trip, keep-last-K, refusal of non-finite state, torn writes."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rl4pix_jax.workdir import checkpointer as checkpointing


def _state(scale=1.0):
  params = {"w": jnp.arange(6.0).reshape(2, 3) * scale, "b": jnp.ones(3)}
  opt_state = optax.adamw(1e-3).init(params)
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(4),
          "key": jax.random.PRNGKey(3)}


def test_round_trip_and_keep(tmp_path):
  ckpt = checkpointing.RunCheckpointer(str(tmp_path / "ckpt"), keep=2)
  for epoch in (1, 2, 3):
    ckpt.save(epoch, _state(epoch), {"epoch": epoch, "tracker": {"a": [1.0, 2.0]}})
  assert ckpt.all_epochs() == [2, 3]
  state, host = ckpt.restore(_state())
  chex_equal = jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), state, _state(3))
  assert all(jax.tree_util.tree_leaves(chex_equal))
  assert host == {"epoch": 3, "tracker": {"a": [1.0, 2.0]}}
  _, host2 = ckpt.restore(_state(), epoch=2)
  assert host2["epoch"] == 2
  with pytest.raises(checkpointing.CheckpointError, match="available"):
    ckpt.restore(_state(), epoch=1)
  ckpt.close()


def test_non_finite_state_is_never_written(tmp_path):
  ckpt = checkpointing.RunCheckpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, _state(), {"epoch": 1})
  bad = _state()
  bad["params"]["w"] = bad["params"]["w"].at[0, 0].set(jnp.nan)
  with pytest.raises(checkpointing.CheckpointError, match="NaN"):
    ckpt.save(2, bad, {"epoch": 2})
  assert ckpt.latest_epoch() == 1
  ckpt.close()


def test_torn_write_leaves_previous_checkpoint_usable(tmp_path):
  root = str(tmp_path / "ckpt")
  ckpt = checkpointing.RunCheckpointer(root)
  ckpt.save(1, _state(), {"epoch": 1})
  ckpt.save(2, _state(2.0), {"epoch": 2})
  ckpt.close()
  # Simulate a crash during the write of epoch 3: an unfinished temporary folder, and a
  # final-named folder without its commit marker / metadata.
  shutil.copytree(os.path.join(root, "2"), os.path.join(root, "3.orbax-checkpoint-tmp-123"))
  os.makedirs(os.path.join(root, "4", "state"))
  reopened = checkpointing.RunCheckpointer(root)
  assert reopened.latest_epoch() == 2
  _, host = reopened.restore(_state())
  assert host["epoch"] == 2
  # The resumed run writes epochs 3 and 4 over the debris.
  reopened.save(3, _state(3.0), {"epoch": 3})
  reopened.save(4, _state(4.0), {"epoch": 4})
  assert reopened.latest_epoch() == 4
  state, host = reopened.restore(_state())
  assert host["epoch"] == 4 and float(state["params"]["w"][1, 2]) == 20.0
  with pytest.raises(checkpointing.CheckpointError, match="already exists"):
    reopened.save(4, _state(), {"epoch": 4})
  reopened.close()


def test_all_finite():
  assert checkpointing.all_finite({"a": jnp.ones(2), "i": jnp.arange(3)})
  assert not checkpointing.all_finite({"a": jnp.array([1.0, jnp.inf])})


def truncate_largest_data_file(checkpoint_folder, every: bool = False) -> list:
  """Cuts the largest array data file of a checkpoint folder (``every``: each of them) in half,
  as a torn copy or a full disk would; returns their paths. (Small arrays, such as a tiny
  LoRA state's, are stored inline in the index files under ``<item>/d/``, hence ``every``.)"""
  files = [os.path.join(d, n) for d, _, names in os.walk(checkpoint_folder) for n in names
           if os.path.basename(d) == "d"]
  paths = files if every else [max((f for f in files if "ocdbt.process_" in f),
                                   key=os.path.getsize)]
  for path in paths:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  return paths


def _big_state(scale=1.0):
  """Arrays large enough to get their own data files (small ones are inlined in the index)."""
  return {"w": jnp.arange(2 ** 16, dtype=jnp.float32) * scale, "step": jnp.int32(4)}


def test_unreadable_newest_checkpoint_falls_back_with_one_warning(tmp_path, caplog):
  root = str(tmp_path / "ckpt")
  ckpt = checkpointing.RunCheckpointer(root, keep=3)
  for epoch in (1, 2, 3):
    ckpt.save(epoch, _big_state(epoch), {"epoch": epoch})
  ckpt.close()
  truncate_largest_data_file(os.path.join(root, "3"))
  reopened = checkpointing.RunCheckpointer(root, read_only=True)
  with caplog.at_level("WARNING"):
    state, host = reopened.restore(_big_state())
  assert host["epoch"] == 2 and reopened.restored_epoch == 2 and reopened.unreadable == [3]
  np.testing.assert_array_equal(state["w"], _big_state(2)["w"])
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "epoch 3" in warnings[0] and "using epoch 2" in warnings[0]
  assert "\n" not in warnings[0]
  # An explicit epoch does not fall back: one line naming it.
  with pytest.raises(checkpointing.CheckpointError, match="epoch 3 .* cannot be read") as e:
    reopened.restore(_big_state(), epoch=3)
  assert "\n" not in str(e.value)
  # A resuming run moves it aside (kept) and can write epoch 3 again.
  aside = reopened.move_aside(reopened.unreadable)
  assert os.listdir(aside) == ["3"] and reopened.all_epochs() == [1, 2]
  reopened.save(3, _big_state(3), {"epoch": 3})
  assert reopened.restore(_big_state())[1]["epoch"] == 3
  reopened.close()


def test_no_readable_checkpoint_is_one_line(tmp_path):
  root = str(tmp_path / "ckpt")
  ckpt = checkpointing.RunCheckpointer(root)
  ckpt.save(1, _big_state(), {"epoch": 1})
  ckpt.close()
  truncate_largest_data_file(os.path.join(root, "1"))
  with pytest.raises(checkpointing.CheckpointError, match="can be read") as e:
    checkpointing.RunCheckpointer(root, read_only=True).restore(_big_state())
  assert "\n" not in str(e.value)


def test_asyncio_reports_of_abandoned_reads_are_dropped_and_others_kept():
  """asyncio logs each failed read future of an abandoned restore when it is collected,
  at any later time ("Future exception was never retrieved"); those records are dropped,
  any other asyncio record passes."""
  import asyncio
  import gc
  import logging as std_logging

  checkpointing._filter_abandoned_read_noise()
  seen = []

  class Collect(std_logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  logger = std_logging.getLogger("asyncio")
  handler = Collect()
  logger.addHandler(handler)
  try:
    def never_retrieved(message):
      loop = asyncio.new_event_loop()
      future = loop.create_future()
      future.set_exception(ValueError(message))
      del future
      gc.collect()
      loop.close()

    never_retrieved('OUT_OF_RANGE: Error reading "x" [tensorstore_spec=\'{}\']')
    assert not seen
    never_retrieved("an unrelated failure")
    assert len(seen) == 1 and "never retrieved" in seen[0]
  finally:
    logger.removeHandler(handler)
