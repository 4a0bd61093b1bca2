#!/bin/bash
# The sd15 rows of benchmarks/README.md in one run on a leased GPU (H100/H200): ours in
# bfloat16 vs diffusers PyTorch bf16 (SDPA), MFU against a measured bf16 peak.
#
#   bash benchmarks/gpu_sd15.sh [deadline_s]
#
# Expects the machine's python3 to hold jax (CUDA), flax, optax and torch; diffusers and
# importlib_metadata may travel as wheels in .whl/ (installed to /tmp/site). Writes the log
# to $OUT (or /tmp/bench_out). Cases run in order of importance; once deadline_s (default
# 330) seconds have passed the remaining ones print as skipped. BENCH_CONFIG / BENCH_STEPS
# (default sd15 / 50) exist to dry-run the script on a CPU (BENCH_CONFIG=tiny).
set -o pipefail
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
DEADLINE=${1:-330}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# PyTorch's side of every case runs first and its model is freed before ours starts
# (--torch_first), so JAX's pool may grow on demand. (XLA_PYTHON_CLIENT_ALLOCATOR=platform
# broke XLA's CUDA-graph capture here: "operation not permitted when stream is capturing".)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 - <<'PY' || exit 1
import diffusers, flax, jax, optax, torch
print(f"jax {jax.__version__} flax {flax.__version__} optax {optax.__version__} "
      f"torch {torch.__version__} diffusers {diffusers.__version__} devices {jax.devices()}")
PY
  # cuDNN flash attention at the sd15 self-attention shapes (head dims 40 and 160), forward
  # and gradient, against XLA's attention; fall back to XLA if it is refused. The UNet's
  # cross-attention (77 keys, odd) always uses XLA's (attention_ops.cudnn_accepts).
  ATTENTION=$(python3 - <<'PY'
import jax, jax.numpy as jnp
def check(q_len, kv_len, heads, dim):
  keys = jax.random.split(jax.random.PRNGKey(q_len + dim), 3)
  q = jax.random.normal(keys[0], (2, q_len, heads, dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (2, kv_len, heads, dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (2, kv_len, heads, dim), jnp.bfloat16)
  def loss(q, k, v, impl):
    out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    return jnp.sum(out.astype(jnp.float32) ** 2), out
  grads = {}
  for impl in ("cudnn", "xla"):
    grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True),
                          static_argnums=3)(q, k, v, impl)
  for a, b in zip(jax.tree_util.tree_leaves(grads["cudnn"]),
                  jax.tree_util.tree_leaves(grads["xla"])):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert rel < 5e-2, (q_len, kv_len, dim, rel)
try:
  for shape in ((4096, 4096, 8, 40), (1024, 1024, 8, 80), (64, 64, 8, 160)):
    check(*shape)
  print("cudnn")
except Exception as error:  # refused or wrong: use XLA's attention
  import sys
  print(f"cudnn attention unusable: {error}"[:400], file=sys.stderr)
  print("xla")
PY
)
  echo "attention implementation: $ATTENTION"
  python3 -m benchmarks.run --config="${BENCH_CONFIG:-sd15}" --dtype=bfloat16 \
    --torch_dtype=bfloat16 --attention="$ATTENTION" --peak_tflops=790 \
    --steps="${BENCH_STEPS:-50}" --edits=4 --reps=3 \
    --cases=forward@12,trajectory,ppo,backward@12,forward@1,forward@3,backward@3,backward@1 \
    --torch_first --keep_going --deadline_s="$DEADLINE"
} 2>&1 | grep --line-buffered -v -e "Casting directly with" -e "^\s*warnings.warn" \
  | tee "$OUT/sd15.log"
