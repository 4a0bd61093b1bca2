"""benchmarks/memory_plan.py --run_config: a run config's sampler and PPO step compiled for a TPU
slice's device count, per-device bytes from XLA's memory analysis.

In a subprocess: the plan needs 8 CPU devices (``jax_num_cpu_devices``, fixed when the backend
starts) and memory_plan defines absl flags that other benchmark modules define too. The
configs/ip2p_magicbrush.py variants are planned with a tiny UNet in place of SD1.5's, at
64 px, so that the three programs compile in seconds: "full" on v5e-8 (sampler and PPO step),
"lora" on v4-8 (PPO step, remat on). The per-device state bytes of the plan are checked against
an independent count: the real train state placed by the trainer's own
``train_state.place_policy`` on the same mesh, measured on device 0.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT as ROOT

PLAN = r"""
import json
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
from benchmarks import configs, memory_plan
from configs import ip2p_magicbrush
from rl4pix_jax import parallel
from rl4pix_jax.rl import train_state

def tiny_config(variant):
  c = ip2p_magicbrush.get_config(variant)
  c.resolution = 64                     # 8x8 latents: the tiny UNet's cross-attention side
  c.sampler.capture_size = 8
  c.sampler.num_steps = 2
  c.train.sample_batch_size = 16
  c.train.train_batch_size = 8
  c.mesh.fsdp_min_size = 256            # the tiny UNet's kernels are small: shard them too
  c.model.dtype = "float32"
  return c

tiny = configs.BENCHMARK_CONFIGS["tiny"]["unet"]
slices = {s.name: s for s in memory_plan.SLICES}
out = {}
# Three compiles: full on v5e-8 (sampler and step), LoRA's step on v4-8 (remat on); then
# full's NFT step on v5e-8.
for variant, slice_name, remat, with_sampler in (("full", "v5e-8", False, True),
                                                 ("lora", "v4-8", True, False)):
  config = tiny_config(variant)
  slice_ = slices[slice_name]
  rows = [memory_plan.plan_run_config(config, slice_, remat, with_sampler=with_sampler,
                                      log=lambda _: None, unet_spec=tiny)]
  # Independent count: the trainer's placement of real params on the same mesh, device 0.
  unet = memory_plan.run_unet(config, False, tiny)
  params = unet.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 8, 8, 8)),
                     jax.numpy.zeros((1,), jax.numpy.int32),
                     jax.numpy.zeros((1, 77, 32)))["params"]
  mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.fsdp),
                            jax.devices()[:slice_.devices])
  placed = train_state.place_policy(config, params, mesh, jax.random.PRNGKey(1))
  on_device0 = lambda tree: sum(
      s.data.nbytes for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards
      if s.device == jax.devices()[0])
  out[variant] = dict(
      rows=[dict(mesh=list(r.mesh), state=r.state, frozen=r.frozen, towers=r.towers,
                 sampled_in_state=r.sampled_in_state, sampler_batch=r.sampler_batch,
                 ppo_batch=r.ppo_batch, sampling_peak=r.sampling_peak(),
                 training_peak=r.training_peak(),
                 sampler=None if r.sampler is None else r.sampler.__dict__,
                 ppo_step=r.ppo_step.__dict__) for r in rows],
      placed_state=on_device0(placed.state),
      placed_frozen=0 if placed.frozen is None else on_device0(placed.frozen),
      placed_unet=on_device0(placed.unet_params),
      table=memory_plan.format_run_table(rows))
# ppo.objective="nft": the step also takes the sampling policy's trainable params.
config = tiny_config("full")
config.ppo.objective = "nft"
row = memory_plan.plan_run_config(config, slices["v5e-8"], False, with_sampler=False,
                                  log=lambda _: None, unet_spec=tiny)
out["full_nft"] = dict(state=row.state, sampled_in_state=row.sampled_in_state,
                       ppo_step=row.ppo_step.__dict__)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def plan():
  result = subprocess.run([sys.executable, "-c", PLAN], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def test_state_bytes_per_device_match_the_trainers_placement(plan):
  for variant in ("full", "lora"):
    row = plan[variant]["rows"][0]
    assert row["state"] == plan[variant]["placed_state"], variant
    assert row["frozen"] == plan[variant]["placed_frozen"], variant
  # full: the sampled params are the state's own, FSDP-sharded like the placed UNet.
  assert plan["full"]["rows"][0]["sampled_in_state"] == plan["full"]["placed_unet"]
  assert plan["lora"]["rows"][0]["sampled_in_state"] == 0


def test_mesh_and_batch_per_device_follow_the_config_and_the_slice(plan):
  full, lora = plan["full"]["rows"][0], plan["lora"]["rows"][0]
  assert full["mesh"] == [2, 4]   # fsdp=4 (full), data takes the rest of v5e-8's 8 chips
  assert (full["sampler_batch"], full["ppo_batch"]) == (16 // 8, 8 // 8)
  assert lora["mesh"] == [4, 1]   # fsdp=1 (LoRA) on v4-8's 4 chips
  assert lora["ppo_batch"] == 8 // 4 and lora["sampler"] is None


def test_program_peaks_hold_their_arguments(plan):
  for variant in ("full", "lora"):
    row = plan[variant]["rows"][0]
    step = row["ppo_step"]
    # The step's arguments are the state, the frozen UNet and the minibatch.
    assert step["arguments"] >= row["state"] + row["frozen"]
    assert step["temporaries"] > 0
    assert row["training_peak"] == (step["arguments"] + step["outputs"] - step["aliased"]
                                    + step["temporaries"] + row["towers"])
  full = plan["full"]["rows"][0]
  sampler = full["sampler"]
  assert sampler["temporaries"] > 0
  assert full["sampling_peak"] == (sampler["arguments"] + sampler["outputs"] - sampler["aliased"]
                                   + sampler["temporaries"] + full["state"]
                                   - full["sampled_in_state"] + full["frozen"] + full["towers"])
  # The donated state comes back in its own buffers.
  assert full["ppo_step"]["aliased"] >= plan["full"]["placed_state"]
  assert plan["lora"]["rows"][0]["sampling_peak"] == 0  # not compiled for that row


def test_nft_step_holds_the_sampling_policys_params_as_well(plan):
  """objective='nft' plans NFT's step, whose arguments add a copy of the trainable params
  (here the whole FSDP-sharded UNet) to PPO's."""
  nft_row, ppo_row = plan["full_nft"], plan["full"]["rows"][0]
  assert nft_row["state"] == ppo_row["state"]
  extra = nft_row["ppo_step"]["arguments"] - ppo_row["ppo_step"]["arguments"]
  # The extra argument is one copy of the params, less PPO's map cotangents (pathwise is
  # off under NFT): 2 steps x 8 x 8 float32 per edit, against kilobytes of params.
  assert extra > 0.9 * nft_row["sampled_in_state"] > 0


def test_the_towers_are_the_real_runs_vae_text_encoder_and_reward_clip(plan):
  # SD1.5 VAE 83.65M + CLIP ViT-L/14 text 123.06M + reward CLIP ViT-L/14 427.62M parameters,
  # float32 (the published counts of those checkpoints).
  expected = (83_653_863 + 123_060_480 + 427_616_513) * 4
  assert abs(plan["full"]["rows"][0]["towers"] - expected) / expected < 0.01


def test_table_says_whether_each_row_fits(plan):
  for variant, name in (("full", "v5e-8 (8, 16 GiB)"), ("lora", "v4-8 (4, 32 GiB)")):
    table = plan[variant]["table"]
    assert table.count("\n") == 2  # header, rule, one row
    assert name in table and "yes (" in table  # a tiny UNet fits
  assert "(as remat off)" in plan["lora"]["table"]
