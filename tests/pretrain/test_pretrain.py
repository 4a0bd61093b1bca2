"""Tests of the supervised stages (rl4pix_jax.pretrain) on tiny models and a tiny dataset."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import shapes as shapes_config
from rl4pix_jax.data import shapes_check
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.pretrain import clip_training
from rl4pix_jax.pretrain import data as data_lib
from rl4pix_jax.pretrain import editor_check
from rl4pix_jax.pretrain import editor_training
from rl4pix_jax.pretrain import shipped
from rl4pix_jax.pretrain import training_loop
from rl4pix_jax.pretrain import vae_training
from rl4pix_jax.workdir import layout
from rl4pix_jax.workdir import stages as ckpt


def tiny_config(steps: int = 2):
  """The default config with tiny models, 16x16 images and a 16-example train split."""
  c = shapes_config.get_config()
  c.resolution = 16
  c.data.train_size, c.data.validation_size, c.data.test_size = 16, 8, 0
  c.model.vae = dict(c.model.vae, sample_size=16, block_out_channels=[8, 16, 16],
                     norm_num_groups=4)
  c.model.text_encoder = dict(c.model.text_encoder, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, projection_dim=16)
  c.model.vision_encoder = dict(c.model.vision_encoder, image_size=16, patch_size=4,
                                hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                projection_dim=16)
  c.model.unet = dict(c.model.unet, sample_size=4, block_out_channels=[16, 32],
                      cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
  for stage in ("vae", "clip", "unet"):
    getattr(c.pretrain, stage).update(steps=steps, batch_size=4, log_every=1,
                                      checkpoint_every=2)
  c.pretrain.unet.update(train_examples=16, ema_decay=0.9, snr_gamma=5.0)
  return c


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
  """A data_dir with the tiny dataset, built once."""
  root = tmp_path_factory.mktemp("pretrain")
  config = tiny_config()
  config.data.data_dir = str(root / "data")
  data_lib.ensure_shapes_dataset(config, str(root))
  return config.data.data_dir


@pytest.fixture(scope="module")
def trained_workdir(shared_data, tmp_path_factory):
  """A workdir where the three stages ran for 2 steps each."""
  workdir = str(tmp_path_factory.mktemp("workdir"))
  config = tiny_config()
  config.data.data_dir = shared_data
  vae_training.train_vae(config, workdir)
  clip_training.train_clip(config, workdir)
  editor_training.train_editor(config, workdir)
  return config, workdir


def metric_steps(workdir, stage):
  with open(os.path.join(layout.stage_dir(workdir, stage), layout.METRICS_FILE)) as f:
    return [json.loads(line)["step"] for line in f]


def test_each_stage_writes_checkpoint_and_model_config(trained_workdir):
  config, workdir = trained_workdir
  for stage in layout.STAGES:
    assert ckpt.stage_complete(workdir, stage)
    params, model_config = ckpt.latest_stage_params(workdir, stage)
    assert model_config["stage"] == stage and model_config["metadata"]["num_steps"] == 2
    assert jax.tree_util.tree_leaves(params)
    assert os.path.exists(os.path.join(layout.stage_dir(workdir, stage), "2"))
  vae_config = ckpt.read_model_config(workdir, "vae")
  scaling = vae_config["models"]["vae"]["scaling_factor"]
  assert scaling == pytest.approx(1 / vae_config["metadata"]["latent_std"])
  clip_config = ckpt.read_model_config(workdir, "clip")["models"]["clip"]
  assert {"text_config", "vision_config", "projection_dim"} <= set(clip_config)
  unet_config = ckpt.read_model_config(workdir, "unet")["models"]["unet"]
  assert unet_config["in_channels"] == 8 and unet_config["block_out_channels"] == [16, 32]


def test_rerun_skips_complete_stages(trained_workdir):
  config, workdir = trained_workdir
  before = {stage: metric_steps(workdir, stage) for stage in layout.STAGES}
  vae_training.train_vae(config, workdir)
  clip_training.train_clip(config, workdir)
  editor_training.train_editor(config, workdir)
  assert {stage: metric_steps(workdir, stage) for stage in layout.STAGES} == before


def test_missing_stage_error_names_path_and_command(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"launch.pretrain --config=configs/shapes.py:unet"):
    ckpt.latest_stage_params(str(tmp_path), "unet")
  assert not ckpt.stage_complete(str(tmp_path), "vae")


class Interrupted(Exception):
  pass


def test_interrupted_stage_resumes_from_last_checkpoint(shared_data, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = tiny_config(steps=4)
  config.data.data_dir = shared_data
  real_run = training_loop.run_training

  def run_until_step_3(*args, **kwargs):
    make_batch = args[6]

    def failing(step):
      if step == 3:
        raise Interrupted()
      return make_batch(step)

    return real_run(*args[:6], failing, *args[7:], **kwargs)

  monkeypatch.setattr(training_loop, "run_training", run_until_step_3)
  with pytest.raises(Interrupted):
    vae_training.train_vae(config, workdir)
  assert not ckpt.stage_complete(workdir, "vae")
  assert metric_steps(workdir, "vae") == [1, 2, 3]  # checkpoint at 2, step 3 lost
  monkeypatch.setattr(training_loop, "run_training", real_run)
  vae_training.train_vae(config, workdir)
  assert metric_steps(workdir, "vae") == [1, 2, 3, 3, 4]  # resumed at step 2
  assert ckpt.stage_complete(workdir, "vae")


def loss_curve(train_step, params, opt_state, batch, steps=20):
  """Losses of ``steps`` updates on one fixed batch with one fixed key."""
  losses = []
  key = jax.random.PRNGKey(0)
  for _ in range(steps):
    params, opt_state, metrics = train_step(params, opt_state, batch, key)
    losses.append(float(metrics["loss"]))
  return losses


# A fixed batch and key make every step see the same inputs: a model that learns must fit
# them. The margins (final loss below 80% / 90% of the first) are several times the
# step-to-step wobble of these curves and far from what an optimizer with a sign error or
# zero gradients produces (a flat or rising curve).
def test_vae_loss_decreases_on_a_fixed_batch(trained_workdir):
  config, workdir = trained_workdir
  model = vae_training.make_vae(config)
  params = vae_training.init_vae_params(model, jax.random.PRNGKey(0), 16)
  optimizer = optax.adamw(1e-3, weight_decay=0.0)
  step = vae_training.make_vae_train_step(model, optimizer, 1e-6)
  images = data_lib.load_split(
      ckpt.read_model_config(workdir, "vae")["metadata"]["dataset_dir"], "train", 16,
      max_examples=4).arrays["target"]
  losses = loss_curve(step, params, optimizer.init(params), images)
  assert losses[-1] < 0.8 * losses[0], losses


def test_clip_loss_decreases_on_a_fixed_batch(trained_workdir):
  config, workdir = trained_workdir
  text_model, vision_model = clip_training.make_clip(clip_training.clip_model_config(config))
  params = clip_training.init_clip_params(text_model, vision_model, jax.random.PRNGKey(0), 16)
  optimizer = optax.adamw(1e-3, weight_decay=0.0)
  step = clip_training.make_clip_train_step(text_model, vision_model, optimizer)
  split = data_lib.load_split(
      ckpt.read_model_config(workdir, "clip")["metadata"]["dataset_dir"], "train", 16,
      max_examples=4)
  losses = loss_curve(step, params, optimizer.init(params), clip_training.pair_batch(
      split.arrays))
  assert losses[-1] < 0.8 * losses[0], losses


def test_editor_loss_decreases_on_a_fixed_batch(trained_workdir):
  config, workdir = trained_workdir
  encoders = editor_training.load_frozen_encoders(workdir)
  dataset_dir = ckpt.read_model_config(workdir, "unet")["metadata"]["dataset_dir"]
  split = data_lib.load_split(dataset_dir, "train", 16, max_examples=4)
  batch = editor_training.encode_split(encoders, split.arrays)
  unet = editor_training.make_unet(config.model.unet)
  params = unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8)), jnp.zeros((1,), jnp.int32),
                     jnp.asarray(batch["text"][:1]))["params"]
  optimizer = optax.adamw(1e-3, weight_decay=0.0)
  schedule = ddim.DDIMSchedule.from_config(dict(config.model.scheduler))
  step = editor_training.make_editor_train_step(
      unet, schedule, optimizer, editor_training.empty_prompt_states(
          encoders.text_model, encoders.text_params), encoders.scaling_factor,
      (0.05, 0.05, 0.05))
  losses = loss_curve(step, params, editor_training.initial_train_state(params, optimizer),
                      batch)
  assert losses[-1] < 0.9 * losses[0], losses


def test_editor_step_keeps_the_ema_of_the_online_weights(trained_workdir):
  config, workdir = trained_workdir
  encoders = editor_training.load_frozen_encoders(workdir)
  encoded = editor_training.encode_generated_examples(encoders, config.seed, 4, 16)
  batch = editor_training.example_batch(encoded, np.arange(4))
  unet = editor_training.make_unet(config.model.unet)
  params = unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8)), jnp.zeros((1,), jnp.int32),
                     jnp.asarray(batch["text"][:1]))["params"]
  optimizer = optax.adamw(1e-2, weight_decay=0.0)
  step = editor_training.make_editor_train_step(
      unet, ddim.DDIMSchedule.from_config(dict(config.model.scheduler)), optimizer,
      editor_training.empty_prompt_states(encoders.text_model, encoders.text_params),
      encoders.scaling_factor, (0.0, 0.0, 0.0), ema_decay=0.5)
  start = jax.tree.map(np.asarray, params)
  ema, state, _ = step(params, editor_training.initial_train_state(params, optimizer), batch,
                       jax.random.PRNGKey(1))
  assert int(state["updates"]) == 1
  decay = float(editor_training.ema_decay_at(0.5, 1))  # warm-up: min(0.5, 2 / 11)
  assert decay == pytest.approx(2 / 11)
  online = jax.tree.map(np.asarray, state["online"])
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(online),
                                                      jax.tree.leaves(start)))
  jax.tree.map(lambda e, s0, o: np.testing.assert_allclose(e, decay * s0 + (1 - decay) * o,
                                                           rtol=1e-6, atol=1e-7),
               jax.tree.map(np.asarray, ema), start, online)


def test_latest_online_params_are_the_non_ema_weights(trained_workdir):
  _, workdir = trained_workdir
  ema, _ = ckpt.latest_stage_params(workdir, "unet")
  online = editor_training.latest_online_params(workdir)
  assert jax.tree.structure(online) == jax.tree.structure(ema)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(online),
                                                         jax.tree.leaves(ema)))
  with pytest.raises(ValueError, match="no optimizer state"):
    editor_training.latest_online_params(layout.SHIPPED_EDITOR_DIR)


def test_ema_decay_warms_up_to_its_value():
  assert float(editor_training.ema_decay_at(0.999, 0)) == pytest.approx(0.1)
  assert float(editor_training.ema_decay_at(0.999, 90)) == pytest.approx(0.91)
  assert float(editor_training.ema_decay_at(0.999, 10 ** 6)) == pytest.approx(0.999)


def test_min_snr_weights_by_hand():
  config = ddim.default_scheduler_config()
  schedule = ddim.DDIMSchedule.from_config(config)
  timesteps = jnp.asarray([0, 100, 500, 999])
  alpha = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(timesteps)]
  snr = alpha / (1 - alpha)
  np.testing.assert_allclose(editor_training.min_snr_weights(schedule, timesteps, 5.0),
                             np.minimum(snr, 5.0) / snr, rtol=1e-5)
  assert snr[0] > 5 > snr[-1]  # the clip is active at low noise only: weights < 1, then 1
  np.testing.assert_array_equal(editor_training.min_snr_weights(schedule, timesteps, 0.0), 1.0)
  v_schedule = ddim.DDIMSchedule.from_config(dict(config, prediction_type="v_prediction"))
  np.testing.assert_allclose(editor_training.min_snr_weights(v_schedule, timesteps, 5.0),
                             np.minimum(snr, 5.0) / (snr + 1), rtol=1e-5)
  sample_schedule = ddim.DDIMSchedule.from_config(dict(config, prediction_type="sample"))
  with pytest.raises(ValueError, match="prediction_type='sample'"):
    editor_training.min_snr_weights(sample_schedule, timesteps, 5.0)


def test_generated_scenes_are_the_built_splits(shared_data):
  from rl4pix_jax.data import shapes_edit_builder  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  config.data.data_dir = shared_data
  dataset_dir = data_lib.ensure_shapes_dataset(config, os.path.dirname(shared_data))
  assert [shapes_edit_builder.split_seed(3, s) for s in ("train", "validation", "test")] == [
      9, 10, 11]
  with pytest.raises(ValueError, match="Unknown split"):
    shapes_edit_builder.split_seed(0, "dev")
  built = data_lib.load_split(dataset_dir, "train", 16)
  # tfds stores a split in its own (key-hashed) order: match the examples by id "shapes-s-i".
  order = [int(example_id.rsplit("-", 1)[1]) for example_id in built.texts["example_id"]]
  generated = next(editor_training.generated_train_examples(config.seed, 16, 16))
  np.testing.assert_array_equal(generated["source"][order], built.arrays["source"])
  np.testing.assert_array_equal(generated["target"][order], built.arrays["target"])
  assert [generated["instruction"][i] for i in order] == built.texts["instruction"]
  validation = {e.example_id: e.instruction for e in
                editor_check.generated_examples(config.seed, "validation", 8, 16)}
  assert validation == {e.example_id: e.instruction for e in
                        data_lib.load_examples(dataset_dir, "validation", 8)}


@pytest.mark.parametrize("rates", [(0.05, 0.05, 0.05), (0.1, 0.3, 0.2)])
def test_conditioning_dropout_rates(rates):
  text, image, both = rates
  n = 200_000
  drop_text, drop_image = editor_training.conditioning_dropout_masks(
      jax.random.PRNGKey(3), n, text, image, both)
  drop_text, drop_image = np.asarray(drop_text), np.asarray(drop_image)
  # Binomial std of a rate p over n draws is sqrt(p (1 - p) / n) <= 0.0012 here; 0.006 is
  # about 5 std: a correct sampler fails with probability < 1e-6, a wrong layout (e.g. a
  # rate off by one of the configured 0.05 steps) fails for sure.
  tolerance = 0.006
  assert np.mean(drop_text & ~drop_image) == pytest.approx(text, abs=tolerance)
  assert np.mean(drop_image & ~drop_text) == pytest.approx(image, abs=tolerance)
  assert np.mean(drop_text & drop_image) == pytest.approx(both, abs=tolerance)
  assert np.mean(drop_text) == pytest.approx(text + both, abs=tolerance)
  assert np.mean(drop_image) == pytest.approx(image + both, abs=tolerance)


def test_conditioning_dropout_rejects_bad_rates():
  with pytest.raises(ValueError, match="sum to <= 1"):
    editor_training.conditioning_dropout_masks(jax.random.PRNGKey(0), 4, 0.5, 0.4, 0.2)


def test_editor_input_is_noisy_target_then_source_latents():
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  rng = np.random.default_rng(0)
  batch = {"target_mean": rng.normal(size=(6, 4, 4, 4)).astype(np.float32),
           "target_logvar": np.full((6, 4, 4, 4), -30.0, np.float32),  # sample == mean
           "source_latents": rng.normal(size=(6, 4, 4, 4)).astype(np.float32),
           "text": rng.normal(size=(6, 5, 8)).astype(np.float32)}
  empty = np.zeros((1, 5, 8), np.float32)
  scaling = 0.5
  unet_input, timesteps, text, noise = editor_training.editor_batch_inputs(
      schedule, batch, empty, scaling, jax.random.PRNGKey(1), (0.0, 0.0, 0.0))
  alpha = np.asarray(schedule.alphas_cumprod)[np.asarray(timesteps)][:, None, None, None]
  expected_noisy = (np.sqrt(alpha) * scaling * batch["target_mean"] +
                    np.sqrt(1 - alpha) * np.asarray(noise))
  np.testing.assert_allclose(unet_input[..., :4], expected_noisy, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(unet_input[..., 4:], batch["source_latents"])
  np.testing.assert_array_equal(text, batch["text"])
  # With every example's image dropped, the source half is zero and the noisy half unchanged.
  dropped, _, _, _ = editor_training.editor_batch_inputs(
      schedule, batch, empty, scaling, jax.random.PRNGKey(1), (0.0, 1.0, 0.0))
  np.testing.assert_array_equal(dropped[..., 4:], 0.0)
  np.testing.assert_allclose(dropped[..., :4], unet_input[..., :4])


def test_evaluate_editor_quickly_scores_edits_and_baseline(trained_workdir, tmp_path):
  config, workdir = trained_workdir
  grid = str(tmp_path / "grid.png")
  results = editor_check.evaluate_editor_quickly(config, workdir, num_examples=4,
                                                 num_steps=2, grid_path=grid)
  assert results["num_examples"] == 4
  for key in ("success", "edit_ok", "preserved_ok", "source_success"):
    assert 0.0 <= results[key] <= 1.0
  assert results["source_l1_to_target"] > 0  # every edit changes some pixels
  assert results["source_edit_ok"] < 1.0  # returning the source does not do the edits
  assert os.path.getsize(grid) > 0


def test_stage_optimizer_schedule_warms_up_then_decays():
  settings = dict(learning_rate=1e-2, warmup_steps=10, final_lr_fraction=0.1)
  optimizer = training_loop.stage_optimizer(settings, 110)
  params = {"w": jnp.zeros(())}
  state = optimizer.init(params)
  # Adam's first update is -lr * sign(g) (to eps), so the step size reads off the schedule.
  sizes = []
  for _ in range(110):
    updates, state = optimizer.update({"w": jnp.ones(())}, state, params)
    sizes.append(-float(updates["w"]))
  assert sizes[0] == pytest.approx(0.0, abs=1e-9)  # linear warmup from 0
  assert sizes[10] == pytest.approx(1e-2, rel=1e-5)  # peak after warmup
  # cosine: lr(t) = final + (peak - final) * (1 + cos(pi * (t - 10) / 100)) / 2
  expected = 1e-3 + (1e-2 - 1e-3) * (1 + np.cos(np.pi * 50 / 100)) / 2
  assert sizes[60] == pytest.approx(expected, rel=1e-4)
  assert sizes[-1] == pytest.approx(1e-3 + 9e-3 * (1 + np.cos(np.pi * 99 / 100)) / 2, rel=1e-4)


def test_stage_optimizer_constant_and_short_stage_and_bad_values():
  constant = training_loop.stage_optimizer(dict(learning_rate=0.5), 3)
  state = constant.init({"w": jnp.zeros(())})
  for _ in range(3):
    updates, state = constant.update({"w": jnp.ones(())}, state, {"w": jnp.zeros(())})
    assert float(updates["w"]) == pytest.approx(-0.5, rel=1e-4)
  # A 2-step smoke run with the default's warmup still takes a non-zero second step.
  short = training_loop.stage_optimizer(dict(learning_rate=1.0, warmup_steps=100), 2)
  state = short.init({"w": jnp.zeros(())})
  sizes = []
  for _ in range(2):
    updates, state = short.update({"w": jnp.ones(())}, state, {"w": jnp.zeros(())})
    sizes.append(-float(updates["w"]))
  assert sizes[0] == 0.0 and sizes[1] > 0.5
  with pytest.raises(ValueError, match="final_lr_fraction"):
    training_loop.stage_optimizer(dict(learning_rate=1.0, final_lr_fraction=2.0), 10)


def test_vae_loss_adds_weighted_mse_to_l1_and_kl(trained_workdir):
  config, workdir = trained_workdir
  model = vae_training.make_vae(config)
  params, _ = ckpt.latest_stage_params(workdir, "vae")
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  key = jax.random.PRNGKey(3)
  loss, metrics = vae_training.vae_loss(model, params, images, key, 1e-3, 2.0)
  # independent recomputation with the same posterior sample
  mean, logvar = model.apply({"params": params}, images, method=model.encode)
  latents = np.asarray(mean) + np.exp(0.5 * np.asarray(logvar)) * np.asarray(
      jax.random.normal(key, mean.shape))
  recon = np.asarray(model.apply({"params": params}, latents, method=model.decode))
  kl = 0.5 * (np.asarray(mean)**2 + np.exp(np.asarray(logvar)) - 1 - np.asarray(logvar))
  expected = (np.abs(recon - images).mean() + 2.0 * ((recon - images)**2).mean() +
              1e-3 * kl.reshape(2, -1).sum(-1).mean())
  assert float(loss) == pytest.approx(expected, rel=1e-4)
  assert float(metrics["mse"]) == pytest.approx(((recon - images)**2).mean(), rel=1e-4)


def test_edit_ceiling_is_the_shapes_check_of_reconstructed_targets(trained_workdir):
  config, workdir = trained_workdir
  model = vae_training.make_vae(config)
  params, _ = ckpt.latest_stage_params(workdir, "vae")
  dataset_dir = data_lib.ensure_shapes_dataset(config, workdir)
  ceiling = vae_training.edit_ceiling(model, params, dataset_dir, 16, max_examples=4)
  targets = data_lib.load_split(dataset_dir, "validation", 16, 4).arrays["target"]
  examples = data_lib.load_examples(dataset_dir, "validation", 4)
  rebuilt = np.clip(np.asarray(model.apply({"params": params}, targets)), -1, 1)
  checks = [shapes_check.check_edit(im, ex) for im, ex in zip(rebuilt, examples)]
  for key in ("success", "edit_ok", "preserved_ok", "outside_change"):
    assert ceiling[key] == pytest.approx(np.mean([c[key] for c in checks]), rel=1e-5)
  assert ceiling["outside_change"] > 0  # a 2-step VAE does not reproduce its input
  assert "edit_ceiling" in ckpt.read_model_config(workdir, "vae")["metadata"]


def test_shipped_stage_round_trip_and_refusals(trained_workdir, tmp_path):
  config, workdir = trained_workdir
  shelf = str(tmp_path / "shipped")
  for stage in layout.STAGES:
    folder = shipped.export_stage(workdir, stage, config, shelf)
    assert not os.path.exists(os.path.join(folder, "2", "opt_state"))  # params only
  fresh = str(tmp_path / "run")
  for stage in layout.STAGES:
    assert shipped.install_stage(shelf, fresh, stage, config)
    assert ckpt.stage_complete(fresh, stage)
    ours, _ = ckpt.latest_stage_params(fresh, stage)
    theirs, _ = ckpt.latest_stage_params(workdir, stage)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert not shipped.install_stage(shelf, fresh, stage, config)  # already complete
  # trained with the same config: the editor stage skips training in the new run
  before = os.listdir(layout.stage_dir(fresh, "unet"))
  editor_training.train_editor(config, fresh)
  assert os.listdir(layout.stage_dir(fresh, "unet")) == before
  other = tiny_config()
  other.data.data_dir = config.data.data_dir
  other.pretrain.unet.learning_rate = 0.5
  other.pretrain.unet.log_every = 7  # logging settings do not count
  with pytest.raises(ValueError, match=r"(?s)pretrain.unet.learning_rate: shipped 0.001, "
                     r"config 0.5\n.*--supervised=train"):
    shipped.install_stage(shelf, str(tmp_path / "other"), "unet", other)
  # the VAE does not depend on the editor's settings
  assert shipped.install_stage(shelf, str(tmp_path / "other"), "vae", other)
  with pytest.raises(FileNotFoundError, match="No shipped clip checkpoint"):
    shipped.install_stage(str(tmp_path / "empty"), fresh + "2", "clip", config)
  unfinished = tmp_path / "unfinished"
  (unfinished / "vae").mkdir(parents=True)
  (unfinished / "vae" / "keep.txt").write_text("partial run")
  with pytest.raises(FileExistsError, match="unfinished vae"):
    shipped.install_stage(shelf, str(unfinished), "vae", config)
  assert (unfinished / "vae" / "keep.txt").read_text() == "partial run"


def test_repository_ships_stages_of_the_default_config():
  """The shipped checkpoints match configs/shapes.py and the models it builds."""
  config = shapes_config.get_config()
  for stage in layout.STAGES:
    folder = layout.stage_dir(layout.SHIPPED_EDITOR_DIR, stage)
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(folder) for n in ns)
    assert 0 < size <= 20 * 2**20, (stage, size)
    model_config = ckpt.read_model_config(layout.SHIPPED_EDITOR_DIR, stage)
    assert not shipped.fingerprint_differences(
        model_config["metadata"][shipped.FINGERPRINT_KEY], shipped.stage_fingerprint(config, stage))
  params, model_config = ckpt.latest_stage_params(layout.SHIPPED_EDITOR_DIR, "unet")
  unet = editor_training.make_unet(config.model.unet)
  expected = jax.eval_shape(lambda: unet.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 8)), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, 77, 64))))["params"]
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, expected)


def restart_config(config, steps=4, restart_at=2):
  c = tiny_config(steps=steps)
  c.data.data_dir = config.data.data_dir
  c.pretrain.unet.update(restart_at=restart_at, restart_learning_rate=3e-4)
  return c


def workdir_with_frozen_stages(source, workdir):
  import shutil  # pylint: disable=import-outside-toplevel
  for stage in ("vae", "clip"):
    shutil.copytree(ckpt.stage_dir(source, stage), os.path.join(workdir, stage))
  return str(workdir)


def test_warm_restart_continued_from_params_equals_the_straight_run(trained_workdir, tmp_path):
  """A stage with a restart at update 2 of 4, and the same stage started at the restart from
  the first run's step-2 EMA params alone (what a shipped stage holds): bitwise the same
  weights, because the restart keeps only the EMA and the update count."""
  from rl4pix_jax.workdir.checkpointer import Checkpointer  # pylint: disable=import-outside-toplevel
  base, source = trained_workdir
  config = restart_config(base)
  straight = workdir_with_frozen_stages(source, tmp_path / "straight")
  editor_training.train_editor(config, straight)
  assert metric_steps(straight, "unet") == [1, 2, 3, 4]
  manager = ckpt.checkpoint_manager(straight, "unet")
  at_restart = manager.restore_items(2, {"params": None})["params"]
  manager.close()
  shelf = str(tmp_path / "shelf")
  with Checkpointer(layout.stage_dir(shelf, "unet"), keep=1) as m:
    m.save_items(2, {"params": at_restart}, {"progress": {"step": 2}})
  straight_config = ckpt.read_model_config(straight, "unet")
  ckpt.write_model_config(shelf, "unet", straight_config["models"], {"step": 2, "num_steps": 2})

  continued = workdir_with_frozen_stages(source, tmp_path / "continued")
  assert editor_training.start_from_params(config, continued, shelf) == 2
  assert not ckpt.stage_complete(continued, "unet")
  editor_training.train_editor(config, continued)
  assert ckpt.stage_complete(continued, "unet")
  assert metric_steps(continued, "unet") == [3, 4]
  ours, _ = ckpt.latest_stage_params(continued, "unet")
  theirs, _ = ckpt.latest_stage_params(straight, "unet")
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  # the restart did something: without it the same 4 updates end elsewhere
  plain = workdir_with_frozen_stages(source, tmp_path / "plain")
  editor_training.train_editor(restart_config(base, restart_at=0), plain)
  other, _ = ckpt.latest_stage_params(plain, "unet")
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(other),
                                                      jax.tree.leaves(theirs)))
  with pytest.raises(ValueError, match="already has checkpoints"):
    editor_training.start_from_params(config, continued, shelf)
  with pytest.raises(ValueError, match="restart_at"):
    editor_training.start_from_params(restart_config(base, restart_at=0), str(tmp_path / "x"),
                                      shelf)


def test_warm_restart_swaps_in_the_ema_and_a_fresh_optimizer():
  """with_warm_restart by hand: before the restart the first step runs; at it the online
  weights become the EMA, the optimizer state is the second optimizer's init, the count stays."""
  first, second = optax.sgd(1.0), optax.adam(0.1)
  calls = []

  def recording(name):
    def step(ema, state, batch, key):
      calls.append((name, int(state["updates"]), float(state["online"]["w"])))
      return ema, dict(state, updates=state["updates"] + 1), {}
    return step

  step = editor_training.with_warm_restart(recording("first"), recording("second"), second, 2)
  ema = {"w": jnp.float32(5.0)}
  state = dict(editor_training.initial_train_state({"w": jnp.float32(1.0)}, first),
               updates=jnp.int32(1))
  _, state, _ = step(ema, state, None, None)
  _, state, _ = step(ema, state, None, None)
  assert calls == [("first", 1, 1.0), ("second", 2, 5.0)]  # restart at update 2: online = EMA
  assert jax.tree.structure(state["optimizer"]) == jax.tree.structure(second.init(ema))
  plain = recording("first")
  assert editor_training.with_warm_restart(plain, None, second, 0) is plain  # no restart
  assert editor_training.restart_schedule(
      dict(restart_at=5, steps=5, restart_learning_rate=1e-3))[0] == 0  # at the end: none
  with pytest.raises(ValueError, match="restart_learning_rate"):
    editor_training.restart_schedule(dict(restart_at=2, steps=5, restart_learning_rate=0.0))


# --------------------------------------------------------------------------------------------
# A SIGKILLed UNet stage, rerun, ends where a straight run ends (subprocesses: a real kill)
# --------------------------------------------------------------------------------------------

KILL_AFTER_UPDATES = 5  # the checkpoint of step 4 is on disk, step 5 is lost with the process


def stage_worker(argv):
  """``python -m tests.pretrain.test_pretrain WORKDIR DATA_DIR KILL``: the tiny UNet stage, 6 steps,
  a checkpoint every 2; with KILL=1 the process SIGKILLs itself inside update 5."""
  import signal  # pylint: disable=import-outside-toplevel
  workdir, data_dir, kill = argv[1], argv[2], argv[3] == "1"
  config = tiny_config(steps=6)
  config.data.data_dir = data_dir
  real_make = editor_training.make_editor_train_step

  def killing_make(*args, **kwargs):
    step_fn, calls = real_make(*args, **kwargs), []

    def step(*step_args):
      calls.append(1)
      if kill and len(calls) == KILL_AFTER_UPDATES:
        os.kill(os.getpid(), signal.SIGKILL)
      return step_fn(*step_args)

    return step

  editor_training.make_editor_train_step = killing_make
  editor_training.train_editor(config, workdir)


def test_killed_unet_stage_resumes_to_the_straight_result(trained_workdir, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  config, source = trained_workdir
  from tests.helpers.cli import cli_env  # pylint: disable=import-outside-toplevel
  from tests.helpers.paths import REPO_ROOT as root  # pylint: disable=import-outside-toplevel
  env = cli_env(tmp_path)
  workdirs = {name: tmp_path / name for name in ("straight", "killed")}
  for workdir in workdirs.values():
    for stage in ("vae", "clip"):
      shutil.copytree(ckpt.stage_dir(source, stage), workdir / stage)
  start = lambda name, kill: subprocess.Popen(
      [sys.executable, "-m", "tests.pretrain.test_pretrain", str(workdirs[name]), config.data.data_dir,
       kill], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  runs = [start("straight", "0"), start("killed", "1")]
  outputs = [p.communicate(timeout=900)[0] for p in runs]
  assert runs[0].returncode == 0, outputs[0][-3000:]
  assert runs[1].returncode == -9, outputs[1][-3000:]  # SIGKILL
  killed = str(workdirs["killed"])
  assert not ckpt.stage_complete(killed, "unet")
  assert metric_steps(killed, "unet") == [1, 2, 3, 4]  # update 5 died with the process
  again = start("killed", "0")
  output = again.communicate(timeout=900)[0]
  assert again.returncode == 0, output[-3000:]
  assert metric_steps(killed, "unet") == [1, 2, 3, 4, 5, 6]  # resumed at the step-4 checkpoint
  assert ckpt.stage_complete(killed, "unet")
  # Same program, same batches and keys per step, state restored exactly: bitwise equal.
  resumed, _ = ckpt.latest_stage_params(killed, "unet")
  straight, _ = ckpt.latest_stage_params(str(workdirs["straight"]), "unet")
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


if __name__ == "__main__":
  import sys as _sys  # pylint: disable=ungrouped-imports
  stage_worker(_sys.argv)
