"""Multi-process start-up: which process this is, and ``jax.distributed.initialize``.

Multi-process runs (TPU pod slices, several GPU hosts) call :func:`maybe_initialize_distributed`
once at start-up, before any other JAX call; on one process it does nothing. The environment is
read from explicit arguments, JAX's own ``JAX_*`` variables, SLURM, or a Cloud TPU VM (its
variables or the GCE metadata server). The mesh and shardings are in ``parallel.py``.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import urllib.error
import urllib.request
from typing import Mapping, Optional

import jax

from rl4pix_jax.parallel import ParallelError

_LOG = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class DistributedLaunch:
  """What the environment says about this process, before ``jax.distributed.initialize``.

  Attributes:
    multi_process: True when this is one of several processes and JAX must be initialized.
    source: where that came from: 'explicit' (arguments), 'jax_env' (JAX_NUM_PROCESSES...),
      'slurm', 'tpu_pod' or 'single'.
    coordinator_address: 'host:port' of process 0, or None to let JAX derive it.
    num_processes: process count, or None to let JAX derive it.
    process_id: this process's index, or None to let JAX derive it.
  """

  multi_process: bool
  source: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process stands once JAX runs.

  Attributes:
    process_index: ``jax.process_index()``.
    process_count: ``jax.process_count()``.
    local_device_count: devices this process drives.
    device_count: devices of all processes.
    source: how the set-up was detected (see :class:`DistributedLaunch`).
  """

  process_index: int
  process_count: int
  local_device_count: int
  device_count: int
  source: str


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
  value = env.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ParallelError(f"Environment variable {name}={value!r}: expected an integer.") from e


def _explicit_launch(source: str, coordinator_address: Optional[str],
                     num_processes: Optional[int], process_id: Optional[int]) -> DistributedLaunch:
  if num_processes is None:
    raise ParallelError(
        f"Distributed set-up ({source}) without a process count: pass num_processes or set "
        "JAX_NUM_PROCESSES.")
  if num_processes < 1:
    raise ParallelError(f"num_processes={num_processes}: expected at least 1.")
  if num_processes == 1:
    return DistributedLaunch(False, source, coordinator_address, 1, 0)
  missing = [n for n, v in (("coordinator_address (JAX_COORDINATOR_ADDRESS)", coordinator_address),
                            ("process_id (JAX_PROCESS_ID)", process_id)) if v is None]
  if missing:
    raise ParallelError(f"{num_processes} processes requested ({source}) but {missing} "
                        "not given: every process needs the coordinator 'host:port' and its id.")
  if not re.fullmatch(r"[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+", coordinator_address):
    raise ParallelError(f"coordinator_address={coordinator_address!r}: expected 'host:port'.")
  if not 0 <= process_id < num_processes:
    raise ParallelError(f"process_id={process_id}: expected 0 <= id < {num_processes}.")
  return DistributedLaunch(True, source, coordinator_address, num_processes, process_id)


def _hostnames(value: Optional[str]) -> list:
  return [h for h in (value or "").split(",") if h.strip()]


def detect_distributed_launch(env: Mapping[str, str], coordinator_address: Optional[str] = None,
                              num_processes: Optional[int] = None,
                              process_id: Optional[int] = None,
                              tpu_worker_endpoints: Optional[str] = None) -> DistributedLaunch:
  """Decides from arguments and environment whether this is one of several processes.

  Pure: reads only its arguments. The first source that applies wins:

  1. 'explicit': any of ``coordinator_address``/``num_processes``/``process_id`` given; missing
     ones come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  2. 'jax_env': JAX_NUM_PROCESSES set (with JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID).
  3. 'slurm': inside ``srun`` (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
     SLURM_LOCALID all set) with SLURM_NTASKS > 1. The coordinator is JAX_COORDINATOR_ADDRESS
     if set, else JAX derives it from the first node of the step.
  4. 'tpu_pod': TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES (or ``tpu_worker_endpoints``
     from the GCE metadata server) lists more than one worker; JAX derives the rest.
  5. otherwise 'single': nothing to initialize.

  Args:
    env: environment variables (e.g. ``os.environ``).
    coordinator_address: 'host:port' of process 0.
    num_processes: total number of processes.
    process_id: index of this process in [0, num_processes).
    tpu_worker_endpoints: the TPU VM metadata value 'worker-network-endpoints' (comma-separated
      workers), if read.

  Returns:
    A :class:`DistributedLaunch`.

  Raises:
    ParallelError: an explicit or JAX_* set-up is incomplete or inconsistent.
  """
  env_coordinator = env.get("JAX_COORDINATOR_ADDRESS") or None
  if any(v is not None for v in (coordinator_address, num_processes, process_id)):
    return _explicit_launch(
        "explicit", coordinator_address or env_coordinator,
        num_processes if num_processes is not None else _env_int(env, "JAX_NUM_PROCESSES"),
        process_id if process_id is not None else _env_int(env, "JAX_PROCESS_ID"))
  if _env_int(env, "JAX_NUM_PROCESSES") is not None:
    return _explicit_launch("jax_env", env_coordinator, _env_int(env, "JAX_NUM_PROCESSES"),
                            _env_int(env, "JAX_PROCESS_ID"))
  slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID")
  if all(v in env for v in slurm_vars) and (_env_int(env, "SLURM_NTASKS") or 0) > 1:
    return DistributedLaunch(True, "slurm", env_coordinator, _env_int(env, "SLURM_NTASKS"),
                             _env_int(env, "SLURM_PROCID"))
  workers = _hostnames(env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
                       or tpu_worker_endpoints)
  if len(workers) > 1:
    slices = _env_int(env, "MEGASCALE_NUM_SLICES") or 1
    worker_id = _env_int(env, "TPU_WORKER_ID")
    slice_id = _env_int(env, "MEGASCALE_SLICE_ID") or 0
    pid = None if worker_id is None else worker_id + slice_id * len(workers)
    return DistributedLaunch(True, "tpu_pod", env_coordinator, len(workers) * slices, pid)
  return DistributedLaunch(False, "single")


def _tpu_chips_present() -> bool:
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def read_gce_tpu_worker_endpoints(timeout_s: float = 5.0) -> Optional[str]:
  """The TPU VM's 'worker-network-endpoints' metadata, or None off a Cloud TPU VM.

  Asks the GCE metadata server only when TPU chips are present (/dev/accel*, /dev/vfio/N) and
  TPU_SKIP_MDS_QUERY is unset; any network error gives None.

  Args:
    timeout_s: seconds to wait for the metadata server.

  Returns:
    Comma-separated worker endpoints (one per TPU VM host of the slice), or None.
  """
  if os.environ.get("TPU_SKIP_MDS_QUERY") is not None or not _tpu_chips_present():
    return None
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
      headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      return response.read().decode("utf-8")
  except (urllib.error.URLError, OSError):
    return None


def process_info(source: str = "single") -> ProcessInfo:
  """Describes the running JAX processes (starts the backend if it has not started)."""
  return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count(), source)


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> ProcessInfo:
  """Calls ``jax.distributed.initialize`` when this is one of several processes, else nothing.

  Call it first thing in a main, before any other JAX call. Detection follows
  :func:`detect_distributed_launch` on ``os.environ`` (on a Cloud TPU VM it also reads the
  slice's worker list from the metadata server). Safe to call twice.

  Args:
    coordinator_address: 'host:port' of process 0 (explicit multi-process set-up).
    num_processes: total number of processes (explicit set-up).
    process_id: this process's index (explicit set-up).

  Returns:
    A :class:`ProcessInfo` (also logged at INFO level).

  Raises:
    ParallelError: an explicit or JAX_* set-up is incomplete or inconsistent.
  """
  if jax.distributed.is_initialized():
    info = process_info("already_initialized")
    _LOG.info("jax.distributed already initialized: %s", info)
    return info
  env = dict(os.environ)
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  endpoints = None
  if not explicit and not any(k in env for k in ("JAX_NUM_PROCESSES", "SLURM_JOB_ID",
                                                 "TPU_PROCESS_ADDRESSES",
                                                 "TPU_WORKER_HOSTNAMES")):
    endpoints = read_gce_tpu_worker_endpoints()
  launch = detect_distributed_launch(env, coordinator_address, num_processes, process_id,
                                     endpoints)
  if launch.multi_process:
    _LOG.info("Initializing jax.distributed (%s): coordinator=%s processes=%s id=%s",
              launch.source, launch.coordinator_address, launch.num_processes,
              launch.process_id)
    if launch.source == "tpu_pod":
      # JAX's own TPU cluster detection knows the slice topology and the coordinator.
      jax.distributed.initialize(coordinator_address=launch.coordinator_address)
    else:
      jax.distributed.initialize(coordinator_address=launch.coordinator_address,
                                 num_processes=launch.num_processes,
                                 process_id=launch.process_id)
  info = process_info(launch.source)
  _LOG.info("JAX processes: %s", info)
  return info
