#!/usr/bin/env bash
# Cloud TPU VM / pod slice life cycle for rl4pix_jax: create, set up, train, follow logs, delete.
#
# Usage: launch/tpu/tpu_vm.sh <create|setup|train|logs|stop|delete> [extra flags for launch.train]
#   create   gcloud compute tpus tpu-vm create (one VM, or every host of a pod slice)
#   setup    copy this repo to every worker, pip install requirements.txt, then jax[tpu]
#   train    start `python -m launch.train` on all workers at once (detached); extra arguments
#            after `train` are passed to launch.train, e.g. --config.ppo.learning_rate=1e-5
#   logs     stream the training log of worker LOG_WORKER (Ctrl-C stops following, not training)
#   stop     stop the training process on all workers (the pid written by `train`)
#   delete   delete the TPU VM (asks gcloud to confirm unless QUIET=1)
# Every worker runs the same command; rl4pix_jax.distributed.maybe_initialize_distributed() finds
# the other workers from the TPU metadata and calls jax.distributed.initialize().
#
# Variables (environment; default in brackets):
#   TPU_NAME          name of the TPU VM / pod slice                         [rl4pix-tpu]
#   ZONE              zone with TPU quota                                    [us-central2-b]
#   PROJECT           GCP project; empty uses gcloud's configured project     []
#   ACCELERATOR_TYPE  TPU type and size: v4-8 (1 host), v4-32 (4 hosts), v5litepod-16 ... [v4-8]
#   RUNTIME_VERSION   TPU VM image: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e)
#                                                                            [tpu-ubuntu2204-base]
#   SPOT              1 creates a Spot (preemptible) TPU                      [0]
#   REMOTE_DIR        repo folder on each worker, relative to the home folder [rl4pix_jax]
#   PYTHON            python on the workers                                   [python3]
#   JAX_VERSION       pinned jax version; setup installs jax[tpu]==JAX_VERSION [0.10.2]
#   CONFIG            config file passed to launch.train
#                                                                     [configs/ip2p_magicbrush.py]
#   WORKDIR           run folder, must be on GCS (gs://bucket/path) so that all workers and
#                     Orbax see the same checkpoints; required by `train`      []
#   LOG_FILE          log file on each worker, relative to REMOTE_DIR          [train.log]
#   LOG_WORKER        worker whose log `logs` streams (process 0 logs metrics) [0]
#   QUIET             1 passes --quiet to gcloud (no confirmation prompts)     [0]
#   DRY_RUN           1 prints the commands instead of running them            [0]
set -euo pipefail

TPU_NAME="${TPU_NAME:-rl4pix-tpu}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
REMOTE_DIR="${REMOTE_DIR:-rl4pix_jax}"
PYTHON="${PYTHON:-python3}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
CONFIG="${CONFIG:-configs/ip2p_magicbrush.py}"
WORKDIR="${WORKDIR:-}"
LOG_FILE="${LOG_FILE:-train.log}"
LOG_WORKER="${LOG_WORKER:-0}"
QUIET="${QUIET:-0}"
DRY_RUN="${DRY_RUN:-0}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ARCHIVE="${TMPDIR:-/tmp}/rl4pix_jax_src.tar.gz"

# shellcheck source=launch/dry_run.sh
source "${REPO_ROOT}/launch/dry_run.sh"

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

gcloud_flags() {
  GCLOUD_FLAGS=("--zone=${ZONE}")
  if [[ -n "${PROJECT}" ]]; then GCLOUD_FLAGS+=("--project=${PROJECT}"); fi
  if [[ "${QUIET}" == "1" ]]; then GCLOUD_FLAGS+=("--quiet"); fi
}

# Runs a shell command on the given worker(s) over gcloud ssh.
on_workers() {
  local workers="$1" command="$2"
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
    "--worker=${workers}" "--command=${command}"
}

cmd_create() {
  local flags=("${GCLOUD_FLAGS[@]}" "--accelerator-type=${ACCELERATOR_TYPE}"
               "--version=${RUNTIME_VERSION}")
  if [[ "${SPOT}" == "1" ]]; then flags+=("--spot"); fi
  run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${flags[@]}"
}

cmd_setup() {
  run tar -C "${REPO_ROOT}" --exclude=.git --exclude=.venv --exclude=.venv-ci \
    --exclude=__pycache__ --exclude=runs -czf "${ARCHIVE}" .
  run gcloud compute tpus tpu-vm scp "${ARCHIVE}" "${TPU_NAME}:rl4pix_jax_src.tar.gz" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  on_workers all "mkdir -p ${REMOTE_DIR} && tar -xzf rl4pix_jax_src.tar.gz -C ${REMOTE_DIR} \
&& cd ${REMOTE_DIR} && ${PYTHON} -m pip install -q -r requirements.txt \
&& ${PYTHON} -m pip install -q 'jax[tpu]==${JAX_VERSION}'"
}

cmd_train() {
  [[ -n "${WORKDIR}" ]] || die "set WORKDIR=gs://<bucket>/<run>: all workers must share it."
  [[ "${WORKDIR}" == gs://* ]] || die "WORKDIR=${WORKDIR}: expected a gs:// path (shared by \
all workers; Orbax writes checkpoints there collectively)."
  local train_cmd
  train_cmd="$(show_cmd "${PYTHON}" -m launch.train "--config=${CONFIG}" \
    "--workdir=${WORKDIR}" "$@")"
  on_workers all "cd ${REMOTE_DIR} && (nohup ${train_cmd} < /dev/null > ${LOG_FILE} 2>&1 & \
echo \$! > train.pid)"
}

cmd_logs() {
  on_workers "${LOG_WORKER}" "tail -n 200 -F ${REMOTE_DIR}/${LOG_FILE}"
}

cmd_stop() {
  on_workers all "kill \$(cat ${REMOTE_DIR}/train.pid) || true"
}

cmd_delete() {
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${GCLOUD_FLAGS[@]}"
}

main() {
  [[ $# -ge 1 ]] || die "usage: tpu_vm.sh <create|setup|train|logs|stop|delete> [flags]"
  local step="$1"
  shift
  gcloud_flags
  case "${step}" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    train) cmd_train "$@" ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    *) die "unknown step '${step}': expected create, setup, train, logs, stop or delete." ;;
  esac
}

main "$@"
