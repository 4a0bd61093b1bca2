"""PPO: the clipped loss in closed form, and the jitted scan train step on a tiny UNet.

The train-step tests share one compiled step (trainable="full") whose optimizer is a
*recording* SGD: its state holds the last applied gradient, so the scan-accumulated gradient
can be compared with an independent reference computed one timestep at a time in Python.
"""

import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.rl import lora
from rl4pix_jax.rl import ppo
from tests.helpers import tiny_models
from tests.helpers.paths import REPO_ROOT

B, T, SIDE = 2, 3, 16
FRACTION = 0.5  # K = ceil(3 * 0.5) = 2 of the 3 steps per sample
K = 2
SAMPLER = sampling.SamplerConfig(num_steps=T, eta=1.0, record_attention=False)
FULL = ppo.PPOConfig(trainable="full", clip_range=0.2, adv_clip_max=5.0, kl_weight=0.0,
                     timestep_fraction=FRACTION, learning_rate=3e-4,
                     attention_pathwise_weight=0.0)
LORA = ppo.PPOConfig(trainable="lora", lora_rank=2, lora_alpha=2.0, clip_range=0.2,
                     kl_weight=0.0,
                     learning_rate=1e-2, timestep_fraction=FRACTION,
                     attention_pathwise_weight=0.0)
SGD_LR = 1e-4


# --------------------------------------------------------------------------------------------
# ppo_loss against closed forms
# --------------------------------------------------------------------------------------------


def test_ratio_one_gives_minus_mean_advantage():
  adv = jnp.array([0.5, -2.0, 1.5, 3.0])
  logp = jnp.array([-1.0, 0.3, 2.0, -0.7])
  loss, metrics = ppo.ppo_loss(logp, logp, adv, clip_range=1e-4, adv_clip_max=5.0)
  np.testing.assert_allclose(loss, -np.mean([0.5, -2.0, 1.5, 3.0]), rtol=1e-6)
  assert float(metrics["approx_kl"]) == 0.0 and float(metrics["clipfrac"]) == 0.0
  # Advantages beyond +-adv_clip_max are clipped first.
  loss, _ = ppo.ppo_loss(logp[:2], logp[:2], jnp.array([10.0, -8.0]), 1e-4, adv_clip_max=5.0)
  np.testing.assert_allclose(loss, -np.mean([5.0, -5.0]), rtol=1e-6)


def test_zero_weight_entries_add_nothing():
  """weights = (1, 0, 1): the middle entry's huge log-ratio (an overflowing exp) is dropped;
  the loss and metrics are the two kept entries' terms divided by all 3 entries."""
  new = jnp.array([0.1, 500.0, -0.2])
  old = jnp.zeros(3)
  adv = jnp.array([1.0, 1.0, -2.0])
  eps = 0.5
  loss, metrics = ppo.ppo_loss(new, old, adv, eps, 5.0, weights=jnp.array([1.0, 0.0, 1.0]))
  r0, r2 = math.exp(0.1), math.exp(-0.2)  # both inside [1 - eps, 1 + eps]
  np.testing.assert_allclose(loss, (-1.0 * r0 + 2.0 * r2) / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["approx_kl"], 0.5 * (0.1 ** 2 + 0.2 ** 2) / 3, rtol=1e-6)
  assert float(metrics["clipfrac"]) == 0.0
  grad = jax.grad(lambda n: ppo.ppo_loss(n, old, adv, eps, 5.0, jnp.array([1.0, 0.0, 1.0]))[0])(
      new)
  np.testing.assert_allclose(grad, [-r0 / 3, 0.0, 2.0 * r2 / 3], rtol=1e-6)


@pytest.mark.parametrize("adv", [2.0, -2.0])
@pytest.mark.parametrize("ratio_over_eps", [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])
def test_clipping_at_and_beyond_both_boundaries(adv, ratio_over_eps):
  eps = 0.2
  ratio = 1.0 + ratio_over_eps * eps
  old = jnp.array([0.4])
  new = old + jnp.log(ratio)
  loss_fn = lambda n: ppo.ppo_loss(n, old, jnp.array([adv]), eps, 5.0)
  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(new)
  # Closed form: PPO takes the pessimistic (larger) of the two losses. With A > 0 the
  # clipped branch wins above 1 + eps (no gradient), the unclipped one below 1 - eps; with
  # A < 0 the reverse. At the boundaries both branches are equal.
  clipped_ratio = min(max(ratio, 1 - eps), 1 + eps)
  want = max(-adv * ratio, -adv * clipped_ratio)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  beyond = abs(ratio_over_eps) > 1
  if abs(ratio_over_eps) != 1:  # exactly at a boundary, float rounding decides clipfrac
    assert float(metrics["clipfrac"]) == float(beyond)
  np.testing.assert_allclose(metrics["approx_kl"], 0.5 * math.log(ratio)**2, rtol=1e-4)
  gradient_flows = (not beyond) or (adv > 0) == (ratio < 1)
  if beyond:  # d loss / d logp_new = -A * ratio on the unclipped branch, 0 on the clipped one
    np.testing.assert_allclose(grad, [-adv * ratio if gradient_flows else 0.0], rtol=1e-5)
  elif abs(ratio_over_eps) < 1:
    np.testing.assert_allclose(grad, [-adv * ratio], rtol=1e-5)


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="trainable='half'"):
    ppo.PPOConfig(trainable="half")
  with pytest.raises(ValueError, match="timestep_fraction"):
    ppo.PPOConfig(timestep_fraction=0.0)
  with pytest.raises(ValueError, match="Unknown ppo config fields"):
    ppo.PPOConfig.from_config({"clip_rang": 0.1})
  from configs import shapes  # pylint: disable=import-outside-toplevel
  assert ppo.PPOConfig.from_config(shapes.get_config().ppo).trainable == "lora"
  assert ppo.num_trained_timesteps(10, 0.3) == 3 and ppo.num_trained_timesteps(3, 0.5) == 2


def test_make_optimizer_is_clipped_adamw():
  config = ppo.PPOConfig(learning_rate=0.1, max_grad_norm=1.0, weight_decay=0.0)
  tx = ppo.make_optimizer(config)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([30.0, 40.0, 0.0])}  # norm 50 -> clipped to norm 1
  updates, _ = tx.update(grads, tx.init(params), params)
  # First AdamW step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps), i.e. -lr * sign(g).
  np.testing.assert_allclose(updates["w"], [-0.1, -0.1, 0.0], atol=1e-6)


def test_shuffled_timestep_indices_are_per_sample_permutations():
  order = np.asarray(ppo.shuffled_timestep_indices(jax.random.PRNGKey(0), 64, 5, 3))
  assert order.shape == (64, 3)
  assert all(len(set(row)) == 3 and set(row) <= set(range(5)) for row in order)
  assert len({tuple(row) for row in order}) > 10  # samples get different subsets/orders


# --------------------------------------------------------------------------------------------
# The train step
# --------------------------------------------------------------------------------------------


def recording_sgd(learning_rate):
  """SGD whose state is the last gradient it applied (a test double for optax)."""
  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(lambda g: -learning_rate * g, grads), grads

  return optax.GradientTransformation(init, update)


def make_cond(seed=0, batch=B):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return sampling.EditConditioning(
      text_embeds=normal(batch, tiny_models.TEXT_LEN, 32),
      uncond_text_embeds=normal(batch, tiny_models.TEXT_LEN, 32),
      image_latents=normal(batch, SIDE, SIDE, 4))


def host_copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def tiny_rollout():
  """The tiny UNet, its params, the schedule, B conditionings, guidance, a sampled trajectory,
  and ``batch_with(advantages)``: a PPOBatch of that trajectory (shared with test_nft)."""
  unet = tiny_models.tiny_unet()
  params = jax.jit(tiny_models.tiny_unet_params, static_argnums=(0, 1, 2))(0, 1, SIDE)
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  cond = make_cond()
  guidance = sampling.Guidance(jnp.float32(7.5), jnp.float32(1.5))
  traj = sampling.make_trajectory_sampler(unet, schedule, SAMPLER)(
      params, cond, jax.random.PRNGKey(3), guidance)

  def batch_with(advantages):
    return ppo.PPOBatch(cond=cond, latents=traj.latents, log_probs=traj.log_probs,
                        advantages=jnp.asarray(advantages, jnp.float32),
                        timesteps=traj.timesteps, guidance=guidance)

  return unet, params, schedule, cond, guidance, traj, batch_with


@pytest.fixture(scope="module")
def setup():
  unet, params, schedule, cond, guidance, traj, batch_with = tiny_rollout()
  tx = recording_sgd(SGD_LR)
  step = ppo.make_train_step(unet, schedule, SAMPLER, FULL, optimizer=tx)

  def fresh_state():
    return ppo.init_train_state(jax.random.PRNGKey(0), params, FULL, optimizer=tx)[0]

  # Independent reference: one scalar timestep at a time, per-sample weights selecting the
  # (sample, step) pairs the train step visits, the PPO loss written out here.
  ratio_step = schedule.step_ratio(T)

  @jax.jit
  def reference(p, i, weights, advantages):
    def loss(q):
      new = sampling.rescore_step(unet, q, schedule, cond, guidance, traj.latents[:, i],
                                  traj.latents[:, i + 1], traj.timesteps[i],
                                  traj.timesteps[i] - ratio_step, SAMPLER.eta)
      ratio = jnp.exp(new - traj.log_probs[:, i])
      adv = jnp.clip(advantages, -FULL.adv_clip_max, FULL.adv_clip_max)
      per_sample = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - FULL.clip_range,
                                                            1 + FULL.clip_range))
      return jnp.sum(weights * per_sample) / (B * K), new
    (_, new), grads = jax.value_and_grad(loss, has_aux=True)(p)
    return new, grads

  def reference_gradient(p, key, advantages):
    order = np.asarray(ppo.shuffled_timestep_indices(key, B, T, K))
    total = None
    for i in range(T):
      weights = jnp.asarray([float(i in order[b]) for b in range(B)])
      _, grads = reference(p, i, weights, jnp.asarray(advantages, jnp.float32))
      total = grads if total is None else jax.tree.map(jnp.add, total, grads)
    return total, order

  # The first call compiles; time it and a second call with new values.
  key = jax.random.PRNGKey(11)
  start = time.perf_counter()
  state, metrics = step(fresh_state(), None, batch_with([1.0, 0.0]), key)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(step(fresh_state(), None, batch_with([0.5, -0.5]),
                             jax.random.PRNGKey(12)))
  second_s = time.perf_counter() - start
  print(f"\ntrain_step (tiny UNet, B={B}, T={T}, K={K}): first call {compile_s:.1f} s "
        f"(compile), second call {second_s:.2f} s, grad_norm {float(metrics['grad_norm']):.3g}")
  first = dict(key=key, advantages=[1.0, 0.0], state=state, metrics=metrics,
               compile_s=compile_s, second_s=second_s)
  return dict(unet=unet, params=host_copy(params), schedule=schedule, traj=traj, step=step,
              batch_with=batch_with, fresh_state=fresh_state, reference=reference,
              reference_gradient=reference_gradient, first=first, cond=cond,
              guidance=guidance)


def test_unchanged_params_rescore_with_ratio_one(setup):
  metrics = setup["first"]["metrics"]
  assert float(metrics["approx_kl"]) < 1e-9
  assert float(metrics["clipfrac"]) == 0.0
  # Ratio 1 everywhere: the loss is -mean(A) = -0.5.
  np.testing.assert_allclose(metrics["loss"], -0.5, atol=1e-4)
  assert float(metrics["nonfinite"]) == 0.0 and float(metrics["grad_norm"]) > 0


def test_positive_advantage_increases_that_samples_log_prob(setup):
  first = setup["first"]
  new_params = first["state"].params
  order = np.asarray(ppo.shuffled_timestep_indices(first["key"], B, T, K))
  traj = setup["traj"]
  gains = []
  for i in order[0]:
    new, _ = setup["reference"](new_params, int(i), jnp.zeros(B), jnp.zeros(B))
    gains.append(float(new[0] - traj.log_probs[0, i]))
  print(f"log-prob change of the A=+1 sample at its trained steps: {gains}")
  assert np.mean(gains) > 0, gains
  assert int(first["state"].step) == 1


@pytest.mark.parametrize("advantages,seed,reuse_first", [([1.0, 0.0], 11, True),
                                                       ([2.0, -7.0], 5, False)])
def test_scan_gradient_equals_per_timestep_reference(setup, advantages, seed, reuse_first):
  key = jax.random.PRNGKey(seed)
  if reuse_first:  # the fixture's first call used this key and these advantages
    state = setup["first"]["state"]
  else:  # -7 is clipped to -adv_clip_max = -5 inside the loss
    state, _ = setup["step"](setup["fresh_state"](), None, setup["batch_with"](advantages), key)
  got = state.opt_state  # the recording SGD's state: the applied (mean) gradient
  want, order = setup["reference_gradient"](setup["params"], key, advantages)
  print(f"visited steps per sample (key {seed}): {order.tolist()}")
  # Tolerance: the two programs batch the UNet differently, and d logp / d eps divides the
  # float32 difference (x_prev - mean) by sigma_t^2, so rounding shows at ~1e-5 of the
  # largest gradient entry (measured: 1.4e-5); a wrong weighting or a missed step is O(1).
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * scale)
  # And SGD applied it: params - lr * grad.
  for p, new, w in zip(jax.tree.leaves(setup["params"]), jax.tree.leaves(state.params),
                       jax.tree.leaves(want)):
    np.testing.assert_allclose(new, p - SGD_LR * np.asarray(w), rtol=1e-5,
                               atol=1e-5 * scale * SGD_LR + 1e-7)


def test_nonfinite_advantage_skips_the_update_bitwise(setup):
  step, batch_with = setup["step"], setup["batch_with"]
  state = setup["fresh_state"]()
  opt_before = host_copy(state.opt_state)
  counts = []
  for advantages in ([np.nan, 1.0], [1.0, np.inf]):
    state, metrics = step(state, None, batch_with(advantages), jax.random.PRNGKey(1))
    counts.append(int(state.nonfinite_count))
    assert float(metrics["nonfinite"]) == 1.0
    assert float(metrics["nonfinite_count"]) == counts[-1]
  assert counts == [1, 2]
  assert int(state.step) == 0
  for before, after in zip(jax.tree.leaves(setup["params"]), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(after, before)
  for before, after in zip(jax.tree.leaves(opt_before), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(after, before)
  state, metrics = step(state, None, batch_with([1.0, -1.0]), jax.random.PRNGKey(1))
  assert int(state.nonfinite_count) == 0 and float(metrics["nonfinite"]) == 0.0
  assert int(state.step) == 1


def test_no_recompilation_across_calls(setup):
  step = setup["step"]
  state, _ = step(setup["fresh_state"](), None, setup["batch_with"]([0.3, 0.1]),
                  jax.random.PRNGKey(99))
  jax.block_until_ready(state)
  assert step._cache_size() == 1  # pylint: disable=protected-access
  first = setup["first"]
  assert first["second_s"] < first["compile_s"]


def test_lora_step_trains_only_the_adapters(setup):
  unet, schedule = setup["unet"], setup["schedule"]
  base = jax.tree.map(jnp.asarray, setup["params"])
  state, frozen = ppo.init_train_state(jax.random.PRNGKey(4), base, LORA)
  assert frozen is base
  adapters_before = host_copy(state.params)
  # Optimizer state exists only for the adapters: every array leaf of it is a LoRA leaf's
  # moment (same path suffix and shape) or a scalar count.
  lora_shapes = {tuple(k.key for k in path): leaf.shape
                 for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    names = tuple(getattr(k, "key", None) for k in path)
    if leaf.ndim:
      assert any(names[-len(p):] == p and leaf.shape == s for p, s in lora_shapes.items()), names
  assert lora.param_count(state.opt_state) < 3 * lora.param_count(state.params) + 10
  step = ppo.make_train_step(unet, schedule, SAMPLER, LORA)
  with pytest.raises(ValueError, match="frozen UNet params"):
    step(state, None, setup["batch_with"]([1.0, -1.0]), jax.random.PRNGKey(0))
  state, metrics = step(state, frozen, setup["batch_with"]([1.0, -1.0]), jax.random.PRNGKey(0))
  assert float(metrics["nonfinite"]) == 0.0 and float(metrics["approx_kl"]) < 1e-9
  for before, after in zip(jax.tree.leaves(setup["params"]), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(after, before)  # the frozen UNet is untouched
  ups = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]
         if path[-1].key == "up"]
  assert all(float(jnp.abs(u).max()) > 0 for u in ups)  # every adapter moved off zero
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(adapters_before), jax.tree.leaves(state.params)))
  merged = ppo.policy_params(state.params, frozen, LORA)
  changed = [not np.array_equal(m, b) for m, b in
             zip(jax.tree.leaves(merged), jax.tree.leaves(setup["params"]))]
  assert sum(changed) == len(lora.lora_target_paths(setup["params"]))


# --------------------------------------------------------------------------------------------
# 1 device vs 8 forced CPU devices (mesh data=4 x fsdp=2, kernels sharded over fsdp)
# --------------------------------------------------------------------------------------------

EIGHT_DEVICE_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
from flax import traverse_util
sys.path.insert(0, {root!r})
from rl4pix_jax import parallel
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.rl import ppo
from tests.helpers import tiny_models
from tests.rl import test_ppo as tp
assert jax.device_count() == 8, jax.devices()
data = np.load({inputs!r})
params = traverse_util.unflatten_dict(
    {{tuple(k.split("/")[1:]): jnp.asarray(v) for k, v in data.items() if k.startswith("p/")}})
tile = lambda name: jnp.asarray(np.concatenate([data[name]] * 4))  # B = 2 -> 8
cond = sampling.EditConditioning(tile("text"), tile("uncond"), tile("image"))
guidance = sampling.Guidance(jnp.float32(7.5), jnp.float32(1.5))
batch = ppo.PPOBatch(cond=cond, latents=tile("latents"), log_probs=tile("log_probs"),
                     advantages=jnp.linspace(-2.0, 2.0, 8), timesteps=jnp.asarray(data["t"]),
                     guidance=guidance)
unet = tiny_models.tiny_unet()
schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
tx = tp.recording_sgd(tp.SGD_LR)
key = jax.random.PRNGKey(5)
state = ppo.init_train_state(key, params, tp.FULL, optimizer=tx)[0]
one, one_metrics = ppo.make_train_step(unet, schedule, tp.SAMPLER, tp.FULL, optimizer=tx)(
    state, None, batch, key)

mesh = parallel.make_mesh(data=4, fsdp=2)
state = ppo.init_train_state(key, params, tp.FULL, optimizer=tx)[0]
shardings = ppo.train_state_shardings(state, mesh, parallel.default_sharding_rules(min_size=1024))
state = parallel.shard_params(state, shardings)
batch = jax.device_put(batch, ppo.batch_shardings(mesh))
step = ppo.make_train_step(unet, schedule, tp.SAMPLER, tp.FULL, mesh=mesh,
                           state_shardings=shardings, optimizer=tx)
eight, eight_metrics = step(state, None, batch, key)
specs = [leaf.sharding.spec for leaf in jax.tree.leaves(eight.params)]
assert any("fsdp" in str(s) for s in specs), specs
assert all(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(eight.params))
flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
np.savez({out!r}, one=flat(one.opt_state), eight=flat(eight.opt_state),
         one_loss=one_metrics["loss"], eight_loss=eight_metrics["loss"])
"""


def test_one_device_equals_eight_devices(setup, tmp_path):
  root = REPO_ROOT
  out, inputs = str(tmp_path / "grads.npz"), str(tmp_path / "inputs.npz")
  traj, cond = setup["traj"], setup["cond"]
  flat_params = {"p/" + "/".join(k): v
                 for k, v in traverse_util.flatten_dict(setup["params"]).items()}
  np.savez(inputs, latents=traj.latents, log_probs=traj.log_probs, t=traj.timesteps,
           text=cond.text_embeds, uncond=cond.uncond_text_embeds, image=cond.image_latents,
           **flat_params)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  script = EIGHT_DEVICE_SCRIPT.format(root=root, out=out, inputs=inputs)
  subprocess.run([sys.executable, "-c", script],
                 check=True, env=env, cwd=root, timeout=600)
  result = np.load(out)
  np.testing.assert_allclose(result["eight_loss"], result["one_loss"], rtol=1e-5, atol=1e-6)
  # Not bitwise: the sharded program reduces the batch and the fsdp-split kernels in another
  # order, and the log-prob gradient amplifies float32 rounding (see the reference test).
  # Per-device batch 1 also makes XLA:CPU pick other convolution kernels (see
  # test_sampling), so how large the rounding is depends on the host's kernels. The bound:
  # the UNet's rounding (~1e-6 of its output) times the guidance (up to 19x, see
  # test_sampling) and the latents' scale (~3), divided by sigma_t (0.04 at the last step)
  # in d logp / d eps, is ~1.4e-3 of the gradient's scale, over the old 1e-3; so 1e-2.
  # Measured: relative L2 difference 2.0e-4, max |diff| 2.6e-4 of the largest entry (AMD
  # EPYC; two 1-device programs, scan vs per-step reference: 2.6e-5). A wrong cross-device
  # reduction (a sum instead of a mean, or one shard's samples missing) is >= 1e-1.
  one, eight = result["one"], result["eight"]
  relative = np.linalg.norm(eight - one) / np.linalg.norm(one)
  print(f"\n8 vs 1 device gradient: relative L2 difference {relative:.2e}, max |diff| "
        f"{np.abs(eight - one).max() / np.abs(one).max():.2e} of the largest entry")
  assert relative < 1e-2
  np.testing.assert_allclose(eight, one, rtol=1e-3, atol=1e-2 * np.abs(one).max())


def test_batch_that_does_not_fit_the_sampler_is_named(setup):
  traj = setup["traj"]
  batch = setup["batch_with"]([1.0, 0.0]).replace(log_probs=traj.log_probs[:, :2])
  with pytest.raises(ValueError, match=r"log_probs \(2, 2\) \(expected \(2, 3\)\)"):
    ppo.ppo_gradients(setup["unet"], setup["schedule"], SAMPLER, FULL, setup["params"], None,
                      batch, jax.random.PRNGKey(0))


def test_pathwise_attention_gradient_matches_a_per_step_reference(setup):
  """With zero advantages the PPO term has no gradient, so the step's gradient is the
  pathwise one: -weight * (1/K) * sum over visited (sample, step) of
  d<cotangent, maps(params)>/d params / B, written out here one timestep at a time."""
  unet, schedule, traj = setup["unet"], setup["schedule"], setup["traj"]
  params = jax.tree.map(jnp.asarray, setup["params"])
  tokens = dict(token_index=jnp.tile(jnp.array([[2, 3]], jnp.int32), (B, 1)),
                token_mask=jnp.ones((B, 2), bool))
  cond = setup["cond"].replace(**tokens)
  recording = sampling.SamplerConfig(num_steps=T, eta=1.0, capture_size=SIDE // 2)
  side = recording.attention_side(SIDE)
  weight = 0.5
  config = ppo.PPOConfig(trainable="full", clip_range=0.2, attention_pathwise_weight=weight,
                         kl_weight=0.0,
                         timestep_fraction=K / T)
  tx = recording_sgd(1.0)
  step = ppo.make_train_step(unet, schedule, recording, config, optimizer=tx)
  cotangents = jax.random.normal(jax.random.PRNGKey(5), (B, T, side, side))
  batch = ppo.PPOBatch(cond=cond, latents=traj.latents, log_probs=traj.log_probs,
                       advantages=jnp.zeros((B,)), timesteps=traj.timesteps,
                       guidance=setup["guidance"], map_cotangents=cotangents)
  key = jax.random.PRNGKey(21)
  state = ppo.init_train_state(jax.random.PRNGKey(0), params, config, optimizer=tx)[0]
  state, _ = step(state, None, batch, key)
  grads = state.opt_state[1] if isinstance(state.opt_state, tuple) else state.opt_state

  order = np.asarray(ppo.shuffled_timestep_indices(key, B, T, K))
  ratio_step = schedule.step_ratio(T)

  def direct(p):
    total = 0.0
    for i in range(T):
      weights = jnp.asarray([float(i in order[b]) for b in range(B)])
      _, maps = sampling.guided_noise_prediction(unet, p, traj.latents[:, i],
                                                 traj.timesteps[i], cond, setup["guidance"],
                                                 side)
      total += jnp.sum(weights * jnp.sum(cotangents[:, i] * maps, axis=(1, 2)))
    return -weight * total / (B * K)
  del ratio_step
  want = jax.grad(direct)(params)
  got_leaves, want_leaves = jax.tree.leaves(grads), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  scale = max(float(jnp.max(jnp.abs(w))) for w in want_leaves)
  assert scale > 0
  for got, expected in zip(got_leaves, want_leaves):
    np.testing.assert_allclose(got, expected, atol=1e-4 * scale, rtol=1e-3)


def test_pathwise_weight_needs_cotangents(setup):
  config = ppo.PPOConfig(trainable="full", attention_pathwise_weight=1.0, kl_weight=0.0)
  batch = setup["batch_with"]([1.0, 0.0])
  with pytest.raises(ValueError, match="needs PPOBatch.map_cotangents"):
    ppo.ppo_gradients(setup["unet"], setup["schedule"], SAMPLER, config,
                      jax.tree.map(jnp.asarray, setup["params"]), None, batch,
                      jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="attention_pathwise_weight=-1"):
    ppo.PPOConfig(attention_pathwise_weight=-1.0)


# --------------------------------------------------------------------------------------------
# KL penalty, trained window
# --------------------------------------------------------------------------------------------


def test_train_window_positions():
  assert ppo.train_window(10, 0.0, 1.0) == (0, 10)
  assert ppo.train_window(10, 0.0, 0.5) == (0, 5)  # the high-noise half
  assert ppo.train_window(10, 0.5, 1.0) == (5, 10)
  assert ppo.train_window(3, 0.0, 0.5) == (0, 2)  # ceil(1.5)
  assert ppo.train_window(10, 0.95, 1.0) == (9, 10)  # never empty
  order = np.asarray(ppo.shuffled_timestep_indices(jax.random.PRNGKey(0), 32, 4, 2, first=3))
  assert order.min() >= 3 and order.max() <= 6
  with pytest.raises(ValueError, match="train_window_start"):
    ppo.PPOConfig(train_window_start=0.5, train_window_end=0.5)


def test_kl_penalty_gradient_matches_a_per_step_reference(setup):
  """Zero advantages leave only kl_weight x KL to the reference (the starting UNet). The
  step's gradient and its ``kl`` metric equal a reference written out here, one timestep at
  a time: the two Gaussian means from ``ddim_step`` without noise, KL = mean (m - m_ref)^2 /
  (2 sigma^2), over the (sample, step) pairs the step visits in its window."""
  unet, schedule, traj = setup["unet"], setup["schedule"], setup["traj"]
  cond, guidance = setup["cond"], setup["guidance"]
  weight = 0.5
  config = ppo.PPOConfig(trainable="full", clip_range=0.2, timestep_fraction=0.5,
                         kl_weight=weight, train_window_start=0.0, train_window_end=0.7,
                         attention_pathwise_weight=0.0)
  first, stop = ppo.train_window(T, 0.0, 0.7)  # (0, 3) -> K = 2 of the 3
  visited = ppo.num_trained_timesteps(stop - first, 0.5)
  tx = recording_sgd(SGD_LR)
  step = ppo.make_train_step(unet, schedule, SAMPLER, config, optimizer=tx)
  reference_params = jax.tree.map(jnp.asarray, setup["params"])
  noise = iter(np.random.default_rng(5).standard_normal(10 ** 7).astype(np.float32))
  policy = jax.tree.map(lambda p: p + 0.02 * np.fromiter(noise, np.float32, p.size).reshape(
      p.shape), setup["params"])
  state = ppo.init_train_state(jax.random.PRNGKey(0), policy, config, optimizer=tx)[0]
  key = jax.random.PRNGKey(21)
  batch = setup["batch_with"]([0.0, 0.0])
  new_state, metrics = step(state, reference_params, batch, key)
  order = np.asarray(ppo.shuffled_timestep_indices(key, B, stop - first, visited, first))
  ratio_step = schedule.step_ratio(T)

  @jax.jit
  def kl_at(q, i):
    x, t = traj.latents[:, i], traj.timesteps[i]
    mean = lambda p: ddim.ddim_step(schedule, sampling.guided_noise_prediction(
        unet, p, x, t, cond, guidance, None)[0], t, t - ratio_step, x, SAMPLER.eta)[0]
    sigma = jnp.maximum(ddim.ddim_std(schedule, t, t - ratio_step, SAMPLER.eta),
                        ddim.MIN_LOG_PROB_STD)
    return jnp.mean((mean(q) - mean(reference_params)) ** 2, axis=(1, 2, 3)) / (2 * sigma ** 2)

  def reference_loss(q):
    total = 0.0
    for i in range(T):
      weights = jnp.asarray([float(i in order[b]) for b in range(B)])
      total = total + jnp.sum(weights * kl_at(q, i))
    return weight * total / (B * visited)

  loss, want = jax.value_and_grad(reference_loss)(jax.tree.map(jnp.asarray, policy))
  np.testing.assert_allclose(metrics["kl"] * weight, loss, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-4)
  assert float(metrics["kl"]) > 0
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(new_state.opt_state), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * scale)  # as the PPO gradient test
  # At the reference itself the KL and its gradient vanish, up to the rounding of the two
  # differently compiled forwards (measured: kl 8e-14 there).
  state = ppo.init_train_state(jax.random.PRNGKey(0), reference_params, config, optimizer=tx)[0]
  _, at_reference = step(state, reference_params, batch, key)
  assert float(at_reference["kl"]) < 1e-6 * float(metrics["kl"])
  assert float(at_reference["grad_norm"]) < 1e-2 * float(metrics["grad_norm"])


def test_kl_penalty_needs_the_reference(setup):
  config = ppo.PPOConfig(trainable="full", kl_weight=0.1, attention_pathwise_weight=0.0)
  step = ppo.make_train_step(setup["unet"], setup["schedule"], SAMPLER, config)
  state = ppo.init_train_state(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray,
                                                                   setup["params"]), config)[0]
  with pytest.raises(ValueError, match="KL reference"):
    step(state, None, setup["batch_with"]([1.0, 0.0]), jax.random.PRNGKey(0))


def test_deterministic_last_step_is_not_trained(setup):
  """With set_alpha_to_one=True the last of the T=3 steps has sigma = 0. Trained alone
  (window [0.7, 1]) with its stored log-prob moved by +50 (any rescore then differs from it),
  the step adds nothing: loss, approx_kl, clipfrac and the gradient are 0. The same batch with
  the first step's log-prob moved trains (the step is stochastic there)."""
  schedule = ddim.DDIMSchedule.from_config(dict(ddim.default_scheduler_config(),
                                                set_alpha_to_one=True))
  config = ppo.PPOConfig(trainable="full", clip_range=0.2, kl_weight=0.0,
                         attention_pathwise_weight=0.0, train_window_start=0.7)
  tx = recording_sgd(SGD_LR)
  step = ppo.make_train_step(setup["unet"], schedule, SAMPLER, config, optimizer=tx)
  params = jax.tree.map(jnp.asarray, setup["params"])
  batch = setup["batch_with"]([1.0, -1.0])
  moved = batch.replace(log_probs=batch.log_probs.at[:, T - 1].add(50.0))
  state = ppo.init_train_state(jax.random.PRNGKey(0), params, config, optimizer=tx)[0]
  _, metrics = step(state, None, moved, jax.random.PRNGKey(1))
  for name in ("loss", "approx_kl", "clipfrac", "grad_norm"):
    assert float(metrics[name]) == 0.0, (name, float(metrics[name]))
  first = ppo.PPOConfig(trainable="full", clip_range=0.2, kl_weight=0.0,
                        attention_pathwise_weight=0.0, train_window_end=0.3)
  step_first = ppo.make_train_step(setup["unet"], schedule, SAMPLER, first, optimizer=tx)
  moved_first = batch.replace(log_probs=batch.log_probs.at[:, 0].add(50.0))
  state = ppo.init_train_state(jax.random.PRNGKey(0), params, first, optimizer=tx)[0]
  _, metrics = step_first(state, None, moved_first, jax.random.PRNGKey(1))
  assert float(metrics["approx_kl"]) > 100 and float(metrics["clipfrac"]) == 1.0
