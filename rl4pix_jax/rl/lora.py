"""LoRA adapters on the UNet attention projections: init, merge, and which kernels they touch.

A LoRA tree mirrors the nested parameter dict of the UNet, but holds only the adapted
kernels, each replaced by ``{"down": (in, r), "up": (r, out)}`` float32 arrays, e.g.
``lora["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_q"]["kernel"]``.
The merged kernel is ``kernel + down @ up * alpha / r`` (diffusers/peft convention; their
PyTorch ``lora_A``/``lora_B`` weights are ``down.T``/``up.T``). ``up`` starts at zero, so the
initial policy equals the base model.

The default targets are the query/key/value/output projections of the self-attention
(``attn1``) and cross-attention (``attn2``) of every UNet transformer block, whose parameter
paths in ``rl4pix_jax.models`` end in ``attn1/to_q/kernel`` ... ``attn2/to_out_0/kernel``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util

Params = Any

DEFAULT_TARGET_REGEX = r"(^|/)attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$"
DOWN, UP = "down", "up"


def _shape(leaf: Any) -> Tuple[int, ...]:
  """Shape of an array or ``jax.ShapeDtypeStruct`` (so targets can be planned abstractly)."""
  return tuple(getattr(leaf, "shape", jnp.shape(leaf)))


def _flat(tree: Params) -> Dict[Tuple[str, ...], Any]:
  if not isinstance(tree, dict):
    tree = dict(tree)
  return traverse_util.flatten_dict(tree)


def lora_target_paths(base_params: Params, target_regex: str = DEFAULT_TARGET_REGEX
                      ) -> List[str]:
  """The '/'-joined paths of the kernels a LoRA with ``target_regex`` adapts (sorted).

  Args:
    base_params: the UNet ``params`` collection (nested dict).
    target_regex: regex searched (``re.search``) in each '/'-joined leaf path.

  Returns:
    Sorted list of matching paths, e.g. ``'mid_block/.../attn1/to_q/kernel'``.

  Raises:
    ValueError: the regex is invalid, matches nothing, or matches a leaf that is not a
      2-D Dense kernel.
  """
  try:
    pattern = re.compile(target_regex)
  except re.error as e:
    raise ValueError(f"lora target_regex={target_regex!r} is not a valid regex: {e}") from e
  paths = []
  flat = _flat(base_params)
  for path, leaf in flat.items():
    name = "/".join(path)
    if not pattern.search(name):
      continue
    if len(_shape(leaf)) != 2:
      raise ValueError(f"lora target_regex={target_regex!r} matches {name!r} of shape "
                       f"{_shape(leaf)}: LoRA adapts 2-D Dense kernels only; make the regex "
                       "end in a Dense '.../kernel'.")
    paths.append(name)
  if not paths:
    examples = sorted("/".join(p) for p in flat)[:5]
    raise ValueError(f"lora target_regex={target_regex!r} matches no parameter; paths look "
                     f"like {examples}.")
  return sorted(paths)


def init_lora(key: jax.Array, base_params: Params, rank: int,
              target_regex: str = DEFAULT_TARGET_REGEX) -> Params:
  """Creates LoRA adapters for the kernels matching ``target_regex``.

  Args:
    key: PRNG key.
    base_params: the UNet ``params`` collection (only shapes are read: arrays or
      ``jax.ShapeDtypeStruct``).
    rank: r, the adapter rank (>= 1, at most min(in, out) of every adapted kernel).
    target_regex: see :func:`lora_target_paths`.

  Returns:
    The LoRA tree: for each adapted kernel path, ``{"down": N(0, (1/r)^2) (in, r),
    "up": zeros (r, out)}``, float32.

  Raises:
    ValueError: bad rank or regex (see :func:`lora_target_paths`).
  """
  if int(rank) != rank or rank < 1:
    raise ValueError(f"lora rank={rank!r}: expected an integer >= 1.")
  flat = _flat(base_params)
  out = {}
  for i, name in enumerate(lora_target_paths(base_params, target_regex)):
    path = tuple(name.split("/"))
    fan_in, fan_out = _shape(flat[path])
    if rank > min(fan_in, fan_out):
      raise ValueError(f"lora rank={rank} exceeds the smaller side of {name!r} "
                       f"({fan_in}x{fan_out}): a low-rank update must have rank <= "
                       f"{min(fan_in, fan_out)}.")
    down = jax.random.normal(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32) / rank
    out[path + (DOWN,)] = down
    out[path + (UP,)] = jnp.zeros((rank, fan_out), jnp.float32)
  return traverse_util.unflatten_dict(out)


def merge_lora(base_params: Params, lora_params: Params, alpha: float) -> Params:
  """Base params with every adapted kernel replaced by ``kernel + down @ up * alpha / r``.

  Pure and jit-able (differentiable in both trees); use it inside the train step, for
  sampling with the current policy, and for export. The base tree is not modified.

  Args:
    base_params: the UNet ``params`` collection.
    lora_params: a tree from :func:`init_lora` (rank r read from the shapes).
    alpha: LoRA alpha; the update is scaled by alpha / r.

  Returns:
    A params tree with the structure and dtypes of ``base_params``.

  Raises:
    ValueError: the LoRA tree names a kernel the base lacks, or shapes disagree.
  """
  flat_base = dict(_flat(base_params))
  flat_lora = _flat(lora_params)
  kernels = sorted({path[:-1] for path in flat_lora})
  for path in kernels:
    name = "/".join(path)
    if (path + (DOWN,)) not in flat_lora or (path + (UP,)) not in flat_lora:
      raise ValueError(f"LoRA tree entry {name!r} needs both 'down' and 'up' arrays.")
    if path not in flat_base:
      raise ValueError(f"LoRA tree adapts {name!r}, which the base params do not have: was it "
                       "made with init_lora on these params?")
    down, up = flat_lora[path + (DOWN,)], flat_lora[path + (UP,)]
    kernel = flat_base[path]
    rank = down.shape[-1]
    if down.shape != (kernel.shape[0], rank) or up.shape != (rank, kernel.shape[1]):
      raise ValueError(f"LoRA shapes down {down.shape}, up {up.shape} do not fit kernel "
                       f"{name!r} of shape {kernel.shape}.")
    delta = jnp.matmul(down.astype(jnp.float32), up.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) * (alpha / rank)
    flat_base[path] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat_base)


def param_count(tree: Params) -> int:
  """Total number of array elements in a tree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(_shape(x)) for x in jax.tree_util.tree_leaves(tree)))
