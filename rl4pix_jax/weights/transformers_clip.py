"""transformers CLIP folders (safetensors) -> Flax param trees of ``rl4pix_jax.models.clip``.

Reads, without torch:
  * a diffusers ``text_encoder/`` folder (``CLIPTextModel``; keys with or without the legacy
    ``text_model.`` prefix) or ``CLIPTextModelWithProjection``;
  * ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` folders;
  * a whole ``CLIPModel`` folder (text tower + ``text_projection``, vision tower +
    ``visual_projection``; ``logit_scale`` is not used).

Every tensor is checked against the Flax template (``jax.eval_shape`` of ``init``): a missing,
unexpected or mis-shaped tensor raises ``WeightsError`` naming the parameter and the folder.
Params come back as host numpy float32 arrays (``jax.device_put`` them, with a sharding if
wanted); apply with ``model.apply({"params": params}, ...)``.

Name mapping: Flax ``encoder/layers_3/self_attn/q_proj/kernel`` <-> torch
``encoder.layers.3.self_attn.q_proj.weight`` (transposed); LayerNorm ``scale`` <-> ``weight``;
``Embed.embedding`` <-> ``weight``; the patch conv kernel HWIO <-> OIHW.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rl4pix_jax.models.clip import (CLIPConfigError, CLIPTextConfig, CLIPTextModel,
                                    CLIPVisionConfig, CLIPVisionModel)
from rl4pix_jax.weights.folders import (TRANSFORMERS_WEIGHTS_NAME, WeightsError,
                                        read_model_config, read_state_dict, resolve_pretrained)

TEXT_PREFIX = "text_model."
VISION_PREFIX = "vision_model."
_PROJECTIONS = ("text_projection", "visual_projection")
_IGNORED = re.compile(r"(^|\.)position_ids$|^logit_scale$")


class LoadedCLIP(NamedTuple):
  """Both towers of a CLIPModel folder."""
  text_config: CLIPTextConfig
  text_params: dict
  vision_config: CLIPVisionConfig
  vision_params: dict


def _model_folder(folder: str, subfolder: str) -> str:
  """The folder itself, or ``folder/subfolder`` for a diffusers pipeline root."""
  if not os.path.isfile(os.path.join(folder, "config.json")):
    candidate = os.path.join(folder, subfolder)
    if os.path.isfile(os.path.join(candidate, "config.json")):
      return candidate
  return folder


def _torch_name(flax_path: Tuple[str, ...], prefix: str) -> str:
  """Flax param path -> torch state-dict name (projections live outside the tower prefix)."""
  parts = []
  for part in flax_path[:-1]:
    match = re.fullmatch(r"layers_(\d+)", part)
    parts.append(f"layers.{match.group(1)}" if match else part)
  leaf = flax_path[-1]
  parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
  name = ".".join(parts)
  return name if flax_path[0] in _PROJECTIONS else prefix + name


def _to_flax_layout(flax_path: Tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if flax_path[-1] == "kernel" and array.ndim == 2:  # Linear (out, in) -> Dense (in, out)
    return array.T
  if flax_path[-1] == "kernel" and array.ndim == 4:  # Conv OIHW -> HWIO
    return array.transpose(2, 3, 1, 0)
  return array


def to_torch_layout(flax_path: Tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if flax_path[-1] == "kernel" and array.ndim == 2:
    return array.T
  if flax_path[-1] == "kernel" and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array


def _param_shapes(model, *example_inputs) -> Dict[Tuple[str, ...], tuple]:
  variables = jax.eval_shape(model.init, jax.random.key(0), *example_inputs)
  flat = traverse_util.flatten_dict(variables["params"])
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def text_param_shapes(config: CLIPTextConfig) -> Dict[Tuple[str, ...], tuple]:
  """Flax param path -> shape for a text tower (no computation, via ``jax.eval_shape``)."""
  ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
  return _param_shapes(CLIPTextModel(config), ids)


def vision_param_shapes(config: CLIPVisionConfig) -> Dict[Tuple[str, ...], tuple]:
  """Flax param path -> shape for a vision tower."""
  pixels = jax.ShapeDtypeStruct(
      (1, config.image_size, config.image_size, config.num_channels), jnp.float32)
  return _param_shapes(CLIPVisionModel(config), pixels)


def gather_params(state: Mapping[str, np.ndarray], shapes: Mapping[Tuple[str, ...], tuple],
                  name_of: Callable[[Tuple[str, ...]], str], folder: str,
                  ignore: Callable[[str], bool],
                  fill: Optional[Callable[[Tuple[str, ...], tuple], Optional[np.ndarray]]] = None,
                  hint: str = "", model: str = "this model") -> dict:
  """The Flax param tree for ``shapes`` from a transformers state dict, every tensor checked.

  Args:
    state: torch name -> array (torch layouts).
    shapes: Flax param path -> expected Flax shape.
    name_of: Flax path -> torch name.
    folder: named in errors.
    ignore: torch names that may be in ``state`` without being used (e.g. position_ids).
    fill: for a path whose tensor is absent, an array to use instead (or None: missing).
    hint: appended to the missing-tensor error.
    model: what the unexpected-tensor error says the tensors do not fit.
  Raises:
    WeightsError: a tensor is missing, has the wrong shape, or is unexpected.
  """
  flat, used, missing = {}, set(), []
  for path, expected in shapes.items():
    name = name_of(path)
    if name not in state:
      filled = fill(path, expected) if fill is not None else None
      if filled is None:
        missing.append(name)
      else:
        flat[path] = filled
      continue
    array = _to_flax_layout(path, np.asarray(state[name], np.float32))
    if tuple(array.shape) != expected:
      torch_expected = to_torch_layout(path, np.zeros(expected, np.int8)).shape
      raise WeightsError(f"Tensor {name!r} in {folder!r} has shape {tuple(state[name].shape)}, "
                         f"expected {tuple(torch_expected)} from config.json.")
    flat[path] = array
    used.add(name)
  if missing:
    raise WeightsError(f"{folder!r} lacks {len(missing)} tensor(s) the config needs, e.g. "
                       f"{missing[:5]}{hint}.")
  unexpected = sorted(k for k in state if k not in used and not ignore(k))
  if unexpected:
    raise WeightsError(f"{folder!r} has {len(unexpected)} unexpected tensor(s) for {model}, "
                       f"e.g. {unexpected[:5]}.")
  return traverse_util.unflatten_dict(flat)


def _tower_prefix(state: Mapping[str, np.ndarray], prefix: str) -> str:
  return prefix if any(k.startswith(prefix) for k in state) else ""


def _configs(folder: str, config: dict, state, want: str):
  try:
    if want == "text":
      projection = None
      if "text_projection.weight" in state:
        projection = config.get("projection_dim")
      return CLIPTextConfig.from_transformers(config, projection)
    projection = None
    if "visual_projection.weight" in state:
      projection = config.get("projection_dim")
    return CLIPVisionConfig.from_transformers(config, projection)
  except CLIPConfigError as e:
    raise WeightsError(f"{folder!r}/config.json: {e}") from e


def _load_tower(folder: str, want: str, config=None, state=None):
  if config is None:
    config = read_model_config(folder)
  if state is None:
    state = read_state_dict(folder, (TRANSFORMERS_WEIGHTS_NAME,))
  is_clip_model = config.get("model_type") == "clip"
  tower_config = _configs(folder, config, state, want)
  if want == "text":
    prefix = _tower_prefix(state, TEXT_PREFIX)
    shapes = text_param_shapes(tower_config)
    other = (VISION_PREFIX, "visual_projection.") if is_clip_model else ()
  else:
    prefix = _tower_prefix(state, VISION_PREFIX)
    shapes = vision_param_shapes(tower_config)
    other = (TEXT_PREFIX, "text_projection.") if is_clip_model else ()
  params = gather_params(state, shapes, lambda path: _torch_name(path, prefix), folder,
                         ignore=lambda name: bool(_IGNORED.search(name)) or name.startswith(other))
  return tower_config, params


def load_clip_text(folder: str) -> Tuple[CLIPTextConfig, dict]:
  """Loads a CLIP text tower.

  Args:
    folder: a diffusers ``text_encoder/`` folder (or the pipeline root holding it), a
      ``CLIPTextModelWithProjection`` folder, or a ``CLIPModel`` folder (text tower +
      ``text_projection``).
  Returns:
    (config, params): ``config.projection_dim`` is set iff the folder has a text projection.
  Raises:
    WeightsError: missing/unexpected/mis-shaped tensors or an unsupported config.
  """
  return _load_tower(_model_folder(folder, "text_encoder"), "text")


def load_clip_vision(folder: str) -> Tuple[CLIPVisionConfig, dict]:
  """Loads a CLIP vision tower from a CLIPVisionModel(WithProjection) or CLIPModel folder.

  Returns:
    (config, params): ``config.projection_dim`` is set iff the folder has a visual projection.
  """
  return _load_tower(folder, "vision")


def load_clip(folder: str) -> LoadedCLIP:
  """Loads both towers (with projections) of a transformers ``CLIPModel`` folder."""
  config = read_model_config(folder)
  if config.get("model_type") != "clip":
    raise WeightsError(f"{folder!r}/config.json has model_type={config.get('model_type')!r}: "
                       "load_clip expects a CLIPModel folder (model_type 'clip'); use "
                       "load_clip_text / load_clip_vision for a single tower.")
  state = read_state_dict(folder, (TRANSFORMERS_WEIGHTS_NAME,))
  text_config, text_params = _load_tower(folder, "text", config, state)
  vision_config, vision_params = _load_tower(folder, "vision", config, state)
  return LoadedCLIP(text_config, text_params, vision_config, vision_params)


def load_clip_models(source: str) -> Tuple[CLIPTextModel, CLIPVisionModel, dict]:
  """The CLIP towers (with projections) of a transformers CLIPModel folder or hub id.

  Returns:
    (text model, vision model, {"text": text params, "vision": vision params}).
  """
  loaded = load_clip(resolve_pretrained(source))
  return (CLIPTextModel(loaded.text_config), CLIPVisionModel(loaded.vision_config),
          {"text": loaded.text_params, "vision": loaded.vision_params})


def clip_text_state_dict_from_params(params: Mapping, prefix: str = TEXT_PREFIX
                                     ) -> Dict[str, np.ndarray]:
  """Flax text-tower params -> transformers state dict (inverse of ``load_clip_text``).

  Args:
    params: a text-tower param tree (``CLIPTextModel``).
    prefix: ``"text_model."`` (the layout of SD checkpoints, CLIPTextModelWithProjection and
      CLIPModel) or ``""`` (transformers 5.x ``CLIPTextModel.save_pretrained``).
  Returns:
    {torch_name: float32 numpy array in PyTorch layout}.
  """
  flat = traverse_util.flatten_dict(dict(params))
  return {_torch_name(path, prefix): np.ascontiguousarray(
      to_torch_layout(path, np.asarray(value, np.float32))) for path, value in flat.items()}
