"""Rewards of the RL fine-tuning: attention-map, CLIP, their combination and a registry.

Importing this package registers the built-in rewards ``attention``, ``clip``,
``preservation``, ``change_inside`` and ``shapes_check``. See ``combined.make_reward_fn`` for the reward of a run.
"""

from rl4pix_jax.rewards.attention import (DISTANCES, attention_distance, attention_map_reward,
                                          kl_distance, l1_distance, l2_distance,
                                          resize_region_to_maps, select_steps,
                                          soft_iou_distance, to_distribution)
from rl4pix_jax.rewards.builtin import attention_region, attention_reward, clip_reward
from rl4pix_jax.rewards.clip_score import (clip_directional_similarity, clip_similarity,
                                           cosine_similarity)
from rl4pix_jax.rewards.combined import make_reward_fn, reward_weights
from rl4pix_jax.rewards.inputs import RewardContext, RewardInputs
from rl4pix_jax.rewards.preservation import (change_inside_mask, change_inside_reward,
                                             outside_mask_difference, preservation_reward)
from rl4pix_jax.rewards.shapes_check import check_scores, shapes_check_reward
from rl4pix_jax.rewards.reference import reference_attention_maps
from rl4pix_jax.rewards.registry import (get_reward, import_reward_modules, register_reward,
                                         registered_rewards)
