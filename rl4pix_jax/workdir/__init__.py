"""Run plumbing shared by the supervised stages (pretrain/) and the RL stage (rl/).

Modules:
  layout        where things live: the stages root, its data folder, a run's files, the shipped
                editor stages
  checkpointer  Orbax checkpoints written atomically (the one checkpointer of both stages)
  stages        the supervised stages' checkpoints: params + model_config.json per stage
  metrics_log   metrics.jsonl (+ TensorBoard for RL runs)
  wandb_log     Weights & Biases logging of RL runs (config.logging.wandb; optional)
  datasets      ``ensure_dataset``: the prepared dataset folder, built on first use
"""
