r"""The real run: RL fine-tuning of InstructPix2Pix on MagicBrush with a CLIP ViT-L/14 reward.

Derived from ``configs/shapes.py`` (every field is declared there, with its default and what it
means); this file only overrides what the real run changes. The launch scripts
(``launch/tpu/tpu_vm.sh``, ``launch/gpu/train_single_host.sh``, ``launch/gpu/train_slurm.sbatch``)
pass it by default.

Variants (``--config=configs/ip2p_magicbrush.py:<arg>``, ``<arg>`` = ``lora`` or ``full``,
optionally ``,512``; default ``lora`` at 256 px):

  lora        LoRA r=8 on the UNet attention projections, lr 3e-4, parameters replicated
  full        every UNet parameter, lr 1e-5, remat on, params + AdamW sharded over fsdp=4
  lora,512 / full,512   the same at 512 px (64x64 latents)

What it needs (each a local folder, a ``gs://`` folder for the data, or a hub id):

  model.pretrained   ``timbrooks/instruct-pix2pix`` (a diffusers folder); a MagicBrush-tuned
                     InstructPix2Pix in the same layout works the same way
  reward.clip_model  ``openai/clip-vit-large-patch14`` (a transformers CLIPModel)
  data.data_dir      the tfds data dir of ``launch.prepare_data --dataset=magicbrush`` (empty:
                     ``<workdir>/../data``)

Commands::

  python -m launch.prepare_data --dataset=magicbrush --data_dir=DATA --magicbrush_dir=PARQUET
  WORKDIR=gs://BUCKET/ip2p_lora launch/tpu/tpu_vm.sh train --config.data.data_dir=gs://BUCKET/data
  python -m launch.train --config=configs/ip2p_magicbrush.py:full --workdir=runs/ip2p_full \
      --config.data.data_dir=DATA
  python -m launch.evaluate --workdir=runs/ip2p_full --dataset=magicbrush ...
  python -m launch.export --workdir=runs/ip2p_full --output=exported/

``tests/launch/test_sd15_rehearsal.py`` runs exactly the worker command of ``tpu_vm.sh train``
with this config on CPU (8 forced devices, ``--config.mesh.fsdp=2``, a tiny random pipeline of
SD1.5's structure, a tiny MagicBrush), then ``launch.evaluate`` and ``launch.export``, and loads
the export in diffusers (docs/scaling_out.md, "Checks and their figures").

A gs:// workdir goes through ``rl4pix_jax/workdir/files.py`` and Orbax; a local
``data.data_dir`` is the tested setup (docs/scaling_out.md, "Run folders", says what is checked).

What to expect. One epoch = ``train.num_sample_batches x train.sample_batch_size`` = 64 edits
(16 MagicBrush examples x 4 samples), 20 DDIM steps each under 3-way guidance, then one PPO pass
in minibatches of 16. Memory per chip, compiled (not run) by the memory plan
(``python -m benchmarks.memory_plan --run_config=configs/ip2p_magicbrush.py:<variant>``, CPU
compiler, 8 forced devices; docs/scaling_out.md, "Memory plan of the real run", has every row):

  variant     v5e-8 (16 GiB/chip)          v4-8 (32 GiB/chip)
  lora        PPO step 16.4 GiB: no (103%)  18.9 GiB: fits (59%)
  full        17.3 GiB with remat: no       23.5 GiB with remat: fits (73%)
  lora,512    30.9 GiB: no                  40.2 GiB: no
  full,512    42.5 GiB with remat: no       67.1 GiB with remat: no

(per chip, PPO step peak with the replicated VAE, text encoder and reward CLIP; sampling
peaks at 7.5-14.8 GiB and fits everywhere.) So the defaults run on a v4-8 at 256 px. On a
v5e-8, shard LoRA's frozen UNet over the 8 chips (``--config.mesh.fsdp=8``: PPO step 14.5 GiB,
fits at 91%), or halve the minibatch (``--config.train.train_batch_size=8``: 14.2 GiB, 89%).
At 512 px, use more chips with 1 edit each. These are the CPU compiler's figures: on the TPU VM,
``--run_config_backend=default`` gives the TPU compiler's own. Time per epoch is not measured
(no TPU here). The PPO numbers below are DDPO's published LoRA / full fine-tuning values, and
the reward weights (and ``ppo.attention_pathwise_weight``) are the shapes default's: none is
tuned on MagicBrush yet.
"""

import ml_collections

from configs import shapes

VARIANTS = ("lora", "full")
RESOLUTIONS = (256, 512)


def parse_arg(arg: str):
  """``"lora"``, ``"full,512"``, ... -> (trainable, resolution); raises ValueError otherwise."""
  parts = [p.strip() for p in (arg or "lora").split(",") if p.strip()]
  trainable = parts[0] if parts else "lora"
  resolution = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
  if trainable not in VARIANTS or len(parts) > 2 or (len(parts) == 2 and
                                                     resolution not in RESOLUTIONS):
    raise ValueError(f"configs/ip2p_magicbrush.py:{arg}: expected one of "
                     f"{', '.join(VARIANTS)}, optionally followed by ,256 or ,512 "
                     f"(e.g. configs/ip2p_magicbrush.py:full,512).")
  return trainable, resolution or RESOLUTIONS[0]


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  trainable, resolution = parse_arg(arg)
  c = shapes.get_config("rl")
  c.resolution = resolution

  c.model.pretrained = "timbrooks/instruct-pix2pix"
  c.model.dtype = "bfloat16"  # compute; params and AdamW moments stay float32
  c.model.remat = trainable == "full"

  c.data.dataset = "magicbrush"
  c.data.max_object_tokens = 8
  c.data.num_threads = 8

  c.sampler.num_steps = 20
  c.sampler.eta = 1.0
  # InstructPix2Pix's own defaults (its paper and the diffusers pipeline).
  c.sampler.guidance_scale = 7.5
  c.sampler.image_guidance_scale = 1.5
  # The second UNet level's cross-attention (latent side / 2): 16 at 256 px, 32 at 512 px.
  c.sampler.capture_size = resolution // 16

  c.reward.clip_model = "openai/clip-vit-large-patch14"
  # MagicBrush has no captions: the target caption is the instruction (data/magicbrush_builder).
  c.reward.clip_text = "caption"

  c.ppo.trainable = trainable
  c.ppo.lora_rank = 8
  c.ppo.lora_alpha = 8.0
  c.ppo.learning_rate = 3e-4 if trainable == "lora" else 1e-5
  c.ppo.clip_range = 1e-4
  c.ppo.num_inner_epochs = 1

  c.train.num_epochs = 100
  c.train.sample_batch_size = 32  # a multiple of 8 and 4: v5e-8 (8 chips) and v4-8 (4 chips)
  c.train.num_sample_batches = 2
  c.train.samples_per_prompt = 4
  c.train.train_batch_size = 16
  c.train.checkpoint_every = 5
  c.train.image_every = 5

  # LoRA: the frozen UNet is replicated (3.2 GiB); full: params + AdamW sharded over 4 chips.
  c.mesh.data = -1
  c.mesh.fsdp = 4 if trainable == "full" else 1
  return c
