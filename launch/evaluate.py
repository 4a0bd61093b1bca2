"""Evaluates a run's editor on a dataset split; writes a JSON report and a markdown table.

    python -m launch.evaluate --workdir=runs/shapes/rl --dataset=shapes_edit --split=test
    python -m launch.evaluate --workdir=runs/shapes/rl --compare_no_rl --max_examples=64
    python -m launch.evaluate --pretrained=timbrooks/instruct-pix2pix --dataset=magicbrush \
        --data_dir=data --clip_model=openai/clip-vit-base-patch32 \
        --dino_model=facebook/dino-vits16 --resolution=512 --setting=single_turn

Outputs ``<output>.json``, ``<output>.md`` and ``<output>_<i>.png`` (source | edit |
attention | target of the first examples, one figure per evaluated model); ``--output``
defaults to ``<workdir>/eval/<dataset>_<split>_<setting>``. Every model is edited with the
same examples and seeds. Without an RL checkpoint (or with ``--no_rl``) the run's starting
(supervised or pretrained) editor is evaluated, and the log says so.
"""

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder written by launch.train.")
flags.DEFINE_string("pretrained", None, "Diffusers InstructPix2Pix folder or hub id "
                    "(instead of --workdir; MagicBrush only unless --clip_model is given).")
flags.DEFINE_integer("step", None, "RL checkpoint epoch (default: the latest).")
flags.DEFINE_bool("no_rl", False, "Evaluate the run's starting editor (no RL checkpoint).")
flags.DEFINE_bool("compare_no_rl", False, "Also evaluate the starting editor (same examples "
                  "and seeds) and put both rows in the table.")
flags.DEFINE_enum("dataset", None, ["shapes_edit", "magicbrush"],
                  "Dataset (default: the run's config.data.dataset).")
flags.DEFINE_string("split", "test", "Split to evaluate.")
flags.DEFINE_string("data_dir", None, "tfds data_dir (default: the run's data folder).")
flags.DEFINE_integer("max_examples", None, "Evaluate the split's first N examples.")
flags.DEFINE_enum("setting", "single_turn", ["single_turn", "multi_turn"],
                  "MagicBrush setting: multi_turn edits the previous turn's output.")
flags.DEFINE_integer("resolution", None, "Image side (default: the run's config.resolution).")
flags.DEFINE_string("clip_model", None, "CLIPModel folder/hub id (MagicBrush: "
                    "openai/clip-vit-base-patch32; shapes: default the run's reward CLIP).")
flags.DEFINE_string("dino_model", None, "DINO ViT folder/hub id (facebook/dino-vits16).")
flags.DEFINE_string("output", None, "Output path prefix (no extension).")
flags.DEFINE_integer("seed", 0, "Sampling seed, shared by every evaluated model.")
flags.DEFINE_integer("steps", None, "DDIM steps (default: the run's sampler.num_steps).")
flags.DEFINE_float("guidance_scale", None, "Text guidance (default: the run's, or 7.5).")
flags.DEFINE_float("image_guidance_scale", None, "Image guidance (default: run's, or 1.5).")
flags.DEFINE_float("eta", 0.0, "DDIM eta of the evaluation sampler.")
flags.DEFINE_integer("batch_size", 8, "Images per compiled call.")


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def _magicbrush_models(clip_folder: str, dino_folder: str):
  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.metrics import image_metrics
  from rl4pix_jax.models import clip, vit
  from rl4pix_jax.weights import folders, transformers_clip, transformers_vit
  loaded = transformers_clip.load_clip(folders.resolve_pretrained(clip_folder))
  vit_config, vit_params = transformers_vit.load_vit(folders.resolve_pretrained(dino_folder))
  return image_metrics.EvaluationModels(
      clip_text_params=loaded.text_params, clip_vision_params=loaded.vision_params,
      dino_params=vit_params, clip_text=clip.CLIPTextModel(loaded.text_config),
      clip_vision=clip.CLIPVisionModel(loaded.vision_config), dino=vit.ViTModel(vit_config))


def _shapes_clip(run, clip_folder):
  """(text model, vision model, {"text", "vision"} params) for the shapes CLIP-T."""
  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.models import clip
  from rl4pix_jax.weights import folders, transformers_clip
  if clip_folder:
    loaded = transformers_clip.load_clip(folders.resolve_pretrained(clip_folder))
    return (clip.CLIPTextModel(loaded.text_config), clip.CLIPVisionModel(loaded.vision_config),
            {"text": loaded.text_params, "vision": loaded.vision_params})
  if run is None or run.setup.clip_params is None:
    raise ValueError("The shapes CLIP-T needs a CLIP: pass --clip_model=<CLIPModel folder> "
                     "(the run has no reward CLIP).")
  return run.setup.clip_text_model, run.setup.clip_vision_model, run.setup.clip_params


def main(argv):  # pylint: disable=too-many-locals,too-many-return-statements,too-many-branches
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # pylint: disable=import-outside-toplevel
  import functools

  from rl4pix_jax import evaluation, run_loading, run_setup
  from rl4pix_jax.data import loader
  from rl4pix_jax.metrics import image_metrics, shapes_metrics
  if bool(FLAGS.workdir) == bool(FLAGS.pretrained):
    return _fail("pass exactly one of --workdir=<run folder> or --pretrained=<diffusers "
                 "folder or hub id>.")
  run = config = None
  if FLAGS.workdir:
    try:
      config = run_loading.read_run_config(FLAGS.workdir)
    except run_loading.RunLoadingError as e:
      return _fail(str(e))
  dataset = FLAGS.dataset or (config.data.dataset if config else None)
  if dataset is None:
    return _fail("--dataset=<shapes_edit|magicbrush> is needed with --pretrained.")
  multi_turn = FLAGS.setting == "multi_turn"
  if dataset == "shapes_edit" and multi_turn:
    return _fail("--setting=multi_turn is a MagicBrush setting; shapes_edit is single-turn.")
  if dataset == "magicbrush" and not (FLAGS.clip_model and FLAGS.dino_model):
    return _fail("MagicBrush metrics need --clip_model=<CLIP ViT-B/32 folder, e.g. "
                 "openai/clip-vit-base-patch32> and --dino_model=<DINO ViT-S/16 folder, "
                 "e.g. facebook/dino-vits16>.")
  try:
    if FLAGS.workdir:
      run = run_loading.load_run(FLAGS.workdir, FLAGS.step,
                                 use_rl=False if FLAGS.no_rl else None)
      editors = [(f"RL epoch {run.epoch}" if run.epoch is not None else "no RL", run.editor)]
      if FLAGS.compare_no_rl and run.epoch is not None:
        editors.insert(0, ("no RL (starting editor)", run.starting_editor()))
    else:
      editors = [(FLAGS.pretrained, run_loading.load_pretrained_editor(FLAGS.pretrained))]
  except (run_loading.RunLoadingError, ValueError) as e:
    return _fail(str(e))
  try:
    if FLAGS.data_dir:
      dataset_dir = loader.find_dataset_dir(FLAGS.data_dir, dataset)
    elif config is not None and dataset == config.data.dataset:
      dataset_dir = run_setup.prepare_dataset(config, FLAGS.workdir)
    else:
      return _fail(f"--data_dir=<tfds data_dir holding {dataset}> is needed.")
    resolution = FLAGS.resolution or (config.resolution if config else 512)
    examples = evaluation.load_examples(dataset_dir, FLAGS.split, resolution,
                                        FLAGS.max_examples)
  except ValueError as e:
    return _fail(str(e))
  sampler = config.sampler if config else {}
  settings = evaluation.SamplerSettings(
      num_steps=FLAGS.steps or sampler.get("num_steps", 20),
      guidance_scale=(FLAGS.guidance_scale if FLAGS.guidance_scale is not None
                      else sampler.get("guidance_scale", 7.5)),
      image_guidance_scale=(FLAGS.image_guidance_scale if FLAGS.image_guidance_scale
                            is not None else sampler.get("image_guidance_scale", 1.5)),
      eta=FLAGS.eta, seed=FLAGS.seed, batch_size=FLAGS.batch_size)
  tokenizer = editors[0][1].tokenizer
  if dataset == "shapes_edit":
    try:
      text_model, vision_model, clip_params = _shapes_clip(run, FLAGS.clip_model)
    except ValueError as e:
      return _fail(str(e))
    keys = list(shapes_metrics.SHAPES_METRICS)
    score = functools.partial(evaluation.shapes_per_example, tokenizer=tokenizer,
                              clip_text=text_model, clip_vision=vision_model,
                              clip_params=clip_params, batch_size=FLAGS.batch_size)
    reference = []
  else:
    models = _magicbrush_models(FLAGS.clip_model, FLAGS.dino_model)
    keys = list(image_metrics.MAGICBRUSH_METRICS)
    score = lambda ex, ed, _maps: evaluation.magicbrush_per_example(  # noqa: E731
        ex, ed, models, tokenizer, FLAGS.batch_size)
    reference = image_metrics.reference_markdown_rows(keys)
  results = []
  for name, editor in editors:
    logging.info("Evaluating %s on %d examples of %s/%s.", name, len(examples), dataset,
                 FLAGS.split)
    results.append(evaluation.evaluate(name, editor, examples, settings, score, keys,
                                       multi_turn=multi_turn))
  output = FLAGS.output or os.path.join(FLAGS.workdir or ".", "eval",
                                        f"{dataset}_{FLAGS.split}_{FLAGS.setting}")
  metadata = {"workdir": FLAGS.workdir, "pretrained": FLAGS.pretrained,
              "rl_epoch": run.epoch if run else None, "dataset": dataset,
              "split": FLAGS.split, "setting": FLAGS.setting, "resolution": resolution,
              "num_examples": len(examples), "sampler": settings.__dict__,
              "reference": image_metrics.MAGICBRUSH_REFERENCE if reference else None}
  paths = evaluation.write_reports(results, examples, keys, output, metadata, reference)
  with open(paths["markdown"], encoding="utf-8") as f:
    print(f.read())
  print(f"Wrote {', '.join(paths.values())}")
  return 0


if __name__ == "__main__":
  app.run(main)
