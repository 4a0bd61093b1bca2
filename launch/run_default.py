r"""The embedded default, end to end: data -> VAE -> CLIP -> editor UNet -> RL -> evaluation.

    python -m launch.run_default --workdir=runs/shapes                       # shipped stages
    python -m launch.run_default --workdir=runs/shapes --supervised=train    # train them too
    python -m launch.run_default --workdir=runs/smoke --supervised=train \
        --config.pretrain.unet.steps=2 ...

``--supervised=shipped`` (the default) copies the supervised stages that the repository ships
in ``assets/shapes_editor/`` (trained by ``--supervised=train`` with the default
config; they are refused when the config differs in a field they depend on);
``--supervised=train`` trains them. Each stage is the project's own command run as a
subprocess (the commands a user would run by hand, printed before they run), and each is
skipped when its final checkpoint exists, so an interrupted default resumes where it stopped. ``--config.*`` overrides are passed to every
stage. At the end the supervised editor and the RL editor are evaluated on the same held-out
examples and seeds, and ``<workdir>/results.md`` / ``results.json`` compare them
(``launch.evaluate --compare_no_rl``); ``timings.json`` holds each stage's wall time.
"""

import json
import os
import subprocess
import sys
import time
from typing import List

from absl import app, flags

from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/shapes", "Folder of the whole default run.")
flags.DEFINE_string("config", "configs/shapes.py", "Config file (ml_collections).")
flags.DEFINE_integer("max_eval_examples", 200, "Held-out test examples to evaluate.")
flags.DEFINE_bool("evaluate", True, "Evaluate the supervised and the RL editor at the end.")
flags.DEFINE_enum("supervised", "shipped", ["shipped", "train"],
                  "shipped: copy the repository's supervised stages (assets/"
                  "shapes_editor); train: train VAE, CLIP and editor UNet here.")
flags.DEFINE_string("shipped_dir", None, "Folder of the shipped supervised stages "
                    "(default: the repository's assets/shapes_editor).")


def config_overrides(argv: List[str]) -> List[str]:
  """The ``--config.<field>=<value>`` arguments of this command, passed on to every stage."""
  return [a for a in argv[1:] if a.startswith("--config.")]


def run_stage(name: str, command: List[str]) -> float:
  """Runs one stage command (printed first); returns its wall time in seconds."""
  print(f"\n[run_default] {name}: {' '.join(command)}", flush=True)
  began = time.perf_counter()
  result = subprocess.run(command, check=False)
  if result.returncode != 0:
    raise SystemExit(f"[run_default] stage {name!r} failed (exit code {result.returncode}); "
                     "fix the error above and rerun the same command: finished stages are "
                     "skipped.")
  return time.perf_counter() - began


def parse_flags(argv: List[str]) -> List[str]:
  """absl parses this command's own flags; ``--config.*`` overrides are for the stages."""
  return FLAGS([a for a in argv if not a.startswith("--config.")])


def main(argv):
  overrides = config_overrides(sys.argv)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  python = sys.executable
  timings = {}
  began = time.perf_counter()
  if FLAGS.supervised == "shipped":
    timings["install_supervised"] = install_shipped(workdir, overrides)
  for stage in ("vae", "clip", "unet"):
    timings[f"pretrain_{stage}"] = run_stage(
        f"pretrain {stage}", [python, "-m", "launch.pretrain",
                              f"--config={FLAGS.config}:{stage}", f"--workdir={workdir}",
                              *overrides])
  rl_dir = os.path.join(workdir, "rl")
  timings["rl"] = run_stage("RL fine-tuning", [python, "-m", "launch.train",
                                               f"--config={FLAGS.config}",
                                               f"--workdir={rl_dir}", *overrides])
  if FLAGS.evaluate:
    timings.update(evaluate_both(python, workdir, rl_dir))
  timings["total"] = time.perf_counter() - began
  with open(os.path.join(workdir, "timings.json"), "w", encoding="utf-8") as f:
    json.dump(timings, f, indent=2)
  print("\n[run_default] wall time per stage (s): " +
        ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)


def install_shipped(workdir: str, overrides: List[str]) -> float:
  """Copies the shipped supervised stages into ``workdir``; returns the seconds it took."""
  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags
  from rl4pix_jax.pretrain import shipped
  from rl4pix_jax.workdir import layout
  began = time.perf_counter()
  holder = flags.FlagValues()
  config_flags.DEFINE_config_file("config", FLAGS.config, flag_values=holder)
  holder(["run_default", *overrides])  # the config file with the stages' --config.* overrides
  root = FLAGS.shipped_dir or layout.SHIPPED_EDITOR_DIR
  for stage in ("vae", "clip", "unet"):
    try:
      copied = shipped.install_stage(root, workdir, stage, holder.config)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
      raise SystemExit(f"[run_default] {e}") from e
    print(f"[run_default] {stage}: " + (f"installed the shipped checkpoint from {root}"
                                        if copied else "already complete in the workdir"),
          flush=True)
  return time.perf_counter() - began


def evaluate_both(python: str, workdir: str, rl_dir: str) -> dict:
  """Evaluates the supervised editor and the RL editor on the same test examples and seeds;
  writes ``<workdir>/results.json``, ``results.md`` and the example figure."""
  seconds = run_stage(
      "evaluate supervised vs RL editor",
      [python, "-m", "launch.evaluate", f"--workdir={rl_dir}", "--dataset=shapes_edit",
       "--split=test", f"--max_examples={FLAGS.max_eval_examples}", "--compare_no_rl",
       f"--output={os.path.join(workdir, 'results')}"])
  # launch.evaluate has printed the table: name the files rather than print it twice.
  print(f"[run_default] results: {os.path.join(workdir, 'results.md')} (and results.json)",
        flush=True)
  return {"evaluation": seconds}


if __name__ == "__main__":
  cli.run(main, flags_parser=parse_flags)
