"""UNet_SD: the text-conditioned UNet of Stable Diffusion 1.x/2.x, written from scratch.

The architecture is the one of the latent diffusion paper (Rombach et al. 2022, https://arxiv.org/abs/2112.10752)
as released in CompVis/stable-diffusion and Stability-AI/stablediffusion. Modules are laid out and named like
that original code (`input_blocks`, `middle_block`, `output_blocks`, `in_layers`, `attn1.to_q`, ...), so a
single-file SD checkpoint copies in key for key; `imagecraft.port` maps diffusers' layout onto it.

Every attention layer computes through a swappable processor (`CrossAttention.processor`), addressable by
module name via `UNet_SD.attn_processors` / `UNet_SD.set_attn_processor`. The default one is a single call to
`torch.nn.functional.scaled_dot_product_attention`; `imagecraft.explain.capture` swaps in one that also records
the cross-attention probabilities.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .runtime import layout_for, unfused_attention

def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """The layout `x` (B, C, H, W) is stored in: channels-last or the standard one."""
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def _count(name: str, value, low: int = 1) -> int:
    """`value` as an int >= low; numpy ints pass, bools and floats do not (True is not a channel count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _levels(name: str, value) -> tuple:
    """A per-level field as a tuple; a string is refused rather than read as one level per character."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a tuple with one entry per level, got {value!r}")
    return tuple(value)


@dataclass
class UNetConfig:
    """Describes any UNet of the SD 1.x/2.x family. Per-level fields take one value or one per level."""

    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted noise (or v) channels out
    model_channels: int = 320  # channels of the first level; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per resolution level
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # levels with a spatial transformer
    num_heads: int | tuple[int, ...] | None = 8  # attention heads per level (SD1); None when head_dim is set
    head_dim: int | tuple[int, ...] | None = None  # channels per head per level (SD2: 64); None when num_heads set
    transformer_depth: int | tuple[int, ...] = 1  # TransformerBlocks per spatial transformer, per level
    context_dim: int = 768  # width of the text encoder's hidden states (SD1: 768, SD2: 1024)
    use_linear_projection: bool = False  # proj_in/proj_out as Linear (SD2) instead of 1x1 conv (SD1)
    upcast_attention: bool = False  # compute fp16 attention in fp32 (SD2.1 overflows otherwise)
    norm_groups: int = 32  # GroupNorm groups everywhere
    dropout: float = 0.0  # dropout in ResBlocks and feed-forwards (only active in training)
    sample_size: int = 64  # latent height and width the model is made for (SD1.5: 64); picks the memory layout

    def __post_init__(self):
        """Checks every field here, so a bad config fails with its name and value, not deep inside a layer."""
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "context_dim", "norm_groups",
                     "sample_size"):
            setattr(self, name, _count(name, getattr(self, name)))
        self.channel_mult = tuple(_count(f"channel_mult[{i}]", m)
                                  for i, m in enumerate(_levels("channel_mult", self.channel_mult)))
        levels = len(self.channel_mult)
        if not levels:
            raise ValueError("channel_mult must have at least one level, got ()")
        self.attention_levels = _levels("attention_levels", self.attention_levels)
        if not all(isinstance(a, bool) for a in self.attention_levels):
            raise ValueError(f"attention_levels must be True or False per level, got {self.attention_levels}")
        if len(self.attention_levels) != levels:
            raise ValueError(f"attention_levels needs one entry per level ({levels}), got {self.attention_levels}")
        for name in ("use_linear_projection", "upcast_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real)
                or not 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(f"set exactly one of num_heads and head_dim, got num_heads={self.num_heads!r} and "
                             f"head_dim={self.head_dim!r}")
        # depth 0 is allowed where no transformer is built (diffusers ignores it on levels without attention)
        for name, low in (("num_heads", 1), ("head_dim", 1), ("transformer_depth", 0)):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if len(value) != levels:
                    raise ValueError(f"{name} needs one entry per level ({levels}), got {tuple(value)}")
                setattr(self, name, tuple(_count(f"{name}[{i}]", v, low) for i, v in enumerate(value)))
            elif value is not None or name == "transformer_depth":
                setattr(self, name, _count(name, value, low))
        if self.model_channels % self.norm_groups:  # the first ResBlock norms conv_in's output
            raise ValueError(f"model_channels={self.model_channels} must be divisible by "
                             f"norm_groups={self.norm_groups}")
        for level, mult in enumerate(self.channel_mult):
            channels = self.model_channels * mult
            if channels % self.norm_groups:
                raise ValueError(f"level {level} has {channels} channels, not divisible by norm_groups={self.norm_groups}")
            if not (self.attention_levels[level] or level == levels - 1):
                continue  # no spatial transformer here (the middle block has one at the last level)
            if self.depth(level) < 1:
                raise ValueError(f"transformer_depth at level {level} must be at least 1 (the level has a spatial "
                                 f"transformer), got {self.depth(level)}")
            if self.head_dim is not None and channels % self._per_level(self.head_dim, level):
                raise ValueError(f"level {level} has {channels} channels, not divisible by "
                                 f"head_dim={self._per_level(self.head_dim, level)}")
            if channels % self.heads(level):
                raise ValueError(f"level {level} has {channels} channels, not divisible by {self.heads(level)} heads")

    def _per_level(self, value, level):
        return value[level] if isinstance(value, tuple) else value

    def heads(self, level: int) -> int:
        """Number of attention heads of the spatial transformers at `level`."""
        if self.num_heads is not None:
            return self._per_level(self.num_heads, level)
        return self.model_channels * self.channel_mult[level] // self._per_level(self.head_dim, level)

    def depth(self, level: int) -> int:
        return self._per_level(self.transformer_depth, level)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """Stable Diffusion 1.x (1.4, 1.5): 8 heads, conv projections, CLIP ViT-L/14 context."""
        return cls()

    @classmethod
    def sd21(cls) -> "UNetConfig":
        """Stable Diffusion 2.x (2.0, 2.1, base and 768-v): 64-channel heads, linear projections, OpenCLIP-H."""
        return cls(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True, upcast_attention=True)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """A few-hundred-thousand-parameter UNet of the same shape, for tests."""
        return cls(model_channels=32, channel_mult=(1, 2), attention_levels=(True, True), num_res_blocks=1,
                   num_heads=2, context_dim=32, norm_groups=8)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps as [cos, sin] (Vaswani et al. 2017), as SD computes it."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # (B, dim): an odd dim gets a zero column, as SD and diffusers


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between and a (projected) skip."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # In-place adds into fresh conv outputs (autograd-safe) spare large allocations on CPU.
        h = self.in_layers(x)
        h += self.emb_layers(emb)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        return self.out_layers(h).add_(self.skip_connection(x))


class DownSample(nn.Module):
    """Halves H and W with a stride-2 3x3 conv (odd sizes round up)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class UpSample(nn.Module):
    """Nearest-neighbour upsampling to `size` (default 2x), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class SDPAProcessor:
    """Default attention maths: one fused `scaled_dot_product_attention` call.

    A processor is any callable `(attn, x, context) -> out`, where `attn` is the CrossAttention module (its
    `to_q`, `to_k`, `to_v`, `to_out`, `heads` and `upcast`), `x` is (B, N, query_dim) and `context` is
    (B, M, context_dim) or None for self-attention. It must return a new tensor: TransformerBlock adds the
    residual into it in place. Swap one in with `UNet_SD.set_attn_processor`.
    """

    def __call__(self, attn: "CrossAttention", x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(attn, *attn.qkv(x, context))

    @staticmethod
    def attend(attn: "CrossAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over projected q, k, v (each (B, heads, N or M, dim_head)), merged and projected out.
        `mask` is added to the scores (-inf removes a key); other processors reuse this to stay bit-identical."""
        return attn.out(SDPAProcessor.weighted_values(attn, q, k, v, mask))

    @staticmethod
    def weighted_values(attn: "CrossAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attend` before the heads are merged and projected: softmax(q k^T / sqrt(d) + mask) v, (B, heads, N,
        dim_head) in q's dtype. Prompt-to-Prompt sums two of these before one projection."""
        dtype = q.dtype
        if attn.upcast and dtype == torch.float16:
            q, k, v = q.float(), k.float(), v.float()
        if unfused_attention(q, k):  # three plain ops, fp32 softmax: faster in bf16 training on CPU (runtime)
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
            if mask is not None:
                scores = scores + mask
            out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.to(dtype)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else queries attend to `context`."""

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])
        self.processor: Callable = SDPAProcessor()

    def qkv(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """Projected queries, keys and values, split into heads: (B, heads, N, dim_head) each."""
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return [rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v)]

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """Merges heads (B, heads, N, dim_head) -> (B, N, inner) and projects back."""
        return self.to_out[0](rearrange(o, "b h n d -> b n (h d)"))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.processor(self, x, context)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, https://arxiv.org/abs/2002.05202)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return x * F.gelu(gate)
        return F.gelu(gate).mul_(x)  # inference: one large allocation fewer


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; each pre-LayerNorm with a residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool = False, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, upcast=upcast)
        self.attn2 = CrossAttention(dim, heads, context_dim=context_dim, upcast=upcast)
        self.ff = FeedForward(dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # residuals added in place into the fresh output projections (autograd-safe)
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """Runs TransformerBlocks over the pixels of a feature map: norm, proj_in, blocks, proj_out, residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 linear: bool = False, upcast: bool = False, dropout: float = 0.0):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim, upcast, dropout) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        # tokens (B, HW, C), contiguous: a free view when x is channels-last (half precision), one copy otherwise
        x = rearrange(x, "b c h w -> b (h w) c").contiguous()
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        # back to (B, C, H, W) in the layout the rest of the UNet runs in, so convs never mix layouts
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous(memory_format=_layout_of(residual))
        if not self.linear:
            x = self.proj_out(x)
        return x.add_(residual)


class TimeModulatedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to ResBlocks and the text context to SpatialTransformers."""

    def forward(self, x, emb, context, upsample_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, UpSample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class FeatureCache:
    """DeepCache's schedule and store for one sampling run: every `interval`-th call runs the whole UNet and keeps
    the feature entering the up path's last `depth` output blocks; the calls in between reuse it and recompute
    only the shallowest `depth` input and output blocks. interval 1 is the whole UNet every step."""

    def __init__(self, interval: int, depth: int = 2):
        if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= 1000:
            raise ValueError(f"cache_interval must be a whole number of 1 or more (1: no caching), got {interval!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"cache depth must be a whole number of at least 1, got {depth!r}")
        self.interval, self.depth = interval, depth
        self.calls = 0
        self.feature: torch.Tensor | None = None

    def partial_step(self, x: torch.Tensor) -> bool:
        """Whether this call may reuse the stored feature (and counts the call)."""
        partial = (self.calls % self.interval != 0 and self.feature is not None
                   and self.feature.shape[0] == x.shape[0])
        self.calls += 1
        return partial


class UNet_SD(nn.Module):
    """The Stable Diffusion UNet: predicts the noise (or v) in latents `x` at timestep `t` given text `context`.

    Args:
        config: a `UNetConfig`; `UNetConfig.sd15()` and `UNetConfig.sd21()` are the released shapes.

    `forward(x, t, context)` takes latents (B, in_channels, H, W) of any H, W >= 1 (sizes that are not a multiple
    of `config.downsample_factor` work as in diffusers: each upsampling matches its skip connection), timesteps
    as an int, a 0-d tensor or a (B,) tensor, and context (B, tokens, context_dim). It returns a tensor of
    x's shape. Weights come from `UNet_SD.from_diffusers(unet)` or `imagecraft.load_pipe_into_our_UNet`.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        ch = cfg.model_channels
        groups = cfg.norm_groups
        emb_dim = cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(channels, level):
            return SpatialTransformer(channels, cfg.heads(level), cfg.depth(level), cfg.context_dim, groups,
                                      cfg.use_linear_projection, cfg.upcast_attention, cfg.dropout)

        # Down: conv_in, then per level num_res_blocks x (ResBlock [+ SpatialTransformer]), then DownSample.
        self.input_blocks = nn.ModuleList([TimeModulatedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]  # channels of each input block's output, consumed in reverse by the output blocks
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * cfg.model_channels, emb_dim, groups, cfg.dropout)]
                ch = mult * cfg.model_channels
                if cfg.attention_levels[level]:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimeModulatedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimeModulatedSequential(DownSample(ch)))
                skip_channels.append(ch)

        # Middle: ResBlock, SpatialTransformer, ResBlock at the lowest resolution.
        self.middle_block = TimeModulatedSequential(
            ResBlock(ch, ch, emb_dim, groups, cfg.dropout),
            transformer(ch, levels - 1),
            ResBlock(ch, ch, emb_dim, groups, cfg.dropout),
        )

        # Up: per level (deepest first) num_res_blocks + 1 x (ResBlock on [h, skip] [+ SpatialTransformer]),
        # the last one of each level but the top followed by an UpSample.
        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * cfg.model_channels, emb_dim, groups, cfg.dropout)]
                ch = mult * cfg.model_channels
                if cfg.attention_levels[level]:
                    layers.append(transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(UpSample(ch))
                self.output_blocks.append(TimeModulatedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    # --- memory layout ------------------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        """After every .to()/.half()/.cuda(): conv weights in the layout for their dtype (`layout_for`)."""
        super()._apply(fn, *args, **kwargs)
        layout = layout_for(self.out[2].weight.dtype, self.config.sample_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_contiguous(memory_format=layout):
                m.weight.data = m.weight.data.contiguous(memory_format=layout)
        return self

    # --- attention processors -----------------------------------------------------------------------------
    @property
    def attn_processors(self) -> dict[str, Callable]:
        """The processor of every attention layer, keyed by module name (e.g. `input_blocks.1.1....attn2`)."""
        return {name: m.processor for name, m in self.named_modules() if isinstance(m, CrossAttention)}

    def set_attn_processor(self, processor) -> None:
        """Sets the attention processor: one for every layer, or a dict {module name: processor} that names
        every attention layer (build it from the keys of `attn_processors`)."""
        layers = {name: m for name, m in self.named_modules() if isinstance(m, CrossAttention)}
        if not isinstance(processor, dict):
            processor = dict.fromkeys(layers, processor)
        missing, unknown = layers.keys() - processor.keys(), processor.keys() - layers.keys()
        if missing or unknown:
            raise ValueError(f"the processor dict must name every attention layer and nothing else; "
                             f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        for name, m in layers.items():
            m.processor = processor[name]

    # --- forward ------------------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"x must be latents of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        batch = x.shape[0]
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim or context.shape[0] not in (1, batch):
            raise ValueError(f"context must have shape ({batch}, tokens, {cfg.context_dim}), got {tuple(context.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"t must be an int, a 0-d tensor or a ({batch},) tensor, got shape {tuple(t.shape)}")
        return t.reshape(-1).expand(batch)

    def forward(self, x: torch.Tensor, t: int | torch.Tensor, context: torch.Tensor,
                cache: "FeatureCache | None" = None) -> torch.Tensor:
        """The noise (or v) prediction for latents x at timestep t, given the text context.

        With a `FeatureCache` (DeepCache, Ma et al. 2024, arXiv:2312.00858), a step the cache marks as partial runs
        only the shallowest `cache.depth` input blocks and the output blocks that take their skips, and starts the
        rest of the up path from the deep feature the last full step stored: the deep features change slowly from
        one sampling step to the next, while the shallow ones carry the detail. Without a cache, every block runs.
        """
        t = self._check_inputs(x, t, context)
        if context.shape[0] != x.shape[0]:
            context = context.expand(x.shape[0], -1, -1)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # (B, 4 * ch)

        if cache is not None and not 1 <= cache.depth < len(self.input_blocks):
            raise ValueError(f"cache depth must be from 1 to {len(self.input_blocks) - 1} for this UNet "
                             f"({len(self.input_blocks)} input blocks), got {cache.depth}")
        partial = cache is not None and cache.partial_step(x)
        depth = cache.depth if partial else len(self.input_blocks)
        skips = []
        h = x.contiguous(memory_format=layout_for(x.dtype, self.config.sample_size))
        for block in self.input_blocks[:depth]:
            h = self._run(block, h, emb, context)
            skips.append(h)
        first = len(self.output_blocks) - depth  # the first output block to run
        if partial:
            h = cache.feature
        else:
            h = self._run(self.middle_block, h, emb, context)
        for j, block in enumerate(self.output_blocks[first:], first):
            if cache is not None and not partial and j == len(self.output_blocks) - cache.depth:
                cache.feature = h  # the deep part's output, for the partial steps until the next full one
            skip = skips.pop()
            # upsample to the size of the next skip, so odd sizes line up as in diffusers
            h = self._run(block, torch.cat([h, skip], dim=1), emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h).contiguous()

    # Training only: recompute each block's activations in the backward pass instead of keeping them, for
    # memory (about a third more compute). Off by default; `finetune --gradient-checkpointing` turns it on.
    gradient_checkpointing: bool = False

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # Readers of other checkpoint layouts by name, registered by `imagecraft.port` when it loads: the porting layer
    # depends on the model, never the reverse, so the model finds its reader by name at call time.
    readers: dict = {}

    @classmethod
    def from_diffusers(cls, unet) -> "UNet_SD":
        """A UNet_SD with the config and weights of a diffusers `UNet2DConditionModel` (e.g. `pipe.unet`), ported
        exactly by `imagecraft.port.from_diffusers`."""
        if "diffusers" not in cls.readers:
            importlib.import_module(__package__ + ".port")  # registers it
        return cls.readers["diffusers"](unet)
