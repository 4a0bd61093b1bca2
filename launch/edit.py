r"""Edits images with a trained run (Orbax checkpoint) or a diffusers InstructPix2Pix folder.

    python -m launch.edit --workdir=runs/shapes/rl --image=cat.png \
        --instruction="make the cat blue" --output=edited.png
    python -m launch.edit --pretrained=timbrooks/instruct-pix2pix --image=photos/ \
        --instruction="turn it into a watercolour" --output=edited/ --steps=20
    python -m launch.edit --workdir=runs/shapes/rl --step=3 --image=scene.png \
        --instruction="move the red circle left" --attention --object="red circle" \
        --output=out/

Writes ``<output>/<name>.png`` per image (or the ``--output`` file for one image) and, with
``--attention``, ``<name>_attention.png``: the ``--object`` words' cross-attention averaged
over the sampling steps, over the edited image. An image whose longer side exceeds
``--max_side`` is edited downscaled (one line says so) and returned at its own size. An
empty instruction is an error; one longer than the text encoder's 77 tokens is cut, with a
warning naming where. Sampler defaults: the run's config (``--workdir``) or the exported
``rl4pix_sampler.json`` (``--pretrained``), else 20 steps, guidance 7.5 / 1.5. Exits 1 after editing the readable images
when some could not be read (each is named), 2 on a bad flag or run folder.
"""

import os
import sys
from typing import List, Optional, Tuple

from absl import app, flags

from launch import cli

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder written by launch.train.")
flags.DEFINE_integer("step", None, "RL checkpoint epoch of --workdir (default: the latest).")
flags.DEFINE_bool("no_rl", False, "Use the run's starting editor, without the RL policy.")
flags.DEFINE_string("pretrained", None, "Diffusers InstructPix2Pix folder or hub id "
                    "(instead of --workdir).")
flags.DEFINE_string("image", None, "An image file or a folder of images.", required=True)
flags.DEFINE_string("instruction", None, "The edit instruction.", required=True)
flags.DEFINE_string("output", None, "Output PNG (one input image) or folder.", required=True)
flags.DEFINE_bool("attention", False, "Also write the --object attention overlay PNG.")
flags.DEFINE_string("object", None, "Words of the instruction whose attention to show.")
flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same result).")
flags.DEFINE_integer("steps", None, "DDIM steps (default: the run's sampler.num_steps, or 20).")
flags.DEFINE_float("guidance_scale", None, "Text guidance (default: the run's, or 7.5).")
flags.DEFINE_float("image_guidance_scale", None, "Image guidance (default: run's, or 1.5).")
flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic sampler, for --workdir and "
                   "--pretrained alike).")
flags.DEFINE_integer("max_side", None, "Images whose longer side exceeds this are edited "
                     "downscaled and returned at their own size (default: the run's "
                     "resolution; for --pretrained the UNet's, 512 for Stable Diffusion; "
                     "0: never).")
flags.DEFINE_integer("batch_size", 8, "Images per compiled call.")
flags.DEFINE_string("size", None, "Working size HxW (e.g. 64x64) to edit at instead of the "
                    "editor's: its training resolution for a run of the shapes default, each "
                    "side rounded down to a multiple of 64 for Stable Diffusion. Results are "
                    "always resized back to each input's own size.")


def list_images(path: str) -> List[str]:
  """The image files of a folder (sorted by name), or [path] for a file."""
  if os.path.isdir(path):
    return sorted(os.path.join(path, n) for n in os.listdir(path)
                  if n.lower().endswith(IMAGE_SUFFIXES))
  return [path]


def output_paths(inputs: List[str], output: str, single_file: bool) -> List[Tuple[str, str]]:
  """(edit path, attention path) per input."""
  if single_file:
    stem = os.path.splitext(output)[0]
    return [(output, f"{stem}_attention.png")]
  names = [os.path.splitext(os.path.basename(p))[0] for p in inputs]
  return [(os.path.join(output, f"{n}.png"), os.path.join(output, f"{n}_attention.png"))
          for n in names]


def _fail(message: str) -> int:
  return cli.fail(message)


def max_side_size(height: int, width: int, max_side: Optional[int]) -> Optional[Tuple[int, int]]:
  """(H, W) scaled so the longer side is ``max_side`` (aspect kept, each side >= 1), or None
  when the image already fits (or ``max_side`` is None/0). The editor then works on that
  size (its own size rule applies on top) and the result is resized back to H x W."""
  if not max_side or max(height, width) <= max_side:
    return None
  scale = max_side / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def default_max_side(editor, config) -> int:
  """The run's training resolution (tiny editors), else the UNet's sample size in pixels (512
  for Stable Diffusion)."""
  if config is not None:
    return int(config.resolution)
  sample = getattr(editor.models.unet.config, "sample_size", None) or 64
  return int(sample) * editor.models.vae_downscale


def main(argv):  # pylint: disable=too-many-return-statements,too-many-locals
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  from rl4pix_jax import editing, visualize  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.rl import run_loading  # pylint: disable=import-outside-toplevel
  if bool(FLAGS.workdir) == bool(FLAGS.pretrained):
    return _fail("pass exactly one of --workdir=<run folder> or --pretrained=<diffusers "
                 "folder or hub id>.")
  if FLAGS.attention and not FLAGS.object:
    return _fail("--attention needs --object=<words of the instruction>, e.g. "
                 "--object='red circle'.")
  from rl4pix_jax.tokenizer import quote, truncation  # pylint: disable=import-outside-toplevel
  if not FLAGS.instruction.strip():
    return _fail(f"--instruction={quote(FLAGS.instruction)} is empty; say what to change, "
                 "e.g. --instruction='turn the red circle blue'.")
  if FLAGS.object and FLAGS.object.lower() not in FLAGS.instruction.lower():
    return _fail(f"--object={quote(FLAGS.object)} is not in --instruction="
                 f"{quote(FLAGS.instruction)}; give words that appear in the instruction.")
  if not os.path.exists(FLAGS.image):
    return _fail(f"--image={FLAGS.image!r} does not exist.")
  inputs = list_images(FLAGS.image)
  if not inputs:
    return _fail(f"No images ({', '.join(IMAGE_SUFFIXES)}) in the folder {FLAGS.image!r}.")
  try:
    size = editing.parse_size(FLAGS.size, "--size") if FLAGS.size else None
  except ValueError as e:
    return _fail(str(e))
  single_file = not os.path.isdir(FLAGS.image) and FLAGS.output.lower().endswith(".png")
  sampler = {"num_steps": 20, "guidance_scale": 7.5, "image_guidance_scale": 1.5}
  config = None
  try:
    if FLAGS.workdir:
      config = run_loading.read_run_config(FLAGS.workdir)
      editor = run_loading.load_run_editor(FLAGS.workdir, FLAGS.step,
                                           use_rl=False if FLAGS.no_rl else None)
      sampler = {k: config.sampler[k] for k in sampler}
    else:
      editor = run_loading.load_pretrained_editor(FLAGS.pretrained)
      # An exported run's sampler (rl4pix_sampler.json), as --workdir would use.
      sampler = {k: editor.sampler_defaults.get(k, v) for k, v in sampler.items()}
  except (run_loading.RunLoadingError, ValueError) as e:
    return _fail(str(e))
  cut = truncation(editor.tokenizer, FLAGS.instruction)
  if cut is not None:
    print(f"warning: --instruction has {cut[0]} tokens but the text encoder reads 77: it is "
          f"cut after {quote(cut[1])}.", file=sys.stderr)
  # --size names the working size itself: then no --max_side downscale first.
  max_side = (0 if size else default_max_side(editor, config)) if FLAGS.max_side is None \
      else FLAGS.max_side
  for name, flag in (("num_steps", FLAGS.steps), ("guidance_scale", FLAGS.guidance_scale),
                     ("image_guidance_scale", FLAGS.image_guidance_scale)):
    if flag is not None:
      sampler[name] = flag

  images, readable, failures, input_sizes = [], [], [], []
  for path in inputs:
    try:
      with Image.open(path) as im:
        pixels = editing.to_uint8_rgb(im)  # 16-bit scaled, alpha over white
      smaller = max_side_size(pixels.shape[0], pixels.shape[1], max_side)
      original = pixels.shape[:2]
      if smaller is not None:
        print(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} is larger than --max_side="
              f"{max_side}: edited at {smaller[1]}x{smaller[0]} and returned at "
              f"{pixels.shape[1]}x{pixels.shape[0]}.", file=sys.stderr)
        pixels = editing.resize_uint8(pixels, smaller)
      input_sizes.append(None if smaller is None else original)
      images.append(pixels)
      readable.append(path)
    except (OSError, ValueError) as e:
      failures.append(f"{path}: cannot read the image ({e})")
      print(f"warning: skipping {path}: cannot read the image ({e})", file=sys.stderr)
  paths = output_paths(readable, FLAGS.output, single_file)
  if not single_file:
    os.makedirs(FLAGS.output, exist_ok=True)
  elif os.path.dirname(FLAGS.output):
    os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
  batch = max(1, FLAGS.batch_size)
  # The chunk starting at image k is edited with seed --seed + k: an image's noise depends
  # only on --seed, --batch_size and its position in the sorted list.
  with tqdm(total=len(images), desc="editing", unit="image") as progress:
    for start in range(0, len(images), batch):
      chunk = list(range(start, min(start + batch, len(images))))
      try:
        result = editor.edit(
            [images[i] for i in chunk], [FLAGS.instruction] * len(chunk),
            seed=FLAGS.seed + start, num_steps=sampler["num_steps"],
            guidance_scale=sampler["guidance_scale"],
            image_guidance_scale=sampler["image_guidance_scale"], eta=FLAGS.eta,
            object_phrases=[FLAGS.object] * len(chunk) if FLAGS.attention else None,
            size=size, batch_size=batch)
      except ValueError as e:
        for i in chunk:
          failures.append(f"{readable[i]}: {e}")
        progress.update(len(chunk))
        continue
      for j, i in enumerate(chunk):
        edit_path, attention_path = paths[i]
        if input_sizes[i] is not None:  # downscaled for --max_side: back at the input's size
          result.images[j] = editing.resize_uint8(result.images[j], input_sizes[i])
        Image.fromarray(result.images[j]).save(edit_path)
        if FLAGS.attention:
          overlay = visualize.attention_overlay(result.images[j], result.attention_maps[j])
          Image.fromarray(overlay).save(attention_path)
      progress.update(len(chunk))
  edited = len(inputs) - len(failures)
  print(f"Edited {edited} of {len(inputs)} images into {FLAGS.output}.")
  if failures:
    print(f"{len(failures)} image(s) failed:", file=sys.stderr)
    for failure in failures:
      print(f"  {failure}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  cli.run(main)
