"""Device mesh, sharding rules and multi-process start-up: one code path from 1 CPU to a TPU pod.

Everything that runs on several devices is a plain ``jax.jit`` over one
``Mesh(('data', 'fsdp'))`` with explicit ``in_shardings``/``out_shardings`` built here:

* ``data``: data parallelism. Batches and trajectories are split along their leading axis.
* ``fsdp``: fully sharded data parallelism (ZeRO-3 style). Large kernels (and their optimizer
  state) are split over this axis; XLA all-gathers them where they are used. The batch is split
  over ``data`` *and* ``fsdp`` (see :func:`batch_sharding`), so every device computes on
  different samples.

Mesh axes are ``AxisType.Auto``: shardings are given on ``jax.jit`` and XLA's partitioner
propagates them through the (unannotated) flax.linen models. ``jax.make_mesh`` defaults to
``Explicit`` axes in JAX 0.10, which would make sharding part of every array's type and require
annotations inside the models; we do not use that mode.

We use ``jit`` over a Mesh rather than ``pmap``: ``pmap`` is in maintenance mode since JAX 0.8
(it is implemented on top of jit + shard_map) and it replicates the parameters on every device
instead of sharding them, which does not fit a 860M-parameter UNet plus AdamW state on a 16 GB
TPU core.

Multi-process runs (TPU pod slices, several GPU hosts) call :func:`maybe_initialize_distributed`
once at start-up, before any other JAX call; on one process it does nothing.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import re
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)

_LOG = logging.getLogger(__name__)

PyTree = Any
# A function of (leaf shape, mesh) returning the leaf's partition spec.
SpecFn = Callable[[Tuple[int, ...], Mesh], PartitionSpec]
ShardingRules = Sequence[Tuple[str, Union[PartitionSpec, SpecFn]]]


class ParallelError(ValueError):
  """A mesh, sharding rule or distributed set-up does not fit the devices or the data."""


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Shape of the ('data', 'fsdp') device mesh.

  Attributes:
    data: devices along the data-parallel axis; -1 means "all devices not used by fsdp".
    fsdp: devices along the parameter-sharding axis; -1 means "all devices not used by data".
  """

  data: int = -1
  fsdp: int = 1


def resolve_mesh_shape(data: int, fsdp: int, device_count: int) -> Tuple[int, int]:
  """Turns a (data, fsdp) request with at most one -1 into concrete sizes.

  Args:
    data: size of the 'data' axis, or -1 for all remaining devices.
    fsdp: size of the 'fsdp' axis, or -1 for all remaining devices.
    device_count: number of devices the mesh must cover exactly.

  Returns:
    (data, fsdp) with data * fsdp == device_count.

  Raises:
    ParallelError: both are -1, a size is 0 or below -1, or the product does not equal
      (or, with a -1, does not divide) the device count.
  """
  for name, size in (("data", data), ("fsdp", fsdp)):
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ParallelError(f"mesh.{name}={size!r}: expected a positive int or -1.")
  if device_count < 1:
    raise ParallelError(f"device_count={device_count}: expected at least one device.")
  if data == -1 and fsdp == -1:
    raise ParallelError("mesh.data and mesh.fsdp are both -1: at most one axis may be -1.")
  if data == -1 or fsdp == -1:
    fixed_name, fixed = ("fsdp", fsdp) if data == -1 else ("data", data)
    if device_count % fixed:
      raise ParallelError(
          f"mesh.{fixed_name}={fixed} does not divide the {device_count} devices, so the other "
          "axis (-1) cannot take the remaining devices.")
    rest = device_count // fixed
    return (rest, fsdp) if data == -1 else (data, rest)
  if data * fsdp != device_count:
    raise ParallelError(
        f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but there are "
        f"{device_count}: the product must equal the device count (use -1 for one axis).")
  return int(data), int(fsdp)


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh with Auto axis types.

  Args:
    data: size of the 'data' axis; -1 for all devices not used by fsdp.
    fsdp: size of the 'fsdp' axis; -1 for all devices not used by data.
    devices: devices to use (default ``jax.devices()``: all devices of all processes).

  Returns:
    A ``jax.sharding.Mesh`` of shape (data, fsdp). On TPU the device order follows the
    physical topology (``jax.make_mesh``), so 'fsdp' neighbours share the fastest links.

  Raises:
    ParallelError: the sizes do not fit the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def make_mesh_from_config(mesh_config: Any,
                          devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the mesh from any object with ``data`` and ``fsdp`` (MeshConfig, ConfigDict).

  Args:
    mesh_config: e.g. ``config.mesh`` of an ml_collections config, or a :class:`MeshConfig`.
    devices: devices to use (default all).

  Returns:
    The ('data', 'fsdp') mesh.
  """
  missing = [k for k in ("data", "fsdp") if not hasattr(mesh_config, k)]
  if missing:
    raise ParallelError(f"Mesh config {mesh_config!r} lacks {missing}: expected .data and .fsdp.")
  return make_mesh(mesh_config.data, mesh_config.fsdp, devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy of an array on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = MESH_AXES) -> NamedSharding:
  """Sharding of a batch or trajectory: leading (batch) axis split, other axes replicated.

  By default the batch is split over both 'data' and 'fsdp' (as FSDP requires: devices that
  share a parameter shard still work on different samples), so the global batch must be a
  multiple of ``mesh.size``. Pass ``batch_axes=('data',)`` to split over 'data' only.
  Trajectories must put the batch axis first (e.g. (B, T, H, W, C)).

  Args:
    mesh: the ('data', 'fsdp') mesh.
    batch_axes: mesh axes the leading axis is split over.

  Returns:
    ``NamedSharding(mesh, P(batch_axes))``.
  """
  unknown = [a for a in batch_axes if a not in mesh.axis_names]
  if unknown or not batch_axes:
    raise ParallelError(
        f"batch_axes={tuple(batch_axes)}: expected a non-empty subset of {mesh.axis_names}.")
  return NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))


# --------------------------------------------------------------------------------------------
# Parameter and optimizer-state shardings
# --------------------------------------------------------------------------------------------


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path: Sequence[Any]) -> Tuple[str, ...]:
  """Names of a pytree key path, e.g. (DictKey('params'), DictKey('conv')) -> ('params', 'conv')."""
  return tuple(_key_name(k) for k in path)


def path_string(path: Sequence[Any]) -> str:
  """'/'-joined names of a pytree key path: the string that sharding-rule regexes match."""
  return "/".join(path_names(path))


@dataclasses.dataclass(frozen=True)
class ShardLargestDivisibleAxis:
  """Spec function: shard a large array over one mesh axis on its largest divisible dimension.

  Attributes:
    min_size: arrays with fewer elements than this are replicated.
    mesh_axis: the mesh axis to shard over (default 'fsdp').
  """

  min_size: int
  mesh_axis: str = FSDP_AXIS

  def __call__(self, shape: Tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Returns the spec for an array of ``shape`` on ``mesh`` (replicated when nothing fits)."""
    axis_size = mesh.shape.get(self.mesh_axis, 1)
    if axis_size == 1 or math.prod(shape) < self.min_size:
      return PartitionSpec()
    # Largest dimension first; among equal sizes the last one (output features for kernels).
    order = sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True)
    for dim in order:
      if shape[dim] % axis_size == 0:
        spec = [None] * len(shape)
        spec[dim] = self.mesh_axis
        return PartitionSpec(*spec)
    return PartitionSpec()


def default_sharding_rules(min_size: int = 2 ** 18) -> list:
  """The default rules: large conv/dense kernels and embeddings over 'fsdp', the rest replicated.

  Args:
    min_size: kernels with fewer elements than this stay replicated (default 262,144 elements,
      1 MiB in float32: smaller ones cost more in all-gathers than they save).

  Returns:
    [(regex, spec or spec function), ...]: kernels/embeddings (path ending in 'kernel' or
    'embedding') get :class:`ShardLargestDivisibleAxis`; everything else ``P()``.
  """
  return [
      (r"(^|/)(kernel|embedding)$", ShardLargestDivisibleAxis(min_size)),
      (r".*", PartitionSpec()),
  ]


def _check_spec(spec: PartitionSpec, shape: Tuple[int, ...], mesh: Mesh, path: str) -> None:
  if len(spec) > len(shape):
    raise ParallelError(
        f"Sharding rule gives {spec} for {path!r} of shape {shape}: the spec has more entries "
        f"({len(spec)}) than the array has dimensions ({len(shape)}).")
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    axes = axes if isinstance(axes, tuple) else (axes,)
    for a in axes:
      if a not in mesh.axis_names:
        raise ParallelError(f"Spec {spec} for {path!r} names mesh axis {a!r}; the mesh has "
                            f"{mesh.axis_names}.")
    size = math.prod(mesh.shape[a] for a in axes)
    if shape[dim] % size:
      raise ParallelError(
          f"Spec {spec} for {path!r} splits dimension {dim} of size {shape[dim]} over {axes} "
          f"({size} devices): the dimension must be a multiple of {size}.")


def spec_for(path: str, shape: Tuple[int, ...], mesh: Mesh, rules: ShardingRules) -> PartitionSpec:
  """The partition spec the first matching rule gives to one array.

  Args:
    path: '/'-joined parameter path, e.g. 'params/down_blocks_0/conv1/kernel'.
    shape: the array's shape.
    mesh: the mesh.
    rules: [(regex searched in ``path``, PartitionSpec or SpecFn)], first match wins.

  Returns:
    The PartitionSpec (checked against the shape and the mesh).

  Raises:
    ParallelError: no rule matches, or the spec does not fit the shape/mesh.
  """
  for pattern, spec in rules:
    if re.search(pattern, path):
      spec = spec(tuple(shape), mesh) if callable(spec) else spec
      if not isinstance(spec, PartitionSpec):
        raise ParallelError(f"Rule {pattern!r} gave {spec!r} for {path!r}: expected a "
                            "PartitionSpec.")
      _check_spec(spec, tuple(shape), mesh, path)
      return spec
  raise ParallelError(f"No sharding rule matches {path!r}; add a catch-all rule ('.*', P()).")


def param_shardings(params: PyTree, mesh: Mesh, rules: Optional[ShardingRules] = None) -> PyTree:
  """A tree of NamedSharding for a parameter tree, from path-regex rules.

  Args:
    params: parameter tree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``;
      nothing is allocated).
    mesh: the ('data', 'fsdp') mesh, or a ``jax.sharding.AbstractMesh`` of the target shape
      (no devices needed: plan a pod slice's layout on a laptop).
    rules: sharding rules (default :func:`default_sharding_rules`).

  Returns:
    A tree with the structure of ``params`` whose leaves are ``NamedSharding``.
  """
  rules = default_sharding_rules() if rules is None else rules
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, spec_for(path_string(p), np.shape(x), mesh, rules)),
      params)


def mirror_param_shardings(tree: PyTree, params: PyTree, shardings: PyTree,
                           mesh: Mesh) -> PyTree:
  """Shardings for a tree that holds copies of parameters (optimizer state, a train state).

  A leaf whose key path ends with a parameter's key path and has that parameter's shape gets
  the parameter's sharding (the longest matching suffix wins); every other leaf (step counts,
  scalars, factored statistics) is replicated. This covers optax.adamw, chains, ``masked`` and
  ``multi_transform`` (frozen parameters have no state there, so nothing to match).

  Args:
    tree: arrays or ShapeDtypeStructs, e.g. ``jax.eval_shape(tx.init, params)``.
    params: the parameter tree (arrays or ShapeDtypeStructs).
    shardings: ``param_shardings(params, ...)``, same structure as ``params``.
    mesh: the mesh (for the replicated leaves).

  Returns:
    A tree with the structure of ``tree`` whose leaves are ``NamedSharding``.
  """
  by_path = {}
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if len(flat_params) != len(flat_shardings):
    raise ParallelError(f"params has {len(flat_params)} leaves but shardings has "
                        f"{len(flat_shardings)}: expected the tree from param_shardings(params).")
  for (path, leaf), sharding in zip(flat_params, flat_shardings):
    by_path[path_names(path)] = (tuple(np.shape(leaf)), sharding)
  full = replicated(mesh)

  def sharding_of(path, leaf):
    names = path_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[0] == tuple(np.shape(leaf)):
        return hit[1]
    return full

  return jax.tree_util.tree_map_with_path(sharding_of, tree)


def opt_state_shardings(opt_state: PyTree, params: PyTree, shardings: PyTree,
                        mesh: Mesh) -> PyTree:
  """Shardings of an optax state: moments follow their parameter, counts are replicated.

  Args:
    opt_state: ``tx.init(params)`` or ``jax.eval_shape(tx.init, params)``.
    params: the parameter tree (arrays or ShapeDtypeStructs).
    shardings: ``param_shardings(params, mesh, rules)``.
    mesh: the mesh.

  Returns:
    A tree with the structure of ``opt_state`` whose leaves are ``NamedSharding``.
  """
  return mirror_param_shardings(opt_state, params, shardings, mesh)


def shard_params(params: PyTree, shardings: PyTree) -> PyTree:
  """Places a tree that every process holds whole (params, optimizer state) on the mesh.

  Each leaf becomes a global ``jax.Array`` built by ``jax.make_array_from_callback`` from a
  host copy: every process copies its own shards and, unlike ``jax.device_put`` of host data
  on several processes, no cross-process equality check runs (one collective per leaf).
  Leaves that are already global arrays spanning other processes, and typed PRNG keys, are
  placed with ``jax.device_put`` of a copy. The result never aliases an input ``jax.Array``
  (``device_put`` may reuse the input buffer for one shard, and donating the result to a
  jitted step with ``donate_argnums`` would then delete the caller's array). Leaves are
  placed one at a time, so the extra memory is one leaf.

  Args:
    params: tree of host or device arrays, identical on every process.
    shardings: tree of NamedSharding with the same structure.

  Returns:
    The tree of global ``jax.Array``s, each laid out as its sharding says.
  """
  def place(x, sharding):
    if isinstance(x, jax.Array) and (not x.is_fully_addressable or
                                     jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)):
      return jax.device_put(x.copy(), sharding)
    host = np.array(x) if isinstance(x, jax.Array) else np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(place, params, shardings)


def global_batch_from_process_local(batch: PyTree, mesh: Mesh,
                                    sharding: Optional[NamedSharding] = None) -> PyTree:
  """Assembles global arrays from the rows each process loaded.

  Each process passes its own slice of the global batch (leading axis, equal size on every
  process); the result is a tree of global ``jax.Array`` of leading size
  ``local_rows * process_count`` sharded as ``sharding``. On one process this is a device_put.

  Args:
    batch: tree of numpy/jax arrays with the per-process batch first, e.g. (B_local, H, W, C).
    mesh: the ('data', 'fsdp') mesh.
    sharding: target sharding (default :func:`batch_sharding` of ``mesh``).

  Returns:
    A tree of global arrays with leading size B_local * jax.process_count().

  Raises:
    ParallelError: a leaf is a scalar, or its local rows do not split over this process's
      devices along the batch axes.
  """
  sharding = batch_sharding(mesh) if sharding is None else sharding

  def make_global(path, x):
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    if x.ndim == 0:
      raise ParallelError(f"Batch leaf {path_string(path)!r} is a scalar: expected a leading "
                          "batch axis.")
    try:
      return jax.make_array_from_process_local_data(sharding, x)
    except ValueError as e:
      raise ParallelError(
          f"Batch leaf {path_string(path)!r} of local shape {x.shape} does not split as "
          f"{sharding.spec} over mesh {dict(mesh.shape)} with {jax.process_count()} "
          f"process(es): {e}") from e

  return jax.tree_util.tree_map_with_path(make_global, batch)


# --------------------------------------------------------------------------------------------
# Multi-process start-up
# --------------------------------------------------------------------------------------------


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
