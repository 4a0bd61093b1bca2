"""The SD1.5 path rehearsed on CPU: what ``launch/tpu/tpu_vm.sh train`` runs on a worker.

Real formats, toy widths: a tiny random InstructPix2Pix pipeline with SD1.5's block structure
(``tiny_models.save_tiny_sd15_pipeline``: four UNet levels, CrossAttnDown x3 + Down, 8 input
channels, a four-level VAE, a CLIP text encoder, the InstructPix2Pix scheduler config), a tiny
CLIPModel and DINO ViT, and a tiny MagicBrush (train, dev and test parquet shards in the hub's
columns, built into tfds by ``launch.prepare_data``'s builder). Then, in subprocesses:

1. the worker command that the TPU script's dry run prints, default config
   (``configs/ip2p_magicbrush.py``: LoRA, bfloat16), with the run's overrides (the tiny
   model, data and CLIP; 64 px, 2 steps, 8 samples, 2 epochs, ``mesh.fsdp=2``), on 8 forced
   CPU devices, in a local workdir (``tests/workdir/test_gcs_workdir.py`` runs a gs:// one);
2. ``launch.evaluate`` in MagicBrush mode, RL against the starting editor;
3. ``launch.export``; then diffusers loads the export and edits an image with it.
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from launch import prepare_data
from tests.data.test_data_builders import tfds_tmpdir
from tests.helpers import magicbrush_parquet, tiny_models
from tests.helpers.cli import cli_env
from tests.helpers.paths import REPO_ROOT
from tests.launch.test_launch_scripts import TPU_VM, _dry_run

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

RESOLUTION = 64  # 8x8 latents through the four-level VAE
DEVICES = 8
TRAIN_IDS = ["500-1", "501-1", "502-1", "503-1"]
INSTRUCTIONS = {"500-1": "change the cat to a dog", "501-1": "add a hat on the dog",
                "502-1": "remove the red car", "503-1": "turn the sky blue",
                "600-1": "make the car red", "700-1": "change the cat to a dog"}


def _overrides(folders):
  """The run's flags after the script's --config and --workdir."""
  return [
      f"--config.model.pretrained={folders['ip2p']}",
      f"--config.reward.clip_model={folders['clip']}",
      f"--config.data.data_dir={folders['data']}",
      "--config.mesh.fsdp=2",
      # At toy widths no kernel reaches the real 2^18-element threshold: shard from 1024.
      "--config.mesh.fsdp_min_size=1024",
      f"--config.resolution={RESOLUTION}", f"--config.sampler.capture_size={RESOLUTION // 16}",
      "--config.sampler.num_steps=2", "--config.train.num_epochs=2",
      "--config.train.sample_batch_size=8", "--config.train.num_sample_batches=1",
      "--config.train.samples_per_prompt=4", "--config.train.train_batch_size=8",
      "--config.train.checkpoint_every=1", "--config.train.image_every=1",
      "--config.train.eval_examples=2", "--config.data.num_threads=1"]


def worker_command(overrides, workdir):
  """The ``python -m launch.train ...`` that ``tpu_vm.sh train`` starts on every worker (its
  dry run, default CONFIG), with this interpreter and a local ``workdir`` in place of the
  gs:// one."""
  line, = _dry_run(TPU_VM, "train", *overrides, WORKDIR="gs://bucket/rehearsal")
  remote, = [a for a in shlex.split(line) if a.startswith("--command=")]
  command = shlex.split(re.search(r"nohup (.*?) < /dev/null", remote).group(1))
  assert command[:3] == ["python3", "-m", "launch.train"], command
  assert "--config=configs/ip2p_magicbrush.py" in command  # the scripts' default config
  return [sys.executable] + [f"--workdir={workdir}" if a.startswith("--workdir=") else a
                             for a in command[1:]]


def _run(command, tmp, devices=1):
  env = dict(cli_env(tmp), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, f"{command[:3]} failed:\n{done.stderr[-5000:]}"
  return done


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd15_rehearsal")
  rng = np.random.default_rng(0)
  shards = {"train": TRAIN_IDS, "dev": ["600-1", "601-1"], "test": ["700-1", "700-2", "701-1"]}
  for split, ids in shards.items():
    magicbrush_parquet.write_parquet(
        root / "parquet" / "data", f"{split}-00000-of-00001.parquet",
        magicbrush_parquet.session_rows(rng, ids, INSTRUCTIONS, side=72))
  with tfds_tmpdir(root / "tmp"):
    prepare_data.prepare_magicbrush(str(root / "data"), str(root / "parquet"), False)
  tiny_models.save_tiny_sd15_pipeline(str(root / "ip2p"))
  tiny_models.save_tiny_clip_model(str(root / "clip"))
  kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
  transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **kw)
                        ).save_pretrained(str(root / "dino"))
  folders = {name: str(root / name) for name in ("data", "ip2p", "clip", "dino")}
  workdir = root / "run"
  train = _run(worker_command(_overrides(folders), workdir), root, DEVICES)
  evaluate = _run([sys.executable, "-m", "launch.evaluate", f"--workdir={workdir}",
                   "--dataset=magicbrush", "--split=test", f"--clip_model={folders['clip']}",
                   f"--dino_model={folders['dino']}", "--max_examples=3", "--steps=2",
                   "--compare_no_rl", f"--output={root / 'eval' / 'single_turn'}"], root)
  _run([sys.executable, "-m", "launch.export", f"--workdir={workdir}",
        f"--output={root / 'export'}"], root)
  return dict(root=root, workdir=workdir, folders=folders, train=train, evaluate=evaluate)


def _metrics(workdir):
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def test_the_default_config_trains_on_an_fsdp_mesh_of_eight_devices(rehearsal):
  workdir, log = rehearsal["workdir"], rehearsal["train"].stdout
  with open(workdir / "config.json", encoding="utf-8") as f:
    config = json.load(f)
  assert config["data"]["dataset"] == "magicbrush" and config["ppo"]["trainable"] == "lora"
  assert config["model"]["dtype"] == "bfloat16" and config["mesh"]["fsdp"] == 2
  # The frozen SD1.5-structured UNet is split over fsdp; each device holds part of it.
  mesh_line, = [line for line in log.splitlines() if "Mesh {'data': 4, 'fsdp': 2}" in line]
  frozen = re.search(r"Frozen UNet: (\d+) arrays, (\d+) sharded \((\d+)% of ([\d.]+) (\w+)\); "
                     r"([\d.]+) (\w+) on device", mesh_line)
  assert frozen, mesh_line
  assert int(frozen.group(2)) > 0 and int(frozen.group(3)) > 50, mesh_line
  assert "over 8 devices" in mesh_line
  rows = _metrics(workdir)
  assert [r["epoch"] for r in rows] == [-1, 0, 1]  # validation of the start, two RL epochs
  for row in rows[1:]:
    assert all(math.isfinite(row[k]) for k in ("reward_mean", "loss", "grad_norm", "kl"))
    assert row["nonfinite_updates"] == 0
    # bfloat16 forwards, yet the ratio stays ~1: the last (deterministic) step of this
    # scheduler config is not scored (it gave approx_kl 1.2e9 when it was).
    assert row["approx_kl"] < 1e-3, row
  assert rows[-1]["optimizer_steps"] == 2
  assert {"val_clip_t", "val_l1"} <= set(rows[-1]) and math.isfinite(rows[-1]["val_clip_t"])
  assert (workdir / "checkpoints" / "1").is_dir()
  assert (workdir / "samples" / "epoch_0001.png").is_file()


def test_evaluate_scores_the_rl_and_the_starting_editor_on_magicbrush(rehearsal):
  report = json.loads((rehearsal["root"] / "eval" / "single_turn.json").read_text())
  assert report["dataset"] == "magicbrush" and report["num_examples"] == 3
  assert len(report["models"]) == 2, list(report["models"])  # the RL run and its start
  for entry in report["models"].values():
    for key in ("l1", "l2", "clip_i", "dino", "clip_t"):
      values = entry["per_example"][key]
      assert len(values) == 3 and all(math.isfinite(v) for v in values), (key, values)


def test_diffusers_loads_the_export_and_edits_with_it(rehearsal):
  export = rehearsal["root"] / "export"
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      str(export), safety_checker=None, requires_safety_checker=False)
  base = diffusers.UNet2DConditionModel.from_pretrained(
      os.path.join(rehearsal["folders"]["ip2p"], "unet"))
  for key in ("down_block_types", "up_block_types", "block_out_channels", "in_channels"):
    assert list(np.atleast_1d(pipe.unet.config[key])) == list(
        np.atleast_1d(tiny_models.TINY_SD15_UNET[key])), key
  # Two LoRA updates were merged into the attention projections; the convolutions are the base's.
  exported, original = pipe.unet.state_dict(), base.state_dict()
  assert set(exported) == set(original)
  changed = {k for k in exported if not torch.equal(exported[k], original[k])}
  assert changed and all(".attn" in k for k in changed), sorted(changed)[:5]
  source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (RESOLUTION, RESOLUTION, 3),
                                                             np.uint8))
  out = pipe("add a hat on the dog", image=source, num_inference_steps=2, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
  assert out.shape == (1, RESOLUTION, RESOLUTION, 3) and np.all(np.isfinite(out))
