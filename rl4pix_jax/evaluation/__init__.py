"""The evaluation: edit a dataset split with fixed seeds, compute metrics, write reports.

Shared by ``launch.evaluate`` and the default run (which evaluates the supervised and the RL
editor on the same examples and seeds).

Modules:
  examples  a split's examples, decoded, in single-turn or multi-turn (session) order
  scoring   editing with shared seeds, per-example metrics, summaries with 95% CIs, and the
            MagicBrush metric models
  reports   markdown table, figures, saved edits, the JSON report
  request   an evaluation as launch.evaluate asks for it (checks, data, editors, reports)

The names below are the package's API (``from rl4pix_jax import evaluation``).
"""

from rl4pix_jax.evaluation.examples import (decode_examples, final_turn_indices, load_examples,
                                            session_order, turn_key)
from rl4pix_jax.evaluation.reports import (FIGURE_EXAMPLES, comparison_figure, edit_file_name,
                                           example_figure, markdown_table, save_edits,
                                           write_reports)
from rl4pix_jax.evaluation.request import EvaluationError, EvaluationRequest, run_evaluation
from rl4pix_jax.evaluation.scoring import (DATASETS, SETTINGS, EvaluationResult,
                                           SamplerSettings, edit_examples, evaluate,
                                           load_magicbrush_models, magicbrush_per_example,
                                           shapes_per_example)
