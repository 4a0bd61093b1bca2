"""``python -m tests.helpers.killed_train EPOCH <launch.train flags>``: ``launch.train`` exactly as
the command line runs it, SIGKILLed at the end of epoch EPOCH's work, after its metrics line and
before its checkpoint (``trainer.train``'s ``on_epoch_end`` hook), as a preempted TPU VM dies."""

import os
import signal
import sys


def main() -> None:
  kill_at = int(sys.argv.pop(1))
  from launch import cli  # pylint: disable=import-outside-toplevel
  from launch import train as train_command  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.rl import trainer  # pylint: disable=import-outside-toplevel

  original = trainer.train

  def train_then_die(*args, **kwargs):
    def on_epoch_end(epoch, _):
      if epoch == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, on_epoch_end=on_epoch_end, **kwargs)

  trainer.train = train_then_die  # launch.train imports trainer inside main, after this
  cli.run(train_command.main)


if __name__ == "__main__":
  main()
