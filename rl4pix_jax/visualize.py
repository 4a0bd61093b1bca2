"""Pictures of runs: attention overlays, captioned sample grids and metric curves (PIL only)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 6
CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _font(size: int = 12):
  return ImageFont.load_default(size=size)


def heatmap_colours(values: np.ndarray) -> np.ndarray:
  """Maps values in [0, 1] (any shape) to RGB uint8 (..., 3): dark blue -> red -> yellow."""
  v = np.clip(values, 0.0, 1.0)[..., None]
  low, mid, high = np.array([20, 20, 120]), np.array([220, 40, 30]), np.array([255, 240, 80])
  rgb = np.where(v < 0.5, low + (mid - low) * (v / 0.5), mid + (high - mid) * ((v - 0.5) / 0.5))
  return rgb.astype(np.uint8)


def attention_overlay(image: np.ndarray, attention: np.ndarray, alpha: float = 0.55
                      ) -> np.ndarray:
  """Blends an attention map over an image.

  Args:
    image: (H, W, 3) uint8.
    attention: (r, r) float, non-negative; resized bilinearly to (H, W) and scaled to
      [0, 1] by its maximum.
    alpha: opacity of the heat map.
  Returns:
    (H, W, 3) uint8.
  """
  attention = np.asarray(attention, np.float32)
  if attention.ndim != 2:
    raise ValueError(f"attention has shape {attention.shape}; expected (r, r).")
  height, width = image.shape[:2]
  scaled = attention / max(float(attention.max()), 1e-12)
  resized = np.asarray(Image.fromarray(scaled).resize((width, height), Image.BILINEAR))
  heat = heatmap_colours(resized).astype(np.float32)
  out = (1 - alpha) * image.astype(np.float32) + alpha * heat
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def captioned_grid(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[str],
                   column_titles: Sequence[str] = (), cell: int = 128,
                   title: str = "") -> Image.Image:
  """Rows of equal-length image panels, each row with a caption underneath.

  Args:
    rows: per row, the panels (H, W, 3) uint8 (resized to ``cell`` x ``cell``, nearest).
    captions: one text per row (e.g. the instruction).
    column_titles: optional header per column.
    cell: panel side in pixels.
    title: optional line at the top.
  Returns:
    An RGB PIL image.
  """
  if not rows:
    raise ValueError("captioned_grid needs at least one row.")
  if len(captions) != len(rows):
    raise ValueError(f"Got {len(captions)} captions for {len(rows)} rows.")
  columns = max(len(r) for r in rows)
  font = _font()
  header = (18 if title else 0) + (18 if column_titles else 0)
  row_height = cell + 20
  width = columns * (cell + GAP) + GAP
  height = header + len(rows) * (row_height + GAP) + GAP
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  top = 2
  if title:
    draw.text((GAP, top), title, fill=(0, 0, 0), font=font)
    top += 18
  for c, name in enumerate(column_titles):
    draw.text((GAP + c * (cell + GAP), top), name, fill=(60, 60, 60), font=font)
  top = header + GAP
  for r, (panels, caption) in enumerate(zip(rows, captions)):
    y = top + r * (row_height + GAP)
    for c, panel in enumerate(panels):
      tile = Image.fromarray(np.asarray(panel, np.uint8)).resize((cell, cell), Image.NEAREST)
      canvas.paste(tile, (GAP + c * (cell + GAP), y))
    draw.text((GAP, y + cell + 3), caption[:int(width / 6.5)], fill=(0, 0, 0), font=font)
  return canvas


def metric_curves(series: Dict[str, Sequence[float]],
                  steps: Optional[Union[Sequence[float], Dict[str, Sequence[float]]]] = None,
                  title: str = "", size=(640, 360),
                  intervals: Optional[Dict[str, Sequence[Tuple[float, float]]]] = None,
                  x_label: str = "") -> Image.Image:
  """A line plot of one or more metric series against epochs (own axes, PIL only).

  Args:
    series: name -> values (non-finite values are skipped); equal lengths unless ``steps``
      gives each series its own x values.
    steps: x values shared by every series (default 0..n-1), or name -> x values per series
      (runs with different samples per epoch on one axis).
    title: text at the top.
    intervals: optional name -> per point (low, high), drawn as a vertical bar at each point.
    x_label: optional text under the x axis.
  Returns:
    An RGB PIL image with axes, min/max labels and a legend.
  """
  if not series:
    raise ValueError("metric_curves needs at least one series.")
  if isinstance(steps, dict):
    missing = [name for name in series if name not in steps]
    if missing:
      raise ValueError(f"metric_curves: no x values for {missing}.")
    xs_of = {name: np.asarray(steps[name], np.float64) for name in series}
    for name, row in series.items():
      if len(row) != len(xs_of[name]):
        raise ValueError(f"Series {name!r} has {len(row)} values but {len(xs_of[name])} steps.")
  else:
    lengths = {len(v) for v in series.values()}
    if len(lengths) != 1:
      raise ValueError(f"Series have different lengths {sorted(lengths)}.")
    n = lengths.pop()
    shared = np.arange(n, dtype=np.float64) if steps is None else np.asarray(steps, np.float64)
    xs_of = {name: shared for name in series}
  intervals = intervals or {}
  rows = {name: np.asarray(v, np.float64) for name, v in series.items()}
  finite = np.concatenate([r[np.isfinite(r)] for r in rows.values()] + [
      np.asarray(b, np.float64).reshape(-1) for b in intervals.values() if len(b)])
  finite = finite[np.isfinite(finite)]
  lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  if hi - lo < 1e-12:
    lo, hi = lo - 0.5, hi + 0.5
  width, height = size
  left, right, top = 70, 20, 30
  canvas = Image.new("RGB", size, (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = _font()
  # Legend rows under the x axis: entries flow left to right and wrap before the right edge;
  # the plot area shrinks by one text line per extra row.
  legend_rows, row = [], []
  x = left + 10
  for name in rows:
    extent = draw.textlength(name, font=font)
    if row and x + extent > width - right:
      legend_rows.append(row)
      row, x = [], left + 10
    row.append((name, x))
    x += extent + 24
  legend_rows.append(row)
  bottom = 36 + 14 * len(legend_rows)
  colour_of = {name: CURVE_COLOURS[k % len(CURVE_COLOURS)] for k, name in enumerate(rows)}
  for r, entries in enumerate(legend_rows):
    for name, x in entries:
      draw.text((x, height - bottom + 20 + 14 * r), name, fill=colour_of[name], font=font)
  draw.text((left, 8), title, fill=(0, 0, 0), font=font)
  draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
  all_xs = np.concatenate([x for x in xs_of.values()]) if xs_of else np.zeros(0)
  x_lo = float(all_xs.min()) if all_xs.size else 0.0
  x_hi = float(all_xs.max()) if all_xs.size and all_xs.max() > x_lo else x_lo + 1.0
  x_first, x_last = x_lo, x_hi  # the labelled x values
  if intervals:  # keep the bars off the frame
    pad_x, pad_y = 0.03 * (x_hi - x_lo), 0.05 * (hi - lo)
    x_lo, x_hi, lo, hi = x_lo - pad_x, x_hi + pad_x, lo - pad_y, hi + pad_y
  def point(x, y):
    px = left + (x - x_lo) / max(x_hi - x_lo, 1e-12) * (width - left - right)
    py = height - bottom - (y - lo) / (hi - lo) * (height - top - bottom)
    return px, py
  for k, (name, row) in enumerate(rows.items()):
    colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
    xs = xs_of[name]
    for x, (low, high) in zip(xs, intervals.get(name, ())):
      if np.isfinite(low) and np.isfinite(high):
        (bx, by_low), (_, by_high) = point(x, low), point(x, high)
        draw.line([(bx, by_low), (bx, by_high)], fill=colour, width=1)
        draw.line([(bx - 3, by_low), (bx + 3, by_low)], fill=colour, width=1)
        draw.line([(bx - 3, by_high), (bx + 3, by_high)], fill=colour, width=1)
    pts = [point(x, y) for x, y in zip(xs, row) if np.isfinite(y)]
    if len(pts) > 1:
      draw.line(pts, fill=colour, width=2)
    for px, py in pts:
      draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
  if x_label:
    draw.text(((width - 6 * len(x_label)) // 2, height - bottom + 4), x_label,
              fill=(60, 60, 60), font=font)
  draw.text((4, top - 6), f"{hi:.4g}", fill=(0, 0, 0), font=font)
  draw.text((4, height - bottom - 8), f"{lo:.4g}", fill=(0, 0, 0), font=font)
  draw.text((point(x_first, lo)[0], height - bottom + 4), f"{x_first:g}", fill=(0, 0, 0),
            font=font)
  draw.text((min(point(x_last, lo)[0], width - right - 30), height - bottom + 4), f"{x_last:g}",
            fill=(0, 0, 0), font=font)
  return canvas


def sample_grid(sources: np.ndarray, edits: np.ndarray, maps: np.ndarray,
                instructions: List[str], epoch: int, limit: int = 8) -> Image.Image:
  """PNG grid: source | edit | attention overlay on the edit, with the instruction."""
  rows, captions = [], []
  for i in range(min(limit, len(sources))):
    source = np.round(sources[i] * 255).astype(np.uint8)
    edit = np.round(edits[i] * 255).astype(np.uint8)
    rows.append([source, edit, attention_overlay(edit, maps[i])])
    captions.append(instructions[i])
  return captioned_grid(rows, captions, ["source", "edit", "target-token attention"],
                        title=f"epoch {epoch}")
