"""The RL stage: a run's starting point, PPO on denoising trajectories, the epoch loop.

Modules:
  run_setup    what a run starts from (RLSetup): models, params, tokenizer, reward CLIP, data
  batching     the per-epoch batch arithmetic and the per-prompt repetition of examples
  advantages   per-prompt reward statistics (host ring buffers) -> normalised advantages
  lora         LoRA adapters on the UNet's attention projections
  ppo          train state, the jitted PPO step (one scan over timesteps per minibatch)
  train_state  the policy on the mesh: placed UNet, PPO train state, frozen LoRA base
  compiled     the jitted functions of an epoch: encode, sample, decode, reward, PPO step
  trainer      the epoch loop: sample -> reward -> advantages -> PPO -> log -> checkpoint
  run_loading  restoring a run's editor (config.json + starting point + RL policy)
"""
