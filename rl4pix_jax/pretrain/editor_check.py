"""A quick check of an editor on validation edits: sample, decode, ``check_edit``, grid PNG."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rl4pix_jax import tokenizer as tokenizer_lib
from rl4pix_jax.data import shapes
from rl4pix_jax.data import shapes_check
from rl4pix_jax.data import shapes_edit_builder
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.pretrain import data as data_lib
from rl4pix_jax.pretrain import editor_training
from rl4pix_jax.workdir import stages as ckpt


def to_uint8(images: np.ndarray) -> np.ndarray:
  """(..., 3) float in [-1, 1] -> uint8."""
  return np.round((np.clip(np.asarray(images), -1, 1) + 1) * 127.5).astype(np.uint8)


def write_edit_grid(path: str, sources: np.ndarray, edits: np.ndarray, targets: np.ndarray,
                    scale: int = 2) -> None:
  """PNG with one row per example: source | edit | target (float images in [-1, 1])."""
  rows = [np.concatenate([to_uint8(s), to_uint8(e), to_uint8(t)], axis=1)
          for s, e, t in zip(sources, edits, targets)]
  grid = np.concatenate(rows, axis=0)
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                               Image.NEAREST).save(path)


def generated_examples(seed: int, split: str, count: int,
                       resolution: int) -> List[shapes.ShapesEditExample]:
  """The first ``count`` examples of ``split`` of the shapes dataset with ``seed``, generated
  directly (the same scenes as the built tfds split; any seed, no dataset folder needed)."""
  stream = shapes_edit_builder.split_seed(seed, split)
  return [shapes.make_example(stream, i, resolution) for i in range(count)]


def evaluate_editor_quickly(config, workdir: str, unet_params: Optional[Any] = None,
                            num_examples: int = 32, num_steps: int = 10, seed: int = 0,
                            grid_path: Optional[str] = None,
                            examples: Optional[Sequence[shapes.ShapesEditExample]] = None
                            ) -> Dict[str, Any]:
  """Edits the first ``num_examples`` validation examples (or ``examples``) and scores them.

  Sampling: ``sampling.make_trajectory_sampler`` with eta=0, ``num_steps`` DDIM steps and the
  config's guidance scales, the same initial noise for a given ``seed``.

  Args:
    config: the run config (data, sampler and model sections).
    workdir: holds the vae, clip and unet stages.
    unet_params: params to evaluate instead of the unet stage's (e.g. after RL).
    grid_path: optional PNG path for a source | edit | target grid.
    examples: edit these instead of the validation split (which is then not read or built).
  Returns:
    dict: ``success``, ``edit_ok``, ``preserved_ok`` (rates in [0, 1]) and ``l1_to_target``
    (mean |edit - target| in [-1, 1] units) for the editor, the same keys prefixed
    ``source_`` for the trivial baseline "return the source image", ``num_examples``, and
    ``per_example``: the editor's ``check_edit`` dict of each example.
  """
  encoders = editor_training.load_frozen_encoders(workdir)
  stage_params, unet_config = ckpt.latest_stage_params(workdir, "unet")
  params = stage_params if unet_params is None else unet_params
  unet = editor_training.make_unet(unet_config["models"]["unet"])
  schedule = ddim.DDIMSchedule.from_config(unet_config["models"]["scheduler"])
  if examples is None:
    dataset_dir = data_lib.ensure_shapes_dataset(config, workdir)
    examples = data_lib.load_examples(dataset_dir, "validation", num_examples)
  examples = list(examples)
  arrays = dict(editor_training.example_images(examples),
                input_ids=tokenizer_lib.tokenize(tokenizer_lib.load_clip_tokenizer(),
                                                 [e.instruction for e in examples]))
  encoded = editor_training.encode_split(encoders, arrays)
  empty = editor_training.empty_prompt_states(encoders.text_model, encoders.text_params)
  count = len(examples)
  cond = sampling.EditConditioning(
      text_embeds=jnp.asarray(encoded["text"]),
      uncond_text_embeds=jnp.broadcast_to(jnp.asarray(empty), encoded["text"].shape),
      image_latents=jnp.asarray(encoded["source_latents"]))
  sampler = sampling.make_trajectory_sampler(
      unet, schedule, sampling.SamplerConfig(num_steps=num_steps, eta=0.0,
                                             record_attention=False))
  guidance = sampling.Guidance(text_scale=jnp.float32(config.sampler.guidance_scale),
                               image_scale=jnp.float32(config.sampler.image_guidance_scale))
  trajectory = sampler(params, cond, jax.random.PRNGKey(seed), guidance)
  decode = jax.jit(lambda p, z: encoders.vae.apply({"params": p}, z,
                                                   method=encoders.vae.decode))
  edits = np.clip(np.asarray(decode(encoders.vae_params,
                                    trajectory.final_latents / encoders.scaling_factor)), -1, 1)
  sources, targets = arrays["source"], arrays["target"]
  results: Dict[str, Any] = {"num_examples": count}
  for prefix, images in (("", edits), ("source_", sources)):
    checks = [shapes_check.check_edit(image, example) for image, example in
              zip(images, examples)]
    for key in ("success", "edit_ok", "preserved_ok"):
      results[prefix + key] = float(np.mean([c[key] for c in checks]))
    results[prefix + "l1_to_target"] = float(np.mean(np.abs(images - targets)))
    if not prefix:
      results["per_example"] = checks
  if grid_path:
    write_edit_grid(grid_path, sources, edits, targets)
  return results
