r"""Evaluates a run's editor on a dataset split; writes a JSON report and a markdown table.

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
evaluated, and the log says so. Sampler defaults: the run's config (``--workdir``) or an
exported folder's ``rl4pix_sampler.json`` (``--pretrained``, as ``launch.edit``), else 20
steps, guidance 7.5 / 1.5; explicit flags win.

MagicBrush settings (``rl4pix_jax.evaluation``): ``single_turn`` edits every turn from its
ground-truth input and scores every turn; ``multi_turn`` edits each session turn by turn, each
turn from the previous turn's edit, and scores the final turn of each session
(``--max_examples`` then counts sessions). The published reference rows (single-turn) are
printed under single-turn tables only.
"""

import dataclasses

from absl import app, flags

from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder written by launch.train.")
flags.DEFINE_string("pretrained", None, "Diffusers InstructPix2Pix folder or hub id "
                    "(instead of --workdir; MagicBrush only unless --clip_model is given).")
cli.define_step_flag()
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
flags.DEFINE_integer("steps", None, "DDIM steps (default: the run's sampler.num_steps, an "
                     "exported folder's rl4pix_sampler.json, or 20).")
flags.DEFINE_float("guidance_scale", None, "Text guidance (default: the run's or the exported "
                   "folder's, or 7.5).")
flags.DEFINE_float("image_guidance_scale", None, "Image guidance (default: the run's or the "
                   "exported folder's, or 1.5).")
flags.DEFINE_float("eta", 0.0, "DDIM eta of the evaluation sampler.")
flags.DEFINE_integer("batch_size", 8, "Images per compiled call.")
flags.DEFINE_integer("figure_examples", None, "Examples (rows) in the example and "
                     "comparison figures (default: evaluation.FIGURE_EXAMPLES, 8).")
flags.DEFINE_bool("save_edits", False, "Also write every edited image as a PNG under "
                  "<output>_edits/<model index>/ (the pixels that were scored).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from rl4pix_jax import evaluation  # pylint: disable=import-outside-toplevel
  request = evaluation.EvaluationRequest(**{
      field.name: FLAGS[field.name].value
      for field in dataclasses.fields(evaluation.EvaluationRequest)})
  try:
    paths = evaluation.run_evaluation(request)
  except evaluation.EvaluationError as e:
    return cli.fail(str(e))
  from rl4pix_jax.workdir import files  # pylint: disable=import-outside-toplevel
  print(files.read_text(paths["markdown"]))
  print(f"Wrote {', '.join(paths.values())}")
  return 0


if __name__ == "__main__":
  cli.run(main)
