"""Reading and writing the standard diffusers/transformers folder formats, without torch.

A model folder holds ``config.json`` and its weights as safetensors: either one file
(``diffusion_pytorch_model.safetensors`` for diffusers, ``model.safetensors`` for
transformers) or shards listed in ``<name>.safetensors.index.json``. Tensors come back as
numpy arrays keyed by their PyTorch parameter names (PyTorch layouts: OIHW convolutions,
``(out, in)`` linear weights); the per-model converters turn them into Flax trees.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS_NAME = "model"


class WeightsError(ValueError):
  """A model folder or its tensors do not match what the loader expects."""


def read_json(path: str) -> dict:
  """Reads a JSON file, naming the file when it is missing or malformed."""
  if not os.path.isfile(path):
    raise WeightsError(f"Missing file {path!r}: expected a JSON config there.")
  try:
    with open(path, "r", encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise WeightsError(f"{path!r} is not valid JSON: {e}") from e


def read_model_config(folder: str) -> dict:
  """Returns the parsed ``config.json`` of a model folder."""
  return read_json(os.path.join(folder, "config.json"))


def _safetensors_files(folder: str, weights_names: Sequence[str]) -> list:
  for name in weights_names:
    single = os.path.join(folder, f"{name}.safetensors")
    if os.path.isfile(single):
      return [single]
    index = os.path.join(folder, f"{name}.safetensors.index.json")
    if os.path.isfile(index):
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index!r} has no 'weight_map' entry listing the shards.")
      shards = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
      for shard in shards:
        if not os.path.isfile(shard):
          raise WeightsError(f"Shard {shard!r} listed in {index!r} is missing.")
      return shards
  expected = ", ".join(f"{n}.safetensors or {n}.safetensors.index.json" for n in weights_names)
  found = sorted(os.listdir(folder)) if os.path.isdir(folder) else "no such folder"
  raise WeightsError(
      f"No safetensors weights in {folder!r}: expected {expected} (found: {found}). "
      "Only safetensors is supported; convert .bin checkpoints with "
      "`safetensors.torch.save_file` first.")


def read_state_dict(
    folder: str,
    weights_names: Sequence[str] = (DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME),
) -> Dict[str, np.ndarray]:
  """Loads every tensor of a model folder (single file or shards) as float32/int numpy.

  Args:
    folder: a model folder (``unet/``, ``vae/``, ``text_encoder/`` or a CLIPModel folder).
    weights_names: file stems to look for, in order of preference.
  Returns:
    ``{pytorch_parameter_name: np.ndarray}``; float16/bfloat16 tensors are upcast to float32.
  """
  from safetensors import safe_open  # local import: keeps module import light

  state = {}
  for path in _safetensors_files(folder, weights_names):
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        array = f.get_tensor(key)
        if array.dtype.name in ("float16", "bfloat16", "float64"):
          array = array.astype(np.float32)
        if key in state:
          raise WeightsError(f"Tensor {key!r} appears in two shards of {folder!r}.")
        state[key] = array
  return state


def write_state_dict(
    state: Mapping[str, np.ndarray],
    folder: str,
    config: Mapping,
    weights_name: str = DIFFUSERS_WEIGHTS_NAME,
) -> str:
  """Writes ``config.json`` and ``<weights_name>.safetensors`` into ``folder``.

  Writes to temporary names first and renames, so an interrupted export never leaves a
  half-written model that looks complete. Returns the weights path.
  """
  from safetensors.numpy import save_file

  os.makedirs(folder, exist_ok=True)
  weights_path = os.path.join(folder, f"{weights_name}.safetensors")
  config_path = os.path.join(folder, "config.json")
  tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state.items()}
  save_file(tensors, weights_path + ".tmp", metadata={"format": "pt"})
  with open(config_path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  os.replace(weights_path + ".tmp", weights_path)
  os.replace(config_path + ".tmp", config_path)
  return weights_path


def resolve_pretrained(path_or_hub_id: str, allow_patterns: Optional[Sequence[str]] = None) -> str:
  """Returns a local folder for a path, or downloads a hub repo id with huggingface_hub.

  A path that exists is returned unchanged. Anything else is treated as a hub id
  (``timbrooks/instruct-pix2pix``) and fetched with ``huggingface_hub.snapshot_download``,
  restricted to safetensors weights and JSON/text files by default. Needs network access.
  """
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  if os.path.exists(path_or_hub_id) or path_or_hub_id.startswith((".", "/")):
    raise WeightsError(f"{path_or_hub_id!r} is not a folder: pass a diffusers/transformers "
                       "model folder or a hub id such as 'timbrooks/instruct-pix2pix'.")
  from huggingface_hub import snapshot_download
  patterns = list(allow_patterns or ["*.json", "*.txt", "*.safetensors"])
  return snapshot_download(repo_id=path_or_hub_id, allow_patterns=patterns)
