"""The combined reward of a run, built from the ``c.reward`` config section.

  reward = attention_weight * attention + clip_weight * clip + sum_k extra[k] * reward_k

Defaults (``configs/shapes.py``) are *our* choice: the paper names an "Attention Map Loss +
Clip Loss" reward but not its formulas or weights. attention = -KL(mask region || mean
attention map), clip = cos(CLIP image of the edit, CLIP text of the target caption), both
weighted 1. A weight of 0 removes a term: it is not computed, and its inputs may be None.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax.numpy as jnp

from rl4pix_jax.rewards import attention, builtin
from rl4pix_jax.rewards.inputs import RewardContext, RewardInputs
from rl4pix_jax.rewards.registry import get_reward, import_reward_modules

CORE_TERMS = ("attention", "clip")
CombinedRewardFn = Callable[[Any, RewardInputs],
                            Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]]


def _weight(name: str, value: Any) -> float:
  try:
    weight = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"c.reward weight of {name!r} is {value!r}, not a number.") from e
  if not math.isfinite(weight) or weight < 0:
    raise ValueError(f"c.reward weight of {name!r} is {weight}; weights must be finite and "
                     ">= 0 (rewards are higher-is-better; 0 switches a term off).")
  return weight


def reward_weights(reward_config: Mapping[str, Any]) -> List[Tuple[str, float]]:
  """[(name, weight)] of the terms with weight > 0: attention, clip, then extras by name.

  Raises:
    ValueError: a bad weight, an extra named like a core term, or all weights 0.
    KeyError: an extra name that is not registered (the message lists the registered ones).
  """
  terms = [("attention", _weight("attention", reward_config["attention_weight"])),
           ("clip", _weight("clip", reward_config["clip_weight"]))]
  extra = reward_config["extra"] or {}
  for name in sorted(extra.keys()):
    if name in CORE_TERMS:
      raise ValueError(f"c.reward.extra names {name!r}; set c.reward.{name}_weight instead.")
    get_reward(name)
    terms.append((name, _weight(name, extra[name])))
  terms = [(name, weight) for name, weight in terms if weight > 0]
  if not terms:
    raise ValueError("Every reward weight in c.reward is 0: set attention_weight, clip_weight "
                     "or an entry of c.reward.extra above 0.")
  return terms


def _check_options(reward_config: Mapping[str, Any], names: List[str]) -> None:
  if "attention" in names:
    region = reward_config["attention_region"]
    if region not in builtin.ATTENTION_REGIONS:
      raise ValueError(f"c.reward.attention_region={region!r} is unknown; expected one of "
                       f"{builtin.ATTENTION_REGIONS}.")
    distance = reward_config["attention_distance"]
    if distance not in attention.DISTANCES:
      raise ValueError(f"c.reward.attention_distance={distance!r} is unknown; expected one "
                       f"of {attention.DISTANCES}.")
    last = reward_config["attention_last_steps"]
    if not isinstance(last, int) or last < 0:
      raise ValueError(f"c.reward.attention_last_steps={last!r} must be an int >= 0 "
                       "(0 = all steps).")
  if "clip" in names:
    text = reward_config["clip_text"]
    if text not in builtin.CLIP_TEXTS:
      raise ValueError(f"c.reward.clip_text={text!r} is unknown; expected one of "
                       f"{builtin.CLIP_TEXTS}.")
    if reward_config["clip_directional"] and text != "caption":
      raise ValueError("c.reward.clip_directional=True needs source and target captions: "
                       "set c.reward.clip_text='caption'.")


def make_reward_fn(reward_config: Mapping[str, Any],
                   clip_text_model: Optional[Any] = None,
                   clip_vision_model: Optional[Any] = None) -> CombinedRewardFn:
  """Builds ``fn(clip_params, inputs) -> (reward (B,), components {name: (B,)})``.

  The function is pure and jit-able (wrap it in ``jax.jit``); every option is resolved here,
  so a bad config fails before anything is compiled. ``components`` holds the unweighted
  value of every enabled term (keys ``attention``, ``clip`` and the extra names), float32.

  Args:
    reward_config: the ``c.reward`` section: attention_weight, clip_weight,
      attention_region, attention_distance, attention_last_steps, clip_text,
      clip_directional, extra ({registered name: weight}), modules (comma-separated modules
      to import first, where user rewards are registered).
    clip_text_model, clip_vision_model: CLIP towers with projections; needed when
      clip_weight > 0. ``clip_params`` is then ``{"text": ..., "vision": ...}`` (else None).
  Raises:
    ValueError / KeyError / ImportError: a bad option, naming it and the accepted values.
  """
  import_reward_modules(reward_config["modules"] or "")
  terms = reward_weights(reward_config)
  names = [name for name, _ in terms]
  _check_options(reward_config, names)
  if "clip" in names:
    for which, model in (("clip_text_model", clip_text_model),
                         ("clip_vision_model", clip_vision_model)):
      if model is None:
        raise ValueError(f"c.reward.clip_weight > 0 needs {which}; pass the CLIP towers "
                         "(rl4pix_jax.weights.transformers_clip.load_clip) or set "
                         "c.reward.clip_weight=0.")
      if getattr(model.config, "projection_dim", None) is None:
        raise ValueError(f"{which} has no projection (projection_dim is None); load a "
                         "CLIPModel folder with load_clip.")
  fns = [(name, weight, get_reward(name)) for name, weight in terms]
  config = dict(reward_config.items()) if hasattr(reward_config, "items") else reward_config

  def reward_fn(clip_params, inputs: RewardInputs):
    context = RewardContext(config, clip_text_model, clip_vision_model, clip_params)
    components, total = {}, None
    for name, weight, fn in fns:
      value = jnp.asarray(fn(inputs, context), jnp.float32)
      if value.ndim != 1:
        raise ValueError(f"Reward {name!r} returned shape {value.shape}; a reward must "
                         "return one value per example, (B,).")
      components[name] = value
      total = weight * value if total is None else total + weight * value
    return total, components

  return reward_fn
