"""Means with 95% confidence intervals over examples, and their JSON / markdown forms.

The interval is a percentile bootstrap: ``num_resamples`` resamples of the examples with
replacement (numpy ``default_rng(seed)``, seed 0 by default, so a report is reproducible), the
mean of each, and the 2.5% / 97.5% percentiles of those means. It needs no normality
assumption, which suits bounded and 0/1 metrics (edit accuracy); for a constant metric it is
[mean, mean]. Non-finite values (a metric undefined for an example, e.g. L1 inside an empty
mask) are left out, and ``n`` counts the values used.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

CONFIDENCE = 0.95
NUM_RESAMPLES = 10_000
_CHUNK = 1_000  # resamples drawn at once (bounds memory at _CHUNK * n indices)


def summarise(values, confidence: float = CONFIDENCE, num_resamples: int = NUM_RESAMPLES,
              seed: int = 0) -> Dict[str, float]:
  """Mean and bootstrap confidence interval of per-example values.

  Args:
    values: (N,) numbers (any array-like; flattened); non-finite entries are ignored.
    confidence: central coverage of the interval, in (0, 1).
    num_resamples: bootstrap resamples (>= 1).
    seed: numpy seed of the resampling.
  Returns:
    {"mean", "ci_low", "ci_high"} floats (nan when no finite value) and "n" (int).
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"summarise: confidence={confidence} must be in (0, 1), e.g. 0.95.")
  if num_resamples < 1:
    raise ValueError(f"summarise: num_resamples={num_resamples} must be >= 1.")
  array = np.asarray(values, np.float64).reshape(-1)
  array = array[np.isfinite(array)]
  n = int(array.size)
  if n == 0:
    return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
  rng = np.random.default_rng(seed)
  means = []
  for start in range(0, num_resamples, _CHUNK):
    count = min(_CHUNK, num_resamples - start)
    means.append(array[rng.integers(0, n, (count, n))].mean(axis=1))
  means = np.concatenate(means)
  tail = 100.0 * (1.0 - confidence) / 2.0
  low, high = np.percentile(means, [tail, 100.0 - tail])
  mean = float(array.mean())
  # Percentiles of float sums can miss a constant mean by an ulp; keep low <= mean <= high.
  return {"mean": mean, "ci_low": float(min(low, mean)), "ci_high": float(max(high, mean)),
          "n": n}


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE
                    ) -> Tuple[float, float]:
  """Wilson score interval of a binomial proportion ``successes / n`` (0/1 outcomes).

  Unlike the bootstrap of ``summarise`` it needs only the count and the mean, so it also
  serves logged means (a validation pass's ``val_success`` over its ``val_examples``), and it
  stays inside [0, 1] and has non-zero width at 0 and n successes. (nan, nan) when n is 0.
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"wilson_interval: confidence={confidence} must be in (0, 1), e.g. 0.95.")
  if n <= 0:
    return math.nan, math.nan
  from statistics import NormalDist  # pylint: disable=import-outside-toplevel
  z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
  p = float(successes) / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def _json_number(value: float) -> Optional[float]:
  return None if not math.isfinite(value) else float(value)


def summarise_metrics(per_example: Mapping[str, Sequence[float]], **kwargs
                      ) -> Dict[str, Dict[str, float]]:
  """``summarise`` of each metric: {name: (N,) values} -> {name: summary}; kwargs as there."""
  return {name: summarise(values, **kwargs) for name, values in per_example.items()}


def metrics_report(per_example: Mapping[str, Sequence[float]], row_name: str,
                   keys: Optional[Sequence[str]] = None, digits: int = 4, **kwargs
                   ) -> Tuple[dict, str]:
  """JSON-ready summaries and a markdown table row for one evaluated model.

  Args:
    per_example: {metric name: (N,) per-example values}.
    row_name: first cell of the row (the model / run).
    keys: metrics and column order of the row; all of ``per_example`` (in its order) if None.
    digits: decimals in the row.
    **kwargs: passed to ``summarise`` (confidence, num_resamples, seed).
  Returns:
    (json_dict, row): ``json_dict`` = {"confidence", "interval", metric: {"mean", "ci_low",
    "ci_high", "n"}} with Python floats and None for undefined values; ``row`` =
    ``| row_name | mean [low, high] | ... |``.
  """
  keys = list(per_example) if keys is None else list(keys)
  unknown = [k for k in keys if k not in per_example]
  if unknown:
    raise ValueError(f"metrics_report: no per-example values for {unknown}; have "
                     f"{sorted(per_example)}.")
  summaries = summarise_metrics({k: per_example[k] for k in keys}, **kwargs)
  report = {"confidence": kwargs.get("confidence", CONFIDENCE),
            "interval": "percentile bootstrap over examples"}
  cells = [row_name]
  for key in keys:
    s = summaries[key]
    report[key] = {"mean": _json_number(s["mean"]), "ci_low": _json_number(s["ci_low"]),
                   "ci_high": _json_number(s["ci_high"]), "n": s["n"]}
    cells.append("-" if s["n"] == 0 else
                 f"{s['mean']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]")
  return report, "| " + " | ".join(cells) + " |"


def markdown_header(keys: Sequence[str], first: str = "model") -> str:
  """The two header lines of a table whose rows come from ``metrics_report``."""
  names = [first] + list(keys)
  return "| " + " | ".join(names) + " |\n|" + "|".join("---" for _ in names) + "|"
