"""Memory plan of the PPO step for a UNet size: params, AdamW state, activations per sample.

    python -m benchmarks.memory_plan --config=sd15 --num_steps=10

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

from benchmarks.configs import BENCHMARK_CONFIGS, attention_config
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.models.attention_ops import ATTENTION_KINDS, AttentionConfig
from rl4pix_jax.models import unet as unet_lib
from rl4pix_jax.rl import ppo

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


def abstract_batch(batch: int, num_steps: int, side: int, length: int, dim: int,
                   latent_channels: int = 4) -> ppo.PPOBatch:
  """A PPOBatch of ShapeDtypeStructs for ``batch`` edits of ``num_steps`` DDIM steps."""
  f32 = jnp.float32
  sds = jax.ShapeDtypeStruct
  cond = sampling.EditConditioning(
      text_embeds=sds((batch, length, dim), f32), uncond_text_embeds=sds((batch, length, dim), f32),
      image_latents=sds((batch, side, side, latent_channels), f32),
      token_index=sds((batch, 2), jnp.int32), token_mask=sds((batch, 2), jnp.bool_))
  return ppo.PPOBatch(
      cond=cond, latents=sds((batch, num_steps + 1, side, side, latent_channels), f32),
      log_probs=sds((batch, num_steps), f32), advantages=sds((batch,), f32),
      timesteps=sds((num_steps,), jnp.int32),
      guidance=sampling.Guidance(sds((), f32), sds((), f32)))


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


def main(argv: Optional[Sequence[str]] = None) -> None:
  del argv
  jax.config.update("jax_platforms", "cpu")
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
