"""What a reward may read: ``RewardInputs`` (batched arrays) and ``RewardContext`` (models).

Conventions: B examples, H x W pixel images, r x r attention maps, T sampler steps, L = 77
token ids. Images are float32 in [0, 1] (the data loader yields [-1, 1]: pass
``(x + 1) / 2``); masks are float32 in [0, 1] with 1 = the region the edit should change.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import flax.struct
import jax.numpy as jnp


@flax.struct.dataclass
class RewardInputs:
  """Everything a reward function may read, for one batch of B edits.

  A field a configured reward does not use may be None (e.g. ``attention_maps`` when the
  attention weight is 0); a reward that needs a missing field raises a ``ValueError`` naming
  the field.

  Attributes:
    edited_images: (B, H, W, 3) float32 in [0, 1], the decoded x_0 of the policy.
    source_images: (B, H, W, 3) float32 in [0, 1], the images being edited.
    mask: (B, H, W) float32 in [0, 1], the dataset's edit mask (1 = should change).
    attention_maps: (B, T, r, r) float32 target-token cross-attention per sampler step
      (``Trajectory.attention_maps``).
    reference_region: (B, r, r) float32 attention of the frozen initial model on the source
      image (``reference_attention_maps``), or None.
    caption_ids: (B, L) int32 CLIP ids of the target caption.
    source_caption_ids: (B, L) int32 CLIP ids of the source caption.
    input_ids: (B, L) int32 CLIP ids of the instruction.
    shapes_check: the shapes check's per-example targets (``data.shapes_check.check_targets``
      stacked over the batch, a dict of (B, ...) arrays), or None for other datasets.
  """
  edited_images: Optional[jnp.ndarray] = None
  source_images: Optional[jnp.ndarray] = None
  mask: Optional[jnp.ndarray] = None
  attention_maps: Optional[jnp.ndarray] = None
  reference_region: Optional[jnp.ndarray] = None
  caption_ids: Optional[jnp.ndarray] = None
  source_caption_ids: Optional[jnp.ndarray] = None
  input_ids: Optional[jnp.ndarray] = None
  shapes_check: Optional[Mapping[str, jnp.ndarray]] = None

  def require(self, *names: str, reward: str) -> None:
    """Raises a ValueError naming the fields among ``names`` that are None."""
    missing = [n for n in names if getattr(self, n) is None]
    if missing:
      raise ValueError(f"Reward {reward!r} needs RewardInputs.{', '.join(missing)}, which "
                       "is None; pass it, or set this reward's weight to 0 in c.reward.")


class RewardContext(NamedTuple):
  """The non-batch things a reward may use (built inside the reward function, per call).

  Attributes:
    config: the ``c.reward`` section (read-only, Python values).
    clip_text_model: ``models.clip.CLIPTextModel`` with a projection, or None.
    clip_vision_model: ``models.clip.CLIPVisionModel`` with a projection, or None.
    clip_params: ``{"text": text params, "vision": vision params}`` or None.
  """
  config: Mapping[str, Any]
  clip_text_model: Any = None
  clip_vision_model: Any = None
  clip_params: Optional[Mapping[str, Any]] = None
