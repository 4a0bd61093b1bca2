"""Helpers of the parity tests against PyTorch transformers models on tiny random weights."""

import numpy as np


def randomise(model, seed: int):
  """Seeded random weights: LayerNorm weights ~1 +- 0.2 (their names contain "norm"),
  everything else ~N(0, 0.3^2), so no zero/one initialisation hides a bug. Returns model.eval()."""
  import torch  # pylint: disable=import-outside-toplevel
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if "norm" in name:
        param.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
      else:
        param.copy_(0.3 * noise)
  return model.eval()


def assert_close(actual, reference, what: str) -> None:
  """max |actual - reference| <= 1e-4 * (1 + max |reference|), printing the measured figure."""
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  assert actual.shape == reference.shape, (what, actual.shape, reference.shape)
  diff = float(np.max(np.abs(actual - reference)))
  tolerance = 1e-4 * (1.0 + float(np.max(np.abs(reference))))
  print(f"{what}: max abs diff {diff:.2e} (max |ref| {np.max(np.abs(reference)):.2f})")
  assert diff <= tolerance, f"{what}: max abs diff {diff} > {tolerance}"
