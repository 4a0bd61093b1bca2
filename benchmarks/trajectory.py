"""Times one full guided trajectory (T DDIM steps, 3-way CFG) of ``sample_trajectory``.

    python -m benchmarks.trajectory --config=small --batch=4 --steps=10 --reps=3

Prints compile time, the median time per trajectory over ``reps`` runs after warm-up and
images/s. Checks that repeated calls reuse one compiled executable.
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import configs
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.models.attention_ops import ATTENTION_KINDS
from rl4pix_jax.models import unet as unet_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "small", list(configs.BENCHMARK_CONFIGS), "Model size.")
flags.DEFINE_integer("batch", 4, "Edits per trajectory batch (the UNet sees 3x this).")
flags.DEFINE_integer("steps", 10, "DDIM steps T.")
flags.DEFINE_integer("reps", 3, "Timed repetitions after the warm-up call.")
flags.DEFINE_bool("attention", True, "Record target-token attention maps.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_enum("attention_kernels", "auto", list(ATTENTION_KINDS),
                  "The UNet's attention kernels (model.attention; benchmarks/README.md, "
                  "'Attention paths').")


def main(_):
  spec = configs.BENCHMARK_CONFIGS[FLAGS.config]
  config = unet_lib.UNetConfig.from_diffusers(spec["unet"])
  dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
  unet = unet_lib.UNet2DConditionModel(
      config, dtype=dtype, attention=configs.attention_config(FLAGS.attention_kernels))
  side, length, dim = spec["latent_side"], spec["text_length"], config.cross_attention_dim[0]
  params = jax.jit(unet.init)(jax.random.PRNGKey(0), jnp.zeros((1, side, side, 8)),
                              jnp.zeros((1,), jnp.int32), jnp.zeros((1, length, dim)))["params"]
  rng = np.random.default_rng(0)
  b = FLAGS.batch
  cond = sampling.EditConditioning(
      text_embeds=jnp.asarray(rng.standard_normal((b, length, dim)), jnp.float32),
      uncond_text_embeds=jnp.asarray(rng.standard_normal((b, length, dim)), jnp.float32),
      image_latents=jnp.asarray(rng.standard_normal((b, side, side, 4)), jnp.float32),
      token_index=jnp.tile(jnp.array([[2, 3]], jnp.int32), (b, 1)),
      token_mask=jnp.ones((b, 2), bool))
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  capture = sampling.cross_attention_sides(config, side)[-1] if FLAGS.attention else None
  sampler = sampling.make_trajectory_sampler(
      unet, schedule, sampling.SamplerConfig(num_steps=FLAGS.steps, eta=1.0,
                                             capture_size=capture,
                                             record_attention=FLAGS.attention))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  start = time.perf_counter()
  jax.block_until_ready(sampler(params, cond, jax.random.PRNGKey(0), sampling.Guidance()))
  compile_s = time.perf_counter() - start
  times = []
  for rep in range(FLAGS.reps):
    start = time.perf_counter()
    jax.block_until_ready(sampler(params, cond, jax.random.PRNGKey(rep + 1),
                                  sampling.Guidance()))
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  assert sampler._cache_size() == 1, "recompiled between calls"  # pylint: disable=protected-access
  print(f"config={FLAGS.config} unet_params={n_params / 1e6:.1f}M latents={side}x{side} "
        f"batch={b} steps={FLAGS.steps} dtype={FLAGS.dtype} device={jax.devices()[0].platform}")
  print(f"first call (compile + run) {compile_s:.1f} s; trajectory median {median:.3f} s "
        f"over {FLAGS.reps}; {b / median:.2f} images/s; compiled executables: 1")


if __name__ == "__main__":
  app.run(main)
