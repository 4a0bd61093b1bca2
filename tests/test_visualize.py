"""Pictures: overlay arithmetic, grid layout and curve rendering."""

import numpy as np
import pytest

from rl4pix_jax import visualize


def test_heatmap_colours_endpoints():
  np.testing.assert_array_equal(visualize.heatmap_colours(np.array([0.0])), [[20, 20, 120]])
  np.testing.assert_array_equal(visualize.heatmap_colours(np.array([1.0])), [[255, 240, 80]])
  np.testing.assert_array_equal(visualize.heatmap_colours(np.array([0.5])), [[220, 40, 30]])


def test_attention_overlay_blends_where_attention_is():
  image = np.full((8, 8, 3), 100, np.uint8)
  attention = np.zeros((2, 2), np.float32)
  attention[0, 0] = 1.0
  out = visualize.attention_overlay(image, attention, alpha=1.0)
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8
  # Top-left corner gets the hottest colour, bottom-right the coldest.
  np.testing.assert_array_equal(out[0, 0], [255, 240, 80])
  np.testing.assert_array_equal(out[-1, -1], [20, 20, 120])
  half = visualize.attention_overlay(image, attention, alpha=0.5)
  np.testing.assert_array_equal(half[-1, -1], np.round(0.5 * 100 + 0.5 * np.array([20, 20, 120])))
  with pytest.raises(ValueError, match="expected"):
    visualize.attention_overlay(image, np.zeros((2, 2, 2)))


def test_captioned_grid_size_and_errors():
  panel = np.zeros((16, 16, 3), np.uint8)
  grid = visualize.captioned_grid([[panel] * 3, [panel] * 3], ["a", "b"],
                                  column_titles=["x", "y", "z"], cell=32, title="t")
  assert grid.size == (3 * (32 + visualize.GAP) + visualize.GAP,
                       36 + 2 * (32 + 20 + visualize.GAP) + visualize.GAP)
  with pytest.raises(ValueError, match="captions"):
    visualize.captioned_grid([[panel]], ["a", "b"])


def test_metric_curves_draws_each_series():
  image = visualize.metric_curves({"reward": [0.0, 1.0, 2.0], "kl": [1.0, float("nan"), 0.5]},
                                  title="curves")
  pixels = np.asarray(image)
  for colour in visualize.CURVE_COLOURS[:2]:
    assert (pixels.reshape(-1, 3) == colour).all(-1).any()
  with pytest.raises(ValueError, match="lengths"):
    visualize.metric_curves({"a": [1.0], "b": [1.0, 2.0]})


def test_metric_curves_with_own_steps_per_series_and_intervals():
  image = visualize.metric_curves({"a": [0.2, 0.4], "b": [0.1, 0.3, 0.5]},
                                  steps={"a": [0, 16], "b": [0, 8, 32]},
                                  intervals={"a": [(0.1, 0.3), (0.3, 0.5)]})
  pixels = np.asarray(image).reshape(-1, 3)
  for colour in visualize.CURVE_COLOURS[:2]:
    assert (pixels == colour).all(-1).any()
  with pytest.raises(ValueError, match="3 values but 2 steps"):
    visualize.metric_curves({"b": [0.1, 0.3, 0.5]}, steps={"b": [0, 8]})


def _validated_run(folder, successes, examples=64, samples_per_epoch=16):
  folder.mkdir()
  lines = [{"epoch": -1 + i * 5, "val_success": s, "val_examples": examples,
            "val_samples_seen": i * 5 * samples_per_epoch} for i, s in enumerate(successes)]
  lines.insert(1, {"epoch": 0, "reward_mean": 0.1})  # a training line: not a point
  (folder / "metrics.jsonl").write_text("".join(__import__("json").dumps(l) + "\n"
                                                for l in lines))
  return str(folder)


def test_plot_runs_writes_one_figure_of_several_runs(tmp_path):
  from launch import plot_runs  # pylint: disable=import-outside-toplevel
  a = _validated_run(tmp_path / "a", [0.5, 0.625, 0.75])
  b = _validated_run(tmp_path / "b", [0.5, 0.4375], samples_per_epoch=64)
  points = plot_runs.validation_points(a, "val_success")
  assert [p["samples_seen"] for p in points] == [0, 80, 160] and points[1]["n"] == 64
  output = tmp_path / "figs" / "val.png"
  assert plot_runs.plot_runs([a, b], ["x", "y"], "val_success", str(output)) == str(output)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  pixels = np.asarray(Image.open(output).convert("RGB")).reshape(-1, 3)
  for colour in visualize.CURVE_COLOURS[:2]:  # one curve per run
    assert (pixels == colour).all(-1).any()
  with pytest.raises(ValueError, match="one label per run"):
    plot_runs.plot_runs([a, b], ["x"], "val_success", str(output))
  with pytest.raises(ValueError, match="--metric=val_clip_t"):
    plot_runs.plot_runs([a], None, "val_clip_t", str(output))


def test_metric_curves_legend_wraps_instead_of_running_off_the_image():
  names = [f"a long run label number {k}" for k in range(5)]
  image = visualize.metric_curves({n: [0.1 * k, 0.2] for k, n in enumerate(names)},
                                  size=(400, 240))
  legend = np.asarray(image)[-80:]  # the legend rows under the x axis labels
  for colour in visualize.CURVE_COLOURS[:5]:  # every label is drawn on the image
    assert np.all(legend == np.asarray(colour, np.uint8), axis=-1).any(), colour
