"""UNet/sampler sizes for the benchmarks (diffusers config field names).

tiny: smoke test (CI-safe). small: a ~12.8M-parameter 8-channel UNet on 32x32 latents, the
size that is meaningful on a CPU. sd15: the real SD1.5 / InstructPix2Pix UNet shapes (860M
parameters, 64x64 latents = 512 px) with random weights; accelerator only.
"""

BENCHMARK_CONFIGS = {
    "tiny": dict(
        latent_side=16, text_length=8,
        unet=dict(in_channels=8, out_channels=4, sample_size=16, block_out_channels=[32, 64],
                  layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                  attention_head_dim=2, norm_num_groups=8)),
    "small": dict(
        latent_side=32, text_length=77,
        unet=dict(in_channels=8, out_channels=4, sample_size=32,
                  block_out_channels=[32, 64, 128, 256], layers_per_block=1,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                  cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32)),
    "sd15": dict(
        latent_side=64, text_length=77,
        unet=dict(in_channels=8, out_channels=4, sample_size=64,
                  block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)),
}

# Queries per block of the UNet's chunked attention when the benchmarks run on a CPU backend:
# the fastest setting measured for `small` on the 2-core CPU (benchmarks/README.md, "Profile").
CPU_ATTENTION_QUERY_CHUNK = 512


def attention_query_chunk(flag_value, backend: str):
  """The UNet's ``attention_query_chunk`` for a benchmark flag value.

  None: ``CPU_ATTENTION_QUERY_CHUNK`` on the 'cpu' backend, off (``jax.nn.dot_product_attention``)
  on accelerators; 0: off; a positive int: that many queries per block.
  """
  if flag_value is None:
    return CPU_ATTENTION_QUERY_CHUNK if backend == "cpu" else None
  if flag_value < 0:
    raise ValueError(f"attention_query_chunk must be >= 0 (0 = off), got {flag_value}.")
  return flag_value or None
