"""Tests of rl4pix_jax.distributed: launch detection (explicit, JAX_*, SLURM, TPU) and start-up.

The two-process start-up itself runs in tests/test_parallel.py (a global batch over localhost).
"""

import jax
import pytest

from rl4pix_jax import distributed, parallel


@pytest.mark.parametrize("env,kwargs,expected", [
    ({}, {}, distributed.DistributedLaunch(False, "single")),
    ({}, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
     distributed.DistributedLaunch(True, "explicit", "10.0.0.1:1234", 4, 3)),
    ({"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_PROCESS_ID": "1"}, {"num_processes": 2},
     distributed.DistributedLaunch(True, "explicit", "h:9", 2, 1)),
    ({}, {"num_processes": 1}, distributed.DistributedLaunch(False, "explicit", None, 1, 0)),
    ({"JAX_COORDINATOR_ADDRESS": "node1:1234", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "5"},
     {}, distributed.DistributedLaunch(True, "jax_env", "node1:1234", 8, 5)),
    ({"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-04]", "SLURM_NTASKS": "4",
      "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}, {},
     distributed.DistributedLaunch(True, "slurm", None, 4, 2)),
    ({"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu01", "SLURM_NTASKS": "2",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "JAX_COORDINATOR_ADDRESS": "gpu01:29500"}, {},
     distributed.DistributedLaunch(True, "slurm", "gpu01:29500", 2, 0)),
    ({"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu01", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, {}, distributed.DistributedLaunch(False, "single")),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4"}, {},  # batch script, outside srun
     distributed.DistributedLaunch(False, "single")),
    ({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1,t-w-2,t-w-3", "TPU_WORKER_ID": "2"}, {},
     distributed.DistributedLaunch(True, "tpu_pod", None, 4, 2)),
    ({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1", "TPU_WORKER_ID": "1", "MEGASCALE_NUM_SLICES": "2",
      "MEGASCALE_SLICE_ID": "1"}, {}, distributed.DistributedLaunch(True, "tpu_pod", None, 4, 3)),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, {},
     distributed.DistributedLaunch(False, "single")),
])
def test_detect_distributed_launch(env, kwargs, expected):
  assert distributed.detect_distributed_launch(env, **kwargs) == expected


def test_detect_distributed_launch_from_tpu_metadata():
  launch = distributed.detect_distributed_launch(
      {}, tpu_worker_endpoints="w0:uid0:10.0.0.2,w1:uid1:10.0.0.3")
  assert launch == distributed.DistributedLaunch(True, "tpu_pod", None, 2, None)
  assert not distributed.detect_distributed_launch({}, tpu_worker_endpoints="10.0.0.2").multi_process


@pytest.mark.parametrize("env,kwargs,message", [
    ({}, {"num_processes": 2, "process_id": 0}, "coordinator_address"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2}, "process_id"),
    ({}, {"coordinator_address": "h:1"}, "without a process count"),
    ({}, {"coordinator_address": "h", "num_processes": 2, "process_id": 0}, "'host:port'"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "0 <= id < 2"),
    ({"JAX_NUM_PROCESSES": "two"}, {}, "JAX_NUM_PROCESSES='two': expected an integer"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, {}, "coordinator_address"),
])
def test_detect_distributed_launch_errors(env, kwargs, message):
  with pytest.raises(parallel.ParallelError, match=message):
    distributed.detect_distributed_launch(env, **kwargs)


_LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


def test_maybe_initialize_distributed_single_process_does_nothing(monkeypatch, caplog):
  for name in _LAUNCH_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
  with caplog.at_level("INFO", logger="rl4pix_jax.distributed"):
    info = distributed.maybe_initialize_distributed()
  assert info == distributed.ProcessInfo(0, 1, jax.local_device_count(), jax.device_count(),
                                      "single")
  assert "JAX processes" in caplog.text
  assert not jax.distributed.is_initialized()
  info = distributed.maybe_initialize_distributed(num_processes=1)
  assert info.process_count == 1 and info.source == "explicit"
  with pytest.raises(parallel.ParallelError, match="coordinator_address"):
    distributed.maybe_initialize_distributed(num_processes=2, process_id=0)


def test_process_info_and_metadata_reader_off_tpu(monkeypatch):
  assert distributed.process_info() == distributed.ProcessInfo(
      0, 1, jax.local_device_count(), jax.device_count(), "single")
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
  assert distributed.read_gce_tpu_worker_endpoints(timeout_s=0.1) is None
