"""Checks a run config before any work starts; each problem is one line naming the flag.

Every message has the form ``--config.<path>=<value>: <what is wrong>; <the fix>.`` so the
command line that caused it can be corrected directly. ``validate_run_config`` covers the RL
run (``launch.train``), ``validate_pretrain_config`` one supervised stage
(``launch.pretrain``), ``checked_batch_arithmetic`` the batch sizes against the devices and
processes. Unknown override names (typos) are caught earlier, when the flags are parsed
(``launch.cli``), with a "did you mean".
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from typing import Any, Iterable, Optional

import ml_collections

from rl4pix_jax.models.attention_ops import ATTENTION_KINDS
from rl4pix_jax.rl.batching import BatchArithmetic, TrainingError, batch_arithmetic

_MISSING = object()


class ConfigError(ValueError):
  """A config value that cannot work; the message names ``--config.<path>`` and the fix."""


def flag(path: str, value: Any) -> str:
  """``--config.<path>=<value>`` as the user would type it."""
  return f"--config.{path}={value}"


def suggest(value: str, choices: Iterable[str]) -> str:
  """' (did you mean X?)' for the closest choice, or ''."""
  close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    if node is None or not hasattr(node, "keys") or part not in node.keys():
      return _MISSING
    node = node[part]
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(config, path: str, minimum: int = 1, maximum: Optional[int] = None,
              allow_none: bool = False, example: Any = None) -> None:
  """An integer in [minimum, maximum] (a missing key, from an older config, is skipped)."""
  value = _get(config, path)
  if value is _MISSING or (allow_none and value is None):
    return
  bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
  if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
    fix = f"; e.g. {flag(path, example)}" if example is not None else ""
    raise ConfigError(f"{flag(path, value)}: must be an integer {bounds}{fix}.")


def check_real(config, path: str, minimum: Optional[float] = None,
               maximum: Optional[float] = None, strict_minimum: bool = False,
               strict_maximum: bool = False, example: Any = None) -> None:
  """A finite number in the given range (``strict_*``: the bound itself excluded)."""
  value = _get(config, path)
  if value is _MISSING:
    return
  fix = f"; e.g. {flag(path, example)}" if example is not None else ""
  if not _is_real(value) or not math.isfinite(value):
    raise ConfigError(f"{flag(path, value)}: must be a finite number{fix}.")
  low_ok = minimum is None or (value > minimum if strict_minimum else value >= minimum)
  high_ok = maximum is None or (value < maximum if strict_maximum else value <= maximum)
  if not (low_ok and high_ok):
    low = "" if minimum is None else ("> " if strict_minimum else ">= ") + f"{minimum:g}"
    high = "" if maximum is None else ("< " if strict_maximum else "<= ") + f"{maximum:g}"
    raise ConfigError(f"{flag(path, value)}: must be {' and '.join(p for p in (low, high) if p)}"
                      f"{fix}.")


def check_choice(config, path: str, choices: Iterable[str]) -> None:
  value = _get(config, path)
  choices = tuple(choices)
  if value is _MISSING or value in choices:
    return
  raise ConfigError(f"{flag(path, value)}: must be one of {', '.join(choices)}"
                    f"{suggest(value, choices)}.")


def validate_run_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field of an RL run config that can be checked without devices or data.

  Raises:
    ConfigError: the first problem, in one line naming ``--config.<path>``.
  """
  check_int(config, "resolution", 8, example=32)
  resolution = _get(config, "resolution")
  if resolution is not _MISSING and resolution % 8:
    raise ConfigError(f"{flag('resolution', resolution)}: must be a multiple of 8 (the "
                      f"editor's latent grid); e.g. "
                      f"{flag('resolution', resolution - resolution % 8 or 8)}.")
  check_choice(config, "model.dtype", ("float32", "bfloat16", "float16"))
  check_choice(config, "model.attention", ATTENTION_KINDS)
  check_int(config, "model.attention_flash_min_tokens", 1, example=4096)
  check_int(config, "model.attention_chunk_queries", 1, example=512)
  check_int(config, "model.attention_flash_block", 128, example=512)
  block = _get(config, "model.attention_flash_block")
  if _is_int(block) and block % 128:
    raise ConfigError(f"{flag('model.attention_flash_block', block)}: must be a multiple of "
                      f"128 (the TPU kernel's lanes); e.g. "
                      f"{flag('model.attention_flash_block', block - block % 128 or 128)}.")
  check_choice(config, "data.dataset", ("shapes_edit", "magicbrush"))
  for name in ("train_size",):
    check_int(config, f"data.{name}", 1, example=2000)
  for name in ("validation_size", "test_size"):
    check_int(config, f"data.{name}", 0, example=200)
  check_int(config, "data.max_object_tokens", 1, 75, example=8)
  check_int(config, "data.num_threads", 1, example=2)
  train_tasks = _get(config, "data.train_tasks")
  if train_tasks not in (_MISSING, None, ""):
    from rl4pix_jax.data import records  # pylint: disable=import-outside-toplevel
    if _get(config, "data.dataset") != "shapes_edit":
      raise ConfigError(f"{flag('data.train_tasks', train_tasks)}: only shapes_edit records "
                        f"have tasks; use {flag('data.train_tasks', '')} with "
                        f"{flag('data.dataset', _get(config, 'data.dataset'))}.")
    unknown = [t for t in str(train_tasks).split(",") if t.strip() not in records.TASKS]
    if unknown:
      raise ConfigError(f"{flag('data.train_tasks', train_tasks)}: {unknown} not among the "
                        f"shapes tasks {', '.join(records.TASKS)} (comma-separated); e.g. "
                        f"{flag('data.train_tasks', 'insertion')}.")

  timesteps = _get(config, "model.scheduler.num_train_timesteps")
  check_int(config, "sampler.num_steps", 1,
            timesteps if _is_int(timesteps) else None, example=10)
  check_real(config, "sampler.eta", 0.0, example=1.0)
  if _get(config, "sampler.eta") == 0 and _get(config, "ppo.objective") != "nft":
    raise ConfigError(f"{flag('sampler.eta', 0.0)}: RL samples its trajectories with this eta, "
                      "and at 0 every DDIM step is deterministic, so PPO has no action to "
                      f"score; e.g. {flag('sampler.eta', 1.0)} (DDPO's), or "
                      f"{flag('ppo.objective', 'nft')}, which needs no log-probs. Evaluation's "
                      "eta is launch.evaluate --eta.")
  check_real(config, "sampler.guidance_scale", 0.0, example=4.0)
  check_real(config, "sampler.image_guidance_scale", 0.0, example=1.5)
  if _get(config, "sampler.capture_size"):
    check_int(config, "sampler.capture_size", 1, example=8)

  check_real(config, "reward.attention_weight", 0.0, example=1.0)
  check_real(config, "reward.clip_weight", 0.0, example=1.0)
  check_choice(config, "reward.attention_region", ("mask", "reference"))
  check_choice(config, "reward.attention_distance", ("l1", "l2", "kl", "soft_iou"))
  steps = _get(config, "sampler.num_steps")
  check_int(config, "reward.attention_last_steps", 0, steps if _is_int(steps) else None,
            example=0)
  check_choice(config, "reward.clip_text", ("caption", "instruction"))
  extra = _get(config, "reward.extra")
  if extra is not _MISSING and extra is not None:
    for name in extra.keys():
      check_real(config, f"reward.extra.{name}", example=1.0)

  check_choice(config, "ppo.trainable", ("lora", "full"))
  check_int(config, "ppo.lora_rank", 1, example=4)
  check_real(config, "ppo.lora_alpha", 0.0, strict_minimum=True, example=4.0)
  regex = _get(config, "ppo.lora_target_regex")
  if regex is not _MISSING:
    try:
      re.compile(regex)
    except (re.error, TypeError) as e:
      raise ConfigError(f"{flag('ppo.lora_target_regex', regex)}: not a regular expression "
                        f"({e}).") from None
  check_real(config, "ppo.learning_rate", 0.0, strict_minimum=True, example=3e-3)
  check_real(config, "ppo.adam_b1", 0.0, 1.0, strict_maximum=True, example=0.9)
  check_real(config, "ppo.adam_b2", 0.0, 1.0, strict_maximum=True, example=0.999)
  check_real(config, "ppo.adam_eps", 0.0, strict_minimum=True, example=1e-8)
  check_real(config, "ppo.weight_decay", 0.0, example=1e-4)
  check_real(config, "ppo.max_grad_norm", 0.0, strict_minimum=True, example=1.0)
  check_real(config, "ppo.clip_range", 0.0, strict_minimum=True, example=1e-2)
  check_real(config, "ppo.adv_clip_max", 0.0, strict_minimum=True, example=5.0)
  check_int(config, "ppo.num_inner_epochs", 1, example=2)
  check_real(config, "ppo.timestep_fraction", 0.0, 1.0, strict_minimum=True, example=1.0)
  check_int(config, "ppo.stat_buffer_size", 1, example=16)
  check_int(config, "ppo.stat_min_count", 1, example=4)
  check_real(config, "ppo.attention_pathwise_weight", 0.0, example=0.1)
  check_choice(config, "ppo.objective", ("ppo", "nft"))
  check_real(config, "ppo.nft_beta", 0.0, strict_minimum=True, example=1.0)

  for name, example in (("num_epochs", 20), ("sample_batch_size", 16),
                        ("num_sample_batches", 1), ("samples_per_prompt", 4),
                        ("train_batch_size", 8), ("checkpoint_every", 5),
                        ("keep_checkpoints", 3), ("max_nonfinite_in_a_row", 3)):
    check_int(config, f"train.{name}", 1, example=example)
  check_int(config, "train.image_every", 0, example=5)
  check_int(config, "train.eval_every", 0, example=5)
  check_int(config, "train.eval_examples", 1, example=64)
  split = _get(config, "train.eval_split")
  if split is not _MISSING and (not isinstance(split, str) or not split.strip()):
    raise ConfigError(f"{flag('train.eval_split', split)}: must name a split of the dataset; "
                      f"e.g. {flag('train.eval_split', 'validation')}.")
  keep_best = _get(config, "train.keep_best")
  if keep_best is not _MISSING and not isinstance(keep_best, bool):
    raise ConfigError(f"{flag('train.keep_best', keep_best)}: must be True or False; e.g. "
                      f"{flag('train.keep_best', True)}.")
  batch = _get(config, "train.sample_batch_size")
  repeats = _get(config, "train.samples_per_prompt")
  if repeats is not _MISSING and batch is not _MISSING and batch % repeats:
    raise ConfigError(
        f"{flag('train.sample_batch_size', batch)}: must be a multiple of "
        f"--config.train.samples_per_prompt={repeats} (each sampling call draws "
        f"sample_batch_size / samples_per_prompt examples); e.g. "
        f"{flag('train.sample_batch_size', max(repeats, batch - batch % repeats))}.")

  if _get(config, "logging.wandb") is True:
    import importlib.util  # pylint: disable=import-outside-toplevel
    if importlib.util.find_spec("wandb") is None:
      raise ConfigError(f"{flag('logging.wandb', True)} needs the wandb package: pip install "
                        "-r requirements-demo.txt (or leave W&B off: metrics.jsonl and "
                        "TensorBoard are always written).")

  mesh_data = _get(config, "mesh.data")
  if mesh_data is not _MISSING and mesh_data != -1:
    check_int(config, "mesh.data", 1, example=-1)
  check_int(config, "mesh.fsdp", 1, example=1)
  check_int(config, "mesh.fsdp_min_size", 0, example=2 ** 18)


def checked_batch_arithmetic(config: ml_collections.ConfigDict, batch_devices: int,
                             process_count: int) -> BatchArithmetic:
  """``batching.batch_arithmetic`` with its problems as a one-line ``ConfigError``."""
  try:
    return batch_arithmetic(config, batch_devices, process_count)
  except TrainingError as e:
    message = re.sub(r"(?<![\w.-])(train\.\w+=)", r"--config.\1", str(e))
    raise ConfigError(f"{message} Choose sizes that divide evenly, e.g. multiples of "
                      f"{batch_devices * process_count}.") from None


# Per supervised stage, the fields that are counts (>= 1) or fractions; the rest >= 0.
_STAGE_COUNTS = ("steps", "batch_size", "log_every", "checkpoint_every", "train_examples")
_STAGE_FRACTIONS = ("final_lr_fraction", "text_dropout", "image_dropout", "both_dropout")


def validate_pretrain_config(config: ml_collections.ConfigDict, stage: str) -> None:
  """Checks ``config.pretrain.<stage>`` and the shared fields a supervised stage uses."""
  check_int(config, "resolution", 8, example=32)
  check_int(config, "data.train_size", 1, example=2000)
  check_int(config, "data.num_threads", 1, example=2)
  section = _get(config, f"pretrain.{stage}")
  if section is _MISSING:
    return
  for name in section.keys():
    path = f"pretrain.{stage}.{name}"
    if name in _STAGE_COUNTS:
      check_int(config, path, 1)
    elif name == "warmup_steps":
      check_int(config, path, 0)
    elif name in _STAGE_FRACTIONS:
      check_real(config, path, 0.0, 1.0)
    elif name == "ema_decay":
      check_real(config, path, 0.0, 1.0, strict_maximum=True)
    elif name == "learning_rate":
      check_real(config, path, 0.0, strict_minimum=True, example=1e-3)
    elif _is_real(section[name]):
      check_real(config, path, 0.0)
