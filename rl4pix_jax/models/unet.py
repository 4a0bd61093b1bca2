"""Flax UNet2DConditionModel (Stable Diffusion 1.x/2.x family, incl. 8-channel InstructPix2Pix).

NHWC, float32 parameters, compute in ``dtype``. Numerically matches diffusers'
``UNet2DConditionModel`` for the configurations ``UNetConfig`` accepts, and can capture the
cross-attention probabilities of chosen text tokens (see ``UNet2DConditionModel.__call__``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rl4pix_jax.models import layers
from rl4pix_jax.models.attention_ops import AttentionConfig

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# diffusers config fields we accept only at one value (SDXL / Kandinsky / LCM extras).
_FIXED_FIELDS = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}
# Fields with no effect on the supported model (only used by unsupported features).
_IGNORED_FIELDS = ("addition_embed_type_num_heads",)


def _per_block(name: str, value: Any, n: int, kind: type) -> Tuple[Any, ...]:
  """Expands an int/bool field to one value per down block, checking list lengths."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"UNet config field {name!r}={list(value)!r} has {len(value)} entries; "
                       f"expected one per down block ({n}).")
    if not all(isinstance(v, kind) and not isinstance(v, (list, tuple)) for v in value):
      raise ValueError(f"UNet config field {name!r}={list(value)!r}: expected a list of "
                       f"{kind.__name__} (nested lists are not supported).")
    return tuple(value)
  if not isinstance(value, kind):
    raise ValueError(f"UNet config field {name!r}={value!r}: expected {kind.__name__} "
                     f"or a list of {n}.")
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The UNet architecture, with per-block fields expanded to tuples (one per down block).

  Field names and meanings are diffusers' ``UNet2DConditionModel`` config names.
  ``num_attention_heads`` is the head count per down block (diffusers' config stores it in
  ``attention_head_dim`` for this model: SD 1.5's ``attention_head_dim=8`` means 8 heads).
  """
  sample_size: Optional[int] = 64
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: Tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  only_cross_attention: Tuple[bool, ...] = (False,) * 4
  mid_block_only_cross_attention: bool = False
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: Tuple[int, ...] = (2,) * 4
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: Tuple[int, ...] = (1280,) * 4
  transformer_layers_per_block: Tuple[int, ...] = (1,) * 4
  num_attention_heads: Tuple[int, ...] = (8,) * 4
  use_linear_projection: bool = False
  upcast_attention: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
    """Builds a config from diffusers' ``unet/config.json`` (a dict).

    Keys starting with ``_`` are ignored. Raises ValueError naming the field, its value and
    what is supported, for unknown fields and unsupported values (SDXL's
    ``addition_embed_type``, ``class_embed_type``, ``encoder_hid_dim``, ...).
    """
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    for name, supported in _FIXED_FIELDS.items():
      value = config.pop(name, supported)
      if value != supported:
        raise ValueError(f"UNet config field {name!r}={value!r} is not supported; "
                         f"only {supported!r} is (SD 1.x/2.x UNets).")
    for name in _IGNORED_FIELDS:
      config.pop(name, None)
    known = {f.name for f in dataclasses.fields(cls)} | {"attention_head_dim"}
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"Unknown UNet config fields {unknown}; expected diffusers "
                       f"UNet2DConditionModel fields: {sorted(known | set(_FIXED_FIELDS))}.")

    defaults = cls()
    per_block_defaults = {"only_cross_attention": False, "layers_per_block": 2,
                          "cross_attention_dim": 1280, "transformer_layers_per_block": 1}
    get = lambda name: config.get(name, per_block_defaults.get(name, getattr(defaults, name)))
    down = tuple(get("down_block_types"))
    up = tuple(get("up_block_types"))
    n = len(down)
    for name, types, allowed in (("down_block_types", down, DOWN_BLOCK_TYPES),
                                 ("up_block_types", up, UP_BLOCK_TYPES)):
      bad = [t for t in types if t not in allowed]
      if bad:
        raise ValueError(f"UNet config field {name!r} has unsupported block types {bad}; "
                         f"expected {allowed}.")
    if len(up) != n:
      raise ValueError(f"UNet config: {len(down)} down_block_types but {len(up)} "
                       "up_block_types; expected the same number.")
    mid = config.get("mid_block_type", defaults.mid_block_type)
    if mid not in MID_BLOCK_TYPES:
      raise ValueError(f"UNet config field 'mid_block_type'={mid!r} is not supported; "
                       f"expected one of {MID_BLOCK_TYPES}.")
    block_out = tuple(int(c) for c in get("block_out_channels"))
    if len(block_out) != n:
      raise ValueError(f"UNet config field 'block_out_channels'={list(block_out)} has "
                       f"{len(block_out)} entries; expected {n} (one per down block).")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    only_cross = get("only_cross_attention")
    mid_only_cross = config.get("mid_block_only_cross_attention")
    if mid_only_cross is None:
      mid_only_cross = only_cross if isinstance(only_cross, bool) else False
    groups = get("norm_num_groups")
    if groups is None:
      raise ValueError("UNet config field 'norm_num_groups'=None is not supported; "
                       "expected an int (GroupNorm everywhere).")
    act = get("act_fn")
    layers.activation(act)
    result = cls(
        sample_size=(tuple(get("sample_size")) if isinstance(get("sample_size"), list)
                     else get("sample_size")),
        in_channels=int(get("in_channels")),
        out_channels=int(get("out_channels")),
        center_input_sample=bool(get("center_input_sample")),
        flip_sin_to_cos=bool(get("flip_sin_to_cos")),
        freq_shift=get("freq_shift"),
        down_block_types=down,
        mid_block_type=mid,
        up_block_types=up,
        only_cross_attention=_per_block("only_cross_attention", only_cross, n, bool),
        mid_block_only_cross_attention=bool(mid_only_cross),
        block_out_channels=block_out,
        layers_per_block=_per_block("layers_per_block", get("layers_per_block"), n, int),
        downsample_padding=int(get("downsample_padding")),
        mid_block_scale_factor=float(get("mid_block_scale_factor")),
        act_fn=act,
        norm_num_groups=int(groups),
        norm_eps=float(get("norm_eps")),
        cross_attention_dim=_per_block("cross_attention_dim", get("cross_attention_dim"), n,
                                       int),
        transformer_layers_per_block=_per_block(
            "transformer_layers_per_block", get("transformer_layers_per_block"), n, int),
        num_attention_heads=_per_block("attention_head_dim", heads, n, int),
        use_linear_projection=bool(get("use_linear_projection")),
        upcast_attention=bool(get("upcast_attention")),
        conv_in_kernel=int(get("conv_in_kernel")),
        conv_out_kernel=int(get("conv_out_kernel")),
    )
    result.validate()
    return result

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "UNetConfig":
    """Builds a config from a dict or ml_collections ConfigDict with diffusers field names."""
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    return cls.from_diffusers(config)

  def validate(self) -> None:
    """Checks channel/head/group divisibility; raises ValueError naming the field."""
    if len(set(self.cross_attention_dim)) != 1:
      raise ValueError(f"UNet config field 'cross_attention_dim'={list(self.cross_attention_dim)}"
                       ": per-block widths are not supported; expected one int.")
    for i, (channels, heads) in enumerate(zip(self.block_out_channels,
                                              self.num_attention_heads)):
      if channels % heads:
        raise ValueError(f"UNet config: block_out_channels[{i}]={channels} is not divisible "
                         f"by its head count attention_head_dim[{i}]={heads}.")
      if channels % self.norm_num_groups:
        raise ValueError(f"UNet config: block_out_channels[{i}]={channels} is not divisible "
                         f"by norm_num_groups={self.norm_num_groups}.")

  @property
  def num_downsamplers(self) -> int:
    return len(self.block_out_channels) - 1

  def to_diffusers(self) -> dict:
    """A ``config.json`` dict that ``diffusers.UNet2DConditionModel`` accepts."""
    same = lambda t: t[0] if len(set(t)) == 1 else list(t)
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": self.sample_size,
        "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "center_input_sample": self.center_input_sample,
        "flip_sin_to_cos": self.flip_sin_to_cos,
        "freq_shift": self.freq_shift,
        "down_block_types": list(self.down_block_types),
        "mid_block_type": self.mid_block_type,
        "up_block_types": list(self.up_block_types),
        "only_cross_attention": same(self.only_cross_attention),
        "mid_block_only_cross_attention": self.mid_block_only_cross_attention,
        "block_out_channels": list(self.block_out_channels),
        "layers_per_block": same(self.layers_per_block),
        "downsample_padding": self.downsample_padding,
        "mid_block_scale_factor": self.mid_block_scale_factor,
        "act_fn": self.act_fn,
        "norm_num_groups": self.norm_num_groups,
        "norm_eps": self.norm_eps,
        "cross_attention_dim": same(self.cross_attention_dim),
        "transformer_layers_per_block": same(self.transformer_layers_per_block),
        "attention_head_dim": same(self.num_attention_heads),
        "num_attention_heads": None,
        "use_linear_projection": self.use_linear_projection,
        "upcast_attention": self.upcast_attention,
        "conv_in_kernel": self.conv_in_kernel,
        "conv_out_kernel": self.conv_out_kernel,
        **{k: v for k, v in _FIXED_FIELDS.items()},
    }


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
  """Per-block hyper-parameters shared by the down, mid and up blocks."""
  out_channels: int
  num_layers: int
  has_attention: bool
  heads: int
  transformer_layers: int
  only_cross_attention: bool
  resample: bool


class _Block(nn.Module):
  """Common fields of the UNet blocks (set from the UNetConfig)."""
  config: UNetConfig
  spec: _BlockSpec
  capture_size: Optional[int] = None
  attention: AttentionConfig = AttentionConfig()
  dtype: Dtype = jnp.float32

  def resnet(self, name: str, scale: float = 1.0) -> layers.ResnetBlock2D:
    cfg = self.config
    return layers.ResnetBlock2D(self.spec.out_channels, cfg.norm_num_groups, cfg.norm_eps, scale,
                                cfg.act_fn, self.dtype, name=name)

  def transformer(self, name: str) -> layers.Transformer2D:
    cfg, spec = self.config, self.spec
    return layers.Transformer2D(
        spec.heads, spec.out_channels // spec.heads, spec.transformer_layers,
        cfg.norm_num_groups, cfg.use_linear_projection, spec.only_cross_attention,
        cfg.upcast_attention, self.capture_size, self.attention, self.dtype, name=name)


class DownBlock(_Block):
  """CrossAttnDownBlock2D (``has_attention``) or DownBlock2D."""

  @nn.compact
  def __call__(self, x, temb, context, token_index=None, token_mask=None):
    """x: (B, H, W, C) -> (x', skips): skips holds every resnet (and downsampler) output."""
    skips = ()
    for i in range(self.spec.num_layers):
      x = self.resnet(f"resnets_{i}")(x, temb)
      if self.spec.has_attention:
        x = self.transformer(f"attentions_{i}")(x, context, token_index, token_mask)
      skips += (x,)
    if self.spec.resample:
      x = layers.Downsample2D(self.spec.out_channels, self.config.downsample_padding, self.dtype,
                              name="downsamplers_0")(x)
      skips += (x,)
    return x, skips


class MidBlock(_Block):
  """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) ``num_layers`` times."""

  @nn.compact
  def __call__(self, x, temb, context, token_index=None, token_mask=None):
    """x: (B, h, w, C) -> (B, h, w, C)."""
    scale = self.config.mid_block_scale_factor
    x = self.resnet("resnets_0", scale)(x, temb)
    for i in range(self.spec.num_layers):
      x = self.transformer(f"attentions_{i}")(x, context, token_index, token_mask)
      x = self.resnet(f"resnets_{i + 1}", scale)(x, temb)
    return x


class UpBlock(_Block):
  """CrossAttnUpBlock2D (``has_attention``) or UpBlock2D."""

  @nn.compact
  def __call__(self, x, skips, temb, context, token_index=None, token_mask=None):
    """x: (B, H, W, C); skips: ``num_layers`` arrays, consumed from the last."""
    for i in range(self.spec.num_layers):
      x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
      x = self.resnet(f"resnets_{i}")(x, temb)
      if self.spec.has_attention:
        x = self.transformer(f"attentions_{i}")(x, context, token_index, token_mask)
    if self.spec.resample:
      x = layers.Upsample2D(self.spec.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class UNet2DConditionModel(nn.Module):
  """Conditional UNet of Stable Diffusion / InstructPix2Pix.

  Attributes:
    config: the architecture.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32, output is float32.
    remat: wrap each down/mid/up block in ``nn.remat`` (gradient checkpointing).
    attention: the attention kernels (``attention_ops.AttentionConfig``; default XLA's
      fused attention in every layer). Run configs build it from ``model.attention``
      ('auto' picks per backend and layer: Pallas flash attention on TPU for long
      self-attention, cuDNN on GPU, the blocked path on CPU). Layers that capture
      cross-attention maps compute explicit probabilities whatever the setting.
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: AttentionConfig = AttentionConfig()

  @nn.compact
  def __call__(
      self,
      sample: jax.Array,
      timesteps: jax.Array,
      encoder_hidden_states: jax.Array,
      token_index: Optional[jax.Array] = None,
      token_mask: Optional[jax.Array] = None,
      capture_size: Optional[int] = None,
  ) -> jax.Array:
    """Predicts the noise (or v) for a batch of latents.

    Args:
      sample: (B, H, W, in_channels) float latents, NHWC; H and W divisible by
        2 ** (number of down blocks - 1).
      timesteps: (B,) or scalar, int or float, diffusers' timestep values (0..999).
      encoder_hidden_states: (B, L, cross_attention_dim) text encoder states.
      token_index: (B, K) int32 token positions whose cross-attention maps to capture, or None.
      token_mask: (B, K) bool, False zeroes a token's maps; None means all True.
      capture_size: capture only in cross-attention layers whose spatial side h equals this
        (a Python int); None captures in every cross-attention layer.
    Returns:
      (B, H, W, out_channels) float32.

    With ``token_index`` given, each selected layer sows (B, h, w, K) float32 head-averaged
    softmax probabilities into the ``'attention_maps'`` collection (``'probs'``); apply with
    ``mutable=['attention_maps']`` to get them, and see ``collect_attention_maps``.
    """
    cfg = self.config
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"UNet sample has shape {sample.shape}; expected (B, H, W, "
                       f"{cfg.in_channels}) NHWC.")
    factor = 2 ** cfg.num_downsamplers
    if sample.shape[1] % factor or sample.shape[2] % factor:
      raise ValueError(f"UNet sample spatial size {sample.shape[1:3]} must be divisible by "
                       f"{factor} (2 ** number of downsamplers).")
    batch = sample.shape[0]
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
      raise ValueError(f"encoder_hidden_states has shape {encoder_hidden_states.shape}; "
                       f"expected ({batch}, L, cross_attention_dim).")
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim == 0:
      timesteps = jnp.broadcast_to(timesteps, (batch,))
    if token_index is not None and token_index.ndim != 2:
      raise ValueError(f"token_index has shape {token_index.shape}; expected (B, K).")

    t_emb = layers.timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                      cfg.freq_shift)
    temb = layers.TimestepEmbedding(cfg.block_out_channels[0] * 4, cfg.act_fn, self.dtype,
                                    name="time_embedding")(t_emb.astype(self.dtype))
    x = sample.astype(jnp.float32)
    if cfg.center_input_sample:
      x = 2 * x - 1.0
    x = layers.conv(cfg.block_out_channels[0], cfg.conv_in_kernel, self.dtype,
                    "conv_in")(x.astype(self.dtype))
    context = encoder_hidden_states.astype(self.dtype)

    wrap = (lambda cls: nn.remat(cls)) if self.remat else (lambda cls: cls)
    common = dict(config=cfg, capture_size=capture_size, attention=self.attention,
                  dtype=self.dtype)
    n = len(cfg.block_out_channels)
    skips = (x,)
    for i, block_type in enumerate(cfg.down_block_types):
      spec = _BlockSpec(cfg.block_out_channels[i], cfg.layers_per_block[i],
                        block_type == "CrossAttnDownBlock2D", cfg.num_attention_heads[i],
                        cfg.transformer_layers_per_block[i], cfg.only_cross_attention[i],
                        resample=i < n - 1)
      x, block_skips = wrap(DownBlock)(spec=spec, name=f"down_blocks_{i}", **common)(
          x, temb, context, token_index, token_mask)
      skips += block_skips

    mid_spec = _BlockSpec(cfg.block_out_channels[-1], 1, True, cfg.num_attention_heads[-1],
                          cfg.transformer_layers_per_block[-1],
                          cfg.mid_block_only_cross_attention, resample=False)
    x = wrap(MidBlock)(spec=mid_spec, name="mid_block", **common)(
        x, temb, context, token_index, token_mask)

    reversed_channels = cfg.block_out_channels[::-1]
    for i, block_type in enumerate(cfg.up_block_types):
      j = n - 1 - i  # matching down block
      spec = _BlockSpec(reversed_channels[i], cfg.layers_per_block[j] + 1,
                        block_type == "CrossAttnUpBlock2D", cfg.num_attention_heads[j],
                        cfg.transformer_layers_per_block[j], cfg.only_cross_attention[j],
                        resample=i < n - 1)
      block_skips, skips = skips[-spec.num_layers:], skips[:-spec.num_layers]
      x = wrap(UpBlock)(spec=spec, name=f"up_blocks_{i}", **common)(
          x, block_skips, temb, context, token_index, token_mask)

    x = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x)
    x = layers.activation(cfg.act_fn)(x)
    x = layers.conv(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out")(x)
    return x.astype(jnp.float32)


def collect_attention_maps(state: Mapping[str, Any]) -> jax.Array:
  """Averages the cross-attention maps sown by ``UNet2DConditionModel``.

  Args:
    state: the mutable-variables dict returned by ``apply(..., mutable=['attention_maps'])``
      (or its ``'attention_maps'`` entry).
  Returns:
    (B, h, w, K) float32, the mean over all sown layers.
  Raises:
    ValueError: when nothing was sown or the sown maps have different shapes (pass a
      ``capture_size`` so that only one resolution is captured).
  """
  tree = state.get(layers.ATTENTION_MAPS_COLLECTION, state) if hasattr(state, "get") else state
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError("No attention maps were sown: call the UNet with token_index and "
                     "mutable=['attention_maps'].")
  shapes = sorted({tuple(leaf.shape) for leaf in leaves})
  if len(shapes) != 1:
    raise ValueError(f"Sown attention maps have different shapes {shapes}; pass capture_size "
                     "to capture one resolution only.")
  return jnp.mean(jnp.stack([leaf.astype(jnp.float32) for leaf in leaves]), axis=0)
