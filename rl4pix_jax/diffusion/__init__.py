"""The diffusion process: the DDIM schedule and step (with log-prob), and the guided chain.

Modules:
  ddim      noise schedule, ``ddim_step`` with the Gaussian log-prob of x_{t-1}
  sampling  the policy rollout: 3-way guided UNet, one ``lax.scan`` over the DDIM steps,
            recording latents, log-probs and target-token attention maps
"""
