r"""A browser page to try edits: the starting (supervised) editor and the RL editor side by side.

    pip install -r requirements-demo.txt   # once (see the README: gradio is optional)
    python -m launch.demo --workdir=runs/shapes/rl
    python -m launch.demo --pretrained=timbrooks/instruct-pix2pix --rl_pretrained=exported/

then open http://127.0.0.1:7860. Upload an image or pick one of the dataset's held-out scenes
(``--scene_split``, first ``--num_scenes``), give an instruction and optionally an object phrase
(words of the instruction); each editor's edit is shown with the phrase's cross-attention
overlay and, for a held-out shapes scene, the programmatic check's verdict
(``rl4pix_jax/data/shapes_check.py``). Edits are ``launch.edit``'s (eta 0, same size rule,
same seed, same pixels). The first edit compiles (a progress bar says so). A bad input is a
message on the page.

``--workdir``: the run's starting editor and its RL policy (``--step``: an epoch or ``best``;
default the latest); the scenes are the run's dataset. ``--pretrained``: a diffusers
InstructPix2Pix folder or hub id as the starting editor, and ``--rl_pretrained`` (e.g. an
``launch.export`` folder) as the RL editor; scenes from ``--data_dir`` (a prepared tfds
data_dir) when given. The server listens on ``--host`` (127.0.0.1: this machine only).
"""

import os
import sys

from absl import flags

from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder written by launch.train.")
cli.define_step_flag()
flags.DEFINE_string("pretrained", None, "Diffusers InstructPix2Pix folder or hub id: the "
                    "starting editor (instead of --workdir).")
flags.DEFINE_string("rl_pretrained", None, "With --pretrained: the RL editor's diffusers "
                    "folder (e.g. a launch.export output).")
flags.DEFINE_string("data_dir", None, "With --pretrained: a prepared tfds data_dir whose "
                    "held-out scenes to offer.")
flags.DEFINE_string("dataset", "shapes_edit", "With --data_dir: the dataset in it.")
flags.DEFINE_string("scene_split", "test", "The split whose scenes the page offers.")
flags.DEFINE_integer("num_scenes", 16, "How many of the split's first scenes to offer (0: none).")
flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 7860, "Port to serve on (0: a free one).")

INSTALL_HINT = ("pip install -r requirements-demo.txt && pip install --no-deps gradio==6.31.0 "
                "(see the README, 'Browser demo and Weights & Biases')")


def load_demo_editors(workdir=None, step=None, pretrained=None, rl_pretrained=None,
                      data_dir=None, dataset="shapes_edit", scene_split="test",
                      num_scenes=16):
  """The ``demo.DemoEditors`` of the flags (see the module docstring)."""
  # pylint: disable=import-outside-toplevel
  from absl import logging

  from rl4pix_jax import demo, editing
  from rl4pix_jax.data import loader
  from rl4pix_jax.evaluation import load_examples
  from rl4pix_jax.rl import run_loading, run_setup
  config = None
  if workdir:
    run = run_loading.load_run(workdir, step)
    config = run.config
    start = run.starting_editor()
    rl = run.editor if run.epoch is not None else None
    rl_name = f"RL editor (epoch {run.epoch})"
    start_name = ("starting (pretrained) editor" if config.model.pretrained
                  else "starting (supervised) editor")
    dataset = config.data.dataset
  else:
    start = run_loading.load_pretrained_editor(pretrained)
    rl = run_loading.load_pretrained_editor(rl_pretrained) if rl_pretrained else None
    rl_name, start_name = f"RL editor ({rl_pretrained})", f"starting editor ({pretrained})"
  scenes = []
  if num_scenes > 0 and (config is not None or data_dir):
    try:
      folder = (loader.find_dataset_dir(data_dir, dataset, "") if data_dir
                else run_setup.prepare_dataset(config, workdir))
      resolution = config.resolution if config is not None else (start.resolution or 512)
      scenes = load_examples(folder, scene_split, resolution, num_scenes)
    except (ValueError, OSError) as e:  # the page still edits uploads
      logging.warning("No held-out scenes (%s); upload images instead.", e)
      print(f"warning: no held-out scenes ({cli.one_line(e)}); the page edits uploads.",
            file=sys.stderr)
  return demo.DemoEditors(
      start=start, rl=rl, start_name=start_name, rl_name=rl_name, scenes=scenes,
      shapes_scenes=dataset == "shapes_edit" and bool(scenes),
      sampler=editing.resolve_sampler(start.sampler_defaults),
      max_side=editing.default_max_side(start, config.resolution if config else None))


def main(argv):
  if len(argv) > 1:
    return cli.fail(f"Unexpected arguments: {argv[1:]}")
  if bool(FLAGS.workdir) == bool(FLAGS.pretrained):
    return cli.fail("pass exactly one of --workdir=<run folder> or --pretrained=<diffusers "
                    "folder or hub id>.")
  if FLAGS.rl_pretrained and not FLAGS.pretrained:
    return cli.fail("--rl_pretrained goes with --pretrained (a run's --workdir has its own RL "
                    "policy; choose its epoch with --step).")
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("gradio") is None:  # imported (seconds) once the editors load
    return cli.fail(f"launch.demo needs gradio, an optional dependency: {INSTALL_HINT}.")
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  from rl4pix_jax import demo  # pylint: disable=import-outside-toplevel
  editors = load_demo_editors(FLAGS.workdir, FLAGS.step, FLAGS.pretrained, FLAGS.rl_pretrained,
                              FLAGS.data_dir, FLAGS.dataset, FLAGS.scene_split,
                              FLAGS.num_scenes)
  app = demo.build_app(editors)
  port = FLAGS.port or demo.free_port(FLAGS.host)
  print(f"[rl4pix_jax] demo: {editors.start_name} vs "
        f"{editors.rl_name if editors.rl else 'no RL editor'}, {len(editors.scenes)} "
        f"held-out scenes; serving on http://{FLAGS.host}:{port} (Ctrl-C stops it)",
        flush=True)
  app.queue().launch(server_name=FLAGS.host, server_port=port, share=False,
                     inbrowser=False, show_error=True, css=demo.PAGE_CSS)
  return 0


if __name__ == "__main__":
  cli.run(main)
