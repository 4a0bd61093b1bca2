"""Ours (JAX) vs the PyTorch stack, side by side in one process, one markdown row per case.

    python -m benchmarks.run --config=small
    python -m benchmarks.run --config=sd15 --dtype=bfloat16 --attention=cudnn \
        --peak_tflops=790   # on a GPU

Cases: UNet forward and forward+backward at each ``--batches`` size; a full guided trajectory
(T DDIM steps, 3-way CFG, eta=1) at ``--edits`` edits (images/s); one PPO minibatch update over
all T timesteps ((sample x timestep) pairs/s). Ours is random-initialised, exported with
``export_unet`` and loaded by diffusers, so both run the same weights on the same inputs.
Times are medians of ``--reps`` runs after one warm-up call; our first call (compile + run) is
reported separately. ``ratio`` = PyTorch time / our time (> 1: ours is faster). With
``--peak_tflops``, MFU = FLOPs of our compiled function (XLA cost analysis) / time / peak.
``--trace_only`` lowers our functions without running them (checks the sd15 path on a CPU).
"""

import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import configs
from benchmarks import host
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.models.attention_ops import ATTENTION_KINDS
from rl4pix_jax.models import unet as unet_lib
from rl4pix_jax.rl import ppo
from rl4pix_jax.weights import diffusers_models

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "small", list(configs.BENCHMARK_CONFIGS), "Model size.")
flags.DEFINE_list("batches", ["1", "3", "12"], "UNet batch sizes (forward, forward+backward).")
flags.DEFINE_integer("edits", 4, "Edits per trajectory / PPO minibatch (the UNet sees 3x).")
flags.DEFINE_integer("steps", 10, "DDIM steps T.")
flags.DEFINE_integer("reps", 3, "Timed repetitions after the warm-up call.")
flags.DEFINE_list("cases", ["forward", "backward", "trajectory", "ppo"],
                  "Cases in the order to run: forward, backward (each at every --batches size, "
                  "or one size as forward@12), trajectory, ppo.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Our compute dtype.")
flags.DEFINE_enum("torch_dtype", "float32", ["float32", "float16", "bfloat16"],
                  "PyTorch dtype (weights and compute).")
flags.DEFINE_enum("attention", "auto", list(ATTENTION_KINDS),
                  "Our attention kernels (model.attention; benchmarks/README.md, 'Attention "
                  "paths'). auto: Pallas flash on TPU for >= 4096-token self-attention, cuDNN "
                  "on GPU where cuDNN takes the shape, the chunked path on CPU.")
flags.DEFINE_integer("attention_chunk_queries", None, "Queries per block of the chunked path "
                     "(unset: model.attention_chunk_queries of configs/shapes.py).")
flags.DEFINE_float("peak_tflops", None, "Peak dense bf16 TFLOP/s of the chip for MFU "
                   "(H100 SXM ~790 measured); None: no MFU column values.")
flags.DEFINE_bool("trace_only", False, "Lower our functions with abstract inputs and print "
                  "their FLOPs; no timing, no PyTorch.")
flags.DEFINE_bool("skip_torch", False, "Time ours only.")
flags.DEFINE_bool("torch_first", False, "Time PyTorch's side of every case first, free its "
                  "model, then ours (on a GPU, so the two never share its memory); default: "
                  "both sides of each case together.")
flags.DEFINE_bool("keep_going", False, "Print a failed case (e.g. out of memory) as a row "
                  "and go on with the next one.")
flags.DEFINE_float("deadline_s", None, "Skip the remaining cases once this many seconds have "
                   "passed since the start (keeps a leased accelerator run inside its slot).")


def median_seconds(fn: Callable[[], object], reps: int) -> float:
  """Median wall time of ``reps`` calls of ``fn`` (which must block until done)."""
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def hlo_flops(jitted, *args) -> Optional[float]:
  """FLOPs of ``jitted(*args)``: XLA's cost analysis of its HLO lowered for the CPU.

  ``args`` may be arrays or ``jax.ShapeDtypeStruct``s. Nothing is compiled; the count is
  that of the unoptimised program, so it does not depend on the backend (a GPU's lowered
  module reports no cost analysis, seen with jax 0.11.2). None if none is reported.
  """
  lowered = jitted.trace(*args).lower(lowering_platforms=("cpu",))
  flops = _flops_of(lowered.cost_analysis())
  if flops is None and jax.default_backend() == "cpu":
    # Some jaxlib builds answer the pre-optimisation query with nothing; the compiled CPU
    # program's analysis counts the same dots and convolutions (compiling is cheap here).
    flops = _flops_of(lowered.compile().cost_analysis())
  return flops


def _flops_of(analysis) -> Optional[float]:
  """The positive ``flops`` entry of an XLA cost analysis (dict, or list of dicts), or None."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def parse_cases(cases: List[str], batches: List[str]) -> List[Tuple[str, Optional[int]]]:
  """``--cases`` -> [(case, UNet batch or None)] in run order; forward/backward expand to
  every ``--batches`` size unless written as ``forward@12``."""
  known = ("forward", "backward", "trajectory", "ppo")
  runs = []
  for case in cases:
    name, _, size = case.partition("@")
    if name not in known:
      raise ValueError(f"unknown case {case!r}; choose from {', '.join(known)} "
                       "(forward and backward also as forward@<batch>).")
    if name in ("forward", "backward"):
      sizes = [size] if size else batches
      runs.extend((name, int(b)) for b in sizes)
    elif size:
      raise ValueError(f"case {case!r}: only forward and backward take @<batch>; the "
                       "trajectory and PPO batch is --edits.")
    else:
      runs.append((name, None))
  return runs


def load_average() -> str:
  return f"{os.getloadavg()[0]:.1f}"


class Row:
  """One markdown table row."""
  HEADER = ("| case | batch | ours | PyTorch | ratio (PyTorch/ours) | our first call s | "
            "our MFU | PyTorch MFU | load avg |\n|---|---|---|---|---|---|---|---|---|")

  def __init__(self, case, batch, ours_s, torch_s, first_s, unit_per_s=None, units=None,
               flops=None):
    self.case, self.batch, self.ours_s, self.torch_s = case, batch, ours_s, torch_s
    self.first_s, self.unit_per_s, self.units, self.flops = first_s, unit_per_s, units, flops

  def time_text(self, seconds: Optional[float]) -> str:
    """'12.3 ms' (with the throughput when the row has units), '-' for None."""
    if seconds is None:
      return "-"
    text = f"{seconds * 1e3:.1f} ms"
    if self.units:
      text += f" ({self.units / seconds:.2f} {self.unit_per_s})"
    return text

  def markdown(self, peak_tflops: Optional[float]) -> str:
    def mfu(seconds):
      if not (peak_tflops and self.flops and seconds):
        return "-"
      return f"{self.flops / seconds / (peak_tflops * 1e12) * 100:.1f}%"
    ratio = f"{self.torch_s / self.ours_s:.2f}x" if self.torch_s and self.ours_s else "-"
    first = "-" if self.first_s is None else f"{self.first_s:.1f}"
    return (f"| {self.case} | {self.batch} | {self.time_text(self.ours_s)} | "
            f"{self.time_text(self.torch_s)} | "
            f"{ratio} | {first} | {mfu(self.ours_s)} | {mfu(self.torch_s)} | "
            f"{load_average()} |")


def make_inputs(spec: Dict, dim: int, batch: int, seed: int) -> Dict[str, np.ndarray]:
  """Random NHWC float32 UNet inputs and conditioning for ``batch`` edits."""
  rng = np.random.default_rng(seed)
  side, length = spec["latent_side"], spec["text_length"]
  return dict(
      latents=rng.standard_normal((batch, side, side, 4)).astype(np.float32),
      image=rng.standard_normal((batch, side, side, 4)).astype(np.float32),
      text=rng.standard_normal((batch, length, dim)).astype(np.float32),
      uncond=rng.standard_normal((batch, length, dim)).astype(np.float32))


def edit_conditioning(inputs: Dict[str, np.ndarray]) -> sampling.EditConditioning:
  return sampling.EditConditioning(text_embeds=jnp.asarray(inputs["text"]),
                                   uncond_text_embeds=jnp.asarray(inputs["uncond"]),
                                   image_latents=jnp.asarray(inputs["image"]))


class Bench:
  """Builds both models on one config and runs the cases."""

  def __init__(self, config_name: str):
    self.spec = configs.BENCHMARK_CONFIGS[config_name]
    self.config = unet_lib.UNetConfig.from_diffusers(self.spec["unet"])
    dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
    self.unet = unet_lib.UNet2DConditionModel(
        self.config, dtype=dtype,
        attention=configs.attention_config(FLAGS.attention, FLAGS.attention_chunk_queries))
    self.side, self.dim = self.spec["latent_side"], self.config.cross_attention_dim[0]
    self.schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
    self.sampler_config = sampling.SamplerConfig(num_steps=FLAGS.steps, eta=1.0,
                                                 record_attention=False)
    self.ppo_config = ppo.PPOConfig(trainable="full", attention_pathwise_weight=0.0,
                                     kl_weight=0.0)
    sample = jax.ShapeDtypeStruct((1, self.side, self.side, 8), jnp.float32)
    text = jax.ShapeDtypeStruct((1, self.spec["text_length"], self.dim), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    if FLAGS.trace_only:
      self.params = jax.eval_shape(self.unet.init, jax.random.PRNGKey(0), sample, t,
                                   text)["params"]
    else:
      self.params = jax.jit(self.unet.init)(
          jax.random.PRNGKey(0), jnp.zeros(sample.shape), jnp.zeros((1,), jnp.int32),
          jnp.zeros(text.shape))["params"]
    # Inference (forward, trajectory) runs on weights cast once to the compute dtype, as
    # PyTorch's .to(dtype); training keeps float32 master weights (mixed precision).
    cast = ((lambda x: jax.ShapeDtypeStruct(x.shape, dtype)) if FLAGS.trace_only
            else (lambda x: x.astype(dtype)))
    self.infer_params = jax.tree_util.tree_map(cast, self.params)
    self.notes: List[str] = []
    self._flops_cache: Dict = {}
    self._outputs: Dict = {}
    self.torch_unet = None
    self.torch_device = "cpu"
    if not (FLAGS.trace_only or FLAGS.skip_torch):
      import torch  # pylint: disable=import-outside-toplevel
      from benchmarks import torch_reference  # pylint: disable=import-outside-toplevel
      self.torch, self.ref = torch, torch_reference
      self.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
      self.torch_dtype = getattr(torch, FLAGS.torch_dtype)
      with tempfile.TemporaryDirectory() as folder:
        diffusers_models.export_unet(self.params, self.config, folder)
        self.torch_unet = torch_reference.load_unet(folder, self.torch_device, self.torch_dtype)

  def parameter_count(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))

  # ----- helpers ------------------------------------------------------------------------

  def _ours(self, jitted, args):
    """(first-call seconds, median seconds, last output) of jitted(*args)."""
    start = time.perf_counter()
    out = jax.block_until_ready(jitted(*args))
    first = time.perf_counter() - start
    median = median_seconds(lambda: jax.block_until_ready(jitted(*args)), FLAGS.reps)
    return first, median, out

  def unet_flops(self, batch: int, backward: bool) -> Optional[float]:
    """FLOPs of one UNet forward (or forward+backward) at ``batch`` (cached).

    Counted by XLA's cost analysis of the HLO lowered for the CPU (no compile, the same
    on every backend), with XLA's attention so that attention's FLOPs are counted (a cuDNN
    custom call counts none). The trajectory and PPO rows use T times the UNet's FLOPs at
    batch 3 x edits: the DDIM arithmetic, the log-prob and the optimizer update are
    negligible next to it.
    """
    key = (batch, backward)
    if key not in self._flops_cache:
      sd = jax.ShapeDtypeStruct
      side, length = self.side, self.spec["text_length"]
      args = (sd((batch, side, side, 8), jnp.float32), sd((batch,), jnp.int32),
              sd((batch, length, self.dim), jnp.float32))
      counted = unet_lib.UNet2DConditionModel(self.config, dtype=self.unet.dtype)
      # Abstract params too: arrays placed on an accelerator cannot enter a CPU lowering.
      abstract = lambda tree: jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
      if backward:
        flops = hlo_flops(self.backward_fn(counted), abstract(self.params), *args)
      else:
        flops = hlo_flops(self.forward_fn(counted), {"params": abstract(self.infer_params)},
                          *args)
      self._flops_cache[key] = flops
    return self._flops_cache[key]

  def _torch_time(self, fn) -> Optional[float]:
    if self.torch_unet is None:
      return None
    fn()  # warm-up
    if self.torch_device == "cuda":
      sync = self.torch.cuda.synchronize
      seconds = median_seconds(lambda: (fn(), sync()), FLAGS.reps)
      # Hand the cached blocks back so that our next case's buffers find the memory.
      self.torch.cuda.empty_cache()
      return seconds
    return median_seconds(fn, FLAGS.reps)

  def _t(self, array, nhwc=False):
    return self.ref.to_torch(array, self.torch_device, self.torch_dtype, nhwc)

  # ----- cases --------------------------------------------------------------------------

  def unet_inputs(self, batch: int):
    x = make_inputs(self.spec, self.dim, batch, seed=batch)
    sample = np.concatenate([x["latents"], x["image"]], axis=-1)
    t = np.full((batch,), 500, np.int32)
    return sample, t, x["text"]

  def forward_fn(self, unet=None):
    """jit(unet.apply) of ``unet`` (default: the benchmarked UNet)."""
    return jax.jit((self.unet if unet is None else unet).apply)

  def backward_fn(self, unet=None):
    """jit(grad) of mean(out^2) w.r.t. the params of ``unet`` (default: the benchmarked UNet)."""
    unet = self.unet if unet is None else unet

    def loss(params, sample, t, text):
      out = unet.apply({"params": params}, sample, t, text)
      return jnp.mean(out.astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss))

  def _torch_unet_inputs(self, sample, t, text):
    """The UNet inputs as torch tensors on the reference device (sample in torch layout)."""
    return self._t(sample, True), self.torch.from_numpy(t).to(self.torch_device), self._t(text)

  def forward(self, batch: int, ours: bool = True, torch: bool = True) -> Row:
    sample, t, text = self.unet_inputs(batch)
    first = ours_s = flops = torch_s = None
    if ours:
      args = ({"params": self.infer_params}, jnp.asarray(sample), jnp.asarray(t),
              jnp.asarray(text))
      first, ours_s, out = self._ours(self.forward_fn(), args)
      self._outputs[("ours", batch)] = np.asarray(out, np.float32)
      flops = self.unet_flops(batch, backward=False) if FLAGS.peak_tflops else None
    if torch and self.torch_unet is not None:
      ts, tt, tx = self._torch_unet_inputs(sample, t, text)
      self.torch_unet.eval()

      def run():
        with self.torch.no_grad():
          return self.torch_unet(ts, tt, tx).sample
      torch_s = self._torch_time(lambda: run().sum().item())
      self._outputs[("torch", batch)] = np.moveaxis(run().float().cpu().numpy(), 1, -1)
    self._note_output_difference(batch)
    return Row("UNet forward", batch, ours_s, torch_s, first, flops=flops)

  def _note_output_difference(self, batch: int) -> None:
    """Once both sides' batch-``batch`` forward outputs exist, notes their relative gap."""
    mine, reference = self._outputs.get(("ours", batch)), self._outputs.get(("torch", batch))
    if mine is None or reference is None:
      return
    rel = np.linalg.norm(mine - reference) / np.linalg.norm(reference)
    self.notes.append(f"UNet forward batch {batch}: ||ours - PyTorch|| / ||PyTorch|| = "
                      f"{rel:.2e} ({FLAGS.dtype} vs {FLAGS.torch_dtype})")

  def backward(self, batch: int, ours: bool = True, torch: bool = True) -> Row:
    sample, t, text = self.unet_inputs(batch)
    first = ours_s = flops = torch_s = None
    if ours:
      args = (self.params, jnp.asarray(sample), jnp.asarray(t), jnp.asarray(text))
      first, ours_s, _ = self._ours(self.backward_fn(), args)
      flops = self.unet_flops(batch, backward=True) if FLAGS.peak_tflops else None
    if torch and self.torch_unet is not None:
      ts, tt, tx = self._torch_unet_inputs(sample, t, text)
      self.torch_unet.train()

      def run():
        self.torch_unet.zero_grad(set_to_none=True)
        out = self.torch_unet(ts, tt, tx).sample.float()
        (out ** 2).mean().backward()
        next(self.torch_unet.parameters()).grad.sum().item()
      torch_s = self._torch_time(run)
      self.torch_unet.zero_grad(set_to_none=True)
    return Row("UNet forward+backward", batch, ours_s, torch_s, first, flops=flops)

  def trajectory(self, ours: bool = True, torch: bool = True) -> Row:
    edits = FLAGS.edits
    x = make_inputs(self.spec, self.dim, edits, seed=100)
    first = ours_s = flops = torch_s = None
    if ours:
      sampler = sampling.make_trajectory_sampler(self.unet, self.schedule, self.sampler_config)
      args = (self.infer_params, edit_conditioning(x), jax.random.PRNGKey(0),
              sampling.Guidance())
      first, ours_s, _ = self._ours(sampler, args)
      unet = self.unet_flops(3 * edits, backward=False) if FLAGS.peak_tflops else None
      flops = unet and unet * FLAGS.steps
      if sampler._cache_size() != 1:  # pylint: disable=protected-access
        raise RuntimeError("the trajectory sampler recompiled between calls")
    if torch and self.torch_unet is not None:
      scheduler = self.ref.make_scheduler(ddim.default_scheduler_config(), FLAGS.steps)
      text, uncond, image = self._t(x["text"]), self._t(x["uncond"]), self._t(x["image"], True)
      generator = self.torch.Generator(device=self.torch_device).manual_seed(0)
      self.torch_unet.eval()
      torch_s = self._torch_time(lambda: self.ref.sample_trajectory(
          self.torch_unet, scheduler, text, uncond, image, generator).sum().item())
    return Row(f"trajectory T={FLAGS.steps}", edits, ours_s, torch_s, first, "images/s",
               edits, flops)

  def ppo_batch(self, x) -> ppo.PPOBatch:
    """A PPO minibatch of the shape the trainer builds (random chain, zero log-probs)."""
    edits, steps = FLAGS.edits, FLAGS.steps
    rng = np.random.default_rng(7)
    latents = rng.standard_normal((edits, steps + 1, self.side, self.side, 4)).astype(np.float32)
    return ppo.PPOBatch(
        cond=edit_conditioning(x), latents=jnp.asarray(latents),
        log_probs=jnp.zeros((edits, steps), jnp.float32),
        advantages=jnp.asarray(rng.standard_normal(edits).astype(np.float32)),
        timesteps=jnp.asarray(self.schedule.timesteps(steps), jnp.int32),
        guidance=sampling.Guidance())

  def ppo_update(self, ours: bool = True, torch: bool = True) -> Row:
    edits, steps = FLAGS.edits, FLAGS.steps
    x = make_inputs(self.spec, self.dim, edits, seed=200)
    batch = self.ppo_batch(x)
    first = ours_s = flops = torch_s = None
    if ours:
      step = ppo.make_train_step(self.unet, self.schedule, self.sampler_config,
                                 self.ppo_config)
      holder = {"state": ppo.init_train_state(jax.random.PRNGKey(1), self.params,
                                              self.ppo_config)[0]}

      def run():
        holder["state"], metrics = step(holder["state"], None, batch, jax.random.PRNGKey(2))
        jax.block_until_ready(metrics)

      start = time.perf_counter()
      run()
      first = time.perf_counter() - start
      ours_s = median_seconds(run, FLAGS.reps)
      if step._cache_size() != 1:  # pylint: disable=protected-access
        raise RuntimeError("the PPO train step recompiled between calls")
      unet = self.unet_flops(3 * edits, backward=True) if FLAGS.peak_tflops else None
      flops = unet and unet * steps
      del holder
    if torch and self.torch_unet is not None:
      scheduler = self.ref.make_scheduler(ddim.default_scheduler_config(), steps)
      update = self.ref.make_ppo_update(self.torch_unet, scheduler)
      chain = self.torch.from_numpy(np.moveaxis(np.asarray(batch.latents), -1, 2).copy()).to(
          self.torch_device, self.torch_dtype)
      log_probs = self.torch.zeros((edits, steps), device=self.torch_device)
      adv = self.torch.from_numpy(np.array(batch.advantages)).to(self.torch_device)
      text, uncond, image = self._t(x["text"]), self._t(x["uncond"]), self._t(x["image"], True)
      torch_s = self._torch_time(lambda: update(chain, log_probs, adv, text, uncond, image))
      del update  # its AdamW state
      self.torch_unet.zero_grad(set_to_none=True)
    return Row(f"PPO update T={steps} (full)", edits, ours_s, torch_s, first, "pairs/s",
               edits * steps, flops)

  def run_case(self, name: str, batch: Optional[int], ours: bool = True,
               torch: bool = True) -> Row:
    if name == "trajectory":
      return self.trajectory(ours, torch)
    if name == "ppo":
      return self.ppo_update(ours, torch)
    return getattr(self, name)(batch, ours, torch)

  def release_torch(self) -> None:
    """Drops the PyTorch model and hands its cached device memory back."""
    self.torch_unet = None
    if self.torch_device == "cuda":
      import gc  # pylint: disable=import-outside-toplevel
      gc.collect()
      self.torch.cuda.empty_cache()

  def trace(self) -> List[str]:
    """Lowers (no compile, no run) our forward, backward, sampler and train step; FLOPs."""
    lines = []
    b = FLAGS.edits
    side, length = self.side, self.spec["text_length"]
    f32 = jnp.float32
    sd = jax.ShapeDtypeStruct
    args = ({"params": self.params}, sd((3 * b, side, side, 8), f32), sd((3 * b,), jnp.int32),
            sd((3 * b, length, self.dim), f32))
    lowered = {"UNet forward": self.forward_fn().lower(*args),
               "UNet forward+backward": self.backward_fn().lower(self.params, *args[1:])}
    cond = sampling.EditConditioning(text_embeds=sd((b, length, self.dim), f32),
                                     uncond_text_embeds=sd((b, length, self.dim), f32),
                                     image_latents=sd((b, side, side, 4), f32))
    sampler = sampling.make_trajectory_sampler(self.unet, self.schedule, self.sampler_config)
    lowered["trajectory"] = sampler.lower(self.params, cond, jax.random.PRNGKey(0),
                                          sampling.Guidance())
    state = jax.eval_shape(lambda p: ppo.init_train_state(jax.random.PRNGKey(1), p,
                                                          self.ppo_config)[0], self.params)
    steps = FLAGS.steps
    batch = ppo.PPOBatch(cond=cond, latents=sd((b, steps + 1, side, side, 4), f32),
                         log_probs=sd((b, steps), f32), advantages=sd((b,), f32),
                         timesteps=sd((steps,), jnp.int32), guidance=sampling.Guidance())
    step = ppo.make_train_step(self.unet, self.schedule, self.sampler_config, self.ppo_config)
    lowered["PPO update"] = step.lower(state, None, batch, jax.random.PRNGKey(2))
    for name, low in lowered.items():
      analysis = low.cost_analysis() or {}
      flops = analysis.get("flops") if isinstance(analysis, dict) else None
      if flops is not None and name in ("trajectory", "PPO update"):
        flops *= steps  # cost analysis counts a scan body once
      lines.append(f"{name}: lowered OK, unet batch {3 * b}, "
                   f"HLO FLOPs (pre-optimisation) {flops if flops is None else f'{flops:.3g}'}")
    return lines


def main(_):
  bench = Bench(FLAGS.config)
  print(host.describe())
  print(f"config={FLAGS.config} unet_params={bench.parameter_count() / 1e6:.1f}M "
        f"latents={bench.side}x{bench.side} T={FLAGS.steps} edits={FLAGS.edits} "
        f"ours={FLAGS.dtype} on {jax.devices()[0].device_kind} (jax {jax.__version__}) "
        f"attention={FLAGS.attention} chunk_queries={bench.unet.attention.chunk_queries} "
        f"reps={FLAGS.reps}")
  if FLAGS.trace_only:
    print("\n".join(bench.trace()))
    return
  if bench.torch_unet is not None:
    import diffusers  # pylint: disable=import-outside-toplevel
    print(f"PyTorch {bench.torch.__version__} ({FLAGS.torch_dtype}, {bench.torch_device}, "
          f"{bench.torch.get_num_threads()} threads), diffusers {diffusers.__version__}")
  cases = parse_cases(FLAGS.cases, FLAGS.batches)
  start = time.perf_counter()
  torch_rows: Dict = {}
  if FLAGS.torch_first and bench.torch_unet is not None:
    for name, batch in cases:  # PyTorch side of every case, then ours: never both in memory
      row = run_guarded(bench, name, batch, start, ours=False)
      if row is not None:
        torch_rows[(name, batch)] = row
        print(f"PyTorch {row.case} batch {batch or row.batch}: {row.time_text(row.torch_s)}",
              flush=True)
    bench.release_torch()
  print(Row.HEADER, flush=True)
  for name, batch in cases:
    row = run_guarded(bench, name, batch, start, torch=not FLAGS.torch_first)
    if row is None:
      continue
    if (name, batch) in torch_rows:
      row.torch_s = torch_rows[(name, batch)].torch_s
    print(row.markdown(FLAGS.peak_tflops), flush=True)
  if bench.notes:
    print("\n".join(bench.notes))


def run_guarded(bench: Bench, name: str, batch: Optional[int], start: float,
                ours: bool = True, torch: bool = True) -> Optional[Row]:
  """One case (or one side of it); None after printing a skipped / failed row."""
  if FLAGS.deadline_s is not None and time.perf_counter() - start > FLAGS.deadline_s:
    print(f"| {name} | {batch or '-'} | skipped: --deadline_s={FLAGS.deadline_s:g} passed "
          "| | | | | | |", flush=True)
    return None
  try:
    return bench.run_case(name, batch, ours, torch)
  except Exception as error:  # pylint: disable=broad-except
    if not FLAGS.keep_going:
      raise
    side = "PyTorch" if not ours else "ours" if not torch else "both"
    message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    print(f"| {name} | {batch or '-'} | failed ({side}): {message} | | | | | | |", flush=True)
    return None


if __name__ == "__main__":
  app.run(main)
