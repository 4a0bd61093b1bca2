"""The browser demo's server (launch.demo's page) on 127.0.0.1, driven over HTTP by gradio_client.

The page is served in this process (``demo.build_app(...).launch(prevent_thread_lock=True)``)
around two tiny random editors (the RL one a perturbed copy of the starting one) and three
held-out shapes scenes; every edit goes through Gradio's HTTP API (upload, queue, download) and
is compared with ``Editor.edit`` on the same seed. The flags of ``python -m launch.demo`` are
tested in a subprocess (no server). Skipped when gradio (optional: requirements-demo.txt) is
not installed.
"""

import os
import subprocess
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the test
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position

from tests.helpers.cli import cli_env  # pylint: disable=wrong-import-position
from tests.helpers.paths import REPO_ROOT  # pylint: disable=wrong-import-position

SKIP_REASON = ("gradio / gradio_client are not installed: the browser demo is an optional "
               "dependency (pip install -r requirements-demo.txt && pip install --no-deps "
               "gradio==6.31.0; README, 'Browser demo and Weights & Biases')")
gradio = pytest.importorskip("gradio", reason=SKIP_REASON)
gradio_client = pytest.importorskip("gradio_client", reason=SKIP_REASON)

# pylint: disable=wrong-import-position
from rl4pix_jax import demo, editing, visualize
from rl4pix_jax.data import shapes, shapes_check
from tests.helpers import rl_fixtures, tiny_models

INSTRUCTION = "turn the red circle blue"
SAMPLER = dict(num_steps=2, guidance_scale=7.5, image_guidance_scale=1.5)


@pytest.fixture(scope="module")
def editors():
  """The starting editor: rl_fixtures' tiny models with quick random weights; the RL editor:
  the same with another random UNet."""
  setup = rl_fixtures.quick_tiny_rl_setup(seed=0)
  models, params = setup.models, setup.params
  rl_unet = tiny_models.quick_random_editor_params(models, rl_fixtures.RESOLUTION, seed=1).unet
  make = lambda p: editing.Editor(models, p, setup.tokenizer, capture_size=16,
                                  resolution=rl_fixtures.RESOLUTION, sampler_defaults=SAMPLER)
  return demo.DemoEditors(
      start=make(params), rl=make(params.replace(unet=rl_unet)),
      scenes=rl_fixtures.tiny_validation_examples(3), shapes_scenes=True,
      sampler=dict(SAMPLER), max_side=rl_fixtures.RESOLUTION)


@pytest.fixture(scope="module")
def client(editors):
  """A gradio_client.Client of the page, served on 127.0.0.1 for this module."""
  app = demo.build_app(editors)
  port = demo.free_port()
  app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                     share=False, inbrowser=False, quiet=True)
  try:
    yield gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
  finally:
    app.close()


def _edit(client, image_path, instruction=INSTRUCTION, phrase="red circle", seed=3,
          scene=demo.NO_SCENE):
  return client.predict(gradio_client.handle_file(str(image_path)), instruction, phrase,
                        SAMPLER["num_steps"], SAMPLER["guidance_scale"],
                        SAMPLER["image_guidance_scale"], seed, scene, api_name="/edit")


def _pixels(path):
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def test_upload_edit_over_http_equals_editor_edit(client, editors, tmp_path):
  rng = np.random.default_rng(0)
  source = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  Image.fromarray(source).save(tmp_path / "upload.png")
  start, start_map, rl, rl_map, message = _edit(client, tmp_path / "upload.png")
  for editor, image, overlay in ((editors.start, start, start_map), (editors.rl, rl, rl_map)):
    want = editor.edit([source], [INSTRUCTION], seed=3, object_phrases=["red circle"],
                       max_side=32, **SAMPLER)
    np.testing.assert_array_equal(_pixels(image), want.images[0])
    np.testing.assert_array_equal(
        _pixels(overlay), visualize.attention_overlay(want.images[0], want.attention_maps[0]))
  assert not np.array_equal(_pixels(start), _pixels(rl))  # two editors, two edits
  assert "2 steps" in message and "seed 3" in message and "Programmatic check" not in message


def test_held_out_scene_is_picked_and_checked(client, editors):
  scene = editors.scenes[1]
  label = demo.scene_label(scene)
  image, instruction, phrase = client.predict(label, api_name="/pick_scene")
  assert instruction == scene["instruction"] and phrase == scene["object_phrase"]
  np.testing.assert_array_equal(_pixels(image), scene["source"])
  outputs = _edit(client, image, instruction, phrase, seed=0, scene=label)
  message = outputs[-1]
  assert "Programmatic check" in message
  example = shapes.example_from_record(scene["record"], scene["index"])
  rows = [line for line in message.splitlines()
          if line.startswith("| ") and not line.startswith("| editor |")]
  assert len(rows) == 2
  for row, editor, edited in zip(rows, (editors.start, editors.rl), (outputs[0], outputs[2])):
    want = editor.edit([scene["source"]], [instruction], seed=0, max_side=32,
                       object_phrases=[phrase], **SAMPLER).images[0]
    np.testing.assert_array_equal(_pixels(edited), want)
    verdict = shapes_check.check_edit(want, example)
    assert ("**success**" in row) == bool(verdict["success"])
    outside = demo._format(verdict["outside_change"])  # pylint: disable=protected-access
    assert f" {outside} |" in row
  # Another instruction on the scene's image: edited, but not checked.
  other = _edit(client, image, "make it green", "green", seed=0, scene=label)[-1]
  assert "Programmatic check" not in other and "No programmatic check" in other


@pytest.mark.parametrize("case", ["unreadable", "phrase", "empty"])
def test_bad_inputs_are_a_message_on_the_page(client, tmp_path, case):
  good = tmp_path / "good.png"
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
  if case == "unreadable":
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    outputs, expected = _edit(client, tmp_path / "broken.png"), "Cannot read the image"
  elif case == "phrase":
    outputs, expected = _edit(client, good, phrase="green star"), "is not in the instruction"
  else:
    outputs, expected = _edit(client, good, instruction="  "), "instruction is empty"
  assert outputs[:4] == (None, None, None, None)
  assert outputs[4].startswith("**Cannot edit:**") and expected in outputs[4], outputs[4]
  assert "Traceback" not in outputs[4]


def test_launch_demo_flags_are_one_line_errors(tmp_path):
  for flags, expected in (([], "exactly one of --workdir"),
                          (["--workdir=x", "--rl_pretrained=y"], "--rl_pretrained goes with"),
                          ([f"--workdir={tmp_path / 'missing'}"], "No run config")):
    done = subprocess.run([sys.executable, "-m", "launch.demo", *flags], cwd=REPO_ROOT,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_building_the_page_writes_nothing_into_the_package(editors):
  """Gradio writes a .pyi stub next to the source of each component subclass; the page's
  UploadedImage is defined so that none lands next to rl4pix_jax/demo.py."""
  stub = os.path.splitext(demo.__file__)[0] + ".pyi"
  if os.path.exists(stub):
    os.remove(stub)  # a stub an older build_app left: it would hide what this test checks
  demo.build_app(editors)
  assert not os.path.exists(stub)
