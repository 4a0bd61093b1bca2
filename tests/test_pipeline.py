"""Loading a diffusers InstructPix2Pix folder and editing: parity with the PyTorch pipeline."""

import os

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from PIL import Image

from rl4pix_jax import editing, pipeline
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.tokenizer import tokenize
from tests.helpers import tiny_models

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["turn the red circle into a blue square", "remove the green star"]
STEPS = 4


def _images():
  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in PROMPTS]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ip2p"))
  tiny_models.save_tiny_diffusers_pipeline(path)
  return path


@pytest.fixture(scope="module")
def editor(folder):
  return pipeline.load_diffusers_editor(folder)


def test_edit_matches_diffusers_pipeline_eta0(folder, editor):
  models, params, tokenizer = editor
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      folder, safety_checker=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  latents = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = pipe(PROMPTS, image=_images(), num_inference_steps=STEPS, guidance_scale=7.5,
                image_guidance_scale=1.5, eta=0.0, latents=latents.clone(),
                output_type="np").images
  pixels = np.stack([editing.prepare_image(im, (32, 32)) for im in _images()])
  config = sampling.SamplerConfig(num_steps=STEPS, eta=0.0, record_attention=False)
  got, maps = editing.edit_batch(
      models, config, params, jnp.asarray(tokenize(tokenizer, PROMPTS)),
      jnp.asarray(tokenize(tokenizer, [""] * 2)), jnp.asarray(pixels), None, None,
      jax.random.PRNGKey(0), sampling.Guidance(7.5, 1.5),
      jnp.asarray(latents.numpy().transpose(0, 2, 3, 1)))
  assert maps is None
  diff = np.abs(np.asarray(got) - want).max()
  print(f"pipeline parity: max abs diff {diff:.2e} in [0,1] pixels")
  assert diff <= 1e-3


def test_editor_outputs_and_determinism(editor):
  models, params, tokenizer = editor
  ed = editing.Editor(models, params, tokenizer, capture_size=16)
  result = ed.edit(_images(), PROMPTS, seed=3, num_steps=2,
                   object_phrases=["red circle", "green star"])
  assert [im.shape for im in result.images] == [(32, 32, 3)] * 2
  assert all(im.dtype == np.uint8 for im in result.images)
  assert [m.shape for m in result.attention_maps] == [(16, 16)] * 2
  assert all((m >= 0).all() for m in result.attention_maps)
  # Batches of one give the same pixels (noise depends on the image's index only).
  single = ed.edit(_images(), PROMPTS, seed=3, num_steps=2, batch_size=1)
  again = ed.edit(_images(), PROMPTS, seed=3, num_steps=2)
  np.testing.assert_array_equal(again.images[0], result.images[0])
  for a, b in zip(single.images, again.images):
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
  assert again.attention_maps == [None, None]


def test_size_rule_and_bad_inputs(editor):
  models, params, tokenizer = editor
  assert editing.size_multiple(models) == 4  # VAE 2x, one UNet downsampler
  assert editing.working_size(35, 42, 4) == (32, 40)
  with pytest.raises(ValueError, match="smaller than"):
    editing.working_size(3, 40, 4)
  ed = editing.Editor(models, params, tokenizer)
  with pytest.raises(ValueError, match="instructions"):
    ed.edit(_images(), PROMPTS[:1])
  with pytest.raises(ValueError, match="purple"):
    ed.edit(_images()[:1], PROMPTS[:1], object_phrases=["purple hat"], num_steps=1)
  grey = np.zeros((32, 32), np.uint8)
  assert editing.to_uint8_rgb(grey).shape == (32, 32, 3)
  rgba = np.zeros((32, 32, 4), np.float32)
  assert editing.to_uint8_rgb(rgba).dtype == np.uint8
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    editing.to_uint8_rgb(np.full((4, 4, 3), 2.0, np.float32))


def test_every_image_mode_is_converted_by_its_meaning(tmp_path):
  ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
  Image.fromarray(ramp).save(tmp_path / "grey16.png")
  with Image.open(tmp_path / "grey16.png") as im:
    assert im.mode.startswith("I")
    grey = editing.to_uint8_rgb(im)
  np.testing.assert_array_equal(grey[..., 0], np.round(ramp / 257.0).astype(np.uint8))
  np.testing.assert_array_equal(editing.to_uint8_rgb(ramp), grey)  # a uint16 array alike
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (200, 10, 10, 255)  # opaque red
  rgba[0, 1] = (0, 0, 0, 0)  # fully transparent: the white background, not black
  rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black
  for image in (rgba, Image.fromarray(rgba, "RGBA")):
    out = editing.to_uint8_rgb(image)
    assert tuple(out[0, 0]) == (200, 10, 10) and tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[1, 0]) == (127, 127, 127)
  la = Image.fromarray(np.stack([np.full((2, 2), 0, np.uint8), np.zeros((2, 2), np.uint8)],
                                axis=-1), "LA")
  assert (editing.to_uint8_rgb(la) == 255).all()  # transparent grey -> background
  cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
  np.testing.assert_array_equal(editing.to_uint8_rgb(cmyk)[0, 0], (255, 0, 0))
  palette = Image.new("P", (2, 2), 0)
  palette.putpalette([0, 0, 255] + [0] * 765)
  np.testing.assert_array_equal(editing.to_uint8_rgb(palette)[0, 0], (0, 0, 255))


def test_size_text_parses_hxw_or_one_side():
  assert editing.parse_size("64x48") == (64, 48)
  assert editing.parse_size("32") == (32, 32)
  for bad in ("64x", "axb", "0x32", "1x2x3"):
    with pytest.raises(ValueError, match="--size="):
      editing.parse_size(bad, "--size")


def test_working_size_rule():
  assert editing.editing_size(300, 200, 4) == (300, 200)  # multiples of 4: as is
  assert editing.editing_size(35, 42, 4) == (32, 40)  # rounded down
  assert editing.editing_size(300, 200, 4, resolution=32) == (32, 32)  # trained size wins
  assert editing.editing_size(300, 200, 4, size=(16, 24), resolution=32) == (16, 24)
  with pytest.raises(ValueError, match="multiple of 4"):
    editing.editing_size(32, 32, 4, size=(30, 32))


def test_other_sizes_are_edited_at_the_training_resolution_and_come_back_whole(editor, caplog):
  models, params, tokenizer = editor
  ed = editing.Editor(models, params, tokenizer, resolution=32)
  rng = np.random.default_rng(1)
  square = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  wide = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)  # 300 wide, 200 high
  with caplog.at_level("WARNING"):
    result = ed.edit([square, wide], PROMPTS, seed=0, num_steps=1)
  assert [im.shape for im in result.images] == [(64, 64, 3), (200, 300, 3)]  # no crop
  said = [r.getMessage() for r in caplog.records if "resized back" in r.getMessage()]
  assert len(said) == 2 and "Editing a 300x200 image at 32x32" in " ".join(said)
  # The 64x64 result is the 32x32 edit of the downscaled input, upscaled: same pixels as
  # editing the downscaled image directly and resizing that result.
  small = editing.resize_uint8(square, (32, 32))
  direct = ed.edit([small], PROMPTS[:1], seed=0, num_steps=1).images[0]
  np.testing.assert_array_equal(result.images[0], editing.resize_uint8(direct, (64, 64)))


def test_missing_part_is_named(folder, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  broken = tmp_path / "broken"
  shutil.copytree(folder, broken)
  os.remove(broken / "unet" / "diffusion_pytorch_model.safetensors")
  with pytest.raises(ValueError, match="unet"):
    pipeline.load_diffusers_editor(str(broken))


def test_build_models_checks_channels(editor):
  models, _, _ = editor
  bad_unet = models.unet.config.__class__.from_diffusers(
      dict(tiny_models.TINY_UNET, in_channels=4))
  with pytest.raises(ValueError, match="in_channels|input channels"):
    pipeline.build_models(bad_unet, models.vae.config, models.text_encoder.config,
                          {"num_train_timesteps": 1000})


def test_encode_decode_match_diffusers(folder, editor):
  models, params, tokenizer = editor
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      folder, safety_checker=None, requires_safety_checker=False)
  ids = tokenize(tokenizer, PROMPTS)
  with torch.no_grad():
    want_text = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    x = torch.from_numpy(np.stack([editing.prepare_image(im, (32, 32)) for im in _images()])
                         .transpose(0, 3, 1, 2))
    want_latents = pipe.vae.encode(x).latent_dist.mode().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(pipeline.encode_text(models, params, jnp.asarray(ids)), want_text,
                             atol=1e-4)
  np.testing.assert_allclose(
      pipeline.encode_images(models, params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))),
      want_latents, atol=1e-4)
