r"""Runs one supervised stage of the embedded default (vae, clip or unet).

  python -m launch.pretrain --config=configs/shapes.py:vae --workdir=runs/shapes
  python -m launch.pretrain --config=configs/shapes.py:clip --workdir=runs/shapes
  python -m launch.pretrain --config=configs/shapes.py:unet --workdir=runs/shapes \
      --config.pretrain.unet.steps=10

The stage comes from the config argument (``config.stage``) or ``--stage``. A stage whose final
checkpoint exists is skipped; an interrupted one resumes. The workdir layout is documented in
``rl4pix_jax/workdir/stages.py``. ``--quick_check`` (unet) samples validation edits
and prints the success rate against the "return the source" baseline.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags

from launch import cli

from rl4pix_jax.pretrain import clip_training
from rl4pix_jax.pretrain import editor_training
from rl4pix_jax.pretrain import vae_training
from rl4pix_jax.workdir import layout

cli.define_config_file("config", "configs/shapes.py:vae",
                       "Config file and stage, e.g. configs/shapes.py:vae.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (stages write <workdir>/<stage>).",
                               required=True)
_STAGE = flags.DEFINE_enum("stage", None, list(layout.STAGES),
                           "Overrides the stage named in --config.")
_QUICK_CHECK = flags.DEFINE_integer("quick_check", 0,
                                    "After the unet stage, edit this many validation examples "
                                    "and print check_edit rates (0: skip).")
_GRID = flags.DEFINE_string("grid", "", "With --quick_check: write a source|edit|target PNG.")
_WEIGHTS = flags.DEFINE_enum("quick_check_weights", "ema", ["ema", "online"],
                             "With --quick_check: the stage's params (the EMA) or the online "
                             "weights of its newest checkpoint (needs its optimizer state).")

_START_FROM = flags.DEFINE_string(
    "start_from", "", "unet with pretrain.unet.restart_at > 0: a folder holding unet/ (e.g. "
    "assets/shapes_editor) whose params continue the stage from its warm restart; the "
    "restart keeps only those weights, so the result is the same recipe continued.")
TRAINERS = {"vae": vae_training.train_vae, "clip": clip_training.train_clip,
            "unet": editor_training.train_editor}


def main(argv):
  del argv
  from rl4pix_jax import config_validation  # pylint: disable=import-outside-toplevel
  config = flags.FLAGS.config
  stage = _STAGE.value or config.stage
  if stage not in TRAINERS:
    raise app.UsageError(f"Stage {stage!r} is not a supervised stage; use one of "
                         f"{sorted(TRAINERS)} (--config=configs/shapes.py:vae or --stage=vae).")
  config_validation.validate_pretrain_config(config, stage)
  if _START_FROM.value:
    if stage != "unet":
      raise app.UsageError(f"--start_from continues the unet stage, not {stage!r}.")
    try:
      step = editor_training.start_from_params(config, _WORKDIR.value, _START_FROM.value)
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(str(e)) from None
    print(f"unet: starting at step {step} from the params in {_START_FROM.value}")
  TRAINERS[stage](config, _WORKDIR.value)
  if _QUICK_CHECK.value and stage == "unet":
    from rl4pix_jax.pretrain import editor_check

    online = (editor_training.latest_online_params(_WORKDIR.value)
              if _WEIGHTS.value == "online" else None)
    results = editor_check.evaluate_editor_quickly(config, _WORKDIR.value, unet_params=online,
                                                   num_examples=_QUICK_CHECK.value,
                                                   grid_path=_GRID.value or None)
    results.pop("per_example")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
  cli.run(main)
