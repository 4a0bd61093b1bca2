"""Where our UNet's time goes on a CPU, and attention-path variants side by side.

    python -m benchmarks.profile_unet --config=small --batch=6 --parts=variants,layers,breakdown

Parts (each prints a markdown table; all variants of a table are timed in one process with
their calls interleaved, so that they see the same machine load — compare ratios):

* ``variants``: the whole UNet forward and forward+backward (grad of mean(out^2) w.r.t. the
  params) for each ``--chunks`` value (``none``: attention 'xla', ``jax.nn.dot_product_attention``
  over all queries; an int: attention 'chunked' with that many queries per block), and
  diffusers PyTorch on the same weights.
* ``layers``: single layers at the config's shapes: the self-attention over the largest
  latent (32x32 = 1024 tokens for ``small``), the cross-attention over the text tokens,
  GroupNorm + SiLU, a 3x3 convolution and the GEGLU feed-forward; ours vs PyTorch.
* ``breakdown``: a ``jax.profiler`` trace of our compiled forward (or forward+backward with
  ``--breakdown_pass=backward``), thunk time summed per UNet block and per layer / op,
  attributed through the HLO ``op_name`` metadata.
"""

import collections
import glob
import os
import re
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import host
from benchmarks.configs import BENCHMARK_CONFIGS
from rl4pix_jax.models import attention_ops, layers
from rl4pix_jax.models.attention_ops import AttentionConfig
from rl4pix_jax.models import unet as unet_lib
from rl4pix_jax.weights import diffusers_models

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "small", list(BENCHMARK_CONFIGS), "Model size.")
flags.DEFINE_integer("batch", 6, "UNet batch size.")
flags.DEFINE_list("parts", ["variants", "layers", "breakdown"], "Parts to run.")
flags.DEFINE_list("chunks", ["none", "32"], "Attention variants to compare: none (xla) or "
                  "queries per block of the chunked path.")
flags.DEFINE_list("passes", ["forward", "backward"], "UNet passes in 'variants'.")
flags.DEFINE_integer("reps", 3, "Timed repetitions (after one warm-up call).")
flags.DEFINE_integer("breakdown_chunk", 32, "Queries per block of the profiled UNet's chunked "
                     "attention (0: attention 'xla').")
flags.DEFINE_enum("breakdown_pass", "forward", ["forward", "backward"], "Profiled pass.")
flags.DEFINE_integer("top", 12, "Rows per breakdown table.")
flags.DEFINE_bool("torch", True, "Time diffusers / PyTorch alongside.")


def load_average() -> str:
  return f"{os.getloadavg()[0]:.1f}"


def interleaved_medians(fns: Dict[str, Callable[[], object]], reps: int) -> Dict[str, float]:
  """Median seconds of each fn (which must block), calling them round-robin ``reps`` times."""
  times = {name: [] for name in fns}
  for fn in fns.values():
    fn()  # warm-up
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def first_call(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def chunk_value(text: str) -> Optional[int]:
  return None if text in ("none", "0", "") else int(text)


class Setup:
  """The benchmark UNet (random weights), its inputs and, optionally, diffusers' copy."""

  def __init__(self):
    self.spec = BENCHMARK_CONFIGS[FLAGS.config]
    self.config = unet_lib.UNetConfig.from_diffusers(self.spec["unet"])
    side, length = self.spec["latent_side"], self.spec["text_length"]
    dim = self.config.cross_attention_dim[0]
    rng = np.random.default_rng(0)
    b = FLAGS.batch
    self.sample = rng.standard_normal((b, side, side, self.config.in_channels)).astype(np.float32)
    self.t = np.full((b,), 500, np.int32)
    self.text = rng.standard_normal((b, length, dim)).astype(np.float32)
    model = unet_lib.UNet2DConditionModel(self.config)
    self.params = jax.jit(model.init)(jax.random.PRNGKey(0), self.sample[:1], self.t[:1],
                                      self.text[:1])["params"]
    self.torch_unet = None
    if FLAGS.torch:
      import torch  # pylint: disable=import-outside-toplevel
      from benchmarks import torch_reference  # pylint: disable=import-outside-toplevel
      self.torch = torch
      with tempfile.TemporaryDirectory() as folder:
        diffusers_models.export_unet(self.params, self.config, folder)
        self.torch_unet = torch_reference.load_unet(folder, "cpu", torch.float32)

  def model(self, chunk: Optional[int]) -> unet_lib.UNet2DConditionModel:
    """Our UNet with XLA's attention (chunk None) or the chunked path at ``chunk`` queries."""
    attention = (AttentionConfig("xla") if chunk is None else
                 AttentionConfig("chunked", chunk_queries=chunk))
    return unet_lib.UNet2DConditionModel(self.config, attention=attention)

  def jax_fn(self, chunk: Optional[int], backward: bool):
    model = self.model(chunk)
    args = (self.params, jnp.asarray(self.sample), jnp.asarray(self.t), jnp.asarray(self.text))
    if backward:
      fn = jax.jit(jax.grad(lambda p, x, t, c: jnp.mean(
          model.apply({"params": p}, x, t, c) ** 2)))
    else:
      fn = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    return lambda: jax.block_until_ready(fn(*args))

  def torch_fn(self, backward: bool):
    torch = self.torch
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self.sample, -1, 1)))
    t, c = torch.from_numpy(self.t), torch.from_numpy(self.text)
    unet = self.torch_unet

    def forward():
      unet.eval()
      with torch.no_grad():
        unet(x, t, c).sample.sum().item()

    def backward_fn():
      unet.train()
      unet.zero_grad(set_to_none=True)
      (unet(x, t, c).sample ** 2).mean().backward()
      next(unet.parameters()).grad.sum().item()
    return backward_fn if backward else forward


def variants(setup: Setup) -> List[str]:
  lines = ["| pass | batch | variant | median | vs first variant | first call s | load avg |",
           "|---|---|---|---|---|---|---|"]
  for name in FLAGS.passes:
    backward = name == "backward"
    fns, firsts = {}, {}
    for text in FLAGS.chunks:
      chunk = chunk_value(text)
      label = "ours, attention=" + ("xla" if chunk is None else f"chunked ({chunk} queries)")
      fns[label] = setup.jax_fn(chunk, backward)
      firsts[label] = f"{first_call(fns[label]):.1f}"
    if setup.torch_unet is not None:
      fns["diffusers PyTorch (SDPA)"] = setup.torch_fn(backward)
      firsts["diffusers PyTorch (SDPA)"] = "-"
    medians = interleaved_medians(fns, FLAGS.reps)
    base = next(iter(medians.values()))
    pass_name = "UNet forward+backward" if backward else "UNet forward"
    for label, seconds in medians.items():
      lines.append(f"| {pass_name} | {FLAGS.batch} | {label} | {seconds * 1e3:.1f} ms | "
                   f"{base / seconds:.2f}x | {firsts[label]} | {load_average()} |")
  return lines


def layer_cases(setup: Setup):
  """(name, ours fns by label, torch fn or None) at the config's largest-latent shapes."""
  cfg, b = setup.config, FLAGS.batch
  side = setup.spec["latent_side"]
  width, heads = cfg.block_out_channels[0], cfg.num_attention_heads[0]
  tokens, text_len = side * side, setup.spec["text_length"]
  rng = np.random.default_rng(1)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, k, v = normal(b, tokens, width), normal(b, tokens, width), normal(b, tokens, width)
  kc, vc = normal(b, text_len, width), normal(b, text_len, width)
  image = normal(b, side, side, width)
  cases = []
  torch = setup.torch if setup.torch_unet is not None else None

  def attention_case(name, keys, values):
    jq, jk, jv = (jnp.asarray(a) for a in (q, keys, values))
    fused = jax.jit(lambda q, k, v: attention_ops.fused_attention(q, k, v, heads))
    chunked = jax.jit(lambda q, k, v: attention_ops.chunked_attention(q, k, v, heads, 32))
    ours = {"fused (jax.nn.dot_product_attention)": lambda: fused(jq, jk, jv).block_until_ready(),
            "chunked, 32 queries/block": lambda: chunked(jq, jk, jv).block_until_ready()}
    torch_fn = None
    if torch is not None:
      split = lambda a: torch.from_numpy(a).reshape(b, a.shape[1], heads, -1).transpose(1, 2)
      tq, tk, tv = split(q), split(keys), split(values)

      def torch_fn():
        with torch.no_grad():
          torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).sum().item()
    cases.append((name, ours, torch_fn))

  attention_case(f"self-attention {tokens} tokens, {heads} heads x {width // heads}", k, v)
  attention_case(f"cross-attention {tokens} x {text_len} tokens", kc, vc)

  norm = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, jnp.float32, "norm")
  conv = layers.conv(width, 3, jnp.float32, "conv")
  ff = layers.FeedForward(width)
  x = jnp.asarray(image)
  for name, module, inp, torch_module, torch_inp in (
      ("GroupNorm + SiLU", norm, x, "norm", None),
      ("conv 3x3", conv, x, "conv", None),
      ("GEGLU feed-forward", ff, x.reshape(b, tokens, width), "ff", None)):
    params = module.init(jax.random.PRNGKey(0), inp)
    fn = jax.jit(lambda p, a, m=module, n=name: (nn.silu(m.apply(p, a)) if n.startswith("Group")
                                                  else m.apply(p, a)))
    ours = {"ours": lambda fn=fn, p=params, a=inp: fn(p, a).block_until_ready()}
    torch_fn = None
    if torch is not None:
      nchw = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 1)))
      if torch_module == "norm":
        layer = torch.nn.GroupNorm(cfg.norm_num_groups, width, eps=cfg.norm_eps)
        call = lambda layer=layer: torch.nn.functional.silu(layer(nchw))
      elif torch_module == "conv":
        layer = torch.nn.Conv2d(width, width, 3, padding=1)
        call = lambda layer=layer: layer(nchw)
      else:
        from diffusers.models import attention  # pylint: disable=import-outside-toplevel
        layer = attention.FeedForward(width, mult=4, activation_fn="geglu")
        seq = torch.from_numpy(image.reshape(b, tokens, width))
        call = lambda layer=layer: layer(seq)

      def torch_fn(call=call):
        with torch.no_grad():
          call().sum().item()
    cases.append((f"{name} {tuple(inp.shape)}", ours, torch_fn))
  return cases


def layers_table(setup: Setup) -> List[str]:
  lines = ["| layer (forward) | batch | variant | median | PyTorch | PyTorch / ours | load avg |",
           "|---|---|---|---|---|---|---|"]
  for name, ours, torch_fn in layer_cases(setup):
    fns = dict(ours)
    if torch_fn is not None:
      fns["torch"] = torch_fn
    medians = interleaved_medians(fns, max(FLAGS.reps, 5))
    torch_s = medians.pop("torch", None)
    for label, seconds in medians.items():
      torch_text = f"{torch_s * 1e3:.2f} ms" if torch_s else "-"
      ratio = f"{torch_s / seconds:.2f}x" if torch_s else "-"
      lines.append(f"| {name} | {FLAGS.batch} | {label} | {seconds * 1e3:.2f} ms | {torch_text} "
                   f"| {ratio} | {load_average()} |")
  return lines


_BLOCK = re.compile(r"^(down_blocks_\d+|mid_block|up_blocks_\d+|conv_in|conv_out|conv_norm_out|"
                    r"time_embedding)$")
_PART = re.compile(r"^(resnets_\d+|attentions_\d+|downsamplers_\d+|upsamplers_\d+)$")
_LAYER = re.compile(r"^(norm\w*|conv\w*|attn\d|ff|proj_in|proj_out|time_emb_proj|to_\w+)$")


def _instruction_metadata(hlo_text: str) -> Dict[str, str]:
  """HLO instruction name -> its op_name metadata, from compiled HLO text."""
  names = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      names[match.group(1)] = op_name.group(1) if op_name else ""
  return names


def breakdown(setup: Setup) -> List[str]:
  chunk = FLAGS.breakdown_chunk or None
  backward = FLAGS.breakdown_pass == "backward"
  model = setup.model(chunk)
  args = (setup.params, jnp.asarray(setup.sample), jnp.asarray(setup.t), jnp.asarray(setup.text))
  if backward:
    fn = jax.jit(jax.grad(lambda p, x, t, c: jnp.mean(model.apply({"params": p}, x, t, c) ** 2)))
  else:
    fn = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  metadata = _instruction_metadata(fn.lower(*args).compile().as_text())
  jax.block_until_ready(fn(*args))
  calls = 2
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    path = sorted(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))[-1]
    profile = jax.profiler.ProfileData.from_file(path)
  by_block, by_layer = collections.Counter(), collections.Counter()
  total = 0.0
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        op_name = metadata.get(event.name)
        if op_name is None or event.name.startswith("while"):
          continue  # not a leaf thunk of our executable (loops are counted by their bodies)
        ms = event.duration_ns / 1e6 / calls
        parts = [p for p in op_name.split("/") if p]
        block = next((p for p in parts if _BLOCK.match(p)), "other")
        part = next((p for p in parts if _PART.match(p)), "")
        layer = [p for p in parts if _LAYER.match(p)]
        op = parts[-1].split("[")[0] if parts else "?"
        by_block[f"{block}/{part}" if part else block] += ms
        by_layer[f"{'/'.join(layer[-2:]) or '-'} : {op}"] += ms
        total += ms
  what = "forward+backward" if backward else "forward"
  attention = "xla" if chunk is None else f"chunked ({chunk} queries)"
  lines = [f"Our UNet {what}, batch {FLAGS.batch}, attention={attention}: thunk time "
           f"{total:.0f} ms per call (summed over XLA's threads), load {load_average()}", "",
           "| UNet block / part | ms | share |", "|---|---|---|"]
  row = lambda key, ms: f"| {key} | {ms:.1f} | {ms / total * 100:.1f}% |"
  lines += [row(k, v) for k, v in by_block.most_common(FLAGS.top)]
  lines += ["", "| layer : op (last op_name component) | ms | share |", "|---|---|---|"]
  lines += [row(k, v) for k, v in by_layer.most_common(FLAGS.top)]
  return lines


def main(_):
  setup = Setup()
  import flax  # pylint: disable=import-outside-toplevel
  print(host.describe())
  print(f"config={FLAGS.config} batch={FLAGS.batch} on {jax.devices()[0].device_kind} "
        f"(jax {jax.__version__}, flax {flax.__version__}), {os.cpu_count()} CPUs, "
        f"load {load_average()}")
  if setup.torch_unet is not None:
    import diffusers  # pylint: disable=import-outside-toplevel
    print(f"PyTorch {setup.torch.__version__} ({setup.torch.get_num_threads()} threads), "
          f"diffusers {diffusers.__version__}")
  for part in FLAGS.parts:
    table = {"variants": variants, "layers": layers_table, "breakdown": breakdown}[part](setup)
    print("\n" + "\n".join(table), flush=True)


if __name__ == "__main__":
  app.run(main)
