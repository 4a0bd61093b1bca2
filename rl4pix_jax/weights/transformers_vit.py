"""transformers ViTModel folders (safetensors; e.g. facebook/dino-vits16) -> ``models.vit``.

Reads, without torch, a folder with ``config.json`` (model_type ``vit``) and ``model.safetensors``
(or shards). Two tensor namings are accepted:

* the stored naming of hub checkpoints and of transformers' ``save_pretrained`` (also 5.x):
  ``encoder.layer.3.attention.attention.query.weight``, ``...attention.output.dense``,
  ``...intermediate.dense``, ``...output.dense``, ``...layernorm_before``/``layernorm_after``;
* transformers 5.x module naming: ``layers.3.attention.q_proj``, ``...attention.o_proj``,
  ``...mlp.fc1``/``fc2``.

Keys may carry a ``vit.`` prefix (task-head checkpoints; tensors outside it are ignored);
``pooler.*`` is ignored (DINO has no pooler; the CLS embedding is the output). Every tensor is
checked against the Flax template: a missing, unexpected or mis-shaped tensor raises
``WeightsError`` naming the tensor, the folder and the shapes.

Name mapping: Flax ``encoder/layers_3/self_attn/q_proj/kernel`` <-> ``encoder.layer.3.attention.
attention.query.weight`` (transposed); ``layer_norm1``/``layer_norm2`` <-> ``layernorm_before``/
``layernorm_after``; ``mlp/fc1``/``fc2`` <-> ``intermediate.dense``/``output.dense``;
``embeddings/patch_embedding`` <-> ``embeddings.patch_embeddings.projection`` (HWIO <-> OIHW);
``embeddings/cls_token``, ``embeddings/position_embeddings``, ``layernorm`` keep their names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rl4pix_jax.models.clip import CLIPConfigError
from rl4pix_jax.models.vit import ViTConfig, ViTModel
from rl4pix_jax.weights.folders import (TRANSFORMERS_WEIGHTS_NAME, WeightsError,
                                        read_model_config, read_state_dict)
from rl4pix_jax.weights.transformers_clip import to_torch_layout, gather_params

HEAD_PREFIX = "vit."
_STORED_BLOCK_NAMES = {
    "layer_norm1": "layernorm_before",
    "layer_norm2": "layernorm_after",
    "self_attn/q_proj": "attention.attention.query",
    "self_attn/k_proj": "attention.attention.key",
    "self_attn/v_proj": "attention.attention.value",
    "self_attn/out_proj": "attention.output.dense",
    "mlp/fc1": "intermediate.dense",
    "mlp/fc2": "output.dense",
}
_MODULE_BLOCK_NAMES = {
    "layer_norm1": "layernorm_before",
    "layer_norm2": "layernorm_after",
    "self_attn/q_proj": "attention.q_proj",
    "self_attn/k_proj": "attention.k_proj",
    "self_attn/v_proj": "attention.v_proj",
    "self_attn/out_proj": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_NAMINGS = {"stored": ("encoder.layer.", _STORED_BLOCK_NAMES),
            "module": ("layers.", _MODULE_BLOCK_NAMES)}
_QKV_BIAS = re.compile(r"self_attn/[qkv]_proj/bias$")
_IGNORED = re.compile(r"^pooler\.|(^|\.)position_ids$")


def torch_name(flax_path: Tuple[str, ...], naming: str = "stored") -> str:
  """Flax param path of ``ViTModel`` -> transformers tensor name.

  Args:
    flax_path: e.g. ``("encoder", "layers_0", "self_attn", "q_proj", "kernel")``.
    naming: ``"stored"`` (checkpoint files) or ``"module"`` (transformers 5.x modules).
  """
  leaf = {"kernel": "weight", "scale": "weight"}.get(flax_path[-1], flax_path[-1])
  if flax_path[0] == "embeddings":
    if flax_path[1] == "patch_embedding":
      return f"embeddings.patch_embeddings.projection.{leaf}"
    return f"embeddings.{flax_path[1]}"
  if flax_path[0] == "layernorm":
    return f"layernorm.{leaf}"
  layer_prefix, block_names = _NAMINGS[naming]
  index = int(re.fullmatch(r"layers_(\d+)", flax_path[1]).group(1))
  return f"{layer_prefix}{index}.{block_names['/'.join(flax_path[2:-1])]}.{leaf}"


def vit_param_shapes(config: ViTConfig) -> Dict[Tuple[str, ...], tuple]:
  """Flax param path -> shape for a ``ViTModel`` (no computation, via ``jax.eval_shape``)."""
  pixels = jax.ShapeDtypeStruct(
      (1, config.image_size, config.image_size, config.num_channels), jnp.float32)
  variables = jax.eval_shape(ViTModel(config).init, jax.random.key(0), pixels)
  return {path: tuple(leaf.shape)
          for path, leaf in traverse_util.flatten_dict(variables["params"]).items()}


def _strip_head_prefix(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Keys under ``vit.`` without the prefix when present (heads dropped), else ``state``."""
  if any(k.startswith(HEAD_PREFIX) for k in state):
    return {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
  return dict(state)


def _detect_naming(state: Mapping[str, np.ndarray]) -> str:
  return "module" if any(k.startswith("layers.") for k in state) else "stored"


def _convert(state: Mapping[str, np.ndarray], config: ViTConfig, folder: str) -> dict:
  naming = _detect_naming(state)

  def zero_qkv_bias(path, expected):  # qkv_bias=false: no bias = zero bias
    if not config.qkv_bias and _QKV_BIAS.search("/".join(path)):
      return np.zeros(expected, np.float32)
    return None

  return gather_params(state, vit_param_shapes(config), lambda path: torch_name(path, naming),
                       folder, ignore=lambda name: bool(_IGNORED.search(name)),
                       fill=zero_qkv_bias, hint=" (is it a transformers ViTModel folder?)",
                       model="a ViTModel with this config.json")


def load_vit(folder: str, layer_norm_eps: Optional[float] = None) -> Tuple[ViTConfig, dict]:
  """Loads a transformers ``ViTModel`` folder (e.g. a download of ``facebook/dino-vits16``).

  Args:
    folder: holds ``config.json`` and ``model.safetensors`` (or an index + shards). Convert a
      ``pytorch_model.bin``-only download with ``safetensors.torch.save_file`` first.
    layer_norm_eps: overrides the config's epsilon. The torch.hub DINO model that MagicBrush's
      script uses has eps 1e-6; transformers' ViT configs default to 1e-12 (the embeddings
      differ by far less than the metric's precision either way).
  Returns:
    (config, params): host numpy float32 params for ``ViTModel(config)``.
  Raises:
    WeightsError: unsupported config, or missing/unexpected/mis-shaped tensors (named).
  """
  raw_config = read_model_config(folder)
  try:
    config = ViTConfig.from_transformers(raw_config)
  except CLIPConfigError as e:
    raise WeightsError(f"{folder!r}/config.json: {e}") from e
  if layer_norm_eps is not None:
    config = dataclasses.replace(config, layer_norm_eps=float(layer_norm_eps))
  state = _strip_head_prefix(read_state_dict(folder, (TRANSFORMERS_WEIGHTS_NAME,)))
  return config, _convert(state, config, folder)


def vit_state_dict_from_params(params: Mapping) -> Dict[str, np.ndarray]:
  """Flax ``ViTModel`` params -> transformers state dict (stored naming, PyTorch layouts).

  The inverse of ``load_vit`` (without ``pooler.*``: load it into
  ``transformers.ViTModel(config, add_pooling_layer=False)``).
  """
  flat = traverse_util.flatten_dict(dict(params))
  return {torch_name(path): np.ascontiguousarray(
      to_torch_layout(path, np.asarray(value, np.float32))) for path, value in flat.items()}
