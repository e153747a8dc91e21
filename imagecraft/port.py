"""Exact weight porting between UNet_SD and the two layouts SD weights come in.

* diffusers' `UNet2DConditionModel` (`pipe.unet`, a `unet/` folder): `load_pipe_into_our_UNet`, and back with
  `to_diffusers_state_dict` / `to_diffusers`.
* original CompVis/LDM single-file checkpoints (`model.diffusion_model.*`): UNet_SD uses the same names, so
  `load_ldm_unet` copies key for key.

Porting is strict: every source tensor is used exactly once, every tensor of ours is filled, each shape is
checked before anything is copied, and a diffusers feature UNet_SD does not implement is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .unet import UNet_SD, UNetConfig


class PortingError(ValueError):
    """Weights or configs that cannot be ported exactly."""


# Names inside a ResBlock: ours (= LDM) -> diffusers' ResnetBlock2D.
RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# Modules outside the blocks: ours -> diffusers.
TOP_NAMES = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Inside spatial transformers, names are the same on both sides (norm, proj_in, transformer_blocks.N.attn1.to_q,
# ff.net.0.proj, ...), and so are UpSample's `conv`. DownSample's `op` is diffusers' `conv`.

# diffusers config fields UNet_SD does not implement: field -> (feature, the value SD 1.x/2.x use).
UNSUPPORTED = {
    "addition_embed_type": ("SDXL-style added conditioning (addition_embed_type)", None),
    "addition_time_embed_dim": ("SDXL-style added time conditioning (addition_time_embed_dim)", None),
    "projection_class_embeddings_input_dim": ("projected class embeddings", None),
    "class_embed_type": ("class embeddings (class_embed_type)", None),
    "num_class_embeds": ("class embeddings (num_class_embeds)", None),
    "class_embeddings_concat": ("concatenated class embeddings", False),
    "encoder_hid_dim": ("an encoder hidden-state projection (encoder_hid_dim)", None),
    "encoder_hid_dim_type": ("an encoder hidden-state projection (encoder_hid_dim_type)", None),
    "time_cond_proj_dim": ("timestep-condition projection (LCM's time_cond_proj_dim)", None),
    "time_embedding_type": ("a non-positional time embedding", "positional"),
    "time_embedding_dim": ("a custom time embedding width", None),
    "time_embedding_act_fn": ("an activation after the time embedding", None),
    "timestep_post_act": ("an activation after the timestep MLP", None),
    "flip_sin_to_cos": ("sin-first timestep embeddings", True),
    "freq_shift": ("a shifted timestep frequency", 0),
    "center_input_sample": ("input centring", False),
    "mid_block_type": ("a mid block other than UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn"),
    "only_cross_attention": ("cross-attention-only transformer blocks", False),
    "mid_block_only_cross_attention": ("a cross-attention-only mid block", None),
    "dual_cross_attention": ("dual cross-attention", False),
    "cross_attention_norm": ("a norm on the cross-attention context", None),
    "attention_type": ("gated or other non-default attention", "default"),
    "resnet_time_scale_shift": ("scale-shift time modulation in ResBlocks", "default"),
    "resnet_skip_time_act": ("ResBlocks without the time activation", False),
    "resnet_out_scale_factor": ("scaled ResBlock outputs", 1.0),
    "mid_block_scale_factor": ("a scaled mid block", 1),
    "act_fn": ("an activation other than SiLU", "silu"),
    "norm_eps": ("a GroupNorm eps other than 1e-5", 1e-5),
    "downsample_padding": ("downsampling with padding other than 1", 1),
    "conv_in_kernel": ("a conv_in kernel other than 3", 3),
    "conv_out_kernel": ("a conv_out kernel other than 3", 3),
    "reverse_transformer_layers_per_block": ("asymmetric transformer depths", None),
}
DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_TYPES = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}


def _same_everywhere(value, name):
    """An int from an int or a tuple of equal ints; UNet_SD has one value for all levels of these."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise PortingError(f"UNet_SD does not implement per-level {name}, got {tuple(value)}")
        return value[0]
    return value


def config_from_diffusers(cfg: Mapping) -> UNetConfig:
    """The UNetConfig of a diffusers UNet2DConditionModel config; refuses features UNet_SD does not implement."""
    cfg = dict(cfg)
    for field, (feature, sd_value) in UNSUPPORTED.items():
        if field in cfg and cfg[field] != sd_value:
            raise PortingError(f"UNet_SD does not implement {feature}: {field}={cfg[field]!r} "
                               f"(SD 1.x/2.x use {sd_value!r})")
    if cfg.get("norm_num_groups") is None:
        raise PortingError("UNet_SD does not implement a UNet without GroupNorm (norm_num_groups=None)")
    down = list(cfg["down_block_types"])
    unknown = [t for t in down if t not in DOWN_TYPES]
    if unknown:
        raise PortingError(f"UNet_SD does not implement down block types {unknown}; it knows {list(DOWN_TYPES)}")
    attention = tuple(DOWN_TYPES[t] for t in down)
    expected_up = [UP_TYPES[a] for a in reversed(attention)]
    if list(cfg["up_block_types"]) != expected_up:
        raise PortingError(f"UNet_SD implements up blocks that mirror the down blocks ({expected_up}), "
                           f"got up_block_types={list(cfg['up_block_types'])}")
    channels = list(cfg["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise PortingError(f"block_out_channels must be multiples of the first one, got {channels}")
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]  # diffusers' legacy name for heads
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if any(isinstance(d, (list, tuple)) for d in depth):
            raise PortingError(f"UNet_SD does not implement per-block transformer depths, got {depth}")
        depth = tuple(depth)
    return UNetConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        model_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=_same_everywhere(cfg["layers_per_block"], "layers_per_block"),
        attention_levels=attention,
        num_heads=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
        transformer_depth=depth,
        context_dim=_same_everywhere(cfg["cross_attention_dim"], "cross_attention_dim"),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        norm_groups=cfg["norm_num_groups"],
        dropout=cfg.get("dropout", 0.0),
        sample_size=_sample_size(cfg.get("sample_size")),
    )


def _sample_size(value) -> int:
    """diffusers' `sample_size` (an int, or (height, width)) as one latent size; SD1.5's 64 when unset."""
    if isinstance(value, (list, tuple)) and value:
        value = min(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 64


def diffusers_config(config: UNetConfig) -> dict:
    """Keyword arguments of the diffusers UNet2DConditionModel with the same architecture as `config`."""
    levels = range(len(config.channel_mult))
    down = [("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in config.attention_levels]
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(config.model_channels * m for m in config.channel_mult),
        down_block_types=tuple(down),
        up_block_types=tuple(UP_TYPES[a] for a in reversed(config.attention_levels)),
        layers_per_block=config.num_res_blocks,
        attention_head_dim=tuple(config.heads(level) for level in levels),  # means heads, in diffusers
        transformer_layers_per_block=tuple(config.depth(level) for level in levels),
        cross_attention_dim=config.context_dim,
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
        norm_num_groups=config.norm_groups,
        dropout=config.dropout,
        sample_size=config.sample_size,
    )


def _block_prefixes(config: UNetConfig) -> list[tuple[str, str]]:
    """(ours, diffusers) module prefixes of every block, derived from the config."""
    pairs = list(TOP_NAMES.items())
    levels = len(config.channel_mult)
    n = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        for j in range(config.num_res_blocks):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}"))
            if config.attention_levels[level]:
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}"))
            n += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            n += 1
    pairs += [("middle_block.0", "mid_block.resnets.0"), ("middle_block.1", "mid_block.attentions.0"),
              ("middle_block.2", "mid_block.resnets.1")]
    n = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(config.num_res_blocks + 1):
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{j}"))
            if config.attention_levels[level]:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{j}"))
            if level and j == config.num_res_blocks:
                k = 2 if config.attention_levels[level] else 1
                pairs.append((f"output_blocks.{n}.{k}", f"up_blocks.{up}.upsamplers.0"))
            n += 1
    return pairs


def diffusers_key_map(config: UNetConfig, our_keys) -> dict[str, str]:
    """{our state-dict key: diffusers key} for every key of ours; one-to-one."""
    pairs = sorted(_block_prefixes(config), key=lambda p: -len(p[0]))  # longest prefix wins
    key_map = {}
    for key in our_keys:
        ours, theirs = next(((o, t) for o, t in pairs if key.startswith(o + ".")), (None, None))
        if ours is None:
            raise PortingError(f"no diffusers name for our key {key!r}")
        rest = key[len(ours) + 1:]
        if ".resnets." in theirs:
            inner, leaf = rest.rsplit(".", 1)
            rest = f"{RESBLOCK_NAMES.get(inner, inner)}.{leaf}"
        key_map[key] = f"{theirs}.{rest}"
    assert len(set(key_map.values())) == len(key_map), "diffusers key map is not one-to-one"
    return key_map


def _copy_strict(ours: nn.Module, source: Mapping[str, torch.Tensor], key_map: Mapping[str, str], what: str):
    """Copies source[key_map[k]] into each tensor k of `ours`, after checking keys and shapes on both sides."""
    our_sd = ours.state_dict()
    wanted = {key_map[k]: k for k in our_sd}
    missing = sorted(wanted.keys() - source.keys())
    unused = sorted(source.keys() - wanted.keys())
    if missing or unused:
        raise PortingError(f"{what}: keys do not match. Missing from the source ({len(missing)}): {missing[:8]}; "
                           f"not used by UNet_SD ({len(unused)}): {unused[:8]}")
    bad = [f"{theirs} {tuple(source[theirs].shape)} -> {k} {tuple(our_sd[k].shape)}"
           for theirs, k in wanted.items() if source[theirs].shape != our_sd[k].shape]
    if bad:
        raise PortingError(f"{what}: {len(bad)} shapes do not match: {bad[:8]}")
    with torch.no_grad():
        for theirs, k in wanted.items():
            our_sd[k].copy_(source[theirs])
    return ours


def load_pipe_into_our_UNet(our_unet: UNet_SD, pipe_unet) -> UNet_SD:
    """Ports the weights of a diffusers UNet2DConditionModel (`pipe.unet`) into an existing UNet_SD, exactly.

    Args:
        our_unet: a UNet_SD whose config matches the diffusers model's.
        pipe_unet: a diffusers `UNet2DConditionModel`, or its state dict.

    Raises `PortingError` naming the keys or shapes when anything does not match one to one.
    """
    if hasattr(pipe_unet, "config"):
        theirs, ours = diffusers_config(config_from_diffusers(pipe_unet.config)), diffusers_config(our_unet.config)
        diff = {k: (theirs[k], ours[k]) for k in ours if k not in ("dropout", "sample_size") and theirs[k] != ours[k]}
        if diff:
            raise PortingError(f"the diffusers UNet and ours differ in architecture, as (theirs, ours): {diff}")
    source = pipe_unet.state_dict() if isinstance(pipe_unet, nn.Module) else pipe_unet
    key_map = diffusers_key_map(our_unet.config, our_unet.state_dict().keys())
    return _copy_strict(our_unet, source, key_map, "diffusers -> UNet_SD")


def from_diffusers(pipe_unet) -> UNet_SD:
    """A UNet_SD with the config (derived) and weights (copied, strictly) of a diffusers UNet2DConditionModel, on
    its device and in its dtype. `UNet_SD.from_diffusers` is this."""
    ours = UNet_SD(config_from_diffusers(pipe_unet.config))
    param = next(pipe_unet.parameters())
    ours.to(device=param.device, dtype=param.dtype)
    return load_pipe_into_our_UNet(ours, pipe_unet)


UNet_SD.readers["diffusers"] = from_diffusers


def to_diffusers_state_dict(our_unet: UNet_SD) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' UNet2DConditionModel names (tensors are shared, not copied)."""
    sd = our_unet.state_dict()
    key_map = diffusers_key_map(our_unet.config, sd.keys())
    return {key_map[k]: v for k, v in sd.items()}


def to_diffusers(our_unet: UNet_SD):
    """A diffusers UNet2DConditionModel with our config and a copy of our weights."""
    from diffusers import UNet2DConditionModel

    param = next(our_unet.parameters())
    unet = UNet2DConditionModel(**diffusers_config(our_unet.config)).to(device=param.device, dtype=param.dtype)
    unet.load_state_dict(to_diffusers_state_dict(our_unet), strict=True)
    return unet


LDM_PREFIX = "model.diffusion_model."


def load_ldm_unet(our_unet: UNet_SD, checkpoint: Mapping[str, torch.Tensor]) -> UNet_SD:
    """Ports the UNet of an original (CompVis/LDM layout) SD checkpoint; our names are its names."""
    source = {k[len(LDM_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(LDM_PREFIX)}
    if not source:
        raise PortingError(f"no UNet weights in this checkpoint: no key starts with {LDM_PREFIX!r}")
    key_map = {k: k for k in our_unet.state_dict()}
    return _copy_strict(our_unet, source, key_map, "LDM checkpoint -> UNet_SD")

