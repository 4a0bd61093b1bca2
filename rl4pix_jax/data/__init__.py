"""Datasets: synthetic shapes edits, MagicBrush, and the grain input pipeline.

Modules:
  shapes_scene, shapes_render, shapes  the synthetic "shapes edit" generator (seed, index) ->
                                       example with exact edit mask
  shapes_check                         programmatic edit-accuracy check (evaluation)
  preview                              PNG grid of example edits (docs/shapes_examples.png)
  records, record_features             stored record format, validation, decoding, tfds spec
  object_phrase                        rule-based object phrase / task type of an instruction
  shapes_edit_builder, magicbrush_builder  tfds builders (array_record, no TensorFlow)
  loader                               grain pipeline -> fixed-shape numpy batches
"""
