#!/usr/bin/env bash
# Train rl4pix_jax on one host with all its GPUs as one ('data', 'fsdp') mesh (one process).
#
# Usage: launch/gpu/train_single_host.sh [extra flags for launch.train]
#   e.g. launch/gpu/train_single_host.sh --config.mesh.fsdp=2 --config.ppo.learning_rate=1e-5
#
# JAX needs its CUDA build, of the pinned version, after requirements.txt:
#   pip install -r requirements.txt && pip install "jax[cuda12]==0.10.2"
# (SETUP=1 runs exactly that before training.) One process drives every visible GPU; the mesh
# takes all of them (mesh.data=-1 by default), so nothing here calls jax.distributed.
#
# Variables (environment; default in brackets):
#   CONFIG              config file passed to launch.train          [configs/ip2p_magicbrush.py]
#   WORKDIR             run folder (local path or gs://...)          [runs/ip2p_magicbrush]
#   PYTHON              python with the requirements installed       [python]
#   JAX_VERSION         version of jax[cuda12] that SETUP=1 installs  [0.10.2]
#   SETUP               1 pip-installs requirements.txt and jax[cuda12] first  [0]
#   CUDA_VISIBLE_DEVICES  which GPUs to use (unset: all)            [unset]
#   XLA_PYTHON_CLIENT_MEM_FRACTION  share of each GPU's memory JAX preallocates  [0.90]
#   DRY_RUN             1 prints the commands instead of running them  [0]
set -euo pipefail

CONFIG="${CONFIG:-configs/ip2p_magicbrush.py}"
WORKDIR="${WORKDIR:-runs/ip2p_magicbrush}"
PYTHON="${PYTHON:-python}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
SETUP="${SETUP:-0}"
XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
DRY_RUN="${DRY_RUN:-0}"
export XLA_PYTHON_CLIENT_MEM_FRACTION

# shellcheck source=launch/dry_run.sh
source "$(dirname "${BASH_SOURCE[0]}")/../dry_run.sh"

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [[ "${SETUP}" == "1" ]]; then
  run "${PYTHON}" -m pip install -r requirements.txt
  run "${PYTHON}" -m pip install "jax[cuda12]==${JAX_VERSION}"
fi

if [[ "${DRY_RUN}" == "1" ]]; then
  echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION}"
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    echo "export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES}"
  fi
fi
run "${PYTHON}" -m launch.train "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@"
