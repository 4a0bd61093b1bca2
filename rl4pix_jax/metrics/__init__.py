"""Evaluation metrics.

Modules:
  image_metrics   MagicBrush protocol: L1, L2 (MSE), CLIP-I, DINO, CLIP-T; published reference
                  numbers (MAGICBRUSH_REFERENCE)
  shapes_metrics  shapes test split: edit accuracy, masked L1s, attention localisation, CLIP-T
  intervals       mean + bootstrap 95% confidence interval over examples; JSON and markdown rows
"""
