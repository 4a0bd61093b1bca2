"""Editing and scoring: every compared model edits the same examples with the same seeds.

Single-turn: example i is edited from its stored source with the noise of
``Editor.edit(seed=seed)`` at position i, so every model sees the same noise, and every example
is scored. Multi-turn: turn k of every session is edited in one call with seed ``seed + k``,
from the editor's own output of turn k - 1; only each session's final turn is scored (every
turn's scores are kept in the report too).

Metrics: ``shapes_edit`` -> ``metrics.shapes_metrics.SHAPES_METRICS`` (needs the run's CLIP
towers); ``magicbrush`` -> ``metrics.image_metrics.magicbrush_metrics`` (CLIP ViT-B/32 and DINO
ViT-S/16 in ``image_metrics.EvaluationModels``). Each summary has a percentile-bootstrap 95% CI.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rl4pix_jax.data import shapes
from rl4pix_jax.evaluation.examples import final_turn_indices, session_order
from rl4pix_jax.metrics import image_metrics, intervals, shapes_metrics
from rl4pix_jax.tokenizer import tokenize

DATASETS = ("shapes_edit", "magicbrush")
SETTINGS = ("single_turn", "multi_turn")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Sampler options of an evaluation (the same for every compared model)."""
  num_steps: int = 20
  guidance_scale: float = 7.5
  image_guidance_scale: float = 1.5
  eta: float = 0.0
  seed: int = 0
  batch_size: int = 8


@dataclasses.dataclass
class EvaluationResult:
  """One model's evaluation.

  Attributes:
    name: the model's row name.
    example_ids: N ids in evaluation order.
    per_example: {metric: (N,) float32}.
    summary: ``intervals.metrics_report`` JSON dict (mean, CI, n per metric).
    row: the markdown table row.
    edited: N (R, R, 3) uint8 edits.
    attention_maps: N (r, r) float32 maps or Nones.
    inputs: N (R, R, 3) uint8 images each edit started from (the stored source, or in
      multi-turn the previous turn's edit); None when not recorded.
    scored: indices of the examples in ``summary``/``row`` (all of them single-turn; the
      final turn of each session multi-turn); None means all.

  ``example_ids``, ``per_example``, ``edited``, ``attention_maps`` and ``inputs`` cover every
  edited example; ``scored_ids``/``scored_per_example`` are the scored subset.
  """
  name: str
  example_ids: List[str]
  per_example: Dict[str, np.ndarray]
  summary: dict
  row: str
  edited: List[np.ndarray]
  attention_maps: List[Optional[np.ndarray]]
  inputs: Optional[List[np.ndarray]] = None
  scored: Optional[List[int]] = None

  @property
  def scored_indices(self) -> List[int]:
    return list(range(len(self.example_ids))) if self.scored is None else list(self.scored)

  @property
  def scored_ids(self) -> List[str]:
    return [self.example_ids[i] for i in self.scored_indices]

  @property
  def scored_per_example(self) -> Dict[str, np.ndarray]:
    index = np.asarray(self.scored_indices, np.int64)
    return {k: np.asarray(v)[index] for k, v in self.per_example.items()}


def edit_examples(editor: Any, examples: Sequence[dict], settings: SamplerSettings,
                  multi_turn: bool = False, attention: bool = True):
  """Edits every example, in input order.

  Returns:
    (edited, maps, inputs): N edited (R, R, 3) uint8, N maps or Nones, and the N images each
    edit started from (the stored sources; multi-turn, the previous turn's edit for turn > 1).
  ``attention`` records the object phrase's map when every example has a phrase.
  """
  phrases = [e["object_phrase"] for e in examples]
  record = attention and all(phrases)
  options = dict(num_steps=settings.num_steps, guidance_scale=settings.guidance_scale,
                 image_guidance_scale=settings.image_guidance_scale, eta=settings.eta,
                 batch_size=settings.batch_size)
  if not multi_turn:
    sources = [e["source"] for e in examples]
    result = editor.edit(sources, [e["instruction"] for e in examples],
                         seed=settings.seed, object_phrases=phrases if record else None,
                         **options)
    return result.images, result.attention_maps, sources
  sessions = session_order([e["example_id"] for e in examples])
  edited: List[Optional[np.ndarray]] = [None] * len(examples)
  maps: List[Optional[np.ndarray]] = [None] * len(examples)
  inputs: List[Optional[np.ndarray]] = [None] * len(examples)
  for turn in range(1, max(len(s) for s in sessions) + 1):
    chained = [s for s in sessions if len(s) >= turn]
    indices = [s[turn - 1] for s in chained]
    for session, i in zip(chained, indices):
      inputs[i] = examples[i]["source"] if turn == 1 else edited[session[turn - 2]]
    result = editor.edit([inputs[i] for i in indices],
                         [examples[i]["instruction"] for i in indices],
                         seed=settings.seed + turn,
                         object_phrases=[phrases[i] for i in indices] if record else None,
                         **options)
    for j, i in enumerate(indices):
      edited[i], maps[i] = result.images[j], result.attention_maps[j]
  return edited, maps, inputs


def _batches(count: int, size: int):
  for start in range(0, count, size):
    yield slice(start, min(start + size, count))


def shapes_per_example(examples: Sequence[dict], edited: Sequence[np.ndarray],
                       maps: Sequence[np.ndarray], tokenizer: Any, clip_text: Any,
                       clip_vision: Any, clip_params: Mapping, batch_size: int = 8
                       ) -> Dict[str, np.ndarray]:
  """``shapes_metrics.shapes_example_metrics`` over all examples: {metric: (N,) float32}."""
  if any(m is None for m in maps):
    raise ValueError("The shapes metrics need attention maps: edit with attention=True.")
  out: Dict[str, List[np.ndarray]] = {k: [] for k in shapes_metrics.SHAPES_METRICS}
  for part in _batches(len(examples), batch_size):
    chunk = examples[part]
    arrays = {
        "source": np.stack([c["source"] for c in chunk]).astype(np.float32) / 127.5 - 1.0,
        "target": np.stack([c["target"] for c in chunk]).astype(np.float32) / 127.5 - 1.0,
        "mask": np.stack([c["mask"] for c in chunk]),
        "caption_ids": tokenize(tokenizer, [c["target_caption"] for c in chunk]),
    }
    pixels = np.stack(edited[part]).astype(np.float32) / 127.5 - 1.0
    wanted = [shapes.example_from_record(c["record"], c["index"]) for c in chunk]
    values = shapes_metrics.shapes_example_metrics(
        pixels, arrays, np.stack(maps[part]), wanted, clip_text, clip_params["text"],
        clip_vision, clip_params["vision"])
    for key, value in values.items():
      out[key].append(np.asarray(value, np.float32))
  return {k: np.concatenate(v) for k, v in out.items()}


_jit_magicbrush = jax.jit(image_metrics.magicbrush_metrics)


def magicbrush_per_example(examples: Sequence[dict], edited: Sequence[np.ndarray],
                           models: image_metrics.EvaluationModels, tokenizer: Any,
                           batch_size: int = 8) -> Dict[str, np.ndarray]:
  """MagicBrush metrics of each example: {"l1", "l2", "clip_i", "dino", "clip_t",
  "clip_t_oracle"} -> (N,) float32. Edits are resized to the target size first."""
  out: Dict[str, List[np.ndarray]] = {}
  for part in _batches(len(examples), batch_size):
    chunk = examples[part]
    target = jnp.asarray(np.stack([c["target"] for c in chunk]), jnp.float32) / 255.0
    images = jnp.asarray(np.stack(edited[part]), jnp.float32) / 255.0
    if images.shape != target.shape:  # resampling at the same size would blur the pixels
      images = image_metrics.resize_to(images, target.shape[1], target.shape[2])
    ids = jnp.asarray(tokenize(tokenizer, [c["target_caption"] for c in chunk]))
    for key, value in _jit_magicbrush(models, images, target, ids).items():
      out.setdefault(key, []).append(np.asarray(value, np.float32))
  return {k: np.concatenate(v) for k, v in out.items()}


# What a run can score on MagicBrush with its own models (no shapes check, no DINO): L1/L2 to
# the target (MagicBrush's), attention mass inside the edit mask, CLIP-T with the run's CLIP.
RUN_MODEL_METRICS = ("l1", "l2", "attention_mass_inside", "clip_t")


@jax.jit
def _pixel_distances(edited, target):
  return {"l1": image_metrics.l1_distance(edited, target),
          "l2": image_metrics.l2_distance(edited, target)}


_jit_mass_inside = jax.jit(shapes_metrics.attention_mass_inside)
_jit_clip_t = jax.jit(image_metrics.clip_text_similarity, static_argnums=(0, 2))


def run_model_per_example(examples: Sequence[dict], edited: Sequence[np.ndarray],
                          maps: Sequence[Optional[np.ndarray]], tokenizer: Any,
                          clip_text: Any = None, clip_vision: Any = None,
                          clip_params: Optional[Mapping] = None, batch_size: int = 8
                          ) -> Dict[str, np.ndarray]:
  """``RUN_MODEL_METRICS`` of each example (those that apply): {metric: (N,) float32}.

  For data without the shapes check (MagicBrush) scored with a run's own models, e.g. the
  validation during RL. ``attention_mass_inside`` needs maps and masks, ``clip_t`` a CLIP
  (``clip_params`` {"text", "vision"}); edits are resized to the target size first.
  """
  with_maps = all(m is not None for m in maps) and all("mask" in e for e in examples)
  out: Dict[str, List[np.ndarray]] = {}
  for part in _batches(len(examples), batch_size):
    chunk = examples[part]
    target = jnp.asarray(np.stack([c["target"] for c in chunk]), jnp.float32) / 255.0
    images = jnp.asarray(np.stack(edited[part]), jnp.float32) / 255.0
    if images.shape != target.shape:
      images = image_metrics.resize_to(images, target.shape[1], target.shape[2])
    values = dict(_pixel_distances(images, target))
    if with_maps:
      values["attention_mass_inside"] = _jit_mass_inside(
          jnp.asarray(np.stack(maps[part])), jnp.asarray(np.stack([c["mask"] for c in chunk])))
    if clip_params is not None:
      ids = jnp.asarray(tokenize(tokenizer, [c["target_caption"] for c in chunk]))
      values["clip_t"] = _jit_clip_t(clip_text, clip_params["text"], clip_vision,
                                     clip_params["vision"], images, ids)
    for key, value in values.items():
      out.setdefault(key, []).append(np.asarray(value, np.float32))
  return {k: np.concatenate(out[k]) for k in RUN_MODEL_METRICS if k in out}


def load_magicbrush_models(clip_model: str, dino_model: str) -> image_metrics.EvaluationModels:
  """The MagicBrush metric models: a transformers CLIPModel folder (or hub id) and a DINO ViT
  folder (or hub id). DINO's resize before the crop scales with the ViT's image size
  (``image_metrics.dino_resize_for``: 256 for 224).

  Raises:
    ValueError: naming the flag (``--clip_model``/``--dino_model``), the path and the problem;
    OSError: a hub id that cannot be downloaded (e.g. offline), likewise named.
  """
  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.models import vit
  from rl4pix_jax.weights import folders, transformers_clip, transformers_vit
  try:
    clip_text, clip_vision, clip_params = transformers_clip.load_clip_models(clip_model)
  except (ValueError, OSError) as e:
    raise type(e)(f"--clip_model={clip_model}: {e} MagicBrush's CLIP-I/CLIP-T need a "
                  "transformers CLIPModel folder or hub id (openai/clip-vit-base-patch32)."
                  ) from e
  if clip_vision.config.projection_dim is None or clip_text.config.projection_dim is None:
    raise ValueError(f"--clip_model={clip_model}: the CLIP towers have no projection_dim; "
                     "pass a full CLIPModel folder (openai/clip-vit-base-patch32).")
  try:
    vit_config, vit_params = transformers_vit.load_vit(folders.resolve_pretrained(dino_model))
  except (ValueError, OSError) as e:
    raise type(e)(f"--dino_model={dino_model}: {e} MagicBrush's DINO metric needs a "
                  "transformers ViTModel folder or hub id (facebook/dino-vits16).") from e
  return image_metrics.EvaluationModels(
      clip_text_params=clip_params["text"], clip_vision_params=clip_params["vision"],
      dino_params=vit_params, clip_text=clip_text, clip_vision=clip_vision,
      dino=vit.ViTModel(vit_config),
      dino_resize=image_metrics.dino_resize_for(vit_config.image_size))


def evaluate(name: str, editor: Any, examples: Sequence[dict], settings: SamplerSettings,
             per_example_fn, keys: Sequence[str], multi_turn: bool = False,
             attention: bool = True) -> EvaluationResult:
  """Edits ``examples`` and scores them with ``per_example_fn(examples, edited, maps)``.

  Every edit is scored; the summary and row cover all examples single-turn, and the final
  turn of each session multi-turn.
  """
  edited, maps, inputs = edit_examples(editor, examples, settings, multi_turn, attention)
  per_example = per_example_fn(examples, edited, maps)
  ids = [e["example_id"] for e in examples]
  scored = final_turn_indices(ids) if multi_turn else list(range(len(examples)))
  result = EvaluationResult(name=name, example_ids=ids, per_example=per_example, summary={},
                            row="", edited=edited, attention_maps=maps, inputs=inputs,
                            scored=scored)
  result.summary, result.row = intervals.metrics_report(result.scored_per_example, name, keys,
                                                        seed=settings.seed)
  return result


