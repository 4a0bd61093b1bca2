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
