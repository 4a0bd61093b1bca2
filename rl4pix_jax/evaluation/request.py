"""An evaluation as ``launch.evaluate`` asks for it: check the request, find the data, load the
editors and the metric models, edit and score every model on the same examples and seeds, and
write the reports.

Every problem the user can fix raises ``EvaluationError`` with a message naming the flag and
the fix; ``launch.evaluate`` prints it and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, Optional

from absl import logging

from rl4pix_jax.evaluation.examples import load_examples
from rl4pix_jax.evaluation.reports import FIGURE_EXAMPLES, write_reports
from rl4pix_jax.evaluation.scoring import (SamplerSettings, evaluate, load_magicbrush_models,
                                           magicbrush_per_example, shapes_per_example)
from rl4pix_jax.metrics import image_metrics, shapes_metrics


class EvaluationError(Exception):
  """The request cannot be evaluated as given (the message says what to pass instead)."""


MAGICBRUSH_DATA_HINT = (" Build MagicBrush from its parquet shards first: `python -m "
                        "launch.prepare_data --dataset=magicbrush --data_dir=DIR "
                        "--magicbrush_dir=PARQUET_DIR`, then pass --data_dir=DIR.")


@dataclasses.dataclass(frozen=True)
class EvaluationRequest:
  """What to evaluate: the fields (and their meaning) of ``launch.evaluate``'s flags.

  Exactly one of ``workdir`` (a run folder) and ``pretrained`` (a diffusers InstructPix2Pix
  folder or hub id); ``None`` fields fall back to the run's config (see ``launch.evaluate``).
  """
  workdir: Optional[str]
  pretrained: Optional[str]
  step: Optional[int]
  no_rl: bool
  compare_no_rl: bool
  dataset: Optional[str]
  split: str
  data_dir: Optional[str]
  dataset_config: Optional[str]
  max_examples: Optional[int]
  setting: str
  resolution: Optional[int]
  clip_model: Optional[str]
  dino_model: Optional[str]
  output: Optional[str]
  seed: int
  steps: Optional[int]
  guidance_scale: Optional[float]
  image_guidance_scale: Optional[float]
  eta: float
  batch_size: int
  save_edits: bool
  figure_examples: Optional[int]


def shapes_clip(run: Any, clip_folder: Optional[str]):
  """(text model, vision model, {"text", "vision"} params) for the shapes CLIP-T."""
  from rl4pix_jax.weights import transformers_clip  # pylint: disable=import-outside-toplevel
  if clip_folder:
    return transformers_clip.load_clip_models(clip_folder)
  if run is None or run.setup.clip_params is None:
    raise ValueError("The shapes CLIP-T needs a CLIP: pass --clip_model=<CLIPModel folder> "
                     "(the run has no reward CLIP).")
  return run.setup.clip_text_model, run.setup.clip_vision_model, run.setup.clip_params


# pylint: disable-next=too-many-locals,too-many-branches,too-many-statements
def run_evaluation(request: EvaluationRequest) -> Dict[str, str]:
  """Evaluates what ``request`` names; returns the written paths (``reports.write_reports``).

  Raises:
    EvaluationError: the request is inconsistent, or its data, run or models cannot be found
      or loaded (the message names the flag and the fix).
  """
  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.data import loader
  from rl4pix_jax.rl import run_loading
  from rl4pix_jax.rl import run_setup
  if bool(request.workdir) == bool(request.pretrained):
    raise EvaluationError("pass exactly one of --workdir=<run folder> or --pretrained=<diffusers "
                          "folder or hub id>.")
  run = config = None
  if request.workdir:
    try:
      config = run_loading.read_run_config(request.workdir)
    except run_loading.RunLoadingError as e:
      raise EvaluationError(str(e)) from e
  dataset = request.dataset or (config.data.dataset if config else None)
  if dataset is None:
    raise EvaluationError("--dataset=<shapes_edit|magicbrush> is needed with --pretrained.")
  multi_turn = request.setting == "multi_turn"
  if dataset == "shapes_edit" and multi_turn:
    raise EvaluationError("--setting=multi_turn is a MagicBrush setting; shapes_edit is "
                          "single-turn.")
  if dataset == "magicbrush" and not (request.clip_model and request.dino_model):
    raise EvaluationError("MagicBrush metrics need --clip_model=<CLIP ViT-B/32 folder, e.g. "
                          "openai/clip-vit-base-patch32> and --dino_model=<DINO ViT-S/16 folder, "
                          "e.g. facebook/dino-vits16>.")
  if request.max_examples is not None and request.max_examples < 1:
    raise EvaluationError(f"--max_examples={request.max_examples}: pass a positive number (or "
                          "leave it out to evaluate the whole split).")
  try:
    if request.data_dir:
      dataset_dir = loader.find_dataset_dir(request.data_dir, dataset, request.dataset_config)
    elif config is not None and dataset == config.data.dataset:
      dataset_dir = run_setup.prepare_dataset(config, request.workdir)
    else:
      raise EvaluationError(f"--data_dir=<tfds data_dir holding {dataset}> is needed."
                            + (MAGICBRUSH_DATA_HINT if dataset == "magicbrush" else ""))
  except ValueError as e:
    hint = ""
    if "several" in str(e):
      hint = " Choose one with --dataset_config=<name>."
    elif dataset == "magicbrush" and "No prepared" in str(e):
      hint = MAGICBRUSH_DATA_HINT
    raise EvaluationError(str(e) + hint) from e
  try:
    resolution = request.resolution or (config.resolution if config else 512)
    examples = load_examples(dataset_dir, request.split, resolution, request.max_examples,
                             multi_turn=multi_turn)
  except ValueError as e:
    hint = ""
    if (dataset == "magicbrush" and request.split == "test"
        and f"Split {request.split!r} not in" in str(e)):
      hint = (" MagicBrush's test set is not among the hub's parquet shards (it is a "
              "separate zip): evaluate --split=validation (the dev set), or put test-*.parquet "
              "shards with the same columns in --magicbrush_dir and rebuild.")
    raise EvaluationError(str(e) + hint) from e
  models = None
  if dataset == "magicbrush":
    try:
      models = load_magicbrush_models(request.clip_model, request.dino_model)
    except (ValueError, OSError) as e:
      raise EvaluationError(str(e)) from e
  try:
    if request.workdir:
      run = run_loading.load_run(request.workdir, request.step,
                                 use_rl=False if request.no_rl else None)
      editors = [(f"RL epoch {run.epoch}" if run.epoch is not None else "no RL", run.editor)]
      if request.compare_no_rl and run.epoch is not None:
        editors.insert(0, ("no RL (starting editor)", run.starting_editor()))
    else:
      editors = [(request.pretrained, run_loading.load_pretrained_editor(request.pretrained))]
  except (run_loading.RunLoadingError, ValueError, OSError) as e:
    flag = (f"--workdir={request.workdir}" if request.workdir
            else f"--pretrained={request.pretrained}")
    raise EvaluationError(f"{flag}: {e}") from e
  # A run uses its own sampler; a pretrained folder InstructPix2Pix's (20 steps, 7.5 / 1.5).
  sampler = config.sampler if config else {"num_steps": 20, "guidance_scale": 7.5,
                                         "image_guidance_scale": 1.5}
  settings = SamplerSettings(
      num_steps=request.steps or sampler["num_steps"],
      guidance_scale=(request.guidance_scale if request.guidance_scale is not None
                      else sampler["guidance_scale"]),
      image_guidance_scale=(request.image_guidance_scale if request.image_guidance_scale
                            is not None else sampler["image_guidance_scale"]),
      eta=request.eta, seed=request.seed, batch_size=request.batch_size)
  tokenizer = editors[0][1].tokenizer
  notes = []
  clip_t_text = "target_caption"
  if dataset == "shapes_edit":
    try:
      text_model, vision_model, clip_params = shapes_clip(run, request.clip_model)
    except ValueError as e:
      raise EvaluationError(str(e)) from e
    keys = list(shapes_metrics.SHAPES_METRICS)
    score = functools.partial(shapes_per_example, tokenizer=tokenizer,
                              clip_text=text_model, clip_vision=vision_model,
                              clip_params=clip_params, batch_size=request.batch_size)
    reference = []
  else:
    keys = list(image_metrics.MAGICBRUSH_METRICS)
    score = lambda ex, ed, _maps: magicbrush_per_example(  # noqa: E731
        ex, ed, models, tokenizer, request.batch_size)
    if request.setting == image_metrics.MAGICBRUSH_REFERENCE_SETTING:
      reference = image_metrics.reference_markdown_rows(keys)
    else:
      reference = []
      notes.append("The paper's reference rows are single-turn numbers; they are not shown "
                   "under a multi-turn table.")
    if all(e["target_caption"] == e["instruction"] for e in examples):
      clip_t_text = "instruction"
      notes.append("CLIP-T compares each edit with its instruction: the data has no target "
                   "captions (MagicBrush's protocol uses the local caption of each target; "
                   "the hub's parquet shards have none).")
      logging.warning("No target captions in %s/%s: CLIP-T uses the instructions.",
                      dataset, request.split)
    else:
      clip_t_text = "target_caption"
  results = []
  for name, editor in editors:
    logging.info("Evaluating %s on %d examples of %s/%s (%s).", name, len(examples), dataset,
                 request.split, request.setting)
    results.append(evaluate(name, editor, examples, settings, score, keys,
                            multi_turn=multi_turn))
  output = request.output or os.path.join(request.workdir or ".", "eval",
                                          f"{dataset}_{request.split}_{request.setting}")
  if multi_turn:
    notes.append(f"multi_turn: {len(results[0].scored_indices)} sessions edited turn by turn "
                 f"({len(examples)} edits, each turn from the previous turn's edit); the "
                 "scores are those of each session's final turn.")
  metadata = {"workdir": request.workdir, "pretrained": request.pretrained,
              "rl_epoch": run.epoch if run else None, "dataset": dataset,
              "split": request.split, "setting": request.setting, "resolution": resolution,
              "num_examples": len(results[0].scored_indices), "num_edits": len(examples),
              "scored": "final turn of each session" if multi_turn else "every example",
              "sampler": settings.__dict__,
              "reference": image_metrics.MAGICBRUSH_REFERENCE if reference else None,
              "reference_setting": (image_metrics.MAGICBRUSH_REFERENCE_SETTING if reference
                                    else None),
              "clip_t_text": clip_t_text if dataset == "magicbrush" else "target_caption"}
  return write_reports(results, examples, keys, output, metadata, reference, notes=notes,
                       save_edited=request.save_edits, magicbrush_layout=dataset == "magicbrush",
                       figure_examples=request.figure_examples or FIGURE_EXAMPLES)
