"""Regression guard: the shipped shapes editor still edits held-out scenes.

Edits the first 48 validation scenes with the shipped VAE, CLIP and UNet (DDIM eta 0, 10 steps,
the config's guidance) and checks the programmatic success rate. Measured on the previous shipped
UNet (7500 steps, AMD EPYC host): success 0.625 at seed 0; over sampling seeds 0-3 mean 0.583,
std 0.045 (min 0.521); the current one (warm restart, 17500 steps) scores 0.646 at seed 0 (its
seed spread was not measured). The bound 0.45 is the previous UNet's mean minus 3 std: host
rounding can flip a few of 48 edits (each is 0.021), not 6; the UNet before those two scores
about 0.3 on these scenes, so a regression to it (or a broken sampler, decoder or text path) fails.
"""

from configs import shapes as shapes_config
from rl4pix_jax.pretrain import editor_check
from rl4pix_jax.workdir import layout

NUM_SCENES = 48
MIN_SUCCESS = 0.45


def test_shipped_editor_edits_held_out_scenes():
  config = shapes_config.get_config()
  examples = editor_check.generated_examples(config.seed, "validation", NUM_SCENES,
                                             config.resolution)
  results = editor_check.evaluate_editor_quickly(config, layout.SHIPPED_EDITOR_DIR,
                                                 examples=examples, seed=0)
  print(f"shipped editor, {NUM_SCENES} validation scenes: success {results['success']:.3f}, "
        f"edit_ok {results['edit_ok']:.3f}, preserved_ok {results['preserved_ok']:.3f}")
  assert results["source_success"] == 0.0  # returning the source never passes the check
  assert results["success"] >= MIN_SUCCESS, results
