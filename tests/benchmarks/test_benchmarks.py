"""Smoke tests of the benchmarks (tiny config only; never a timed assertion)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import configs, run, torch_reference
from rl4pix_jax.diffusion import ddim
from tests.helpers.paths import REPO_ROOT

ROOT = REPO_ROOT


def _run(*flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--config=tiny", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_tiny_run_prints_side_by_side_rows():
  out = _run("--cases=forward,trajectory", "--batches=1", "--steps=2", "--edits=1", "--reps=1")
  rows = [line for line in out.splitlines() if line.startswith("| UNet") or
          line.startswith("| trajectory")]
  assert len(rows) == 2, out
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].endswith(("ms", "images/s)")) and cells[3] != "-", row  # both sides ran
    assert cells[4].endswith("x"), row
  assert "images/s" in rows[1]


def test_tiny_torch_first_fills_both_sides_and_notes_the_difference():
  out = _run("--cases=forward@2,ppo", "--steps=2", "--edits=1", "--reps=1", "--torch_first",
             "--peak_tflops=1")
  assert "PyTorch UNet forward batch 2:" in out, out
  rows = [line for line in out.splitlines() if line.startswith(("| UNet", "| PPO"))]
  assert len(rows) == 2, out
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] != "-" and cells[3] != "-" and cells[4].endswith("x"), row
    assert cells[6].endswith("%") and cells[7].endswith("%"), row
  assert "UNet forward batch 2: ||ours - PyTorch|| / ||PyTorch|| = " in out, out


def test_tiny_trace_only_lowers_every_case():
  out = _run("--trace_only", "--steps=2", "--edits=1")
  for name in ("UNet forward", "UNet forward+backward", "trajectory", "PPO update"):
    assert f"{name}: lowered OK" in out, out


def test_torch_log_prob_matches_ours():
  """The PyTorch reference's DDPO log-prob equals rl4pix_jax.diffusion.ddim.ddim_step's re-score."""
  steps = 10
  config = ddim.default_scheduler_config()
  scheduler = torch_reference.make_scheduler(config, steps)
  schedule = ddim.DDIMSchedule.from_config(config)
  rng = np.random.default_rng(0)
  x, eps, prev = (rng.standard_normal((2, 4, 4, 4)).astype(np.float32) for _ in range(3))
  for t in (int(scheduler.timesteps[0]), int(scheduler.timesteps[-1])):
    prev_t = t - schedule.step_ratio(steps)
    _, ours = ddim.ddim_step(schedule, jnp.asarray(eps), t, prev_t, jnp.asarray(x), 1.0,
                             prev_sample=jnp.asarray(prev))
    to_t = lambda a: torch.from_numpy(np.moveaxis(a, -1, 1).copy())
    ref = torch_reference.ddim_log_prob(scheduler, to_t(eps), t, to_t(x), to_t(prev))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-4, atol=1e-4)


def test_row_ratio_and_mfu():
  row = run.Row("case", 3, ours_s=0.5, torch_s=1.0, first_s=2.0, unit_per_s="images/s",
                units=3, flops=1e12)
  cells = [c.strip() for c in row.markdown(peak_tflops=4.0).strip("|").split("|")]
  assert cells[2] == "500.0 ms (6.00 images/s)"
  assert cells[4] == "2.00x"
  assert cells[6] == "50.0%"  # 1e12 FLOP / 0.5 s / 4e12 FLOP/s
  assert cells[7] == "25.0%"  # the same FLOPs in PyTorch's 1.0 s
  one_side = run.Row("case", 3, ours_s=None, torch_s=1.0, first_s=None)
  cells = [c.strip() for c in one_side.markdown(peak_tflops=None).strip("|").split("|")]
  assert cells[2] == "-" and cells[4] == "-" and cells[5] == "-"


def test_median_seconds_calls_reps_times():
  calls = []
  assert run.median_seconds(lambda: calls.append(1), 5) >= 0.0
  assert len(calls) == 5


def test_hlo_flops_of_a_matmul():
  a = jnp.ones((8, 16), jnp.float32)
  b = jnp.ones((16, 4), jnp.float32)
  flops = run.hlo_flops(jax.jit(jnp.matmul), a, b)
  if flops is None:
    pytest.skip(f"the {jax.default_backend()} backend of jaxlib {jax.__version__} reports no "
                "cost analysis, lowered or compiled (runs wherever XLA reports 'flops')")
  assert flops == pytest.approx(2 * 8 * 16 * 4, rel=0.1)


def test_hlo_flops_accepts_abstract_inputs():
  spec = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  flops = run.hlo_flops(jax.jit(jnp.matmul), spec, jax.ShapeDtypeStruct((16, 4), jnp.float32))
  if flops is None:
    pytest.skip(f"the {jax.default_backend()} backend of jaxlib {jax.__version__} reports no "
                "cost analysis, lowered or compiled (runs wherever XLA reports 'flops')")
  assert flops == pytest.approx(2 * 8 * 16 * 4, rel=0.1)


def test_flops_of_reads_either_form_of_a_cost_analysis():
  assert run._flops_of({"flops": 12.0}) == 12.0  # pylint: disable=protected-access
  assert run._flops_of([{"flops": 3.0}]) == 3.0  # pylint: disable=protected-access
  for empty in (None, [], {}, {"flops": 0.0}, {"flops": -1.0}):  # -1: XLA's "unknown"
    assert run._flops_of(empty) is None  # pylint: disable=protected-access


def test_parse_cases_orders_and_expands():
  assert run.parse_cases(["trajectory", "forward@12", "backward", "ppo"], ["1", "3"]) == [
      ("trajectory", None), ("forward", 12), ("backward", 1), ("backward", 3), ("ppo", None)]
  with pytest.raises(ValueError, match="unknown case 'fwd'"):
    run.parse_cases(["fwd"], ["1"])
  with pytest.raises(ValueError, match="only forward and backward take @"):
    run.parse_cases(["ppo@4"], ["1"])


def test_attention_config_takes_the_run_config_numbers_and_the_flag():
  from configs import shapes  # pylint: disable=import-outside-toplevel
  model = shapes.get_config().model
  default = configs.attention_config()
  assert default.kind == model.attention == "auto"
  assert (default.flash_min_tokens, default.chunk_queries, default.flash_block) == (
      model.attention_flash_min_tokens, model.attention_chunk_queries,
      model.attention_flash_block)
  assert default.platform is None
  picked = configs.attention_config("chunked", 64, platform="tpu")
  assert (picked.kind, picked.chunk_queries, picked.platform) == ("chunked", 64, "tpu")
  with pytest.raises(ValueError, match="must be one of auto, xla"):
    configs.attention_config("flash")


MEMORY_PLAN_CHECK = """
from benchmarks import configs, memory_plan
seen = []
class Stop(Exception):
  pass
def capture(unet, *args, **kwargs):
  seen.append(unet.attention.kind)
  raise Stop()
memory_plan.ppo.make_train_step = capture
for attention in (None, configs.attention_config("chunked", platform="cpu")):
  try:
    memory_plan.plan_variant(configs.BENCHMARK_CONFIGS["tiny"], memory_plan.VARIANTS[0],
                             [1, 2], 2, log=lambda _: None, attention=attention)
  except Stop:
    pass
print(seen)
"""


def test_memory_plan_builds_the_unet_with_the_attention_setting():
  """plan_variant hands its ``attention`` to the UNet it compiles (XLA's when not given);
  stopped at make_train_step, before any compile. In a subprocess: memory_plan and run
  define the same absl flags."""
  result = subprocess.run([sys.executable, "-c", MEMORY_PLAN_CHECK], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "['xla', 'chunked']"


def test_host_line_names_model_cores_and_isa_flags():
  from benchmarks import host  # pylint: disable=import-outside-toplevel
  text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
          "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_fp16 amx_tile "
          "amx_bf16\nprocessor\t: 1\nmodel name\t: other\n")
  model, flags = host.parse_cpuinfo(text)
  assert model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
  assert flags == ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16",
                   "amx_tile", "amx_bf16")
  assert host.describe(text, cores=2) == (
      "host: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, 2 cores, ISA: avx2 fma avx512f "
      "avx512bw avx512_bf16 avx512_fp16 amx_tile amx_bf16")
  assert host.describe().startswith("host: ")  # this machine
