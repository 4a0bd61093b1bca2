"""Checks of the TPU VM and GPU launch scripts: syntax, shellcheck, and their dry-run commands.

Nothing here needs gcloud, SLURM or a GPU: with DRY_RUN=1 the scripts print the commands they
would run, one per line, and these tests compare those lines with the expected commands.
"""

import glob
import os
import shutil
import subprocess

import pytest
from tests.helpers.paths import REPO_ROOT

REPO = REPO_ROOT
TPU_VM = os.path.join(REPO, "launch", "tpu", "tpu_vm.sh")
SINGLE_HOST = os.path.join(REPO, "launch", "gpu", "train_single_host.sh")
SLURM = os.path.join(REPO, "launch", "gpu", "train_slurm.sbatch")
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*", "*.sh")) +
                 glob.glob(os.path.join(REPO, "launch", "*", "*.sbatch")))


def _dry_run(script, *args, expect_rc=0, **env):
  """Runs ``script`` with DRY_RUN=1 in a clean environment; returns its stdout lines."""
  clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
           "TMPDIR": "/tmp", "DRY_RUN": "1", **env}
  proc = subprocess.run(["bash", script, *args], env=clean, capture_output=True, text=True,
                        timeout=30, check=False)
  assert proc.returncode == expect_rc, proc.stderr
  return proc.stdout.splitlines() if expect_rc == 0 else proc.stderr


def test_all_scripts_found_and_executable():
  names = {os.path.relpath(s, REPO) for s in SCRIPTS}
  assert names == {"launch/tpu/tpu_vm.sh", "launch/gpu/train_single_host.sh",
                   "launch/gpu/train_slurm.sbatch"}
  for script in SCRIPTS:
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); bash -n still ran")
  # -x follows the shared launch/dry_run.sh (its `# shellcheck source=` paths are from REPO).
  proc = subprocess.run(["shellcheck", "-x", "--shell=bash", script], cwd=REPO,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ TPU VM

GCLOUD = "gcloud compute tpus tpu-vm"


def test_tpu_create_defaults_and_options():
  assert _dry_run(TPU_VM, "create") == [
      f"{GCLOUD} create rl4pix-tpu --zone=us-central2-b --accelerator-type=v4-8 "
      "--version=tpu-ubuntu2204-base"]
  assert _dry_run(TPU_VM, "create", TPU_NAME="pod", ZONE="us-east5-a", PROJECT="proj",
                  ACCELERATOR_TYPE="v5litepod-16", RUNTIME_VERSION="v2-alpha-tpuv5-lite",
                  SPOT="1") == [
      f"{GCLOUD} create pod --zone=us-east5-a --project=proj --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite --spot"]


def test_tpu_setup_copies_repo_and_installs_on_all_workers():
  lines = _dry_run(TPU_VM, "setup", JAX_VERSION="0.10.2")
  assert len(lines) == 3
  assert lines[0].startswith(f"tar -C {REPO} --exclude=.git --exclude=.venv")
  assert lines[0].endswith("-czf /tmp/rl4pix_jax_src.tar.gz .")
  assert lines[1] == (f"{GCLOUD} scp /tmp/rl4pix_jax_src.tar.gz rl4pix-tpu:rl4pix_jax_src.tar.gz "
                      "--zone=us-central2-b --worker=all")
  assert lines[2].startswith(f"{GCLOUD} ssh rl4pix-tpu --zone=us-central2-b --worker=all "
                             "'--command=mkdir -p rl4pix_jax && tar -xzf")
  assert "python3 -m pip install -q -r requirements.txt && " in lines[2]
  assert "python3 -m pip install -q '\\''jax[tpu]==0.10.2'\\''" in lines[2]


def test_tpu_train_runs_on_all_workers_with_gcs_workdir_and_passthrough_flags():
  lines = _dry_run(TPU_VM, "train", "--config.train.lr=1e-5", WORKDIR="gs://bucket/run1",
                   CONFIG="configs/shapes.py")
  assert lines == [
      f"{GCLOUD} ssh rl4pix-tpu --zone=us-central2-b --worker=all '--command=cd rl4pix_jax && "
      "(nohup python3 -m launch.train --config=configs/shapes.py --workdir=gs://bucket/run1 "
      "--config.train.lr=1e-5 < /dev/null > train.log 2>&1 & echo $! > train.pid)'"]


@pytest.mark.parametrize("workdir,message", [
    ("", "set WORKDIR=gs://"), ("/tmp/run", "expected a gs:// path")])
def test_tpu_train_requires_gcs_workdir(workdir, message):
  assert message in _dry_run(TPU_VM, "train", expect_rc=2, WORKDIR=workdir)


def test_tpu_logs_stop_delete_and_unknown_step():
  assert _dry_run(TPU_VM, "logs", LOG_WORKER="3") == [
      f"{GCLOUD} ssh rl4pix-tpu --zone=us-central2-b --worker=3 "
      "'--command=tail -n 200 -F rl4pix_jax/train.log'"]
  assert _dry_run(TPU_VM, "stop") == [
      f"{GCLOUD} ssh rl4pix-tpu --zone=us-central2-b --worker=all "
      "'--command=kill $(cat rl4pix_jax/train.pid) || true'"]
  assert _dry_run(TPU_VM, "delete", QUIET="1") == [
      f"{GCLOUD} delete rl4pix-tpu --zone=us-central2-b --quiet"]
  assert "unknown step 'launch'" in _dry_run(TPU_VM, "launch", expect_rc=2)
  assert "usage:" in _dry_run(TPU_VM, expect_rc=2)


# ------------------------------------------------------------------------------ GPU


def test_single_host_dry_run():
  assert _dry_run(SINGLE_HOST, "--config.mesh.fsdp=2") == [
      "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
      "python -m launch.train --config=configs/ip2p_magicbrush.py "
      "--workdir=runs/ip2p_magicbrush --config.mesh.fsdp=2"]
  lines = _dry_run(SINGLE_HOST, SETUP="1", CUDA_VISIBLE_DEVICES="0,1", WORKDIR="gs://b/r")
  assert lines == [
      "python -m pip install -r requirements.txt",
      "python -m pip install 'jax[cuda12]==0.10.2'",
      "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
      "export CUDA_VISIBLE_DEVICES=0,1",
      "python -m launch.train --config=configs/ip2p_magicbrush.py --workdir=gs://b/r"]


def test_slurm_one_process_per_node():
  lines = _dry_run(SLURM, "--config.train.lr=1e-5", SLURM_JOB_NODELIST="gpu[07-08,11]",
                   SLURM_NNODES="3", SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4")
  assert lines == [
      "export JAX_COORDINATOR_ADDRESS=gpu07:29500",
      "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
      "srun --nodes=3 --ntasks-per-node=1 --kill-on-bad-exit=1 python -m launch.train "
      "--config=configs/ip2p_magicbrush.py --workdir=runs/ip2p_magicbrush_slurm "
      "--config.train.lr=1e-5"]


def test_slurm_one_process_per_gpu():
  lines = _dry_run(SLURM, SLURM_JOB_NODELIST="a01,a02", SLURM_NNODES="2",
                   SLURM_NTASKS_PER_NODE="8(x2)", SLURM_GPUS_ON_NODE="8",
                   COORDINATOR_PORT="12345", WORKDIR="/shared/run")
  assert lines == [
      "export JAX_COORDINATOR_ADDRESS=a01:12345",
      "srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 python -m launch.train "
      "--config=configs/ip2p_magicbrush.py --workdir=/shared/run"]


def test_slurm_errors():
  assert "SLURM_JOB_NODELIST is not set" in _dry_run(SLURM, expect_rc=2)
  message = _dry_run(SLURM, expect_rc=2, SLURM_JOB_NODELIST="n1", SLURM_NTASKS_PER_NODE="3",
                     SLURM_GPUS_ON_NODE="4")
  assert "TASKS_PER_NODE=3: expected 1 (one process per node) or 4 (one per GPU)" in message
