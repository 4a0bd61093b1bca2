"""Shared test set-up: CPU only, persistent XLA compilation cache, float32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top

_CACHE = os.environ.get("RL4PIX_JAX_CACHE", os.path.expanduser("~/.cache/rl4pix_jax/xla"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_default_matmul_precision", "highest")
