"""The browser demo (``python -m launch.demo``): one edit by the starting and the RL editor.

``edit_both`` is the whole computation (no Gradio): it reads the image, checks the instruction
and object phrase, edits with each editor (``Editor.edit``, same seed, eta 0), draws each
edit's target-token attention overlay and, when the image is one of the dataset's held-out
shapes scenes with its own instruction, runs the programmatic check
(``data/shapes_check.check_edit``) on each edit. ``build_app`` puts it on a Gradio page;
gradio is an optional dependency (requirements-demo.txt) imported only there.

A bad input (no or unreadable image, empty instruction, an object phrase that is not in the
instruction) raises ``DemoInputError``; the page shows its message instead of the edits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from rl4pix_jax import editing, visualize
from rl4pix_jax.data import shapes, shapes_check
from rl4pix_jax.tokenizer import quote, truncation

# Shown by the page next to each editor's pictures.
CHECK_KEYS = ("success", "edit_ok", "preserved_ok", "object_iou", "before_iou",
              "removed_fraction", "outside_change")
NO_SCENE = "(upload an image)"
# Small editors' pictures (32 px) are drawn scaled up, pixels kept sharp; the pixels sent and
# downloaded are the edit's own. Pass PAGE_CSS to ``launch(css=...)``.
PIXELS = "rl4pix-pixels"
OUTPUT_HEIGHT = 240
PAGE_CSS = (f".{PIXELS} img, #image img {{ width: 100% !important; height: 100% !important; "
            "object-fit: contain; image-rendering: pixelated; }")


class DemoInputError(ValueError):
  """An input the page reports as a message (what is wrong and what to do)."""


@dataclasses.dataclass
class DemoEditors:
  """What the page edits with.

  Attributes:
    start: the starting editor (supervised or pretrained).
    rl: the RL editor, or None (a run without an RL checkpoint, or ``--pretrained`` alone).
    start_name, rl_name: column titles (e.g. "supervised (starting) editor", "RL, epoch 19").
    scenes: held-out examples (``evaluation.load_examples``) to pick from; may be empty.
    shapes_scenes: the scenes are shapes_edit examples (the programmatic check applies).
    sampler: default num_steps, guidance_scale, image_guidance_scale (``resolve_sampler``).
    max_side: ``Editor.edit``'s max_side (``editing.default_max_side``).
  """
  start: editing.Editor
  rl: Optional[editing.Editor]
  start_name: str = "starting (supervised) editor"
  rl_name: str = "RL editor"
  scenes: Sequence[dict] = ()
  shapes_scenes: bool = False
  sampler: Dict[str, Any] = dataclasses.field(
      default_factory=lambda: dict(editing.DEFAULT_SAMPLER))
  max_side: Optional[int] = None
  _compiled: set = dataclasses.field(default_factory=set)

  def scene_labels(self) -> List[str]:
    return [scene_label(s) for s in self.scenes]

  def scene(self, label: Optional[str]) -> Optional[dict]:
    if not label or label == NO_SCENE:
      return None
    for s in self.scenes:
      if scene_label(s) == label:
        return s
    raise DemoInputError(f"No held-out scene {label!r}; pick one from the list.")


def scene_label(example: dict) -> str:
  return f"#{example['index']} {example['example_id']}: {example['instruction']}"


@dataclasses.dataclass
class EditOutcome:
  """One editor's edit (uint8, the input's size), attention overlay (or None), check (or
  None) and seconds."""
  image: np.ndarray
  overlay: Optional[np.ndarray]
  check: Optional[Dict[str, float]]
  seconds: float
  compiled: bool


@dataclasses.dataclass
class DemoResult:
  start: EditOutcome
  rl: Optional[EditOutcome]
  message: str  # Markdown: the check's verdict, timings, notes


@dataclasses.dataclass
class UnreadableUpload:
  """An upload the page's image widget could not open (its name and the error)."""
  name: str
  error: Exception


def read_image(image: Any) -> np.ndarray:
  """(H, W, 3) uint8 from an upload: a file path, bytes, a PIL image or an array."""
  if image is None:
    raise DemoInputError("No image: upload one, or pick a held-out scene.")
  if isinstance(image, UnreadableUpload):
    raise DemoInputError(f"Cannot read the image ({os.path.basename(image.name)}: "
                         f"{image.error}); upload a PNG, JPEG or WebP file.")
  try:
    if isinstance(image, (str, os.PathLike)):
      with Image.open(image) as opened:
        return editing.to_uint8_rgb(opened)
    if isinstance(image, bytes):
      with Image.open(io.BytesIO(image)) as opened:
        return editing.to_uint8_rgb(opened)
    return editing.to_uint8_rgb(image)
  except (OSError, ValueError, SyntaxError) as e:
    name = os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else "it"
    raise DemoInputError(f"Cannot read the image ({name}: {e}); upload a PNG, JPEG or WebP "
                         "file.") from None


def check_text(editor: editing.Editor, instruction: str, phrase: str) -> List[str]:
  """Validates the texts; returns notes (a cut instruction)."""
  if not (instruction or "").strip():
    raise DemoInputError("The instruction is empty; say what to change, e.g. 'turn the red "
                         "circle blue'.")
  if phrase and phrase.lower() not in instruction.lower():
    raise DemoInputError(f"The object phrase {quote(phrase)} is not in the instruction "
                         f"{quote(instruction)}; give words of the instruction (or leave it "
                         "empty for no attention map).")
  cut = truncation(editor.tokenizer, instruction)
  if cut is not None:
    return [f"The instruction has {cut[0]} tokens but the text encoder reads 77: it is cut "
            f"after {quote(cut[1])}."]
  return []


def _sampler_value(value, default, kind, name, minimum):
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return default
  try:
    value = kind(value)
  except (TypeError, ValueError):
    raise DemoInputError(f"{name}={value!r} is not a number.") from None
  if value < minimum:
    raise DemoInputError(f"{name}={value} must be at least {minimum}.")
  return value


def _compile_key(editor: editing.Editor, image: np.ndarray, sampler, phrase) -> tuple:
  """What decides whether an edit compiles (``editing.edit_batch``'s static arguments and
  shapes): editors sharing models share compiled functions."""
  return (id(editor.models), image.shape, sampler["num_steps"], bool(phrase))


def edit_one(editors: DemoEditors, editor: editing.Editor, image: np.ndarray,
             instruction: str, phrase: str, sampler: Dict[str, Any], seed: int,
             scene: Optional[dict]) -> EditOutcome:
  """One editor's edit of ``image`` as ``launch.edit`` does it (eta 0)."""
  key = _compile_key(editor, image, sampler, phrase)
  compiled = key not in editors._compiled  # pylint: disable=protected-access
  begin = time.perf_counter()
  try:
    result = editor.edit([image], [instruction], seed=seed, num_steps=sampler["num_steps"],
                         guidance_scale=sampler["guidance_scale"],
                         image_guidance_scale=sampler["image_guidance_scale"], eta=0.0,
                         object_phrases=[phrase] if phrase else None,
                         max_side=editors.max_side, batch_size=1)
  except ValueError as e:
    raise DemoInputError(str(e)) from None
  seconds = time.perf_counter() - begin
  editors._compiled.add(key)  # pylint: disable=protected-access
  edited = result.images[0]
  overlay = (visualize.attention_overlay(edited, result.attention_maps[0])
             if result.attention_maps[0] is not None else None)
  check = None
  if scene is not None:
    check = shapes_check.check_edit(edited, shapes.example_from_record(scene["record"],
                                                                       scene["index"]))
  return EditOutcome(edited, overlay, check, seconds, compiled)


def edit_both(editors: DemoEditors, image: Any, instruction: str, phrase: str = "",
              num_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
              image_guidance_scale: Optional[float] = None, seed: int = 0,
              scene: Optional[str] = None,
              progress: Optional[Callable[[float, str], None]] = None) -> DemoResult:
  """The page's computation (see the module docstring).

  Raises:
    DemoInputError: a bad input (the message says what to do).
  """
  progress = progress or (lambda fraction, text: None)
  instruction = (instruction or "").strip()
  phrase = (phrase or "").strip()
  pixels = read_image(image)
  notes = check_text(editors.start, instruction, phrase)
  sampler = {
      "num_steps": _sampler_value(num_steps, editors.sampler["num_steps"], int, "steps", 1),
      "guidance_scale": _sampler_value(guidance_scale, editors.sampler["guidance_scale"],
                                       float, "guidance", 0.0),
      "image_guidance_scale": _sampler_value(
          image_guidance_scale, editors.sampler["image_guidance_scale"], float,
          "image guidance", 0.0)}
  seed = int(_sampler_value(seed, 0, int, "seed", 0))
  picked = editors.scene(scene)
  checked = None
  if picked is not None and editors.shapes_scenes:
    if (pixels.shape == picked["source"].shape and np.array_equal(pixels, picked["source"])
        and instruction == picked["instruction"]):
      checked = picked
    else:
      notes.append(f"No programmatic check: the image or instruction is not that of the scene "
                   f"{quote(scene_label(picked))} any more.")
  elif picked is None and editors.shapes_scenes:
    notes.append("The programmatic check runs on the held-out scenes (pick one).")
  if not phrase:
    notes.append("No attention overlay: give an object phrase (words of the instruction).")
  runs = [(editors.start_name, editors.start)]
  if editors.rl is not None:
    runs.append((editors.rl_name, editors.rl))
  outcomes = []
  for i, (name, editor) in enumerate(runs):
    first = _compile_key(editor, pixels, sampler, phrase) not in \
        editors._compiled  # pylint: disable=protected-access
    doing = ("compiling (the first edit of this size and step count), then editing"
             if first else "editing")
    progress(i / len(runs), f"{name}: {doing}")
    outcomes.append(edit_one(editors, editor, pixels, instruction, phrase, sampler, seed,
                             checked))
  progress(1.0, "done")
  message = describe(runs, outcomes, sampler, seed, notes, editors.rl is None)
  return DemoResult(outcomes[0], outcomes[1] if len(outcomes) > 1 else None, message)


def _format(value: float) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.3f}" if abs(value - round(value)) > 1e-9 else f"{int(round(value))}"


def describe(runs, outcomes: Sequence[EditOutcome], sampler, seed, notes, no_rl) -> str:
  """The Markdown under the pictures: the check's verdict per editor, timings, notes."""
  lines = []
  checks = [o.check for o in outcomes]
  if any(c is not None for c in checks):
    lines.append("**Programmatic check** (rl4pix_jax/data/shapes_check.py)\n")
    lines.append("| editor | verdict | " + " | ".join(CHECK_KEYS[1:]) + " |")
    lines.append("|---|---|" + "---|" * (len(CHECK_KEYS) - 1))
    for (name, _), check in zip(runs, checks):
      verdict = "**success**" if check["success"] else "fail"
      lines.append(f"| {html.escape(name)} | {verdict} | "
                   + " | ".join(_format(check[k]) for k in CHECK_KEYS[1:]) + " |")
    lines.append("")
  timing = ", ".join(f"{name} {o.seconds:.1f} s{' (with compiling)' if o.compiled else ''}"
                     for (name, _), o in zip(runs, outcomes))
  lines.append(f"{sampler['num_steps']} steps, guidance {sampler['guidance_scale']:g} / image "
               f"{sampler['image_guidance_scale']:g}, seed {seed}: {timing}.")
  if no_rl:
    notes = notes + ["No RL editor (no RL checkpoint): only the starting editor is shown."]
  lines.extend(f"\n- {html.escape(n)}" for n in notes)
  return "\n".join(lines)


def error_message(error: Exception) -> str:
  return f"**Cannot edit:** {html.escape(str(error))}"


# ---- the page -----------------------------------------------------------------------------

@contextlib.contextmanager
def _no_pyi_written_by_gradio():
  """Gradio's component metaclass writes a ``.pyi`` stub next to the source file of every
  component subclass (``gradio.component_meta.create_or_modify_pyi``): defining one here would
  write ``rl4pix_jax/demo.pyi`` into the package (a stale copy of this file once it changes).
  For the classes defined inside this block it does nothing; the original is put back after."""
  from gradio import component_meta  # pylint: disable=import-outside-toplevel
  original = component_meta.create_or_modify_pyi
  component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
  try:
    yield
  finally:
    component_meta.create_or_modify_pyi = original


def build_app(editors: DemoEditors, title: str = "rl4pix_jax: starting vs RL editor"):
  """The Gradio Blocks of the page (``launch.demo`` serves it).

  API (``gradio_client``): ``/edit`` (image, instruction, object phrase, steps, guidance,
  image guidance, seed, scene) -> (starting edit, its attention, RL edit, its attention,
  Markdown message); ``/pick_scene`` (scene) -> (image, instruction, object phrase).
  """
  import gradio as gr  # pylint: disable=import-outside-toplevel

  with _no_pyi_written_by_gradio():
    class UploadedImage(gr.Image):
      """gr.Image whose unreadable upload reaches ``edit`` (as an error) instead of failing in
      Gradio's own preprocessing with a bare "Error" box; drawn by the frontend's image widget."""
      is_template = True  # get_block_name: the parent's ("image")

      def preprocess(self, payload):
        try:
          return super().preprocess(payload)
        except Exception as e:  # pylint: disable=broad-except
          return UnreadableUpload(getattr(payload, "orig_name", None) or "the upload", e)

  labels = [NO_SCENE] + editors.scene_labels()
  sampler = editors.sampler

  def pick_scene(label):
    try:
      scene = editors.scene(label)
    except DemoInputError:
      scene = None
    if scene is None:
      return gr.update(), gr.update(), gr.update()
    return scene["source"], scene["instruction"], scene.get("object_phrase") or ""

  def edit(image, instruction, phrase, steps, guidance, image_guidance, seed, scene,
           progress=gr.Progress()):
    try:
      result = edit_both(editors, image, instruction, phrase, steps, guidance, image_guidance,
                         seed, scene, progress=lambda f, text: progress(f, desc=text))
    except DemoInputError as e:
      return None, None, None, None, error_message(e)
    rl = result.rl
    return (result.start.image, result.start.overlay, None if rl is None else rl.image,
            None if rl is None else rl.overlay, result.message)

  with gr.Blocks(title=title) as app:
    gr.Markdown(f"## {html.escape(title)}\nUpload an image or pick a held-out scene, say what "
                "to change, and optionally name the object (words of the instruction) whose "
                "cross-attention to show. The first edit compiles the editors (a progress bar "
                "shows it); later edits of the same size and step count are fast.")
    with gr.Row():
      with gr.Column(scale=1):
        scene = gr.Dropdown(labels, value=NO_SCENE, label="Held-out scene",
                            visible=bool(editors.scenes), elem_id="scene")
        image = UploadedImage(type="filepath", image_mode=None, format="png", label="Image",
                              sources=["upload", "clipboard"], height=256, elem_id="image")
        instruction = gr.Textbox(label="Instruction", placeholder="turn the red circle blue",
                                 elem_id="instruction")
        phrase = gr.Textbox(label="Object phrase (optional)", placeholder="red circle",
                            elem_id="phrase")
        with gr.Accordion("Sampler", open=True):
          steps = gr.Slider(1, 100, value=int(sampler["num_steps"]), step=1, label="Steps")
          guidance = gr.Slider(0.0, 20.0, value=float(sampler["guidance_scale"]), step=0.1,
                               label="Guidance (text)")
          image_guidance = gr.Slider(0.0, 10.0, value=float(sampler["image_guidance_scale"]),
                                     step=0.05, label="Image guidance")
          seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
        button = gr.Button("Edit", variant="primary", elem_id="edit_button")
      with gr.Column(scale=2):
        gr.Markdown(f"**{html.escape(editors.start_name)}**")
        with gr.Row():
          start_image = gr.Image(label="edit", type="numpy", format="png", interactive=False,
                                 height=OUTPUT_HEIGHT, elem_classes=[PIXELS])
          start_overlay = gr.Image(label="attention", type="numpy", format="png",
                                   interactive=False, height=OUTPUT_HEIGHT, elem_classes=[PIXELS])
        gr.Markdown(f"**{html.escape(editors.rl_name if editors.rl else 'RL editor: none')}**")
        with gr.Row():
          rl_image = gr.Image(label="edit", type="numpy", format="png", interactive=False,
                                 height=OUTPUT_HEIGHT, elem_classes=[PIXELS])
          rl_overlay = gr.Image(label="attention", type="numpy", format="png",
                                interactive=False, height=OUTPUT_HEIGHT, elem_classes=[PIXELS])
        message = gr.Markdown(elem_id="message")
    scene.change(pick_scene, [scene], [image, instruction, phrase], api_name="pick_scene")
    button.click(edit, [image, instruction, phrase, steps, guidance, image_guidance, seed,
                        scene], [start_image, start_overlay, rl_image, rl_overlay, message],
                 api_name="edit")
  return app


def free_port(host: str = "127.0.0.1") -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind((host, 0))
    return int(s.getsockname()[1])

