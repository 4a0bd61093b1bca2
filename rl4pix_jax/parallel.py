"""Device mesh, sharding rules and placement: one code path from 1 CPU to a TPU pod.

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

Multi-process start-up (TPU pod slices, several GPU hosts) lives in ``distributed.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# Kernels with fewer elements stay replicated (the default of config.mesh.fsdp_min_size).
DEFAULT_FSDP_MIN_SIZE = 2 ** 18

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


def default_sharding_rules(min_size: int = DEFAULT_FSDP_MIN_SIZE) -> list:
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


def describe_placement(tree: PyTree) -> str:
  """One line on how a placed tree of ``jax.Array``s lies on its devices.

  E.g. ``"412 arrays, 96 sharded (81% of 3.2 GiB); 1.9 GiB on device 0"``: the leaves whose
  sharding splits them, their share of the tree's global bytes, and the bytes that the first
  addressable device holds (its shards of every leaf).
  """
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)]
  total = sum(x.nbytes for x in leaves)
  split = [x for x in leaves if not x.sharding.is_fully_replicated]
  device = jax.local_devices()[0] if leaves else None
  on_device = sum(s.data.nbytes for x in leaves for s in x.addressable_shards
                  if s.device == device)
  share = 100.0 * sum(x.nbytes for x in split) / total if total else 0.0
  return (f"{len(leaves)} arrays, {len(split)} sharded ({share:.0f}% of {_bytes(total)}); "
          f"{_bytes(on_device)} on device {device.id if device else 0}")


def _bytes(count: float) -> str:
  for unit in ("B", "KiB", "MiB"):
    if count < 1024:
      return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
    count /= 1024
  return f"{count:.1f} GiB"


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
