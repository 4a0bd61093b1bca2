"""UNet/sampler sizes for the benchmarks (diffusers config field names).

tiny: smoke test (CI-safe). small: a ~12.8M-parameter 8-channel UNet on 32x32 latents, the
size that is meaningful on a CPU. sd15: the real SD1.5 / InstructPix2Pix UNet shapes (860M
parameters, 64x64 latents = 512 px) with random weights; accelerator only.
``attention_config``: the attention setting every benchmark script takes (``--attention``).
"""

from configs import shapes
from rl4pix_jax.models.attention_ops import AttentionConfig

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



def attention_config(kind: str = None, chunk_queries: int = None,
                     platform: str = None) -> AttentionConfig:
  """The benchmarks' ``AttentionConfig``: the run config's attention keys (configs/shapes.py,
  the one home of their defaults), with ``kind`` / ``chunk_queries`` overridden when given.

  ``kind``: auto | xla | cudnn | pallas_tpu | chunked (None: the run config's, 'auto');
  ``platform``: what 'auto' decides for (None: the default backend).
  """
  model = shapes.get_config().model
  return AttentionConfig(
      kind=kind or model.attention, flash_min_tokens=model.attention_flash_min_tokens,
      chunk_queries=chunk_queries or model.attention_chunk_queries,
      flash_block=model.attention_flash_block, platform=platform)
