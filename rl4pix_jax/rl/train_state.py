"""The policy on the mesh: the UNet, the PPO train state and the frozen LoRA base, placed by the
sharding rules; and the policy params of a saved RL checkpoint."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Tuple

import jax
import ml_collections

from rl4pix_jax import parallel
from rl4pix_jax.rl import ppo
from rl4pix_jax.workdir import checkpointer as checkpointing
from rl4pix_jax.workdir import layout


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """A copy of ``tree`` replicated on every device of ``mesh``."""
  replicated = parallel.replicated(mesh)
  return parallel.shard_params(tree, jax.tree_util.tree_map(lambda _: replicated, tree))


@dataclasses.dataclass
class PlacedPolicy:
  """The RL policy's starting state on the mesh.

  Attributes:
    state: the PPO train state (trainable params, AdamW moments, step).
    state_shardings: its shardings.
    unet_params, unet_shardings: the initial UNet, placed (the LoRA base, and the reference
      policy of the "reference" attention region).
    frozen, frozen_shardings: the frozen LoRA base ("lora"; also the KL reference), the
      initial UNet ("full" with ppo.kl_weight > 0: the KL reference), or None.
  """
  state: Any
  state_shardings: Any
  unet_params: Any
  unet_shardings: Any
  frozen: Any
  frozen_shardings: Any


def needs_frozen_unet(step_config: ppo.PPOConfig) -> bool:
  """Whether the train step holds a frozen copy of the starting UNet: "lora" (its base) and
  any run with the KL penalty (its reference policy); "full" without KL holds none."""
  return step_config.trainable == "lora" or step_config.kl_weight > 0


def place_policy(config: ml_collections.ConfigDict, initial_unet: Any, mesh: jax.sharding.Mesh,
                 base_key: jax.Array) -> PlacedPolicy:
  """Places the UNet and initialises the train state with ``fold_in(base_key, 1)``.

  The UNet, the train state (its params and AdamW moments) and the frozen LoRA base are
  placed by the sharding rules: large kernels split over 'fsdp', the rest replicated.
  """
  rules = parallel.default_sharding_rules(
      int(config.mesh.fsdp_min_size))
  unet_shardings = parallel.param_shardings(initial_unet, mesh, rules)
  unet_params = parallel.shard_params(initial_unet, unet_shardings)
  init_key = replicate(jax.random.fold_in(base_key, 1), mesh)
  init_state = lambda key, unet: ppo.init_train_state(key, unet, config.ppo)[0]
  state_shardings = ppo.train_state_shardings(
      jax.eval_shape(init_state, init_key, unet_params), mesh, rules)
  state = jax.jit(init_state, out_shardings=state_shardings)(init_key, unet_params)
  frozen = unet_params if needs_frozen_unet(ppo.PPOConfig.from_config(config.ppo)) else None
  frozen_shardings = unet_shardings if frozen is not None else None
  return PlacedPolicy(state, state_shardings, unet_params, unet_shardings, frozen,
                      frozen_shardings)


def restore_policy(config: ml_collections.ConfigDict, workdir: str, initial_unet_params: Any,
                   epoch: Optional[int] = None, directory: Optional[str] = None
                   ) -> Tuple[Any, int]:
  """(policy UNet params with LoRA merged, the epoch restored) of an RL checkpoint.

  Without ``epoch`` this is the newest readable checkpoint (an unreadable newer one is named
  in one warning). Reads only: nothing in ``workdir`` is created or cleaned up.

  Args:
    config: the run config saved beside the checkpoints.
    workdir: the run folder.
    initial_unet_params: the UNet params the run started from (the frozen base).
    epoch: which checkpoint (default: the newest readable).
    directory: the checkpoint folder (default ``<workdir>/checkpoints``; the best validated
      one is ``layout.run_best_checkpoint_dir``).
  Raises:
    CheckpointError: no checkpoint, or not a readable one (one line).
  """
  state, frozen = ppo.init_train_state(jax.random.PRNGKey(0), initial_unet_params, config.ppo)
  directory = directory or layout.run_checkpoint_dir(workdir)
  if not os.path.isdir(directory) and "://" not in directory:
    raise checkpointing.CheckpointError(
        f"No RL checkpoint in {directory!r}; run `python -m launch.train "
        f"--workdir={workdir}` first.")
  checkpointer = checkpointing.RunCheckpointer(
      directory, keep=max(1, config.train.keep_checkpoints), read_only=True)
  try:
    state, _ = checkpointer.restore(state, epoch)
  finally:
    checkpointer.close()
  return ppo.policy_params(state.params, frozen, config.ppo), checkpointer.restored_epoch


def restore_policy_params(config: ml_collections.ConfigDict, workdir: str,
                          initial_unet_params: Any, epoch: Optional[int] = None) -> Any:
  """The policy UNet params of ``restore_policy`` (same arguments), without the epoch."""
  return restore_policy(config, workdir, initial_unet_params, epoch)[0]
