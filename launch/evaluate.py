"""Evaluates a run's editor on a dataset split; writes a JSON report and a markdown table.

    python -m launch.evaluate --workdir=runs/shapes/rl --dataset=shapes_edit --split=test
    python -m launch.evaluate --workdir=runs/shapes/rl --compare_no_rl --max_examples=64
    python -m launch.evaluate --pretrained=timbrooks/instruct-pix2pix --dataset=magicbrush \
        --data_dir=data --clip_model=openai/clip-vit-base-patch32 \
        --dino_model=facebook/dino-vits16 --resolution=512 --setting=single_turn

Outputs ``<output>.json``, ``<output>.md`` and ``<output>_<i>.png`` (input | edit |
attention | target of the first examples, one figure per evaluated model); with
``--save_edits`` every edit as a PNG under ``<output>_edits/<i>/`` (MagicBrush: in its
``testResults`` layout, ``<img_id>/<img_id>_1.png``, ``_inde_<k>.png`` / ``_iter_<k>.png``).
``--output`` defaults to ``<workdir>/eval/<dataset>_<split>_<setting>`` (``./eval/...`` with
``--pretrained``). Every model is edited with the same examples and seeds. Without an RL
checkpoint (or with ``--no_rl``) the run's starting (supervised or pretrained) editor is
evaluated, and the log says so.

MagicBrush settings (``rl4pix_jax.evaluation``): ``single_turn`` edits every turn from its
ground-truth input and scores every turn; ``multi_turn`` edits each session turn by turn, each
turn from the previous turn's edit, and scores the final turn of each session
(``--max_examples`` then counts sessions). The published reference rows (single-turn) are
printed under single-turn tables only.
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
flags.DEFINE_string("dataset_config", None, "tfds builder config under --data_dir (e.g. "
                    "MagicBrush 'default' or 'skip_bad'); needed only when several are built.")
flags.DEFINE_integer("max_examples", None, "Evaluate the split's first N examples "
                     "(multi_turn: the first N sessions, every turn of each).")
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
flags.DEFINE_bool("save_edits", False, "Also write every edited image as a PNG under "
                  "<output>_edits/<model index>/ (the pixels that were scored).")


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


_MAGICBRUSH_DATA_HINT = (" Build MagicBrush from its parquet shards first: `python -m "
                         "launch.prepare_data --dataset=magicbrush --data_dir=DIR "
                         "--magicbrush_dir=PARQUET_DIR`, then pass --data_dir=DIR.")


def _shapes_clip(run, clip_folder):
  """(text model, vision model, {"text", "vision"} params) for the shapes CLIP-T."""
  from rl4pix_jax.weights import transformers_clip  # pylint: disable=import-outside-toplevel
  if clip_folder:
    return transformers_clip.load_clip_models(clip_folder)
  if run is None or run.setup.clip_params is None:
    raise ValueError("The shapes CLIP-T needs a CLIP: pass --clip_model=<CLIPModel folder> "
                     "(the run has no reward CLIP).")
  return run.setup.clip_text_model, run.setup.clip_vision_model, run.setup.clip_params


def main(argv):  # pylint: disable=too-many-locals,too-many-return-statements,too-many-branches
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # pylint: disable=import-outside-toplevel
  import functools

  from rl4pix_jax import evaluation
  from rl4pix_jax.rl import run_loading
  from rl4pix_jax.rl import run_setup
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
  if FLAGS.max_examples is not None and FLAGS.max_examples < 1:
    return _fail(f"--max_examples={FLAGS.max_examples}: pass a positive number (or leave "
                 "it out to evaluate the whole split).")
  try:
    if FLAGS.data_dir:
      dataset_dir = loader.find_dataset_dir(FLAGS.data_dir, dataset, FLAGS.dataset_config)
    elif config is not None and dataset == config.data.dataset:
      dataset_dir = run_setup.prepare_dataset(config, FLAGS.workdir)
    else:
      return _fail(f"--data_dir=<tfds data_dir holding {dataset}> is needed."
                   + (_MAGICBRUSH_DATA_HINT if dataset == "magicbrush" else ""))
  except ValueError as e:
    hint = ""
    if "several" in str(e):
      hint = " Choose one with --dataset_config=<name>."
    elif dataset == "magicbrush" and "No prepared" in str(e):
      hint = _MAGICBRUSH_DATA_HINT
    return _fail(str(e) + hint)
  try:
    resolution = FLAGS.resolution or (config.resolution if config else 512)
    examples = evaluation.load_examples(dataset_dir, FLAGS.split, resolution,
                                        FLAGS.max_examples, multi_turn=multi_turn)
  except ValueError as e:
    hint = ""
    if (dataset == "magicbrush" and FLAGS.split == "test"
        and f"Split {FLAGS.split!r} not in" in str(e)):
      hint = (" MagicBrush's test set is not among the hub's parquet shards (it is a "
              "separate zip): evaluate --split=validation (the dev set), or put test-*.parquet "
              "shards with the same columns in --magicbrush_dir and rebuild.")
    return _fail(str(e) + hint)
  models = None
  if dataset == "magicbrush":
    try:
      models = evaluation.load_magicbrush_models(FLAGS.clip_model, FLAGS.dino_model)
    except (ValueError, OSError) as e:
      return _fail(str(e))
  try:
    if FLAGS.workdir:
      run = run_loading.load_run(FLAGS.workdir, FLAGS.step,
                                 use_rl=False if FLAGS.no_rl else None)
      editors = [(f"RL epoch {run.epoch}" if run.epoch is not None else "no RL", run.editor)]
      if FLAGS.compare_no_rl and run.epoch is not None:
        editors.insert(0, ("no RL (starting editor)", run.starting_editor()))
    else:
      editors = [(FLAGS.pretrained, run_loading.load_pretrained_editor(FLAGS.pretrained))]
  except (run_loading.RunLoadingError, ValueError, OSError) as e:
    flag = f"--workdir={FLAGS.workdir}" if FLAGS.workdir else f"--pretrained={FLAGS.pretrained}"
    return _fail(f"{flag}: {e}")
  sampler = config.sampler if config else {}
  settings = evaluation.SamplerSettings(
      num_steps=FLAGS.steps or sampler.get("num_steps", 20),
      guidance_scale=(FLAGS.guidance_scale if FLAGS.guidance_scale is not None
                      else sampler.get("guidance_scale", 7.5)),
      image_guidance_scale=(FLAGS.image_guidance_scale if FLAGS.image_guidance_scale
                            is not None else sampler.get("image_guidance_scale", 1.5)),
      eta=FLAGS.eta, seed=FLAGS.seed, batch_size=FLAGS.batch_size)
  tokenizer = editors[0][1].tokenizer
  notes = []
  clip_t_text = "target_caption"
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
    keys = list(image_metrics.MAGICBRUSH_METRICS)
    score = lambda ex, ed, _maps: evaluation.magicbrush_per_example(  # noqa: E731
        ex, ed, models, tokenizer, FLAGS.batch_size)
    if FLAGS.setting == image_metrics.MAGICBRUSH_REFERENCE_SETTING:
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
                      dataset, FLAGS.split)
    else:
      clip_t_text = "target_caption"
  results = []
  for name, editor in editors:
    logging.info("Evaluating %s on %d examples of %s/%s (%s).", name, len(examples), dataset,
                 FLAGS.split, FLAGS.setting)
    results.append(evaluation.evaluate(name, editor, examples, settings, score, keys,
                                       multi_turn=multi_turn))
  output = FLAGS.output or os.path.join(FLAGS.workdir or ".", "eval",
                                        f"{dataset}_{FLAGS.split}_{FLAGS.setting}")
  if multi_turn:
    notes.append(f"multi_turn: {len(results[0].scored_indices)} sessions edited turn by turn "
                 f"({len(examples)} edits, each turn from the previous turn's edit); the "
                 "scores are those of each session's final turn.")
  metadata = {"workdir": FLAGS.workdir, "pretrained": FLAGS.pretrained,
              "rl_epoch": run.epoch if run else None, "dataset": dataset,
              "split": FLAGS.split, "setting": FLAGS.setting, "resolution": resolution,
              "num_examples": len(results[0].scored_indices), "num_edits": len(examples),
              "scored": "final turn of each session" if multi_turn else "every example",
              "sampler": settings.__dict__,
              "reference": image_metrics.MAGICBRUSH_REFERENCE if reference else None,
              "reference_setting": (image_metrics.MAGICBRUSH_REFERENCE_SETTING if reference
                                    else None),
              "clip_t_text": clip_t_text if dataset == "magicbrush" else "target_caption"}
  paths = evaluation.write_reports(results, examples, keys, output, metadata, reference,
                                   notes=notes, save_edited=FLAGS.save_edits,
                                   magicbrush_layout=dataset == "magicbrush")
  with open(paths["markdown"], encoding="utf-8") as f:
    print(f.read())
  print(f"Wrote {', '.join(paths.values())}")
  return 0


if __name__ == "__main__":
  app.run(main)
