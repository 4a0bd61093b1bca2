"""Memory plan of the PPO step for a UNet size: params, AdamW state, activations per sample.

    python -m benchmarks.memory_plan --config=sd15 --num_steps=10
    python -m benchmarks.memory_plan --run_config=configs/ip2p_magicbrush.py:full,512

With ``--run_config`` the plan is of a run config as the trainer builds it (see
:func:`plan_run_config`): its sampler and its PPO train step, sharded over a TPU slice's
device count (8 forced CPU devices: ``v5e-8`` = 8 chips, ``v4-8`` = 4 chips), remat on and off,
and the per-device bytes of each compiled program against the chip's HBM. On a TPU VM,
``--run_config_backend=default`` compiles for its own chips with the TPU compiler instead.

Nothing is allocated: the parameters and the train state are ``jax.eval_shape`` trees of
``ShapeDtypeStruct`` for the real shapes, and the PPO train step (``ppo.make_train_step``: one
minibatch update, 3-way CFG re-scoring of every visited timestep, gradients accumulated in a
``lax.scan``) is lowered and compiled for the CPU backend on abstract arguments. XLA's
``compiled.memory_analysis()`` gives the temporary buffers of the step. The step is compiled for
two batch sizes (``--batches``, default 1 and 2) and the temporaries are extrapolated linearly:
``temp(B) = fixed + B * per_sample``.

The fit columns assume the state is resident (the trainable params, AdamW's two moments,
and for LoRA the frozen UNet; the train state is donated, so the updated state reuses its
buffers) plus ``temp(B)`` (which holds the gradient accumulator), under the capacity: ``B_max = floor((capacity - resident - fixed) / per_sample)``. With FSDP over ``n``
devices the resident state is divided by ``n`` (see ``--fsdp``; the fixed temporaries are
kept whole, a conservative simplification). CPU buffer assignment differs
from TPU/GPU (other fusions, no rematerialisation pass of its own), so treat the per-sample
figures as an estimate within tens of percent, not a guarantee.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, List, Optional, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp

import ml_collections
from ml_collections import config_flags

from benchmarks.configs import BENCHMARK_CONFIGS, attention_config
from rl4pix_jax import parallel, pipeline
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.models.attention_ops import ATTENTION_KINDS, AttentionConfig
from rl4pix_jax.models import clip as clip_lib
from rl4pix_jax.models import unet as unet_lib
from rl4pix_jax.models import vae as vae_lib
from rl4pix_jax.rl import nft, ppo
from rl4pix_jax.rl.compiled import ppo_step_config, sampler_config_from
from rl4pix_jax.rl.train_state import needs_frozen_unet

GIB = 2 ** 30
CAPACITIES_GB = {"16 GB (TPU v4/v5e core)": 16e9, "80 GB GPU": 80e9}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the plan: which parameters train and whether the UNet blocks are remat'ed."""
  name: str
  trainable: str
  remat: bool


VARIANTS = (Variant("full", "full", False), Variant("full + remat", "full", True),
            Variant("LoRA r=4", "lora", False), Variant("LoRA r=4 + remat", "lora", True))


@dataclasses.dataclass(frozen=True)
class PlanRow:
  """Bytes of one variant (all int bytes; per_sample in bytes per edit of the PPO batch).

  Attributes:
    variant: the variant.
    unet_params: the UNet parameters (float32).
    trainable_params: the trained parameters (= unet_params for "full", the LoRA tree else).
    adamw_state: AdamW's two moments (and counts) of the trainable set.
    grads: the float32 gradient accumulator of the trainable set (a scan carry: it is part
      of ``fixed_temp``, listed for reference, not added again).
    fixed_temp: compiled temporaries that do not grow with the batch (gradient accumulator,
      the merged LoRA UNet, workspace).
    per_sample: compiled temporaries per edit (its 3 CFG UNet passes, forward and backward).
    temps: {batch: measured temp bytes}.
    compile_s: total compile seconds of the variant.
  """
  variant: Variant
  unet_params: int
  trainable_params: int
  adamw_state: int
  grads: int
  fixed_temp: int
  per_sample: int
  temps: Dict[int, int]
  compile_s: float

  def resident(self, fsdp: int = 1) -> float:
    """State bytes per device with the state sharded over ``fsdp`` devices."""
    frozen = self.unet_params if self.variant.trainable == "lora" else 0
    return (frozen + self.trainable_params + self.adamw_state) / fsdp

  def max_batch(self, capacity: float, fsdp: int = 1) -> int:
    """Largest per-device PPO batch whose state + temporaries fit in ``capacity`` bytes."""
    free = capacity - self.resident(fsdp) - self.fixed_temp
    return max(0, int(free // self.per_sample)) if self.per_sample > 0 else 0


def tree_bytes(tree) -> int:
  """Total bytes of the leaves (arrays or ShapeDtypeStructs) of a pytree."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def abstract_conditioning(batch: int, side: int, length: int, dim: int,
                          latent_channels: int = 4, tokens: int = 2
                          ) -> sampling.EditConditioning:
  """EditConditioning of ShapeDtypeStructs: ``batch`` edits, (side, side) latents, ``length``
  text tokens of width ``dim``, ``tokens`` target-object token slots."""
  f32, sds = jnp.float32, jax.ShapeDtypeStruct
  return sampling.EditConditioning(
      text_embeds=sds((batch, length, dim), f32), uncond_text_embeds=sds((batch, length, dim), f32),
      image_latents=sds((batch, side, side, latent_channels), f32),
      token_index=sds((batch, tokens), jnp.int32), token_mask=sds((batch, tokens), jnp.bool_))


def abstract_batch(batch: int, num_steps: int, side: int, length: int, dim: int,
                   latent_channels: int = 4, tokens: int = 2,
                   map_side: Optional[int] = None) -> ppo.PPOBatch:
  """A PPOBatch of ShapeDtypeStructs for ``batch`` edits of ``num_steps`` DDIM steps; with
  ``map_side``, the (batch, T, map_side, map_side) attention-map cotangents of the pathwise
  term."""
  f32, sds = jnp.float32, jax.ShapeDtypeStruct
  return ppo.PPOBatch(
      cond=abstract_conditioning(batch, side, length, dim, latent_channels, tokens),
      latents=sds((batch, num_steps + 1, side, side, latent_channels), f32),
      log_probs=sds((batch, num_steps), f32), advantages=sds((batch,), f32),
      timesteps=sds((num_steps,), jnp.int32),
      guidance=sampling.Guidance(sds((), f32), sds((), f32)),
      map_cotangents=None if map_side is None else sds((batch, num_steps, map_side, map_side),
                                                       f32))


def plan_variant(spec: dict, variant: Variant, batches: Sequence[int], num_steps: int,
                 log=print, attention: Optional[AttentionConfig] = None) -> PlanRow:
  """Compiles the PPO step of one variant for each batch size on abstract arguments.

  Args:
    spec: a ``benchmarks.configs.BENCHMARK_CONFIGS`` entry (unet, latent_side, text_length).
    variant: full/LoRA, remat or not.
    batches: two or more batch sizes to compile (the fit is linear in the batch).
    num_steps: DDIM steps T of the stored trajectories (every step is trained).
    log: progress printer.
    attention: the UNet's attention kernels (None: XLA's, which materialises every
      self-attention score array; 'auto' compiles the chunked path on the CPU).

  Returns:
    The :class:`PlanRow` with a least-squares line through (batch, temp bytes).
  """
  if len(set(batches)) < 2:
    raise ValueError(f"batches={batches}: need two different batch sizes for the linear fit.")
  config = unet_lib.UNetConfig.from_diffusers(spec["unet"])
  unet = unet_lib.UNet2DConditionModel(config, remat=variant.remat,
                                       attention=attention or AttentionConfig("xla"))
  side, length = spec["latent_side"], spec["text_length"]
  dim = config.cross_attention_dim[0]
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  params = jax.eval_shape(
      lambda k: unet.init(k, jnp.zeros((1, side, side, config.in_channels)),
                          jnp.zeros((1,), jnp.int32), jnp.zeros((1, length, dim)))["params"],
      key)
  ppo_config = ppo.PPOConfig(trainable=variant.trainable, attention_pathwise_weight=0.0,
                              kl_weight=0.0)
  state, frozen = jax.eval_shape(lambda k, p: ppo.init_train_state(k, p, ppo_config), key,
                                 params)
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  sampler_config = sampling.SamplerConfig(num_steps=num_steps, eta=1.0)
  step = ppo.make_train_step(unet, schedule, sampler_config, ppo_config)
  temps, compile_s = {}, 0.0
  for batch in batches:
    start = time.perf_counter()
    compiled = step.lower(state, frozen, abstract_batch(batch, num_steps, side, length, dim),
                          key).compile()
    compile_s += time.perf_counter() - start
    temps[batch] = int(compiled.memory_analysis().temp_size_in_bytes)
    log(f"  {variant.name}: batch {batch} temp {temps[batch] / GIB:.2f} GiB "
        f"({time.perf_counter() - start:.0f} s compile)")
  xs = sorted(temps)
  mean_x = sum(xs) / len(xs)
  mean_y = sum(temps[x] for x in xs) / len(xs)
  slope = (sum((x - mean_x) * (temps[x] - mean_y) for x in xs)
           / sum((x - mean_x) ** 2 for x in xs))
  grads = tree_bytes(state.params)
  return PlanRow(variant=variant, unet_params=tree_bytes(params),
                 trainable_params=tree_bytes(state.params),
                 adamw_state=tree_bytes(state.opt_state), grads=grads,
                 fixed_temp=int(round(mean_y - slope * mean_x)), per_sample=int(round(slope)),
                 temps=temps, compile_s=compile_s)


def format_table(rows: List[PlanRow], fsdp: Sequence[int] = (1,)) -> str:
  """The markdown table: bytes in GiB and the largest per-device batch per capacity."""
  header = ["variant", "UNet params", "trainable", "AdamW state", "grads (in fixed temp)", "fixed temp",
            "activations / sample"]
  for n in fsdp:
    for cap in CAPACITIES_GB:
      header.append(f"batch on {cap}" + (f", fsdp={n}" if n > 1 else ""))
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  gib = lambda b: f"{b / GIB:.2f} GiB" if b >= 0.01 * GIB else f"{b / 2 ** 20:.1f} MiB"
  for r in rows:
    cells = [r.variant.name, gib(r.unet_params), gib(r.trainable_params), gib(r.adamw_state),
             gib(r.grads), gib(r.fixed_temp), gib(r.per_sample)]
    for n in fsdp:
      cells += [str(r.max_batch(cap, n)) for cap in CAPACITIES_GB.values()]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ---- the plan of a run config (--run_config) ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: how many chips (one device each in JAX) and each chip's HBM in bytes."""
  name: str
  devices: int
  hbm: int


SLICES = (Slice("v5e-8", 8, 16 * GIB), Slice("v4-8", 4, 32 * GIB))

# The frozen towers of the real run, as in their shipped configs: InstructPix2Pix's VAE and
# text encoder (SD1.5's: CLIP ViT-L/14 text, no projection) and the reward's CLIP ViT-L/14.
# Only their parameter bytes enter the plan (they are resident, replicated, float32).
VIT_L14_TEXT = clip_lib.CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_attention_heads=12)
VIT_L14_VISION = clip_lib.CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=1024,
                                           intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, projection_dim=768)


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """Per-device bytes of one compiled SPMD program (``compiled.memory_analysis()``).

  Attributes:
    arguments, outputs: the program's parameter and result buffers on one device.
    aliased: result bytes that reuse donated argument buffers (the train state).
    temporaries: XLA's temporary buffers (activations, gradients, workspace).
    compile_s: seconds to lower and compile.
  """
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  compile_s: float

  @property
  def peak(self) -> int:
    """Bytes live on one device while the program runs: arguments + new outputs + temps."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


def program_memory(jitted, *args) -> ProgramMemory:
  """Lowers and compiles ``jitted`` on abstract ``args``; its per-device memory analysis."""
  start = time.perf_counter()
  analysis = jitted.lower(*args).compile().memory_analysis()
  return ProgramMemory(
      arguments=int(analysis.argument_size_in_bytes), outputs=int(analysis.output_size_in_bytes),
      aliased=int(analysis.alias_size_in_bytes), temporaries=int(analysis.temp_size_in_bytes),
      compile_s=time.perf_counter() - start)


def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of ``tree`` (ShapeDtypeStructs) placed as ``shardings`` says."""
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(
                 shardings, is_leaf=lambda z: isinstance(z, jax.sharding.Sharding))))


def frozen_tower_bytes(with_reward_clip: bool) -> int:
  """Parameter bytes of the VAE, the editor's text encoder and (optionally) the reward CLIP."""
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  ids = jnp.zeros((1, 77), jnp.int32)
  towers = [(vae_lib.AutoencoderKL(vae_lib.VAEConfig()), (jnp.zeros((1, 64, 64, 3)),)),
            (clip_lib.CLIPTextModel(VIT_L14_TEXT), (ids,))]
  if with_reward_clip:
    towers += [(clip_lib.CLIPTextModel(dataclasses.replace(VIT_L14_TEXT, projection_dim=768)),
                (ids,)),
               (clip_lib.CLIPVisionModel(VIT_L14_VISION), (jnp.zeros((1, 224, 224, 3)),))]
  return sum(tree_bytes(jax.eval_shape(lambda k, m=module, a=args: m.init(k, *a), key))
             for module, args in towers)


@dataclasses.dataclass(frozen=True)
class RunPlanRow:
  """One (slice, remat) row of a run config's plan; bytes are per device.

  Attributes:
    slice: the TPU slice; remat: UNet block rematerialisation.
    mesh: (data, fsdp) sizes.
    state: the PPO train state (trainable params, AdamW moments) on one device.
    frozen: the frozen UNet (LoRA base and/or KL reference) on one device, 0 if none.
    sampled_in_state: bytes of the sampler's params argument already counted in ``state``
      (full fine-tuning samples ``state.params``; LoRA samples a merged copy: 0).
    towers: VAE + text encoder + reward CLIP, replicated.
    sampler, ppo_step: the two compiled programs (None: not compiled for this row).
    sampler_batch, ppo_batch: edits per device in each program.
  """
  slice: Slice
  remat: bool
  mesh: tuple
  state: int
  frozen: int
  sampled_in_state: int
  towers: int
  sampler: Optional[ProgramMemory]
  ppo_step: ProgramMemory
  sampler_batch: int
  ppo_batch: int

  def sampling_peak(self) -> int:
    """The sampler's peak plus what stays resident outside its arguments: the train state
    (less the params it samples, for full fine-tuning), the frozen UNet, the towers."""
    if self.sampler is None:
      return 0
    return (self.sampler.peak + self.state - self.sampled_in_state + self.frozen
            + self.towers)

  def training_peak(self) -> int:
    """The PPO step's peak (its arguments are the state and the frozen UNet) plus the towers."""
    return self.ppo_step.peak + self.towers


def run_unet(config: ml_collections.ConfigDict, remat: bool,
             unet_spec: Optional[dict] = None) -> unet_lib.UNet2DConditionModel:
  """The SD1.5 / InstructPix2Pix UNet (or ``unet_spec``, diffusers fields) at
  ``config.resolution`` with the run's compute dtype and attention setting ('auto' decides
  for the CPU here: the blocked path, no score arrays)."""
  spec = dict(unet_spec or BENCHMARK_CONFIGS["sd15"]["unet"],
              sample_size=config.resolution // 8)
  return unet_lib.UNet2DConditionModel(
      unet_lib.UNetConfig.from_diffusers(spec), dtype=pipeline.compute_dtype(config.model.dtype),
      remat=remat, attention=pipeline.attention_config(config))


def plan_run_config(config: ml_collections.ConfigDict, slice_: Slice, remat: bool,
                    with_sampler: bool = True, log=print,
                    unet_spec: Optional[dict] = None) -> RunPlanRow:
  """Compiles a run config's sampler and PPO step for ``slice_`` (no data, nothing allocated).

  As ``trainer.train`` builds them: the mesh is ``config.mesh`` over ``slice_.devices`` CPU
  devices, the UNet, train state and frozen base placed by the sharding rules
  (``train_state.place_policy``), the sampler (``sampling.make_trajectory_sampler``) run on a
  sample batch of ``train.sample_batch_size`` edits and the PPO step
  (``ppo.make_train_step``, with the config's KL and pathwise terms; ``nft.make_nft_train_step``
  for ``ppo.objective='nft'``, which also holds the sampling policy's params) on a minibatch of
  ``train.train_batch_size``. Needs at least ``slice_.devices`` devices
  (``jax_num_cpu_devices``).
  """
  devices = jax.devices()[:slice_.devices]
  if len(devices) < slice_.devices:
    raise ValueError(f"{slice_.name} needs {slice_.devices} devices, found {len(devices)}: run "
                     "with jax_num_cpu_devices >= 8 (this script's main sets it).")
  mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.fsdp), devices)
  unet = run_unet(config, remat, unet_spec)
  side = config.resolution // 8
  length, dim = 77, unet.config.cross_attention_dim[0]
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  params = jax.eval_shape(
      lambda k: unet.init(k, jnp.zeros((1, side, side, unet.config.in_channels)),
                          jnp.zeros((1,), jnp.int32), jnp.zeros((1, length, dim)))["params"],
      key)
  rules = parallel.default_sharding_rules(int(config.mesh.fsdp_min_size))
  unet_shardings = parallel.param_shardings(params, mesh, rules)
  step_config = ppo_step_config(config)
  state = jax.eval_shape(lambda k, p: ppo.init_train_state(k, p, step_config)[0], key, params)
  state_shardings = ppo.train_state_shardings(state, mesh, rules)
  frozen = params if needs_frozen_unet(step_config) else None  # as train_state.place_policy
  frozen_shardings = unet_shardings if frozen is not None else None
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  sampler_config = sampler_config_from(config)
  map_side = sampler_config.attention_side(side) if step_config.pathwise else None
  tokens = int(config.data.max_object_tokens)
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  f32 = jnp.float32
  guidance = sampling.Guidance(jax.ShapeDtypeStruct((), f32), jax.ShapeDtypeStruct((), f32))
  tag = f"{slice_.name}, remat {'on' if remat else 'off'}, mesh {dict(mesh.shape)}"

  sampler_memory = None
  if with_sampler:
    b = int(config.train.sample_batch_size)
    sampler = sampling.make_trajectory_sampler(unet, schedule, sampler_config, mesh,
                                               param_shardings=unet_shardings)
    sampler_memory = program_memory(
        sampler.jitted, params, abstract_conditioning(b, side, length, dim, tokens=tokens), key,
        guidance, jax.ShapeDtypeStruct((b, side, side, unet.config.out_channels), f32))
    log(f"  {tag}: sampler, {b // batch_devices} edits/device: peak "
        f"{sampler_memory.peak / GIB:.2f} GiB ({sampler_memory.compile_s:.0f} s compile)")
  b = int(config.train.train_batch_size)
  # ppo.objective "nft" takes the sampling policy's trainable params too (trainer.train).
  nft_objective = step_config.objective == "nft"
  make_step = nft.make_nft_train_step if nft_objective else ppo.make_train_step
  step = make_step(unet, schedule, sampler_config, step_config, mesh,
                   state_shardings=state_shardings, frozen_shardings=frozen_shardings)
  step_memory = program_memory(
      step, state, frozen, abstract_batch(b, sampler_config.num_steps, side, length, dim,
                                          tokens=tokens, map_side=map_side), key,
      *((state.params,) if nft_objective else ()))
  log(f"  {tag}: PPO step, {b // batch_devices} edits/device: peak "
      f"{step_memory.peak / GIB:.2f} GiB ({step_memory.compile_s:.0f} s compile)")
  return RunPlanRow(
      slice=slice_, remat=remat, mesh=(mesh.shape["data"], mesh.shape["fsdp"]),
      state=per_device_bytes(state, state_shardings),
      frozen=per_device_bytes(frozen, frozen_shardings) if frozen is not None else 0,
      sampled_in_state=(per_device_bytes(params, unet_shardings)
                        if step_config.trainable == "full" else 0),
      towers=frozen_tower_bytes(bool(config.reward.clip_weight)), sampler=sampler_memory,
      ppo_step=step_memory, sampler_batch=int(config.train.sample_batch_size) // batch_devices,
      ppo_batch=b // batch_devices)


def format_run_table(rows: List[RunPlanRow]) -> str:
  """Markdown: per-device GiB of the state, the two programs' peaks and the HBM verdict."""
  header = ["slice (chips, HBM/chip)", "mesh (data, fsdp)", "remat", "train state", "frozen UNet",
            "towers", "sampling: edits/device, peak", "PPO step: edits/device, peak",
            "fits in HBM"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  gib = lambda b: f"{b / GIB:.2f}"
  for r in rows:
    worst = max(r.sampling_peak(), r.training_peak())
    sampling_cell = (f"{r.sampler_batch}, {gib(r.sampling_peak())} GiB" if r.sampler
                     else "(as remat off)")
    lines.append("| " + " | ".join([
        f"{r.slice.name} ({r.slice.devices}, {r.slice.hbm // GIB} GiB)", str(r.mesh),
        "on" if r.remat else "off", f"{gib(r.state)} GiB", f"{gib(r.frozen)} GiB",
        f"{gib(r.towers)} GiB", sampling_cell,
        f"{r.ppo_batch}, {gib(r.training_peak())} GiB",
        ("yes" if worst <= r.slice.hbm else "no") + f" ({100 * worst / r.slice.hbm:.0f}%)"
        ]) + " |")
  return "\n".join(lines)


FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "sd15", list(BENCHMARK_CONFIGS), "UNet size.")
flags.DEFINE_list("batches", ["1", "2"], "Batch sizes to compile (linear fit).")
flags.DEFINE_integer("num_steps", 10, "DDIM steps T of the stored trajectories.")
flags.DEFINE_list("variants", [v.name for v in VARIANTS], "Variants to plan (names).")
flags.DEFINE_list("fsdp", ["1", "8"], "FSDP sizes for the fit columns.")
flags.DEFINE_enum("attention", "xla", list(ATTENTION_KINDS),
                  "The UNet's attention kernels (model.attention; benchmarks/README.md, "
                  "'Attention paths'). xla (default here, as in the tables of "
                  "docs/scaling_out.md): every score array materialised, an upper bound; "
                  "auto or chunked: the CPU's blocked path, no score array, closer to a "
                  "flash kernel's memory.")
config_flags.DEFINE_config_file(
    "run_config", None, "A run config (e.g. configs/ip2p_magicbrush.py:full,512): plan its "
    "sampler and PPO step on --slices instead of the --config UNet's variants.",
    lock_config=True)
flags.DEFINE_list("slices", [s.name for s in SLICES], "TPU slices for --run_config.")
flags.DEFINE_list("remat", ["off", "on"], "UNet remat settings for --run_config.")
flags.DEFINE_enum("run_config_backend", "cpu", ["cpu", "default"],
                  "--run_config compiles for: cpu (8 forced CPU devices, anywhere) or default "
                  "(JAX's default backend: on a TPU VM its chips and the TPU compiler, whose "
                  "memory analysis is the one to trust; --slices must fit its device count).")


def run_config_main() -> None:
  """--run_config: one row per (slice, remat); the sampler is compiled once per slice."""
  config = FLAGS.run_config
  known = {s.name: s for s in SLICES}
  unknown = [s for s in FLAGS.slices if s not in known]
  bad_remat = [r for r in FLAGS.remat if r not in ("on", "off")]
  if unknown or bad_remat:
    raise app.UsageError(f"--slices: known {list(known)} (got {unknown}); --remat: on, off "
                         f"(got {bad_remat}).")
  rows = []
  for name in FLAGS.slices:
    for i, remat in enumerate(FLAGS.remat):
      # The sampler runs no backward pass: remat does not change it, so it compiles once.
      rows.append(plan_run_config(config, known[name], remat == "on", with_sampler=i == 0))
      print(format_run_table(rows[-1:]), flush=True)
  print(f"\n{config.ppo.trainable} fine-tuning, ppo.objective={config.ppo.objective}, "
        f"{config.resolution} px, compute "
        f"{config.model.dtype}, T={config.sampler.num_steps}, attention={config.model.attention} "
        f"(compiled for {jax.devices()[0].platform}), per-device bytes from XLA's memory "
        "analysis:")
  print(format_run_table(rows))


def main(argv: Optional[Sequence[str]] = None) -> None:
  del argv
  if FLAGS.run_config is not None and FLAGS.run_config_backend == "default":
    run_config_main()  # on the TPU VM itself: its own compiler's memory analysis
    return
  jax.config.update("jax_platforms", "cpu")
  if FLAGS.run_config is not None:
    jax.config.update("jax_num_cpu_devices", max(s.devices for s in SLICES))
    run_config_main()
    return
  known = {v.name: v for v in VARIANTS}
  unknown = [v for v in FLAGS.variants if v not in known]
  if unknown:
    raise app.UsageError(f"Unknown variants {unknown}; known: {list(known)}.")
  rows = []
  for name in FLAGS.variants:
    rows.append(plan_variant(BENCHMARK_CONFIGS[FLAGS.config], known[name],
                             [int(b) for b in FLAGS.batches], FLAGS.num_steps,
                             attention=attention_config(FLAGS.attention, platform="cpu")))
    print(format_table(rows[-1:], [int(n) for n in FLAGS.fsdp]), flush=True)
  print(f"\nPPO step, {FLAGS.config} UNet, T={FLAGS.num_steps}, float32, CPU compile, "
        f"attention={FLAGS.attention}, "
        f"temporaries fitted over batches {FLAGS.batches}:")
  print(format_table(rows, [int(n) for n in FLAGS.fsdp]))


if __name__ == "__main__":
  app.run(main)
