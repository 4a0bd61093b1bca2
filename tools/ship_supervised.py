"""Writes a run's supervised stages (params only) into assets/shapes_editor/.

    python -m launch.run_default --workdir=runs/shapes --supervised=train
    python -m tools.ship_supervised --workdir=runs/shapes

The config must be the one the run was trained with (the default: configs/shapes.py); its
fingerprint is stored beside each stage so that ``launch.run_default`` refuses a shipped stage
whose config no longer matches. Prints each stage folder's size (the shipped folder is part of
the git repository: keep each stage under 20 MB).
"""

import os

from absl import app, flags
from ml_collections import config_flags

from rl4pix_jax.pretrain import shipped
from rl4pix_jax.workdir import layout

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes.py",
                                          "Config the run was trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run whose stages to ship.", required=True)
_OUTPUT = flags.DEFINE_string("output", layout.SHIPPED_EDITOR_DIR, "Shipped stages folder.")


def folder_size(path: str) -> int:
  """Bytes of all files under ``path``."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for stage in layout.STAGES:
    folder = shipped.export_stage(_WORKDIR.value, stage, _CONFIG.value, _OUTPUT.value)
    print(f"{stage}: {folder} ({folder_size(folder) / 2**20:.1f} MiB)")


if __name__ == "__main__":
  app.run(main)
