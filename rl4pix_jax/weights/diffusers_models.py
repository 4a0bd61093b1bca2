"""diffusers UNet2DConditionModel / AutoencoderKL state dicts <-> Flax parameter trees.

The Flax modules name their submodules after the diffusers attributes (``resnets_0`` for
``resnets.0``), so the mapping is by name: a Flax path joins with dots, indexed lists become
``name.i``, ``kernel``/``scale`` become ``weight``. Layouts: convolution kernels are HWIO in
Flax and OIHW in PyTorch, dense kernels ``(in, out)`` vs ``(out, in)``.

Every conversion is checked against the abstract parameter tree of the model
(``jax.eval_shape`` of ``init``): a missing tensor, an unexpected tensor or a shape mismatch
raises ``WeightsError`` naming the tensor, where it came from, and the shape expected.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rl4pix_jax.models.unet import UNet2DConditionModel, UNetConfig
from rl4pix_jax.models.vae import AutoencoderKL, VAEConfig
from rl4pix_jax.weights.folders import (
    DIFFUSERS_WEIGHTS_NAME, WeightsError, read_model_config, read_state_dict, write_state_dict)

Params = Dict[str, Any]
_INDEXED = frozenset(("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
                      "downsamplers", "upsamplers", "to_out", "net"))
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# diffusers' pre-0.14 VAE attention names -> current names (suffix of the attention path).
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_MAX_LISTED = 8


def torch_name(flax_path: Tuple[str, ...]) -> str:
  """The diffusers state-dict key of a Flax parameter path.

  ``('down_blocks_0', 'resnets_1', 'conv1', 'kernel')`` -> ``down_blocks.0.resnets.1.conv1.weight``.
  """
  parts = []
  for component in flax_path[:-1]:
    match = re.fullmatch(r"(.+)_(\d+)", component)
    if match and match.group(1) in _INDEXED:
      parts += [match.group(1), match.group(2)]
    else:
      parts.append(component)
  leaf = flax_path[-1]
  if leaf not in _LEAF_NAMES:
    raise WeightsError(f"Flax parameter {'/'.join(flax_path)!r} has an unknown leaf name; "
                       f"expected one of {sorted(_LEAF_NAMES)}.")
  return ".".join(parts + [_LEAF_NAMES[leaf]])


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))
  if array.ndim == 2:
    return array.T
  return array


def torch_shape(flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The PyTorch shape of a Flax parameter shape (HWIO -> OIHW, (in, out) -> (out, in))."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if len(flax_shape) == 2:
    return tuple(flax_shape[::-1])
  return tuple(flax_shape)


def _to_flax_layout(array: np.ndarray, flax_ndim: int) -> np.ndarray:
  if flax_ndim == 2 and array.ndim == 4 and array.shape[2:] == (1, 1):
    array = array[:, :, 0, 0]  # a 1x1 convolution stored where a linear layer is expected
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:
    return array.T
  return array


def _list_names(names, shapes: Mapping[str, Tuple[int, ...]]) -> str:
  names = sorted(names)
  shown = ", ".join(f"{n} {tuple(shapes[n])}" for n in names[:_MAX_LISTED])
  more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return shown + more


def _template(params_or_template: Params) -> Dict[Tuple[str, ...], Any]:
  tree = params_or_template.get("params", params_or_template)
  return traverse_util.flatten_dict(tree)


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    template: Params,
    source: str = "the state dict",
    dtype: Any = jnp.float32,
) -> Params:
  """Converts a PyTorch state dict to a Flax variables dict shaped like ``template``.

  Args:
    state_dict: ``{torch_name: array}`` in PyTorch layouts.
    template: ``{'params': tree}`` of arrays or ``jax.ShapeDtypeStruct`` (from eval_shape).
    source: where the tensors came from, for error messages (a folder or file).
    dtype: dtype of the returned arrays.
  Returns:
    ``{'params': tree}`` of jax arrays in Flax layouts.
  Raises:
    WeightsError: missing, unexpected or mis-shaped tensors (all named, with shapes).
  """
  flat = _template(template)
  expected = {torch_name(path): path for path in flat}
  expected_shapes = {n: torch_shape(tuple(flat[p].shape)) for n, p in expected.items()}
  found_shapes = {n: tuple(np.shape(a)) for n, a in state_dict.items()}
  missing = set(expected) - set(state_dict)
  unexpected = set(state_dict) - set(expected)
  problems = []
  if missing:
    problems.append(f"missing tensors (expected shapes): {_list_names(missing, expected_shapes)}")
  if unexpected:
    problems.append(f"unexpected tensors (found shapes): {_list_names(unexpected, found_shapes)}")
  if problems:
    raise WeightsError(f"Weights in {source} do not match the model: " + "; ".join(problems))
  out = {}
  for name, path in expected.items():
    want = tuple(flat[path].shape)
    array = _to_flax_layout(np.asarray(state_dict[name]), len(want))
    if tuple(array.shape) != want:
      raise WeightsError(
          f"Tensor {name!r} in {source} has shape {found_shapes[name]}; expected "
          f"{expected_shapes[name]} (PyTorch layout) for this config.")
    out[path] = jnp.asarray(array, dtype=dtype)
  return {"params": traverse_util.unflatten_dict(out)}


def state_dict_from_params(params: Params, template: Params) -> Dict[str, np.ndarray]:
  """Converts Flax params (``{'params': tree}`` or the bare tree) to a PyTorch state dict.

  Raises:
    WeightsError: when the tree does not match ``template`` (names or shapes).
  """
  flat = _template(params)
  want = _template(template)
  missing, extra = set(want) - set(flat), set(flat) - set(want)
  if missing or extra:
    raise WeightsError(
        "Flax params do not match the model: missing "
        f"{sorted('/'.join(p) for p in missing)[:_MAX_LISTED]}, unexpected "
        f"{sorted('/'.join(p) for p in extra)[:_MAX_LISTED]}.")
  state = {}
  for path, value in flat.items():
    if tuple(value.shape) != tuple(want[path].shape):
      raise WeightsError(f"Flax param {'/'.join(path)!r} has shape {tuple(value.shape)}; "
                         f"expected {tuple(want[path].shape)}.")
    array = np.asarray(jax.device_get(value), dtype=np.float32)
    state[torch_name(path)] = np.ascontiguousarray(_to_torch_layout(array))
  return state


def unet_template(config: UNetConfig) -> Params:
  """The abstract ``{'params': tree}`` of a UNet (``jax.ShapeDtypeStruct`` leaves)."""
  factor = 2 ** config.num_downsamplers
  sample = jnp.zeros((1, factor, factor, config.in_channels), jnp.float32)
  context = jnp.zeros((1, 1, config.cross_attention_dim[0]), jnp.float32)
  model = UNet2DConditionModel(config)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, jnp.zeros((1,)),
                                           context))


def vae_template(config: VAEConfig) -> Params:
  """The abstract ``{'params': tree}`` of an AutoencoderKL."""
  side = config.downscale_factor
  images = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
  model = AutoencoderKL(config)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))


def unet_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: UNetConfig,
                                source: str = "the state dict", dtype: Any = jnp.float32
                                ) -> Params:
  """diffusers UNet2DConditionModel state dict -> ``{'params': tree}`` for our UNet."""
  return params_from_state_dict(state_dict, unet_template(config), source, dtype)


def unet_state_dict_from_params(params: Params, config: UNetConfig) -> Dict[str, np.ndarray]:
  """Our UNet params -> ``{torch_name: float32 array}`` that diffusers loads."""
  return state_dict_from_params(params, unet_template(config))


def rename_old_vae_attention(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Maps diffusers' old VAE attention names (query/key/value/proj_attn) to to_q/.../to_out.0."""
  renamed = {}
  for name, array in state_dict.items():
    parts = name.split(".")
    if len(parts) >= 3 and ".attentions." in f".{name}" and parts[-2] in _OLD_VAE_ATTENTION:
      name = ".".join(parts[:-2] + [_OLD_VAE_ATTENTION[parts[-2]], parts[-1]])
    if name in renamed:
      raise WeightsError(f"Tensor {name!r} appears under both its old and its new name.")
    renamed[name] = array
  return renamed


def vae_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: VAEConfig,
                               source: str = "the state dict", dtype: Any = jnp.float32
                               ) -> Params:
  """diffusers AutoencoderKL state dict (current or old attention names) -> ``{'params': tree}``."""
  return params_from_state_dict(rename_old_vae_attention(state_dict), vae_template(config),
                                source, dtype)


def vae_state_dict_from_params(params: Params, config: VAEConfig) -> Dict[str, np.ndarray]:
  """Our VAE params -> ``{torch_name: float32 array}`` (current diffusers names)."""
  return state_dict_from_params(params, vae_template(config))


def _load(folder: str, parse: Callable, convert: Callable, dtype: Any):
  raw = read_model_config(folder)
  try:
    config = parse(raw)
  except WeightsError:
    raise
  except ValueError as e:
    raise WeightsError(f"{os.path.join(folder, 'config.json')!r}: {e}") from e
  state = read_state_dict(folder, (DIFFUSERS_WEIGHTS_NAME,))
  return config, convert(state, config, source=repr(folder), dtype=dtype)


def load_unet(folder: str, dtype: Any = jnp.float32) -> Tuple[UNetConfig, Params]:
  """Loads a diffusers ``unet/`` folder (config.json + single or sharded safetensors).

  Args:
    folder: the UNet folder.
    dtype: dtype of the returned parameter arrays (keep float32 for training).
  Returns:
    (config, ``{'params': tree}``).
  """
  return _load(folder, UNetConfig.from_diffusers, unet_params_from_state_dict, dtype)


def load_vae(folder: str, dtype: Any = jnp.float32) -> Tuple[VAEConfig, Params]:
  """Loads a diffusers ``vae/`` folder; returns (config, ``{'params': tree}``)."""
  return _load(folder, VAEConfig.from_diffusers, vae_params_from_state_dict, dtype)


def export_unet(params: Params, config: UNetConfig, folder: str) -> str:
  """Writes config.json + diffusion_pytorch_model.safetensors for diffusers.

  ``diffusers.UNet2DConditionModel.from_pretrained(folder)`` loads the result. Returns the
  weights path.
  """
  return write_state_dict(unet_state_dict_from_params(params, config), folder,
                          config.to_diffusers())


def export_vae(params: Params, config: VAEConfig, folder: str) -> str:
  """Writes a diffusers ``AutoencoderKL`` folder; returns the weights path."""
  return write_state_dict(vae_state_dict_from_params(params, config), folder,
                          config.to_diffusers())
