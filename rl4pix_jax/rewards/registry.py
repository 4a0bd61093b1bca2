"""Name -> reward function registry, so a config can add rewards by name.

A reward is ``fn(inputs: RewardInputs, context: RewardContext) -> (B,) float32`` (higher is
better), pure and jit-able. Register one with the decorator, make sure its module is imported
(list it in ``c.reward.modules``), and weight it from the config::

  @register_reward("red_check")
  def red_check(inputs, context):
    inputs.require("edited_images", "mask", reward="red_check")
    ...
    return score  # (B,)

  c.reward.extra = {"red_check": 0.5}
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterable, Tuple

import jax.numpy as jnp

from rl4pix_jax.rewards.inputs import RewardContext, RewardInputs

RewardFn = Callable[[RewardInputs, RewardContext], jnp.ndarray]

_REWARDS: Dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator registering ``fn`` under ``name``; a name can be registered only once.

  Raises:
    ValueError: ``name`` is empty or already registered to another function.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_reward: the name must be a non-empty string, got {name!r}.")

  def decorate(fn: RewardFn) -> RewardFn:
    existing = _REWARDS.get(name)
    if existing is not None and existing is not fn:
      raise ValueError(f"A reward named {name!r} is already registered "
                       f"({existing.__module__}.{existing.__qualname__}); pick another name.")
    _REWARDS[name] = fn
    return fn
  return decorate


def registered_rewards() -> Tuple[str, ...]:
  """The registered names, sorted."""
  return tuple(sorted(_REWARDS))


def get_reward(name: str) -> RewardFn:
  """The reward registered as ``name``.

  Raises:
    KeyError: unknown name; the message lists the registered ones.
  """
  if name not in _REWARDS:
    raise KeyError(f"No reward named {name!r}; registered rewards: "
                   f"{', '.join(registered_rewards())}. Register yours with "
                   "@rl4pix_jax.rewards.register_reward(name) in a module listed in "
                   "c.reward.modules.")
  return _REWARDS[name]


def import_reward_modules(modules: Iterable[str] | str) -> None:
  """Imports the modules that register user rewards (names, or one comma-separated string).

  Raises:
    ImportError: a module cannot be imported (the message names it).
  """
  if isinstance(modules, str):
    modules = [m for m in modules.split(",")]
  for module in modules:
    module = module.strip()
    if not module:
      continue
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ImportError(f"c.reward.modules names {module!r}, which cannot be imported: {e}"
                        ) from e
