"""Per-prompt stat tracker: DDPO's rule by hand, the ring buffer, the state round trip."""

import json

import numpy as np
import pytest

from rl4pix_jax.rl import advantages

EPS = advantages.STD_EPSILON


def test_batch_statistics_until_min_count_then_own_buffer():
  tracker = advantages.PerPromptStatTracker(buffer_size=3, min_count=2)
  # Update 1: every key has < 2 values -> batch statistics over all four rewards.
  got = tracker.update(["a", "b", "b", "c"], [1.0, 2.0, 4.0, 9.0])
  # b has two values now (>= min_count): its own buffer [2, 4] -> mean 3, std 1.
  batch = np.array([1.0, 2.0, 4.0, 9.0])
  mean, std = 4.0, np.sqrt(((batch - 4.0)**2).mean())  # 3.0822...
  want = [(1 - mean) / (std + EPS), (2 - 3) / (1 + EPS), (4 - 3) / (1 + EPS),
          (9 - mean) / (std + EPS)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got.dtype == np.float32

  # Update 2: a reaches [1, 3] -> mean 2, std 1; b's ring drops 2: [4, 6, 8] -> mean 6,
  # std sqrt(8/3); c gets [9] + nothing (absent).
  got = tracker.update(["a", "b", "b"], [3.0, 6.0, 8.0])
  std_b = np.sqrt(8.0 / 3.0)
  want = [(3 - 2) / (1 + EPS), (6 - 6) / (std_b + EPS), (8 - 6) / (std_b + EPS)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(tracker.buffer("b"), [4.0, 6.0, 8.0])
  np.testing.assert_array_equal(tracker.buffer("a"), [1.0, 3.0])
  np.testing.assert_array_equal(tracker.buffer("c"), [9.0])
  assert len(tracker) == 3


def test_ring_buffer_keeps_the_newest_values():
  tracker = advantages.PerPromptStatTracker(buffer_size=4, min_count=1)
  for value in range(7):
    tracker.update(["k"], [float(value)])
  np.testing.assert_array_equal(tracker.buffer("k"), [3.0, 4.0, 5.0, 6.0])
  # min_count 1: the key's own buffer right away; mean 5.5, std of [4, 5, 6, 7] = sqrt(1.25).
  got = tracker.update(["k"], [7.0])
  np.testing.assert_allclose(got, [(7 - 5.5) / (np.sqrt(1.25) + EPS)], rtol=1e-6)


def test_state_dict_json_round_trip_continues_identically():
  rng = np.random.default_rng(0)
  tracker = advantages.PerPromptStatTracker(buffer_size=5, min_count=3)
  keys = [f"instr {i % 3}|{i % 2}" for i in range(8)]
  for _ in range(4):
    tracker.update(keys, rng.standard_normal(8))
  restored = advantages.PerPromptStatTracker.from_state_dict(
      json.loads(json.dumps(tracker.state_dict())))
  assert restored.state_dict() == tracker.state_dict()
  rewards = rng.standard_normal(8)
  np.testing.assert_array_equal(restored.update(keys, rewards), tracker.update(keys, rewards))


def test_nonfinite_rewards_give_nan_and_do_not_poison_buffers():
  tracker = advantages.PerPromptStatTracker(buffer_size=4, min_count=2)
  got = tracker.update(["a", "a", "b"], [1.0, np.nan, 3.0])
  assert np.isnan(got[1])
  mean, std = 2.0, 1.0  # batch statistics of the finite rewards [1, 3]
  np.testing.assert_allclose(got[[0, 2]], [(1 - mean) / (std + EPS), (3 - mean) / (std + EPS)],
                             rtol=1e-6)
  np.testing.assert_array_equal(tracker.buffer("a"), [1.0])


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="min_count"):
    advantages.PerPromptStatTracker(buffer_size=2, min_count=3)
  tracker = advantages.PerPromptStatTracker(buffer_size=2, min_count=1)
  with pytest.raises(ValueError, match="one reward per key"):
    tracker.update(["a", "b"], [1.0])
  with pytest.raises(ValueError, match="lacks"):
    advantages.PerPromptStatTracker.from_state_dict({"buffer_size": 2})


def test_group_advantages_by_hand():
  """Group a: rewards 1, 3 (mean 2, std 1) -> -1, +1; group b: 5, 5 (no spread) -> 0;
  "global" divides by the std of all four rewards (sqrt(2.75))."""
  keys = ["a", "b", "a", "b"]
  rewards = [1.0, 5.0, 3.0, 5.0]
  got = advantages.group_advantages(keys, rewards, "group")
  np.testing.assert_allclose(got, [-1.0, 0.0, 1.0, 0.0], rtol=1e-5)
  got = advantages.group_advantages(keys, rewards, "global")
  np.testing.assert_allclose(got, np.asarray([-1.0, 0.0, 1.0, 0.0]) / np.sqrt(2.75),
                             rtol=1e-5)


def test_group_advantages_skip_zero_spread_and_nonfinite():
  """A group of one is zeroed with skip_zero_spread (and normalised to 0 without it); a
  NaN reward gets NaN and stays out of its group's statistics."""
  keys = ["a", "a", "a", "c"]
  rewards = [1.0, 3.0, np.nan, 7.0]
  got = advantages.group_advantages(keys, rewards, "global", skip_zero_spread=True)
  finite_std = np.std([1.0, 3.0, 7.0])
  np.testing.assert_allclose(got[:2], np.asarray([-1.0, 1.0]) / finite_std, rtol=1e-5)
  assert np.isnan(got[2]) and got[3] == 0.0
  with pytest.raises(ValueError, match="std="):
    advantages.group_advantages(keys, rewards, "batch")
  with pytest.raises(ValueError, match="one reward per key"):
    advantages.group_advantages(keys, rewards[:3])
