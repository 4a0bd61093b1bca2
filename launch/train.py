r"""RL fine-tuning of an InstructPix2Pix editor with PPO (the method's main stage).

    python -m launch.train --config=configs/shapes.py --workdir=runs/shapes/rl
    python -m launch.train --config=configs/shapes.py --workdir=runs/shapes/rl \
        --config.ppo.clip_range=1e-4 --config.train.num_epochs=50

Every config value can be overridden with ``--config.<section>.<field>=<value>`` (``--help``
lists them, ``--print_config`` prints the resolved config). The config is validated before
anything is written. Rerunning the same command resumes from the newest readable checkpoint
in ``<workdir>/checkpoints`` (an unreadable newer one is named in a warning and moved to
``<workdir>/checkpoints_unreadable/``). On a TPU pod
or a multi-node GPU job, start it on every host: ``jax.distributed`` is initialised from the
environment (see docs/scaling_out.md).
"""

from absl import app, flags, logging

from launch import cli
from rl4pix_jax import distributed

FLAGS = flags.FLAGS
cli.define_config_file("config", "configs/shapes.py", "Run config (ml_collections).")
flags.DEFINE_string("workdir", None, "Run folder (local path or gs://).", required=True)
flags.DEFINE_integer("stop_after_epochs", None,
                     "Stop with a checkpoint after this many epochs of this invocation.")
flags.DEFINE_bool("print_config", False, "Print the resolved config (file + overrides) as "
                  "JSON, validated, and exit without touching --workdir.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from rl4pix_jax import config_validation  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  config_validation.validate_run_config(config)  # before any work, and before any write
  if FLAGS.print_config:
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    return 0
  info = distributed.maybe_initialize_distributed()
  logging.info("Process %d of %d.", info.process_index, info.process_count)
  # Imported after jax.distributed is initialised, as JAX requires.
  from rl4pix_jax.rl import run_setup  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.rl import trainer  # pylint: disable=import-outside-toplevel
  setup = run_setup.rl_setup_from_config(config, FLAGS.workdir)
  iterator = run_setup.make_train_iterator(config, FLAGS.workdir, setup.tokenizer)
  history = trainer.train(config, FLAGS.workdir, setup, iterator,
                          stop_after_epochs=FLAGS.stop_after_epochs)
  if history:
    last = history[-1]
    logging.info("Finished epoch %d: reward %.4f.", last["epoch"], last["reward_mean"])


if __name__ == "__main__":
  cli.run(main)
