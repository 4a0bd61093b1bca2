"""DDIM schedule and step against diffusers' DDIMScheduler and closed-form log-densities."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from rl4pix_jax.diffusion import ddim

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    ddim.default_scheduler_config(),
    dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
         set_alpha_to_one=True, timestep_spacing="trailing"),
    dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", clip_sample=False,
         set_alpha_to_one=False, timestep_spacing="linspace", prediction_type="v_prediction"),
]


def _reference(config):
  return diffusers.DDIMScheduler.from_config(config)


@pytest.mark.parametrize("config", CONFIGS)
def test_schedule_matches_diffusers(config):
  ours = ddim.DDIMSchedule.from_config(config)
  ref = _reference(config)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)
  np.testing.assert_allclose(ours.final_alpha_cumprod, ref.final_alpha_cumprod.numpy())
  for steps in (1, 7, 20, 50):
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps(steps), ref.timesteps.numpy())


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers_and_closed_form(config, eta):
  ours = ddim.DDIMSchedule.from_config(config)
  ref = _reference(config)
  steps = 10
  ref.set_timesteps(steps)
  rng = np.random.default_rng(0)
  shape = (2, 4, 4, 3)  # NHWC here, NCHW for diffusers
  for t in ref.timesteps.numpy()[[0, 4, -1]]:
    sample = rng.standard_normal(shape).astype(np.float32)
    model_output = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    to_torch = lambda x: torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    expected = ref.step(to_torch(model_output), int(t), to_torch(sample), eta=eta,
                        variance_noise=to_torch(noise)).prev_sample.numpy().transpose(0, 2, 3, 1)
    prev_t = int(t) - ours.step_ratio(steps)
    # Sample with a key, then re-score the diffusers sample built from the same noise.
    got, log_prob = ddim.ddim_step(ours, jnp.asarray(model_output), t, prev_t,
                                   jnp.asarray(sample), eta, prev_sample=jnp.asarray(expected))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    mean, _ = ddim.ddim_step(ours, jnp.asarray(model_output), t, prev_t, jnp.asarray(sample),
                             0.0 * eta)
    # Closed form in float64: sigma from the schedule, mean from a deterministic step.
    a = np.float64(ref.alphas_cumprod[int(t)])
    a_prev = (np.float64(ref.alphas_cumprod[prev_t]) if prev_t >= 0
              else np.float64(ref.final_alpha_cumprod))
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    if eta == 0:
      np.testing.assert_allclose(mean, expected, atol=1e-5)
      continue
    if sigma < ddim.MIN_LOG_PROB_STD:  # last step with set_alpha_to_one: deterministic
      assert np.isfinite(np.asarray(log_prob)).all()
      continue
    mu = _mean_with_sigma(config, model_output, sample, a, a_prev, sigma)
    x = expected.astype(np.float64)
    want = np.mean(-(x - mu)**2 / (2 * sigma**2) - np.log(sigma) - 0.5 * np.log(2 * np.pi),
                   axis=(1, 2, 3))
    np.testing.assert_allclose(log_prob, want, rtol=1e-4, atol=1e-4)


def _mean_with_sigma(config, model_output, sample, a, a_prev, sigma):
  eps, x = model_output.astype(np.float64), sample.astype(np.float64)
  if config.get("prediction_type", "epsilon") == "v_prediction":
    x0 = np.sqrt(a) * x - np.sqrt(1 - a) * eps
    eps = np.sqrt(a) * eps + np.sqrt(1 - a) * x
  else:
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
  if config.get("clip_sample", True):
    x0 = np.clip(x0, -1, 1)
  return np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps


def test_sampling_with_key_then_rescoring_gives_same_log_prob():
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  key = jax.random.PRNGKey(0)
  sample, out = jax.random.normal(key, (2, 2, 8, 8, 4))
  prev, log_prob = ddim.ddim_step(schedule, out, 501, 481, sample, 1.0, key=key)
  _, rescored = ddim.ddim_step(schedule, out, 501, 481, sample, 1.0, prev_sample=prev)
  np.testing.assert_allclose(rescored, log_prob, atol=1e-5)
  # Per-sample timesteps broadcast like scalars.
  prev_b, log_prob_b = ddim.ddim_step(schedule, out, jnp.array([501, 501]),
                                      jnp.array([481, 481]), sample, 1.0, key=key)
  np.testing.assert_allclose(prev_b, prev, atol=1e-6)
  np.testing.assert_allclose(log_prob_b, log_prob, atol=1e-5)


def test_eta_zero_log_prob_is_finite():
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  x = jnp.ones((1, 4, 4, 4))
  _, log_prob = ddim.ddim_step(schedule, x, 981, 961, x, 0.0)
  assert np.isfinite(np.asarray(log_prob)).all()


def test_add_noise_and_training_target_closed_form():
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  clean, noise = np.ones((2, 2, 2, 1), np.float32), np.full((2, 2, 2, 1), 2.0, np.float32)
  t = np.array([0, 999])
  a = np.asarray(schedule.alphas_cumprod)[t][:, None, None, None]
  np.testing.assert_allclose(ddim.add_noise(schedule, clean, noise, t),
                             np.sqrt(a) * clean + np.sqrt(1 - a) * noise, rtol=1e-6)
  np.testing.assert_allclose(ddim.training_target(schedule, clean, noise, t), noise)
  ref = _reference(ddim.default_scheduler_config())
  np.testing.assert_allclose(
      ddim.add_noise(schedule, clean, noise, t),
      ref.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), torch.from_numpy(t)).numpy(),
      rtol=1e-5)


@pytest.mark.parametrize("field,value", [("prediction_type", "flow"), ("timestep_spacing", "x"),
                                         ("beta_schedule", "sigmoid"), ("thresholding", True)])
def test_unsupported_scheduler_fields_are_named(field, value):
  config = dict(ddim.default_scheduler_config(), **{field: value})
  with pytest.raises(ValueError, match=field):
    ddim.DDIMSchedule.from_config(config)


def test_bad_step_count():
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  with pytest.raises(ValueError, match="num_inference_steps"):
    schedule.timesteps(0)


@pytest.mark.parametrize("config", CONFIGS)
def test_step_kl_matches_gaussians_from_diffusers(config):
  """KL of two DDIM steps at one x_t: the means from diffusers' step (zero noise) for the two
  model outputs, sigma in float64; KL(N(m1, s^2) || N(m2, s^2)) = (m1 - m2)^2 / (2 s^2),
  averaged over dimensions. Zero for equal outputs."""
  ours = ddim.DDIMSchedule.from_config(config)
  ref = _reference(config)
  steps, eta = 10, 1.0
  ref.set_timesteps(steps)
  rng = np.random.default_rng(1)
  shape = (2, 4, 4, 3)
  to_torch = lambda x: torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  for t in ref.timesteps.numpy()[[0, 4]]:
    sample, out_1, out_2 = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    mean = lambda out: ref.step(to_torch(out), int(t), to_torch(sample), eta=eta,
                                variance_noise=torch.zeros(to_torch(sample).shape)
                                ).prev_sample.numpy().transpose(0, 2, 3, 1).astype(np.float64)
    prev_t = int(t) - ours.step_ratio(steps)
    a = np.float64(ref.alphas_cumprod[int(t)])
    a_prev = np.float64(ref.alphas_cumprod[prev_t])
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    want = np.mean((mean(out_1) - mean(out_2)) ** 2 / (2 * sigma ** 2), axis=(1, 2, 3))
    got = ddim.step_kl(ours, jnp.asarray(out_1), jnp.asarray(out_2), t, prev_t,
                       jnp.asarray(sample), eta)
    # float32 means of O(1) differ by O(1): a relative 1e-4 leaves ~100x float32 rounding
    np.testing.assert_allclose(got, want, rtol=1e-4)
    same = ddim.step_kl(ours, jnp.asarray(out_1), jnp.asarray(out_1), t, prev_t,
                        jnp.asarray(sample), eta)
    np.testing.assert_array_equal(same, 0.0)


def test_is_stochastic_marks_the_steps_with_zero_sigma():
  """T=3 leading steps (667, 334, 1): the last step goes to alpha_prev = alphas_cumprod[0]
  (set_alpha_to_one=False, SD's config), whose sigma > 0, or to alpha_prev = 1 (True), where
  sigma = eta sqrt((1 - 1) / ...) = 0; eta = 0 makes every step deterministic."""
  base = ddim.default_scheduler_config()
  steps = jnp.asarray([667, 334, 1])
  prev = steps - 333
  sd = ddim.DDIMSchedule.from_config(base)
  to_one = ddim.DDIMSchedule.from_config(dict(base, set_alpha_to_one=True))
  assert ddim.is_stochastic(sd, steps, prev, 1.0).tolist() == [True, True, True]
  assert ddim.is_stochastic(to_one, steps, prev, 1.0).tolist() == [True, True, False]
  assert ddim.is_stochastic(sd, steps, prev, 0.0).tolist() == [False, False, False]
  # The last SD step's sigma by hand: sqrt((1 - a0) / (1 - a1) * (1 - a1 / a0)).
  a = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
  want = np.sqrt((1 - a[0]) / (1 - a[1]) * (1 - a[1] / a[0]))
  np.testing.assert_allclose(ddim.ddim_std(sd, 1, -332, 1.0), want, rtol=1e-3)
  assert want > 100 * ddim.MIN_LOG_PROB_STD


def test_clip_sample_default_follows_the_config_class():
  """Absent clip_sample: a DDIM config clips x0 (diffusers' default), another class's config
  (InstructPix2Pix ships an Euler-ancestral one) does not; a named value always wins."""
  levels = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear")
  assert ddim.DDIMSchedule.from_config(levels).clip_sample
  assert ddim.DDIMSchedule.from_config(dict(levels, _class_name="DDIMScheduler")).clip_sample
  euler = dict(levels, _class_name="EulerAncestralDiscreteScheduler")
  assert not ddim.DDIMSchedule.from_config(euler).clip_sample
  assert ddim.DDIMSchedule.from_config(dict(euler, clip_sample=True)).clip_sample
