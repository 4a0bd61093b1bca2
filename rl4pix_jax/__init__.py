"""rl4pix_jax: reinforcement-learning fine-tuning of InstructPix2Pix editors in JAX/Flax."""

__version__ = "0.1.0"
