"""launch.export: the exported folder runs in diffusers and reproduces our edit (DDIM, eta=0)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rl4pix_jax import editing, export
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.models.clip import CLIPTextConfig
from rl4pix_jax.rl import run_loading
from rl4pix_jax.tokenizer import tokenize
from rl4pix_jax.weights import diffusers_models
from tests.launch.test_cli_edit import run_cli, tiny_run  # pylint: disable=unused-import

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["turn the red circle into a blue square", "remove the green star"]
STEPS = 3
PARITY_ATOL = 1e-3  # [0, 1] pixels, the sampler parity tolerance of tests/test_pipeline.py


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
  workdir, _ = tiny_run
  folder = tmp_path_factory.mktemp("exported") / "ip2p"
  done = run_cli("launch.export", f"--workdir={workdir}", f"--output={folder}",
                 tmp=folder.parent)
  assert done.returncode == 0, done.stderr[-3000:]
  return folder


def test_exported_pipeline_reproduces_our_edit(tiny_run, exported):
  workdir, _ = tiny_run
  run = run_loading.load_run(str(workdir))
  assert run.epoch == 0
  models, params, tokenizer = run.editor.models, run.editor.params, run.editor.tokenizer
  # The exported UNet holds the merged policy, not the base.
  _, unet = diffusers_models.load_unet(str(exported / "unet"))
  for got, want in zip(jax.tree_util.tree_leaves(unet), jax.tree_util.tree_leaves(params.unet)):
    np.testing.assert_allclose(got, want, atol=1e-6)
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      str(exported), safety_checker=None, requires_safety_checker=False)
  assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
  pipe.set_progress_bar_config(disable=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  latents = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = pipe(PROMPTS, image=[Image.fromarray(im) for im in images],
                num_inference_steps=STEPS, guidance_scale=7.5, image_guidance_scale=1.5,
                eta=0.0, latents=latents.clone(), output_type="np").images
  pixels = np.stack([editing.prepare_image(im, (32, 32)) for im in images])
  got, _ = editing.edit_batch(
      models, sampling.SamplerConfig(num_steps=STEPS, eta=0.0, record_attention=False), params,
      jnp.asarray(tokenize(tokenizer, PROMPTS)), jnp.asarray(tokenize(tokenizer, [""] * 2)),
      jnp.asarray(pixels), None, None, jax.random.PRNGKey(0), sampling.Guidance(7.5, 1.5),
      jnp.asarray(latents.numpy().transpose(0, 2, 3, 1)))
  diff = float(np.abs(np.asarray(got) - want).max())
  print(f"export parity: max abs diff {diff:.2e} in [0,1] pixels")
  assert diff < PARITY_ATOL


def test_export_writes_every_part_from_params(tiny_run, tmp_path):
  """Without a base folder every part is written from the Flax params and loads in torch."""
  workdir, _ = tiny_run
  run = run_loading.load_run(str(workdir))
  editor = run.editor
  folder = export.export_pipeline(editor.models, editor.params, editor.tokenizer,
                                  run.config.model.scheduler, str(tmp_path / "full"))
  with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
    assert json.load(f)["_class_name"] == export.PIPELINE_CLASS
  text = transformers.CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))
  ids = tokenize(editor.tokenizer, PROMPTS)
  with torch.no_grad():
    want = text(torch.from_numpy(ids).long())[0].numpy()
  got = editor.models.text_encoder.apply({"params": editor.params.text_encoder},
                                         jnp.asarray(ids)).last_hidden_state
  np.testing.assert_allclose(got, want, atol=1e-4)
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      folder, safety_checker=None, requires_safety_checker=False)
  assert pipe.vae.config.latent_channels == editor.models.vae.config.latent_channels


def test_clip_text_config_json_round_trips():
  config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4)
  back = CLIPTextConfig.from_transformers(export.clip_text_config_json(config))
  assert back == config
  assert transformers.CLIPTextConfig(**export.clip_text_config_json(config)).hidden_size == 32


def test_export_cli_without_config_names_it(tmp_path):
  done = run_cli("launch.export", f"--workdir={tmp_path}", f"--output={tmp_path / 'x'}",
                 tmp=tmp_path)
  assert done.returncode == 2 and "config.json" in done.stderr


def test_export_carries_the_sampler_and_plain_file_modes(tiny_run, exported):
  workdir, _ = tiny_run
  sampler = export.read_sampler(str(exported))
  want = run_loading.read_run_config(str(workdir)).sampler
  assert sampler == {k: want[k] for k in export.SAMPLER_KEYS}
  assert run_loading.load_pretrained_editor(str(exported)).sampler_defaults == sampler
  modes = {os.stat(os.path.join(root, n)).st_mode & 0o777
           for root, _, names in os.walk(exported) for n in names}
  assert len(modes) == 1, modes  # .safetensors as readable as the JSON files


def test_evaluate_pretrained_export_uses_its_sampler_and_flags_win(tiny_run, exported, tmp_path):
  """launch.evaluate --pretrained=<export> reads rl4pix_sampler.json (as launch.edit does):
  the run's 2 steps, not 20; an explicit --guidance_scale still wins over the file's."""
  workdir, root = tiny_run
  recorded = export.read_sampler(str(exported))
  assert recorded["num_steps"] == 2 and recorded["guidance_scale"] != 3.0
  done = run_cli("launch.evaluate", f"--pretrained={exported}", "--dataset=shapes_edit",
                 f"--data_dir={workdir.parent / 'data'}", f"--clip_model={root / 'clip'}",
                 "--resolution=32", "--split=test", "--max_examples=2", "--guidance_scale=3.0",
                 f"--output={tmp_path / 'eval'}", tmp=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  sampler = json.loads((tmp_path / "eval.json").read_text())["sampler"]
  assert sampler["num_steps"] == 2 and sampler["guidance_scale"] == 3.0
  assert sampler["image_guidance_scale"] == recorded["image_guidance_scale"]


def test_resolve_sampler_explicit_then_recorded_then_default():
  assert editing.resolve_sampler({"num_steps": 2, "guidance_scale": 4.0, "eta": 1.0},
                                 num_steps=None, guidance_scale=3.0) == {
                                     "num_steps": 2, "guidance_scale": 3.0,
                                     "image_guidance_scale": 1.5}
  assert editing.resolve_sampler({}) == editing.DEFAULT_SAMPLER
  with pytest.raises(TypeError, match="steps"):
    editing.resolve_sampler({}, steps=3)
