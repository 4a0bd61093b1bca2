"""Exports a run's editor (RL policy with LoRA merged) as a diffusers pipeline folder.

    python -m launch.export --workdir=runs/shapes/rl --output=exported/shapes_ip2p
    python -m launch.export --workdir=runs/shapes/rl --step=3 --output=exported/epoch3

The folder loads with ``diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained``;
``rl4pix_sampler.json`` beside ``model_index.json`` records the run's sampler (steps, guidance,
image guidance, eta), the defaults of ``launch.edit --pretrained=<folder>``.
"""

from absl import app, flags, logging

from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder written by launch.train.", required=True)
flags.DEFINE_string("output", None, "Folder to write the diffusers pipeline into.",
                    required=True)
cli.define_step_flag()
flags.DEFINE_bool("no_rl", False, "Export the run's starting editor (no RL checkpoint).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from rl4pix_jax import export  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.rl import run_loading  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.weights import folders  # pylint: disable=import-outside-toplevel
  try:
    config = run_loading.read_run_config(FLAGS.workdir)
    editor = run_loading.load_run_editor(FLAGS.workdir, FLAGS.step,
                                         use_rl=False if FLAGS.no_rl else True)
  except (run_loading.RunLoadingError, ValueError) as e:
    return cli.fail(str(e))
  base = folders.resolve_pretrained(config.model.pretrained) if config.model.pretrained else None
  export.export_pipeline(editor.models, editor.params, editor.tokenizer,
                         config.model.scheduler, FLAGS.output, base_folder=base,
                         sampler_config=config.sampler)
  logging.info("Wrote %s", FLAGS.output)
  print(f"Exported the editor of {FLAGS.workdir} to {FLAGS.output}")
  return 0


if __name__ == "__main__":
  cli.run(main)
