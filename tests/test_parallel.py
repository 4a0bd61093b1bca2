"""Tests of rl4pix_jax.parallel: mesh, sharding rules, global batches (1 and 2 processes).

Rules are checked in-process on an AbstractMesh (no devices needed); real sharding runs in
subprocesses with 8 forced CPU devices and with two processes on localhost.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from rl4pix_jax import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_4x2 = AbstractMesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def _tiny_params():
  """Abstract params: one large conv kernel, one large dense kernel, small ones, biases."""
  f32 = jnp.float32
  return {"params": {
      "conv_in": {"kernel": jax.ShapeDtypeStruct((3, 3, 8, 32), f32),
                  "bias": jax.ShapeDtypeStruct((32,), f32)},
      "proj": {"kernel": jax.ShapeDtypeStruct((96, 64), f32),
               "bias": jax.ShapeDtypeStruct((64,), f32)},
      "small": {"kernel": jax.ShapeDtypeStruct((4, 4), f32)},
      "odd": {"kernel": jax.ShapeDtypeStruct((33, 35), f32)},
      "norm": {"scale": jax.ShapeDtypeStruct((4096,), f32)},
  }}


# ------------------------------------------------------------------------------ mesh


@pytest.mark.parametrize("data,fsdp,count,expected", [
    (-1, 1, 8, (8, 1)), (-1, 2, 8, (4, 2)), (4, -1, 8, (4, 2)), (2, 4, 8, (2, 4)),
    (1, 1, 1, (1, 1)), (-1, 1, 1, (1, 1))])
def test_resolve_mesh_shape(data, fsdp, count, expected):
  assert parallel.resolve_mesh_shape(data, fsdp, count) == expected


@pytest.mark.parametrize("data,fsdp,count,message", [
    (3, 2, 8, "3 x mesh.fsdp=2 = 6 devices, but there are 8"),
    (-1, 3, 8, "mesh.fsdp=3 does not divide the 8 devices"),
    (-1, -1, 8, "both -1"),
    (0, 1, 8, "mesh.data=0"),
    (2, -2, 8, "mesh.fsdp=-2")])
def test_resolve_mesh_shape_errors(data, fsdp, count, message):
  with pytest.raises(parallel.ParallelError, match=message):
    parallel.resolve_mesh_shape(data, fsdp, count)


def test_make_mesh_uses_auto_axes_on_all_devices():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data", "fsdp")
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(parallel.ParallelError, match="there are 1"):
    parallel.make_mesh(2, 1)


def test_make_mesh_from_config():
  mesh = parallel.make_mesh_from_config(parallel.MeshConfig(data=-1, fsdp=1))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
  mesh = parallel.make_mesh_from_config(types.SimpleNamespace(data=1, fsdp=-1),
                                        devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
  with pytest.raises(parallel.ParallelError, match=r"lacks \['fsdp'\]"):
    parallel.make_mesh_from_config(types.SimpleNamespace(data=1))


def test_replicated_and_batch_sharding():
  mesh = parallel.make_mesh()
  assert parallel.replicated(mesh).spec == P()
  assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert parallel.batch_sharding(mesh, ("data",)).spec == P(("data",))
  with pytest.raises(parallel.ParallelError, match="subset of"):
    parallel.batch_sharding(mesh, ("model",))


# ------------------------------------------------------------------------------ rules


def test_path_names_and_string():
  path = jax.tree_util.tree_flatten_with_path({"params": {"conv": {"kernel": 1}}})[0][0][0]
  assert parallel.path_names(path) == ("params", "conv", "kernel")
  assert parallel.path_string(path) == "params/conv/kernel"
  seq_path = jax.tree_util.tree_flatten_with_path([0, (1, 2)])[0][2][0]
  assert parallel.path_string(seq_path) == "1/1"


def test_shard_largest_divisible_axis():
  rule = parallel.ShardLargestDivisibleAxis(min_size=1000)
  assert rule((3, 3, 8, 32), MESH_4x2) == P(None, None, None, "fsdp")
  assert rule((96, 64), MESH_4x2) == P("fsdp", None)
  assert rule((33, 64), MESH_4x2) == P(None, "fsdp")  # 64 is the largest and divisible.
  assert rule((35, 33), MESH_4x2) == P()  # no dimension divisible by 2
  assert rule((10, 10), MESH_4x2) == P()  # smaller than min_size
  assert rule((64, 64), MESH_4x2) == P(None, "fsdp")  # ties: the last (output) dimension
  mesh_1x1 = AbstractMesh((8, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  assert rule((96, 64), mesh_1x1) == P()


def test_default_rules_shard_large_kernels_only():
  shardings = parallel.param_shardings(_tiny_params(), MESH_4x2,
                                       parallel.default_sharding_rules(min_size=1000))
  specs = jax.tree.map(lambda s: s.spec, shardings["params"])
  assert specs["conv_in"]["kernel"] == P(None, None, None, "fsdp")
  assert specs["proj"]["kernel"] == P("fsdp", None)
  assert specs["small"]["kernel"] == P()
  assert specs["odd"]["kernel"] == P()
  assert specs["norm"]["scale"] == P()  # large, but not a kernel
  assert specs["conv_in"]["bias"] == P()
  assert all(s.mesh is MESH_4x2 for s in jax.tree.leaves(shardings))


def test_spec_for_first_rule_wins_and_errors():
  rules = [(r"proj/kernel$", P(None, "fsdp")), (r"kernel$", P("data")), (r".*", P())]
  assert parallel.spec_for("params/proj/kernel", (96, 64), MESH_4x2, rules) == P(None, "fsdp")
  assert parallel.spec_for("params/x/kernel", (8, 3), MESH_4x2, rules) == P("data")
  assert parallel.spec_for("params/x/bias", (3,), MESH_4x2, rules) == P()
  with pytest.raises(parallel.ParallelError, match="dimension 0 of size 6 .* multiple of 4"):
    parallel.spec_for("params/x/kernel", (6, 3), MESH_4x2, rules)
  with pytest.raises(parallel.ParallelError, match="more entries"):
    parallel.spec_for("a/kernel", (8,), MESH_4x2, [(r".*", P("data", None))])
  with pytest.raises(parallel.ParallelError, match="names mesh axis 'model'"):
    parallel.spec_for("a/kernel", (8,), MESH_4x2, [(r".*", P("model"))])
  with pytest.raises(parallel.ParallelError, match="No sharding rule matches 'a/bias'"):
    parallel.spec_for("a/bias", (8,), MESH_4x2, [(r"kernel$", P())])
  with pytest.raises(parallel.ParallelError, match="expected a PartitionSpec"):
    parallel.spec_for("a/bias", (8,), MESH_4x2, [(r".*", lambda shape, mesh: "data")])


def _state_specs(tx, params, rules):
  shardings = parallel.param_shardings(params, MESH_4x2, rules)
  state = jax.eval_shape(tx.init, params)
  state_shardings = parallel.opt_state_shardings(state, params, shardings, MESH_4x2)
  flat = jax.tree_util.tree_flatten_with_path(state_shardings)[0]
  return {parallel.path_string(p): s.spec for p, s in flat}


def test_opt_state_shardings_adamw_and_chain():
  params = _tiny_params()
  rules = parallel.default_sharding_rules(min_size=1000)
  for tx in (optax.adamw(1e-3), optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))):
    specs = _state_specs(tx, params, rules)
    moments = [k for k in specs if k.endswith("params/proj/kernel")]
    assert len(moments) == 2, specs  # mu and nu
    assert all(specs[k] == P("fsdp", None) for k in moments)
    conv = [k for k in specs if k.endswith("conv_in/kernel")]
    assert all(specs[k] == P(None, None, None, "fsdp") for k in conv)
    counts = [k for k in specs if k.endswith("count")]
    assert counts and all(specs[k] == P() for k in counts)
    assert all(specs[k] == P() for k in specs if k.endswith("bias"))


def test_opt_state_shardings_masked_and_multi_transform():
  params = _tiny_params()
  rules = parallel.default_sharding_rules(min_size=1000)
  trainable = lambda tree: jax.tree_util.tree_map_with_path(  # pylint: disable=g-long-lambda
      lambda p, _: "proj" in parallel.path_string(p), tree)
  masked = optax.masked(optax.adamw(1e-3), trainable)
  specs = _state_specs(masked, params, rules)
  assert not any("conv_in" in k for k in specs)  # frozen params: no optimizer state
  assert specs and all(specs[k] == P("fsdp", None) for k in specs if k.endswith("proj/kernel"))
  labels = lambda tree: jax.tree.map(  # pylint: disable=g-long-lambda
      lambda b: "train" if b else "frozen", trainable(tree))
  multi = optax.multi_transform({"train": optax.adamw(1e-3), "frozen": optax.set_to_zero()},
                                labels)
  specs = _state_specs(multi, params, rules)
  kernel_moments = [k for k in specs if k.endswith("proj/kernel")]
  assert len(kernel_moments) == 2 and all(specs[k] == P("fsdp", None) for k in kernel_moments)
  assert not any("conv_in" in k for k in specs)


def test_mirror_param_shardings_train_state_and_shape_mismatch():
  params = _tiny_params()
  shardings = parallel.param_shardings(params, MESH_4x2, parallel.default_sharding_rules(1000))
  state = {"params": params, "step": jax.ShapeDtypeStruct((), jnp.int32),
           "stats": {"params": {"proj": {"kernel": jax.ShapeDtypeStruct((96,), jnp.float32)}}}}
  mirrored = parallel.mirror_param_shardings(state, params, shardings, MESH_4x2)
  assert mirrored["params"]["params"]["proj"]["kernel"].spec == P("fsdp", None)
  assert mirrored["step"].spec == P()
  assert mirrored["stats"]["params"]["proj"]["kernel"].spec == P()  # factored: other shape
  with pytest.raises(parallel.ParallelError, match="leaves"):
    parallel.mirror_param_shardings(state, params, {"x": shardings["params"]["proj"]}, MESH_4x2)


# ------------------------------------------------------------------------------ arrays


def test_shard_params_places_every_leaf_kind_without_aliasing():
  """Host arrays, device arrays (bfloat16 too), raw and typed PRNG keys, Python scalars."""
  mesh = parallel.make_mesh()
  tree = {"host": np.ones((2, 4), np.float32),
          "bf16": jnp.arange(8, dtype=jnp.bfloat16).reshape(2, 4),
          "raw_key": jax.random.PRNGKey(3), "typed_key": jax.random.key(3), "step": 5}
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), tree)
  placed = parallel.shard_params(tree, shardings)
  for name in ("host", "bf16", "raw_key"):
    np.testing.assert_array_equal(placed[name], tree[name], err_msg=name)
    assert placed[name].dtype == jnp.asarray(tree[name]).dtype, name
  assert jax.random.key_data(placed["typed_key"]).tolist() == jax.random.key_data(
      tree["typed_key"]).tolist()
  assert int(placed["step"]) == 5
  assert all(leaf.sharding == parallel.replicated(mesh) for leaf in jax.tree.leaves(placed))
  jax.jit(lambda t: jax.tree.map(lambda x: x, t), donate_argnums=0)(
      {k: placed[k] for k in ("bf16", "raw_key")})
  np.testing.assert_array_equal(tree["bf16"], np.arange(8).reshape(2, 4))  # inputs intact


def test_shard_params_and_global_batch_on_one_device():
  mesh = parallel.make_mesh()
  params = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
  placed = parallel.shard_params(params, {"w": parallel.replicated(mesh)})
  assert isinstance(placed["w"], jax.Array)
  np.testing.assert_array_equal(placed["w"], params["w"])
  assert placed["w"].sharding == parallel.replicated(mesh)
  on_device = jax.device_put(params, parallel.replicated(mesh))
  copy = parallel.shard_params(on_device, {"w": parallel.replicated(mesh)})
  jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(copy)
  np.testing.assert_array_equal(on_device["w"], params["w"])  # donation did not reach the input
  batch = {"image": np.ones((4, 2, 2, 3), np.float32), "ids": np.arange(4)}
  global_batch = parallel.global_batch_from_process_local(batch, mesh)
  assert global_batch["image"].shape == (4, 2, 2, 3)
  assert global_batch["ids"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(global_batch["ids"], np.arange(4))
  with pytest.raises(parallel.ParallelError, match="'step' is a scalar"):
    parallel.global_batch_from_process_local({"step": np.int32(3)}, mesh)


def test_describe_placement_on_one_device():
  placed = parallel.shard_params({"w": np.zeros((2, 3), np.float32), "b": np.zeros(300, np.int8)},
                                 {"w": parallel.replicated(parallel.make_mesh()),
                                  "b": parallel.replicated(parallel.make_mesh())})
  assert parallel.describe_placement(placed) == (
      "2 arrays, 0 sharded (0% of 324 B); 324 B on device 0")
  assert parallel.describe_placement({}) == "0 arrays, 0 sharded (0% of 0 B); 0 B on device 0"


# ------------------------------------------------------------------------------ subprocesses


def _run_python(script, env_extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **env_extra)
  return subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=240):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f"subprocess failed:\n{err[-4000:]}"
  return json.loads(out.strip().splitlines()[-1])


_EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    import flax.linen as nn
    from rl4pix_jax import parallel
    jax.config.update("jax_default_matmul_precision", "highest")

    class Tiny(nn.Module):
      @nn.compact
      def __call__(self, x):                      # x: (B, 8, 8, 4)
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)             # (B, 1024)
        x = nn.relu(nn.Dense(32, name="hidden")(x))   # kernel (1024, 32): sharded
        return nn.Dense(1, name="out")(x)[:, 0]       # kernel (32, 1): replicated

    model = Tiny()
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 4)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(16,)).astype(np.float32)
    params = model.init(jax.random.key(0), x[:1])
    # eps=1, not optax's 1e-8: AdamW's first steps are then lr * g / (|g| + 1), smooth in g.
    # With eps=1e-8 they are ~lr * sign(g), and a gradient entry that is ~0 up to rounding
    # can flip sign between the 8-device and 1-device reduction orders and move a param by
    # up to 2 lr per step, how often depending on the host's rounding (tests/test_scale_out.py).
    tx = optax.adamw(1e-2, eps=1.0)

    def loss_fn(p, x, y):
      return jnp.mean((model.apply(p, x) - y) ** 2)

    def step(p, s, x, y):
      g = jax.grad(loss_fn)(p, x, y)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    def run(mesh):
      abstract = jax.eval_shape(model.init, jax.random.key(0), x[:1])
      shardings = parallel.param_shardings(abstract, mesh,
                                           parallel.default_sharding_rules(min_size=500))
      s_shardings = parallel.opt_state_shardings(jax.eval_shape(tx.init, abstract), abstract,
                                                 shardings, mesh)
      p = parallel.shard_params(params, shardings)
      s = parallel.shard_params(tx.init(params), s_shardings)
      batch = parallel.global_batch_from_process_local({"x": x, "y": y}, mesh)
      data = parallel.batch_sharding(mesh)
      f = jax.jit(step, in_shardings=(shardings, s_shardings, data, data),
                  out_shardings=(shardings, s_shardings), donate_argnums=(0, 1))
      for _ in range(3):
        p, s = f(p, s, batch["x"], batch["y"])
      return p, s, batch

    p8, s8, batch8 = run(parallel.make_mesh(data=4, fsdp=2))
    try:
      parallel.global_batch_from_process_local({"x": x[:6]}, parallel.make_mesh(4, 2))
      uneven_error = ""
    except parallel.ParallelError as e:
      uneven_error = str(e)
    p1, _, _ = run(parallel.make_mesh(1, 1, devices=jax.devices()[:1]))
    k = p8["params"]["hidden"]["kernel"]
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
               zip(jax.tree.leaves(p8), jax.tree.leaves(p1)))
    print(json.dumps({
        "devices": jax.device_count(),
        "dense_spec": str(k.sharding.spec),
        "dense_shard_shape": list(k.addressable_shards[0].data.shape),
        "conv_spec": str(p8["params"]["Conv_0"]["kernel"].sharding.spec),
        "mu_spec": str(s8[0].mu["params"]["hidden"]["kernel"].sharding.spec),
        "bias_spec": str(p8["params"]["hidden"]["bias"].sharding.spec),
        "out_spec": str(p8["params"]["out"]["kernel"].sharding.spec),
        "batch_spec": str(batch8["x"].sharding.spec),
        "batch_shard_rows": batch8["x"].addressable_shards[0].data.shape[0],
        "max_abs_diff": diff,
        "uneven_error": uneven_error,
        "max_abs_param": max(float(np.max(np.abs(a))) for a in jax.tree.leaves(p1)),
        "placement": parallel.describe_placement(p8),
    }))
""")


def test_eight_cpu_devices_fsdp_update_matches_one_device():
  proc = _run_python(_EIGHT_DEVICE_SCRIPT,
                     {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  result = _result(proc)
  assert result["devices"] == 8
  assert result["dense_spec"] == str(P("fsdp", None))  # (1024, 32): dim 0 is the largest
  assert result["dense_shard_shape"] == [512, 32]
  assert result["conv_spec"] == str(P(None, None, None, "fsdp"))  # 3*3*4*16 = 576 >= 500
  assert result["mu_spec"] == result["dense_spec"]
  assert result["bias_spec"] == str(P())
  assert result["out_spec"] == str(P())  # 32 elements < 500
  assert result["batch_spec"] == str(P(("data", "fsdp")))
  assert result["batch_shard_rows"] == 2  # 16 rows over 8 devices
  # Same math, other reduction order (the gradient psum over 8 shards, fsdp-split kernels):
  # with the smooth eps=1 updates (see the script) params differ by lr x a few float32 ulps
  # of the gradient plus ~1 ulp of |p| (1.2e-7 |p|). Measured 3.0e-8 (AMD EPYC; 2.2e-7
  # with eps=1e-8). A wrong reduction (the gradient of 8 of the 16 samples, as if shards were
  # dropped) moves params by 6.9e-3: the bound, 1e-5 of the largest param, catches it.
  assert result["max_abs_diff"] < 1e-5 * max(1.0, result["max_abs_param"])
  # By hand: float32 leaves of 576 + 16 + 32768 + 32 + 32 + 1 = 33425 elements (130.6 KiB);
  # the two sharded kernels hold 33344 of them (99.8%); device 0 has half of each sharded
  # kernel plus every replicated leaf: (16672 + 81) x 4 B = 65.4 KiB.
  assert result["placement"] == "6 arrays, 2 sharded (100% of 130.6 KiB); 65.4 KiB on device 0"
  assert result["uneven_error"].startswith("Batch leaf 'x' of local shape (6, 8, 8, 4) does not "
                                           "split as P(('data', 'fsdp'),)")


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from rl4pix_jax import distributed, parallel
    port, pid = sys.argv[1], int(sys.argv[2])
    info = distributed.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    import jax, jax.numpy as jnp
    mesh = parallel.make_mesh()
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)      # the global batch
    local = rows[2 * info.process_index: 2 * info.process_index + 2]
    batch = parallel.global_batch_from_process_local({"x": local}, mesh)
    total = jax.jit(lambda b: jnp.sum(b["x"] * jnp.arange(1, 5, dtype=jnp.float32)[:, None]),
                    out_shardings=parallel.replicated(mesh))(batch)
    print(json.dumps({"process_index": info.process_index, "process_count": info.process_count,
                      "source": info.source, "global_shape": list(batch["x"].shape),
                      "mesh": dict(mesh.shape), "total": float(total)}))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_global_sum():
  port = str(_free_port())
  procs = [subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESS_SCRIPT, port, str(i)],
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO), cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    results = [_result(p, timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  rows = np.arange(12, dtype=np.float32).reshape(4, 3)
  expected = float(np.sum(rows * np.arange(1, 5)[:, None]))
  for i, r in enumerate(results):
    assert r["process_index"] == i and r["process_count"] == 2 and r["source"] == "explicit"
    assert r["global_shape"] == [4, 3]
    assert r["mesh"] == {"data": 2, "fsdp": 1}
    assert r["total"] == expected
