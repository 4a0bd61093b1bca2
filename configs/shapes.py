"""The embedded default: a tiny InstructPix2Pix editor trained and RL-tuned on shapes, on CPU.

Every number of the run lives here and can be overridden on the command line, e.g.
``--config.ppo.clip_range=1e-4``. ``--config=configs/shapes.py:vae`` (or ``clip``, ``unet``,
``rl``) only records the stage in ``config.stage``; the launch scripts read it.
``--config=configs/shapes.py:long`` is the RL stage with the longest recipe tried on 2 cores
(``LONG_RECIPE`` below: about 1900 samples, under 60 minutes; see docs/rl_recipes.md).

Model fields use the diffusers/transformers config names, so the same code builds these tiny
models and real SD1.5/InstructPix2Pix ones (set ``model.pretrained`` to a diffusers folder).
"""

import ml_collections


STAGES = ("vae", "clip", "unet", "rl")

# configs/shapes.py:long, as --config.<path>=<value> overrides of the RL stage: the paper's
# attention + CLIP reward with preservation, change_inside and the verifiable shapes_check,
# the default's KL penalty, GRPO group advantages over 8 samples per prompt that skip groups without
# reward spread, 60 epochs of 32 samples (docs/rl_recipes.md has what it gave).
LONG_RECIPE = {
    "reward.extra": {"preservation": 10.0, "change_inside": 1.0, "shapes_check": 1.0},
    "ppo.advantage_mode": "group", "ppo.skip_zero_spread": True,
    "train.samples_per_prompt": 8, "train.sample_batch_size": 32,
    "train.train_batch_size": 16, "train.num_epochs": 60, "train.eval_every": 10,
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg and arg not in STAGES + ("long",):
    raise ValueError(f"configs/shapes.py:{arg}: expected one of {STAGES + ('long',)} (or "
                     "nothing, the rl stage).")
  c = ml_collections.ConfigDict()
  c.stage = "rl" if arg in ("", "long") else arg
  c.seed = 0
  # pixels; latents are resolution / 4 (8x8) with the VAE below. 32 rather than 64: on 2 CPU
  # cores the 64-pixel models cost ~4x more per step and the supervised stages did not fit
  # their ~12 minute budget (see README, supervised stages).
  c.resolution = 32

  # ---- models -------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.pretrained = ""  # a diffusers pipeline folder or hub id; overrides the dicts below
  c.model.stages_dir = ""  # supervised stages (vae/, clip/, unet/); "" = the workdir's parent
  c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators); params stay float32
  c.model.remat = False
  # The attention kernels of the UNet and the VAE mid-block (rl4pix_jax/models/attention_ops.py,
  # AttentionConfig; benchmarks/README.md "Attention paths"): auto | xla | cudnn | pallas_tpu |
  # chunked. auto: Pallas flash attention on TPU for self-attention over >= flash_min_tokens
  # tokens, cuDNN flash attention on GPU where cuDNN takes the shape, the blocked (chunked)
  # path on CPU for layers of more than attention_chunk_queries queries (XLA for fewer, so
  # the default's 8x8-latent layers run as before), XLA otherwise. Layers that record
  # attention maps always compute explicit probabilities. All paths give the same values up
  # to float rounding.
  c.model.attention = "auto"
  c.model.attention_flash_min_tokens = 4096  # 64x64 latents (512 px), as maxdiffusion
  # Queries per block of the chunked path: the fastest measured for the benchmarks' `small`
  # UNet on the 2-core CPU (benchmarks/README.md, "Profile").
  c.model.attention_chunk_queries = 512
  c.model.attention_flash_block = 512  # queries/keys per Pallas TPU block (a multiple of 128)
  c.model.unet = dict(
      sample_size=8, in_channels=8, out_channels=4,
      block_out_channels=[64, 128], layers_per_block=1,
      down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
      cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
  c.model.vae = dict(
      in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
      block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=8,
      down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
      scaling_factor=1.0)  # pretrain.vae measures the latent std and stores 1/std
  c.model.text_encoder = dict(
      vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
      projection_dim=64, eos_token_id=49407, bos_token_id=49406, pad_token_id=49407)
  c.model.vision_encoder = dict(
      image_size=32, patch_size=4, hidden_size=64, intermediate_size=256,
      num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu", projection_dim=64)
  c.model.scheduler = dict(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
      steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")

  # ---- data ---------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "shapes_edit"
  c.data.data_dir = ""  # empty: <workdir>/../data when run from launch.run_default
  c.data.split = "train"  # the split the RL stage samples its edits from
  # shapes tasks the RL stage samples (comma-separated: insertion, removal, replacement,
  # transformation); empty = all. Evaluation always scores every task.
  c.data.train_tasks = ""
  # the tfds builder config of the prepared data ("" = the only one there; magicbrush has
  # "default" and "skip_bad", see launch.prepare_data)
  c.data.config_name = ""
  c.data.train_size = 2000
  c.data.validation_size = 200
  c.data.test_size = 200
  c.data.max_object_tokens = 8
  c.data.skip_bad_records = False
  c.data.num_threads = 2

  # ---- supervised stages (the default trains its own tiny models) ---------------------
  c.pretrain = ml_collections.ConfigDict()
  # Every stage: AdamW with global-norm clipping, linear warmup then cosine decay to
  # learning_rate x final_lr_fraction (pretrain.training_loop.stage_optimizer).
  # vae: L1 + mse_weight x MSE (+ a tiny KL). With L1 alone the VAE drew every object in the
  # palette's mean colour for its first ~600 steps, and no editor can beat its decoder: the
  # stage reports the "edit ceiling" (the shapes check of VAE(target) on validation).
  # unet dropout: text only / image only / both, as InstructPix2Pix trains (5% each).
  # These three stages are what assets/shapes_editor/ ships (see README).
  c.pretrain.vae = dict(steps=2000, batch_size=32, learning_rate=3e-3, warmup_steps=50,
                        final_lr_fraction=0.05, mse_weight=1.0, kl_weight=1e-6,
                        log_every=100, checkpoint_every=500)
  c.pretrain.clip = dict(steps=400, batch_size=64, learning_rate=1e-3, warmup_steps=20,
                         final_lr_fraction=0.1, log_every=50, checkpoint_every=200)
  # unet: train_examples scenes of the train split's generator stream (the first
  # data.train_size of them are the tfds train split; more scenes cost ~1.5 ms each to render),
  # an EMA of the weights (what is saved and edits), min-SNR-gamma loss weights (0 = off).
  # A warm restart at update restart_at (online weights := the EMA, fresh AdamW, a second
  # warmup + cosine to `steps` at restart_learning_rate; editor_training's docstring).
  # ~105 min on one core (0.35 s a step). See docs/default_run.md for what each change bought.
  c.pretrain.unet = dict(steps=17500, batch_size=32, learning_rate=1e-3, warmup_steps=200,
                         final_lr_fraction=0.05, log_every=100, checkpoint_every=500,
                         text_dropout=0.05, image_dropout=0.05, both_dropout=0.05,
                         train_examples=60000, ema_decay=0.999, snr_gamma=5.0,
                         restart_at=7500, restart_learning_rate=5e-4)

  # ---- policy rollout -----------------------------------------------------------------
  c.sampler = ml_collections.ConfigDict()
  c.sampler.num_steps = 10
  # DDIM eta of the RL rollouts: > 0 (at 0 no step samples, so PPO has nothing to score;
  # a step whose sigma_t is 0 is left out of the PPO ratio and KL, see docs/method.md "PPO").
  c.sampler.eta = 1.0
  # Chosen on validation (check_edit success, eta=0). Previous editor, 96 edits: text/image
  # guidance 7.5/1.5 -> 0.21, 7.5/2.5 -> 0.25, 4.0/1.5 -> 0.29, 3.0/1.2 -> 0.30. Current editor,
  # 200 edits: 4.0/1.5 -> 0.66 stays the best of 3.0/4.0/5.0 x 1.5/2.0 (others 0.625-0.65).
  # SD's 7.5 oversaturates these tiny editors.
  c.sampler.guidance_scale = 4.0
  c.sampler.image_guidance_scale = 1.5
  c.sampler.capture_size = 8  # side of the recorded cross-attention maps (the latent side here)

  # ---- reward (our documented defaults; see README "Reward design") -------------------
  c.reward = ml_collections.ConfigDict()
  c.reward.attention_weight = 1.0
  c.reward.clip_weight = 1.0
  c.reward.attention_region = "mask"  # "mask" (dataset edit mask) or "reference"
  c.reward.attention_distance = "kl"  # "l1", "l2", "kl" (region || map) or "soft_iou"
  c.reward.attention_last_steps = 0  # 0: average maps over all steps; k: the last k
  c.reward.clip_directional = False
  c.reward.clip_model = ""  # CLIPModel folder/hub id for pretrained editors ("" = tiny stage CLIP)
  c.reward.clip_text = "caption"  # "caption" (target caption) or "instruction" (no captions)
  # registered reward name -> weight. The default adds preservation (x10: its per-sample
  # spread is ~0.01, the attention term's ~0.4) and change_inside to the paper's two terms, with
  # ppo.kl_weight = 1: chosen on validation (200 edits) over the paper's two terms alone, which
  # cost success 0.59 -> 0.515 and preserved_ok 0.85 -> 0.805 in 20 epochs; with them 40
  # epochs gave 0.58 / 0.87 (docs/rl_recipes.md).
  c.reward.extra = ml_collections.ConfigDict({"preservation": 10.0, "change_inside": 1.0})
  c.reward.modules = ""  # comma-separated modules to import that register extra rewards

  # ---- PPO ------------------------------------------------------------------------------
  # Chosen on validation (96 edits) among DDPO's lr 3e-4 / clip 1e-4 (the policy did not move:
  # approx_kl ~1e-8), lr 1e-3 / clip 1e-3, lr 3e-3 / clip 1e-2 and lr 1e-2 / clip 1e-2 with 2
  # inner epochs; with 4 samples per prompt (per-prompt advantages) lr 3e-3 / clip 1e-2 / 2
  # inner epochs was the only one that raised the attention metrics. See README, "default".
  c.ppo = ml_collections.ConfigDict()
  c.ppo.trainable = "lora"  # "lora" (attention projections) or "full"
  c.ppo.lora_rank = 4
  c.ppo.lora_alpha = 4.0
  # which UNet kernels get adapters (regex over "/"-joined param paths): q/k/v/out of attn1/attn2
  c.ppo.lora_target_regex = r"(^|/)attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$"
  c.ppo.learning_rate = 3e-3
  c.ppo.adam_b1 = 0.9
  c.ppo.adam_b2 = 0.999
  c.ppo.adam_eps = 1e-8
  c.ppo.weight_decay = 1e-4
  c.ppo.max_grad_norm = 1.0
  c.ppo.clip_range = 1e-2
  c.ppo.adv_clip_max = 5.0
  c.ppo.num_inner_epochs = 2
  c.ppo.timestep_fraction = 1.0
  c.ppo.stat_buffer_size = 16  # per-prompt ring buffer length
  c.ppo.stat_min_count = 4  # below this many values a prompt uses batch statistics
  # Pathwise gradient of the attention-map reward (the maps depend on the weights directly,
  # which the PPO likelihood-ratio gradient does not see); 0 = off; inactive when
  # reward.attention_weight is 0. Chosen on validation (200 edits, supervised editor: success
  # 0.285, attention mass inside the mask 0.057): 0 -> 0.255 / 0.058, 0.1 -> 0.260 / 0.276,
  # 1.0 -> 0.160 / 0.239. See README, "PPO".
  c.ppo.attention_pathwise_weight = 0.1
  # KL penalty to the starting policy per trained step (closed form between the two Gaussian
  # DDIM steps, in the per-dimension log-prob unit); 0 = off (DPOK / Flow-GRPO use one).
  c.ppo.kl_weight = 1.0  # with the extra rewards above (chosen together on validation)
  # Trained steps come from positions [start T, end T) of the T steps, noisiest first
  # (0.0, 0.5 = the high-noise half); timestep_fraction is of that window.
  c.ppo.train_window_start = 0.0
  c.ppo.train_window_end = 1.0
  # "per_prompt": DDPO's per-prompt ring buffers (stat_buffer_size, stat_min_count); "group":
  # GRPO's statistics of the samples_per_prompt samples of a prompt in this epoch, divided
  # by the group's ("group") or the epoch's ("global") std; skip_zero_spread zeroes the
  # advantages of groups whose rewards are all equal.
  c.ppo.advantage_mode = "per_prompt"
  c.ppo.advantage_std = "group"
  c.ppo.skip_zero_spread = False
  # "ppo": the clipped likelihood ratio of the stored DDIM steps (DDPO); "nft": DiffusionNFT's
  # negative-aware denoising loss on the final latents (rl4pix_jax/rl/nft.py), nft_beta its
  # trust region (the larger, the smaller a step).
  c.ppo.objective = "ppo"
  c.ppo.nft_beta = 1.0

  # ---- RL loop ----------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 20
  c.train.sample_batch_size = 16  # per sampling call (global, all devices)
  c.train.num_sample_batches = 1  # sampling calls per epoch
  # Each example is sampled this many times per call (different noise), so DDPO's per-prompt
  # advantages compare samples of one prompt (see ppo.stat_min_count).
  c.train.samples_per_prompt = 4
  c.train.train_batch_size = 8  # samples per PPO minibatch (global)
  c.train.checkpoint_every = 5  # epochs
  c.train.keep_checkpoints = 3
  c.train.image_every = 5  # epochs between sample grids
  c.train.max_nonfinite_in_a_row = 3
  # Validation during RL (rl4pix_jax/rl/validation.py): the starting policy before the first
  # update, then the policy after every eval_every-th epoch and after the last one edit the
  # first eval_examples of eval_split (seed 0, eta 0, the run's steps and guidance: what
  # `launch.evaluate --split=<eval_split> --max_examples=<eval_examples>` reports) and log
  # val_* metrics. 0 = off. The default 20-epoch run validates 5 times.
  c.train.eval_every = 5  # epochs
  c.train.eval_examples = 64
  c.train.eval_split = "validation"
  # Keep the checkpoint of the best validation success in <workdir>/checkpoints_best
  # (ties: the earlier epoch), whatever keep_checkpoints deletes; `--step=best` loads it.
  c.train.keep_best = True

  # ---- logging ------------------------------------------------------------------------------
  # metrics.jsonl and TensorBoard (<workdir>/tensorboard/) are always written. wandb=True also
  # logs every metric of metrics.jsonl, the sample grids and the reward / validation curves to
  # Weights & Biases (pip install -r requirements-demo.txt; WANDB_MODE=offline works without a
  # network). The run id is kept in <workdir>/wandb_run.json, so a resumed run continues its
  # W&B run. Empty entity: wandb's default; empty run name: the workdir's name.
  c.logging = ml_collections.ConfigDict()
  c.logging.wandb = False
  c.logging.wandb_project = "rl4pix_jax"
  c.logging.wandb_entity = ""
  c.logging.wandb_run_name = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2 ** 18  # kernels with fewer elements are replicated, not sharded
  if arg == "long":
    for path, value in LONG_RECIPE.items():
      section, field = path.split(".")
      c[section][field] = (ml_collections.ConfigDict(value) if isinstance(value, dict)
                           else value)
  return c
