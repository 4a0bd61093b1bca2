"""Datasets: synthetic shapes edits, MagicBrush, and the grain input pipeline."""
