"""PPO for the denoising chain: clipped loss, optimizer, train state and the jitted train step.

One call of the train step is one PPO minibatch update: each sample's T stored steps are
shuffled (its own permutation), the first ``ceil(T * timestep_fraction)`` positions are
visited by one ``jax.lax.scan`` that re-scores every sample at its own timestep with the
same guided policy that sampled (``sampling.rescore_step``), and the gradients of the
clipped PPO loss are accumulated in the scan carry, averaged and applied in ONE optax
update. Log-probs are DDPO's per-dimension mean (see ``ddim``), so ``clip_range`` (1e-4 in
DDPO) is in that unit. A visited step that is deterministic (sigma_t = 0: eta = 0, or a
schedule that ends at alpha_prev = 1, as ``set_alpha_to_one`` does in the last step) is not an
action of the policy: its ratio and KL are set to 1 and 0 (``ddim.is_stochastic``). Scored
with the floored sigma they would divide the rounding of two forwards by 1e-12: measured, a
bfloat16 LoRA run at epoch 0, when the policy equals the base, gave approx_kl 1.2e9.

Trainable sets: ``"full"`` trains every UNet parameter; ``"lora"`` trains only LoRA adapters
on the attention projections (``rl4pix_jax.rl.lora``), merged into the frozen UNet inside the
step, and the frozen UNet gets no optimizer state.

Pathwise attention gradient (``attention_pathwise_weight`` > 0): the attention-map reward
reads maps that the UNet's own weights produce, so the reward of a stored trajectory changes
with the weights directly, not only through which latents were sampled; the likelihood-ratio
(PPO) gradient sees only the latter. With ``PPOBatch.map_cotangents`` (the reward's gradient
with respect to each step's recorded maps, from the sampling pass) the re-score records the
maps under the current weights and the loss adds ``-weight * <cotangent, maps>`` per visited
step, whose gradient is that direct part (first order around the sampling weights).

A non-finite loss, gradient or advantage skips the update: params and optimizer state come back
bitwise unchanged, ``nonfinite_count`` (consecutive skips) grows, and ``metrics['nonfinite']``
is 1. A finite update resets the count to 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rl4pix_jax import parallel
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.rl import lora

Params = Any
TRAINABLE_SETS = ("full", "lora")
ADVANTAGE_MODES = ("per_prompt", "group")
ADVANTAGE_STDS = ("group", "global")
OBJECTIVES = ("ppo", "nft")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """The PPO options (the ``ppo`` section of a config; hashable, static under jit).

  The defaults are those of ``configs/shapes.py`` (tests/test_config_keys.py keeps them equal).

  Attributes:
    trainable: "lora" (adapters on the attention projections) or "full" (every UNet param).
    lora_rank: LoRA rank r.
    lora_alpha: LoRA alpha (the update is scaled by alpha / r).
    lora_target_regex: regex over '/'-joined UNet param paths selecting the adapted kernels.
    learning_rate, adam_b1, adam_b2, adam_eps, weight_decay: AdamW.
    max_grad_norm: global-norm gradient clipping before AdamW.
    clip_range: PPO epsilon; the ratio is clipped to [1 - eps, 1 + eps].
    adv_clip_max: advantages are clipped to [-adv_clip_max, adv_clip_max].
    num_inner_epochs: PPO passes over each epoch's samples (read by the trainer).
    timestep_fraction: fraction of the T steps trained per sample (ceil(T * fraction)).
    stat_buffer_size: per-prompt reward ring-buffer length (``advantages``).
    stat_min_count: values a prompt needs before it uses its own statistics.
    attention_pathwise_weight: weight of the pathwise gradient of the attention-map reward
      (module docstring); 0 turns it off. The trainer passes the cotangents in units of
      the epoch's reward standard deviation, like the advantages.
    kl_weight: weight of the KL penalty to the starting policy, per visited step
      (``ddim.step_kl``, closed form between the two Gaussian steps); 0 turns it off. The
      reference is the frozen LoRA base ("lora") or the initial UNet ("full").
    train_window_start, train_window_end: the trained steps are drawn from positions
      [floor(start T), ceil(end T)) of the T steps, noisiest first (0, 0.5: the high-noise
      half, as MixGRPO / Flow-GRPO-Fast); ``timestep_fraction`` is of that window.
    advantage_mode: "per_prompt" (DDPO's ring buffers per prompt, ``stat_buffer_size`` /
      ``stat_min_count``) or "group" (GRPO: the samples of one prompt in this epoch).
    advantage_std: with "group": divide by the group's std ("group") or the epoch's
      ("global").
    skip_zero_spread: with "group": groups whose rewards are all equal get advantage 0
      (they say nothing about which sample is better).
    objective: "ppo" (this module's clipped ratio of the stored steps) or "nft" (DiffusionNFT's
      negative-aware denoising loss on the final latents, ``rl4pix_jax.rl.nft``; no
      log-probs, ``clip_range`` and the pathwise term unused).
    nft_beta: with "nft": the policy's weight in the implicit positive policy, > 0; the
      larger, the smaller one epoch's step (``nft`` module docstring).
  """
  trainable: str = "lora"
  lora_rank: int = 4
  lora_alpha: float = 4.0
  lora_target_regex: str = lora.DEFAULT_TARGET_REGEX
  learning_rate: float = 3e-3
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  weight_decay: float = 1e-4
  max_grad_norm: float = 1.0
  clip_range: float = 1e-2
  adv_clip_max: float = 5.0
  num_inner_epochs: int = 2
  timestep_fraction: float = 1.0
  stat_buffer_size: int = 16
  stat_min_count: int = 4
  attention_pathwise_weight: float = 0.1
  kl_weight: float = 1.0
  train_window_start: float = 0.0
  train_window_end: float = 1.0
  advantage_mode: str = "per_prompt"
  advantage_std: str = "group"
  skip_zero_spread: bool = False
  objective: str = "ppo"
  nft_beta: float = 1.0

  @property
  def pathwise(self) -> bool:
    """Whether the train step adds the attention reward's pathwise gradient."""
    return self.attention_pathwise_weight > 0

  def __post_init__(self):
    problems = []
    if self.trainable not in TRAINABLE_SETS:
      problems.append(f"trainable={self.trainable!r} (expected one of {TRAINABLE_SETS})")
    if self.objective not in OBJECTIVES:
      problems.append(f"objective={self.objective!r} (expected one of {OBJECTIVES})")
    for name in ("learning_rate", "adam_eps", "max_grad_norm", "clip_range", "adv_clip_max",
                 "nft_beta"):
      if not getattr(self, name) > 0:
        problems.append(f"{name}={getattr(self, name)!r} (expected > 0)")
    for name in ("adam_b1", "adam_b2"):
      if not 0 <= getattr(self, name) < 1:
        problems.append(f"{name}={getattr(self, name)!r} (expected in [0, 1))")
    for name in ("weight_decay", "attention_pathwise_weight", "kl_weight"):
      if not getattr(self, name) >= 0:
        problems.append(f"{name}={getattr(self, name)!r} (expected >= 0)")
    if not 0 <= self.train_window_start < self.train_window_end <= 1:
      problems.append(f"train_window_start={self.train_window_start!r}, train_window_end="
                      f"{self.train_window_end!r} (expected 0 <= start < end <= 1)")
    if self.advantage_mode not in ADVANTAGE_MODES:
      problems.append(f"advantage_mode={self.advantage_mode!r} (expected one of "
                      f"{ADVANTAGE_MODES})")
    if self.advantage_std not in ADVANTAGE_STDS:
      problems.append(f"advantage_std={self.advantage_std!r} (expected one of {ADVANTAGE_STDS})")
    if not 0 < self.timestep_fraction <= 1:
      problems.append(f"timestep_fraction={self.timestep_fraction!r} (expected in (0, 1])")
    for name in ("lora_rank", "num_inner_epochs", "stat_buffer_size", "stat_min_count"):
      value = getattr(self, name)
      if int(value) != value or value < 1:
        problems.append(f"{name}={value!r} (expected an integer >= 1)")
    if self.stat_min_count > self.stat_buffer_size:
      problems.append(f"stat_min_count={self.stat_min_count} > stat_buffer_size="
                      f"{self.stat_buffer_size} (a prompt could never use its own statistics)")
    if problems:
      raise ValueError("Bad ppo config: " + "; ".join(problems) + ".")

  @classmethod
  def from_config(cls, config: Any) -> "PPOConfig":
    """Builds it from a ``ConfigDict``/mapping (e.g. ``config.ppo``) or returns a PPOConfig.

    Raises:
      ValueError: unknown field names (listed), or values out of range.
    """
    if isinstance(config, cls):
      return config
    values = dict(config.items() if hasattr(config, "items") else config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"Unknown ppo config fields {unknown}; known fields: {sorted(known)}.")
    return cls(**values)


def num_trained_timesteps(num_steps: int, timestep_fraction: float) -> int:
  """ceil(T * fraction) timesteps trained per sample (robust to float error), >= 1."""
  return max(1, math.ceil(round(num_steps * timestep_fraction, 6)))


def train_window(num_steps: int, start: float, end: float) -> Tuple[int, int]:
  """(first, stop) positions of the trained window of T steps: [floor(start T),
  ceil(end T)), at least one step (robust to float error)."""
  first = min(num_steps - 1, math.floor(round(num_steps * start, 6)))
  stop = max(first + 1, min(num_steps, math.ceil(round(num_steps * end, 6))))
  return first, stop


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def ppo_loss(log_probs_new: jnp.ndarray, log_probs_old: jnp.ndarray, advantages: jnp.ndarray,
             clip_range: float, adv_clip_max: float, weights: Optional[jnp.ndarray] = None
             ) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """The clipped PPO surrogate of a batch of (sample, step) log-probs.

  Args:
    log_probs_new: (...) float, log-probs under the current policy.
    log_probs_old: (...) float, log-probs under the sampling policy (same shape).
    advantages: (...) float, broadcastable to the log-probs (e.g. (B,) with (B,) log-probs).
    clip_range: epsilon; the ratio is clipped to [1 - eps, 1 + eps].
    adv_clip_max: advantages are clipped to [-adv_clip_max, adv_clip_max] first.
    weights: optional 0/1 float (...), broadcastable to the log-probs: a 0 entry (a
      deterministic step, ``ddim.is_stochastic``) adds 0 to the loss and the metrics, which
      stay means over every entry. None: all ones.

  Returns:
    ``(loss, metrics)``: loss = mean(w max(-A r, -A clip(r, 1-eps, 1+eps))) with
    r = exp(new - old), a float32 scalar; metrics ``loss``, ``approx_kl`` =
    0.5 mean(w (new - old)^2) and ``clipfrac`` = mean(w [|r - 1| > eps]), float32 scalars.
  """
  log_probs_new = jnp.asarray(log_probs_new, jnp.float32)
  log_probs_old = jnp.asarray(log_probs_old, jnp.float32)
  adv = jnp.clip(jnp.asarray(advantages, jnp.float32), -adv_clip_max, adv_clip_max)
  adv = jnp.broadcast_to(adv, log_probs_new.shape)
  w = (jnp.ones_like(log_probs_new) if weights is None
       else jnp.broadcast_to(jnp.asarray(weights, jnp.float32), log_probs_new.shape))
  # A zero-weight entry's delta is zeroed before exp: its ratio is 1, so neither its value
  # nor its gradient (even an overflowing one) reaches the loss.
  delta = jnp.where(w > 0, log_probs_new - log_probs_old, 0.0)
  ratio = jnp.exp(delta)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  loss = jnp.mean(w * jnp.maximum(unclipped, clipped))
  metrics = {
      "loss": loss,
      "approx_kl": 0.5 * jnp.mean(w * jax.lax.stop_gradient(delta)**2),
      "clipfrac": jnp.mean(w * (jnp.abs(jax.lax.stop_gradient(ratio) - 1.0) > clip_range)
                           .astype(jnp.float32)),
  }
  return loss, metrics


# --------------------------------------------------------------------------------------------
# Optimizer and state
# --------------------------------------------------------------------------------------------


def make_optimizer(ppo_config: Any) -> optax.GradientTransformation:
  """clip_by_global_norm(max_grad_norm) then AdamW, all values from the ppo config."""
  c = PPOConfig.from_config(ppo_config)
  return optax.chain(
      optax.clip_by_global_norm(c.max_grad_norm),
      optax.adamw(c.learning_rate, b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps,
                  weight_decay=c.weight_decay))


@flax.struct.dataclass
class TrainState:
  """What the PPO update changes (donated to the train step).

  Attributes:
    step: () int32, optimizer updates applied (skipped non-finite updates do not count).
    params: the trainable tree: the whole UNet ``params`` ("full") or the LoRA tree ("lora").
    opt_state: optax state of ``params`` only.
    nonfinite_count: () int32, consecutive skipped (non-finite) updates; 0 after a good one.
  """
  step: jnp.ndarray
  params: Params
  opt_state: optax.OptState
  nonfinite_count: jnp.ndarray


def init_train_state(key: jax.Array, unet_params: Params, ppo_config: Any,
                     optimizer: Optional[optax.GradientTransformation] = None
                     ) -> Tuple[TrainState, Optional[Params]]:
  """The initial train state and the frozen params the step needs.

  Args:
    key: PRNG key (initialises the LoRA ``down`` matrices; unused for "full").
    unet_params: the UNet ``params`` collection.
    ppo_config: ``PPOConfig`` or the ``ppo`` ConfigDict.
    optimizer: overrides :func:`make_optimizer` (e.g. a schedule or plain SGD).

  Returns:
    ``(state, frozen_params)``. "lora": state.params is a fresh LoRA tree and
    ``frozen_params`` is ``unet_params``; "full": state.params is a copy of ``unet_params``
    (so donating the state never deletes the caller's arrays) and ``frozen_params`` is None.
  """
  c = PPOConfig.from_config(ppo_config)
  tx = make_optimizer(c) if optimizer is None else optimizer
  if c.trainable == "lora":
    trainable = lora.init_lora(key, unet_params, c.lora_rank, c.lora_target_regex)
    frozen = unet_params
  else:
    trainable = jax.tree.map(jnp.array, unet_params)  # jnp.array copies
    frozen = None
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                     opt_state=tx.init(trainable), nonfinite_count=jnp.zeros((), jnp.int32))
  return state, frozen


def policy_params(trainable_params: Params, frozen_params: Optional[Params],
                  ppo_config: Any) -> Params:
  """The UNet params of the current policy (LoRA merged into the frozen base for "lora").

  Jit-able; use it to sample with the current policy and to export.
  """
  c = PPOConfig.from_config(ppo_config)
  if c.trainable == "full":
    return trainable_params
  if frozen_params is None:
    raise ValueError("trainable='lora' needs the frozen UNet params; got None.")
  return lora.merge_lora(frozen_params, trainable_params, c.lora_alpha)


def train_state_shardings(state: TrainState, mesh: Mesh, rules: Any = None) -> TrainState:
  """Shardings of a TrainState: params by path-regex rules, moments follow, scalars replicated.

  Args:
    state: a TrainState of arrays or ShapeDtypeStructs (``jax.eval_shape`` of init).
    mesh: the ('data', 'fsdp') mesh.
    rules: ``parallel`` sharding rules (default ``parallel.default_sharding_rules()``).

  Returns:
    A TrainState whose leaves are ``NamedSharding`` (pass it to :func:`make_train_step`
    and to ``parallel.shard_params``).
  """
  params = parallel.param_shardings(state.params, mesh, rules)
  return TrainState(
      step=parallel.replicated(mesh), params=params,
      opt_state=parallel.opt_state_shardings(state.opt_state, state.params, params, mesh),
      nonfinite_count=parallel.replicated(mesh))


# --------------------------------------------------------------------------------------------
# Batch, gradients, train step
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class PPOBatch:
  """One PPO minibatch of stored trajectories.

  Attributes:
    cond: conditioning of the B edits (as sampled).
    latents: (B, T+1, h, w, c) float32 chain x_T ... x_0 (``Trajectory.latents``).
    log_probs: (B, T) float32 log-probs of the sampling policy.
    advantages: (B,) float32 normalised advantages (clipped inside the loss).
    timesteps: (T,) int32 diffusion timesteps, noisiest first (``Trajectory.timesteps``).
    guidance: the guidance scales used when sampling.
    map_cotangents: (B, T, r, r) float32 gradient of the (normalised) reward with respect to
      ``Trajectory.attention_maps``, or None; needed when attention_pathwise_weight > 0.
  """
  cond: sampling.EditConditioning
  latents: jnp.ndarray
  log_probs: jnp.ndarray
  advantages: jnp.ndarray
  timesteps: jnp.ndarray
  guidance: sampling.Guidance
  map_cotangents: Optional[jnp.ndarray] = None


def _check_batch(batch: PPOBatch, sampler_config: sampling.SamplerConfig,
                 pathwise: bool = False) -> None:
  b, t1 = batch.latents.shape[:2]
  t = sampler_config.num_steps
  want = {"latents": (b, t + 1), "log_probs": (b, t), "advantages": (b,), "timesteps": (t,)}
  got = {"latents": (b, t1), "log_probs": batch.log_probs.shape,
         "advantages": batch.advantages.shape, "timesteps": batch.timesteps.shape}
  if pathwise:
    if batch.map_cotangents is None:
      raise ValueError("attention_pathwise_weight > 0 needs PPOBatch.map_cotangents (the "
                       "reward's gradient with respect to the recorded maps); pass them or "
                       "set ppo.attention_pathwise_weight=0.")
    want["map_cotangents"] = (b, t)
    got["map_cotangents"] = batch.map_cotangents.shape[:2]
  bad = [f"{k} {got[k]} (expected {want[k]})" for k in want if tuple(got[k]) != want[k]]
  if bad:
    raise ValueError(f"PPOBatch does not fit B={b}, T=sampler num_steps={t}: " + ", ".join(bad)
                     + ". Build it from a Trajectory sampled with the same SamplerConfig.")


def _per_sample_index(x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """x (B, T, ...) and index (B,) int -> (B, ...) with row b = x[b, index[b]]."""
  return jax.vmap(lambda row, i: jax.lax.dynamic_index_in_dim(row, i, keepdims=False))(
      x, index)


def shuffled_timestep_indices(key: jax.Array, batch_size: int, num_steps: int,
                              num_trained: int, first: int = 0) -> jnp.ndarray:
  """(B, num_trained) int32: the first positions of an independent permutation of
  range(first, first + num_steps) per sample."""
  keys = jax.random.split(key, batch_size)
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_steps))(keys)
  return (perms[:, :num_trained] + first).astype(jnp.int32)


def ppo_gradients(unet: Any, schedule: ddim.DDIMSchedule, sampler_config: sampling.SamplerConfig,
                  ppo_config: Any, trainable_params: Params, frozen_params: Optional[Params],
                  batch: PPOBatch, key: jax.Array) -> Tuple[Params, Dict[str, jnp.ndarray]]:
  """Mean PPO gradient over a minibatch's shuffled timesteps, in one ``lax.scan`` (jit it).

  Args:
    unet: the UNet module.
    schedule: DDIM schedule.
    sampler_config: the sampler's config (T = num_steps, eta).
    ppo_config: ``PPOConfig`` or ConfigDict.
    trainable_params: UNet params ("full") or LoRA tree ("lora").
    frozen_params: the frozen UNet params ("lora") or None ("full").
    batch: the minibatch.
    key: PRNG key for the per-sample timestep permutations.

  Returns:
    ``(grads, metrics)``: grads (float32, structure of ``trainable_params``) of the loss
    averaged over the K = ceil(W * timestep_fraction) visited positions of the W-step
    window (each a mean over the B samples; a deterministic step adds 0); metrics ``loss``,
    ``approx_kl``, ``clipfrac`` and ``kl`` (mean KL to the reference policy; 0 when
    kl_weight is 0) averaged the same way. With kl_weight > 0 the loss adds
    ``kl_weight * kl`` and ``frozen_params`` is the reference policy's UNet (the LoRA base;
    the initial UNet for "full").
  """
  c = PPOConfig.from_config(ppo_config)
  _check_batch(batch, sampler_config, c.pathwise)
  batch_size, num_steps = batch.log_probs.shape
  step_ratio = schedule.step_ratio(num_steps)
  order = visited_positions(key, c, batch_size, num_steps)  # (B, K)
  reference_params = frozen_params if c.kl_weight > 0 else None
  if c.kl_weight > 0 and frozen_params is None:
    raise ValueError("ppo.kl_weight > 0 needs the reference UNet params as frozen_params.")
  capture_side = (sampler_config.attention_side(batch.latents.shape[2]) if c.pathwise
                  else None)

  def loss_at(params, index):
    latents = _per_sample_index(batch.latents, index)
    next_latents = _per_sample_index(batch.latents, index + 1)
    old = _per_sample_index(batch.log_probs, index)
    timestep = batch.timesteps[index]
    unet_params = policy_params(params, frozen_params, c)
    new, maps, kl = sampling.rescore_step_and_kl(
        unet, unet_params, reference_params, schedule, batch.cond, batch.guidance, latents,
        next_latents, timestep, timestep - step_ratio, sampler_config.eta, capture_side)
    # Deterministic steps (sigma_t = 0) are not actions of the policy: no ratio, no KL.
    stochastic = ddim.is_stochastic(schedule, timestep, timestep - step_ratio,
                                    sampler_config.eta).astype(jnp.float32)  # (B,)
    loss, metrics = ppo_loss(new, old, batch.advantages, c.clip_range, c.adv_clip_max,
                             stochastic)
    if kl is None:
      metrics["kl"] = jnp.zeros((), jnp.float32)
    else:
      kl = jnp.where(stochastic > 0, kl, 0.0)
      metrics["kl"] = jax.lax.stop_gradient(jnp.mean(kl))
      loss = loss + c.kl_weight * jnp.mean(kl)
      metrics["loss"] = jax.lax.stop_gradient(loss)
    if not c.pathwise:
      return loss, metrics
    cotangent = _per_sample_index(batch.map_cotangents, index)  # (B, r, r)
    direct = jnp.mean(jnp.sum(cotangent * maps, axis=(1, 2)))
    return loss - c.attention_pathwise_weight * direct, metrics

  return mean_gradient_over_visits(loss_at, trainable_params, order.T,
                                   ("loss", "approx_kl", "clipfrac", "kl"))


def visited_positions(key: jax.Array, ppo_config: "PPOConfig", batch_size: int,
                      num_steps: int) -> jnp.ndarray:
  """(B, K) int32: each sample's K = ceil(W * timestep_fraction) trained positions, drawn from
  the W-step window (:func:`train_window`) by :func:`shuffled_timestep_indices`."""
  first, stop = train_window(num_steps, ppo_config.train_window_start,
                             ppo_config.train_window_end)
  num_trained = num_trained_timesteps(stop - first, ppo_config.timestep_fraction)
  return shuffled_timestep_indices(key, batch_size, stop - first, num_trained, first)


def mean_gradient_over_visits(loss_at: Callable, trainable_params: Params, visits: Any,
                              metric_names: Tuple[str, ...]
                              ) -> Tuple[Params, Dict[str, jnp.ndarray]]:
  """Means of ``loss_at(params, visit) -> (loss, metrics)``'s gradient and metrics over the
  leading axis of ``visits`` (a pytree, one entry per visited position), in one
  ``jax.lax.scan`` whose carry accumulates them (float32 grads, float32 scalar metrics
  ``metric_names``)."""
  grad_fn = jax.value_and_grad(loss_at, has_aux=True)

  def body(carry, visit):
    grad_sum, metric_sum = carry
    (_, metrics), grads = grad_fn(trainable_params, visit)
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
    metric_sum = jax.tree.map(jnp.add, metric_sum, metrics)
    return (grad_sum, metric_sum), None

  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), trainable_params)
  metric_zeros = {k: jnp.zeros((), jnp.float32) for k in metric_names}
  (grad_sum, metric_sum), _ = jax.lax.scan(body, (zeros, metric_zeros), visits)
  scale = 1.0 / jax.tree.leaves(visits)[0].shape[0]
  return (jax.tree.map(lambda g: g * scale, grad_sum),
          {k: v * scale for k, v in metric_sum.items()})


def apply_gradients(state: TrainState, grads: Params, loss: jnp.ndarray,
                    tx: optax.GradientTransformation, inputs_finite: Any = True
                    ) -> Tuple[TrainState, Dict[str, jnp.ndarray]]:
  """One optax update, skipped (state unchanged but the count) if anything is non-finite.

  Args:
    state: the train state.
    grads: gradients, structure of ``state.params``.
    loss: () the loss they come from.
    tx: the optimizer the state was made with.
    inputs_finite: () bool, False also skips (e.g. a NaN or inf advantage, which the
      advantage clipping would otherwise turn into a finite +-adv_clip_max).

  Returns:
    ``(state, metrics)`` with ``grad_norm`` (global norm before clipping), ``nonfinite``
    (1.0 if skipped) and ``nonfinite_count`` (consecutive skips, float32).
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.asarray(inputs_finite, bool)
  safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  updates, new_opt_state = tx.update(safe_grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jnp.where(finite, new, old)
  count = jnp.where(finite, 0, state.nonfinite_count + 1).astype(jnp.int32)
  new_state = TrainState(
      step=state.step + finite.astype(jnp.int32),
      params=jax.tree.map(keep, new_params, state.params),
      opt_state=jax.tree.map(keep, new_opt_state, state.opt_state),
      nonfinite_count=count)
  metrics = {"grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32),
             "nonfinite_count": count.astype(jnp.float32)}
  return new_state, metrics


def batch_shardings(mesh: Mesh, map_cotangents: bool = False) -> PPOBatch:
  """PPOBatch of shardings: per-sample arrays split over the mesh's batch axes, the rest
  (timesteps, guidance scales) replicated; ``map_cotangents``: the batch carries them."""
  split = parallel.batch_sharding(mesh)
  full = parallel.replicated(mesh)
  return PPOBatch(cond=split, latents=split, log_probs=split, advantages=split,
                  timesteps=full, guidance=full,
                  map_cotangents=split if map_cotangents else None)


def make_train_step(
    unet: Any,
    schedule: ddim.DDIMSchedule,
    sampler_config: sampling.SamplerConfig,
    ppo_config: Any,
    mesh: Optional[Mesh] = None,
    state_shardings: Optional[TrainState] = None,
    frozen_shardings: Any = None,
    optimizer: Optional[optax.GradientTransformation] = None,
) -> Callable[..., Tuple[TrainState, Dict[str, jnp.ndarray]]]:
  """The jitted ``train_step(state, frozen_unet_params, batch, key) -> (state, metrics)``.

  One call = one PPO minibatch update (see the module docstring). The state is donated:
  do not use the passed ``state`` afterwards. Metrics (float32 scalars): ``loss``,
  ``approx_kl``, ``clipfrac``, ``kl``, ``grad_norm``, ``nonfinite``, ``nonfinite_count``.

  Args:
    unet: the UNet module.
    schedule: DDIM schedule.
    sampler_config: the sampler's config (T and eta must match the trajectories).
    ppo_config: ``PPOConfig`` or the ``ppo`` ConfigDict.
    mesh: optional ('data', 'fsdp') mesh: the batch is split over its batch axes
      (``parallel.batch_sharding``), state and frozen params placed as given.
    state_shardings: TrainState of shardings (:func:`train_state_shardings`); default
      replicated.
    frozen_shardings: shardings of the frozen UNet params ("lora"); default replicated.
    optimizer: overrides :func:`make_optimizer`; must be the one the state was made with.

  Returns:
    The jitted step. ``frozen_unet_params`` is None for trainable="full".
  """
  c = PPOConfig.from_config(ppo_config)
  tx = make_optimizer(c) if optimizer is None else optimizer

  def train_step(state, frozen_unet_params, batch, key):
    check_frozen_given(c, frozen_unet_params)
    grads, metrics = ppo_gradients(unet, schedule, sampler_config, c, state.params,
                                   frozen_unet_params, batch, key)
    return update(state, grads, metrics, batch, tx)

  return jit_train_step(train_step, mesh, state_shardings, frozen_shardings, c.pathwise)


def check_frozen_given(ppo_config: "PPOConfig", frozen_unet_params: Any) -> None:
  """Raises ValueError when the step needs the frozen UNet (LoRA base / KL reference) and
  got None."""
  if (ppo_config.trainable == "lora" or ppo_config.kl_weight > 0) and frozen_unet_params is None:
    raise ValueError("trainable='lora' or kl_weight > 0: pass the frozen UNet params "
                     "(the LoRA base / KL reference) as the second argument.")


def update(state: TrainState, grads: Params, metrics: Dict[str, jnp.ndarray], batch: PPOBatch,
           tx: optax.GradientTransformation) -> Tuple[TrainState, Dict[str, jnp.ndarray]]:
  """:func:`apply_gradients` of a step's gradients (skipped on a non-finite advantage too);
  the step's metrics with the update's."""
  inputs_finite = jnp.all(jnp.isfinite(batch.advantages))
  state, update_metrics = apply_gradients(state, grads, metrics["loss"], tx, inputs_finite)
  return state, {**metrics, **update_metrics}


def jit_train_step(train_step: Callable, mesh: Optional[Mesh], state_shardings: Any,
                   frozen_shardings: Any, map_cotangents: bool,
                   extra_state_args: int = 0) -> Callable:
  """``jax.jit`` of ``train_step(state, frozen, batch, key, *extra)`` with the state donated;
  on a mesh: state and frozen params placed as given (default replicated), the batch split
  (``batch_shardings``), the key replicated, and ``extra_state_args`` more trees placed like
  ``state.params`` (NFT's sampling-policy params)."""
  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,))
  full = parallel.replicated(mesh)
  state_in = full if state_shardings is None else state_shardings
  frozen_in = full if frozen_shardings is None else frozen_shardings
  params_in = full if state_shardings is None else state_shardings.params
  return jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=(state_in, frozen_in, batch_shardings(mesh, map_cotangents),
                               full) + (params_in,) * extra_state_args,
                 out_shardings=(state_in, full))
