"""LoRA for UNet_SD and the CLIP text encoder, through peft, in the file formats the field uses.

Adapters are peft's LoRA layers injected into our modules (`peft.inject_adapter_in_model`), so training, scaling
and unloading are peft's. What is ours is the naming: UNet_SD keeps the original LDM module names
(`input_blocks.1.1.transformer_blocks.0.attn1.to_q`), while LoRA files name diffusers' modules. Two formats are
written and read:

* diffusers / PEFT (`pytorch_lora_weights.safetensors`): `unet.down_blocks.0.attentions.0.transformer_blocks.0.
  attn1.to_q.lora_A.weight`, `...lora_B.weight`, `text_encoder.text_model.encoder.layers.0.self_attn.q_proj...`,
  with the LoraConfig (rank, alpha, targets) as JSON in the safetensors metadata under `lora_adapter_metadata`;
  plain diffusers loads it with `pipe.load_lora_weights(folder)`.
* kohya (A1111, ComfyUI): `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`,
  `.lora_up.weight` and `.alpha`; `lora_te_text_model_encoder_layers_0_self_attn_q_proj...` for the text encoder.

A module's LoRA adds (alpha / rank) * scale * B @ A to its weight's output. LyCORIS files (LoHa, LoKr, ...) are
refused by name, as is any key that names no module of the model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from .port import diffusers_key_map
from .settings import UNET_TARGETS  # the LoRA target groups, with the other tables
from .unet import UNet_SD

ADAPTER = "lora"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NAME = "lora_kohya.safetensors"
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LYCORIS_MARKERS = ("hada_w1", "hada_w2", "lokr_w1", "lokr_w2", "oft_blocks", "lora_mid", "dora_scale", ".w_norm",
                   "glora_")


MAX_RANK = 1024  # SD LoRAs use 4 to 256; a larger rank costs memory and time for no gain
MAX_ALPHA_RATIO = 256  # alpha / rank: kohya files use 1/16 to 2; 256 is the fine-tune's largest alpha at rank 1


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model; the message says what and why."""


def target_names(model: nn.Module, suffixes) -> list[str]:
    """Full names of the model's Linear and Conv2d modules whose names end in one of `suffixes`."""
    return [name for name in base_modules(model) if any(name == s or name.endswith("." + s) for s in suffixes)]


def unet_targets(unet: UNet_SD, groups=("attn",)) -> list[str]:
    unknown = [g for g in groups if g not in UNET_TARGETS]
    if unknown or not groups:
        raise ValueError(f"LoRA targets must be some of {', '.join(UNET_TARGETS)}, got {list(groups)}")
    return target_names(unet, [s for g in groups for s in UNET_TARGETS[g]])


def add_lora(model: nn.Module, names: list[str], rank: int | dict, alpha: float | dict, adapter: str = ADAPTER,
             gaussian: bool = False) -> nn.Module:
    """Injects peft LoRA layers into the named modules (in place); rank and alpha per module where dicts. Only the
    LoRA weights then require grad. B starts at zero, so the model is unchanged until it trains."""
    from peft import LoraConfig, inject_adapter_in_model

    ranks = rank if isinstance(rank, dict) else dict.fromkeys(names, rank)
    alphas = alpha if isinstance(alpha, dict) else dict.fromkeys(names, alpha)
    r, a = max(ranks.values()), max(alphas.values())
    config = LoraConfig(r=r, lora_alpha=a, target_modules=names, init_lora_weights="gaussian" if gaussian else True,
                        rank_pattern={f"^{re.escape(n)}$": v for n, v in ranks.items() if v != r},
                        alpha_pattern={f"^{re.escape(n)}$": v for n, v in alphas.items() if v != a})
    return inject_adapter_in_model(config, model, adapter_name=adapter)


def lora_layers(model: nn.Module, adapter: str = ADAPTER) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def set_scale(model: nn.Module, scale: float, adapter: str = ADAPTER):
    """Every LoRA layer of the adapter adds scale * (alpha / rank) * B @ A (scale 0: the base model)."""
    for m in lora_layers(model, adapter).values():
        m.set_scale(adapter, scale)


def remove_lora(model: nn.Module) -> int:
    """Puts every LoRA-wrapped module's base layer back in its place; returns how many were unwrapped."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, m in wrapped:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.get_base_layer())
    if hasattr(model, "peft_config"):  # what peft's injection left on the model
        del model.peft_config
    return len(wrapped)


def lora_weights(model: nn.Module, adapter: str = ADAPTER) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A, B, alpha)} of the adapter, detached fp32 copies."""
    return {name: (m.lora_A[adapter].weight.detach().float().clone(), m.lora_B[adapter].weight.detach().float().clone(),
                   float(m.lora_alpha[adapter]))
            for name, m in lora_layers(model, adapter).items()}


def base_modules(model: nn.Module) -> list[str]:
    """Names of the model's own Linear and Conv2d modules, as they are without LoRA (peft's wrappers hide them
    under `.base_layer` and add lora_A / lora_B)."""
    return [name.removesuffix(".base_layer") for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and ".lora_" not in name]


def unet_module_map(unet: UNet_SD) -> dict[str, str]:
    """{our module name: diffusers module name} for every weight-bearing module of UNet_SD."""
    keys = [f"{name}.weight" for name in base_modules(unet)]
    return {ours[:-len(".weight")]: theirs[:-len(".weight")]
            for ours, theirs in diffusers_key_map(unet.config, keys).items()}


# --- writing -------------------------------------------------------------------------------------------------
def save(folder: Path, unet: UNet_SD, text_encoder: nn.Module | None = None, adapter: str = ADAPTER,
         extra_metadata: dict | None = None) -> list[Path]:
    """Writes the adapter in diffusers/PEFT layout (`WEIGHT_NAME`) and in kohya layout (`KOHYA_NAME`), atomically;
    returns both paths."""
    from safetensors.torch import save as to_bytes

    from .files import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft_tensors, kohya_tensors, config = {}, {}, {}
    names = unet_module_map(unet)
    parts = [("unet", "lora_unet_", lora_weights(unet, adapter), names, names)]
    if text_encoder is not None:
        te = lora_weights(text_encoder, adapter)
        # kohya (A1111) names the text encoder's modules from `text_model.` (transformers' CLIPTextModel before
        # version 5); PEFT keys use the modules' own names, as diffusers writes them
        parts.append(("text_encoder", "lora_te_", te, {n: n for n in te},
                      {n: n if n.startswith("text_model.") else "text_model." + n for n in te}))
    for prefix, kohya_prefix, weights, rename, kohya_rename in parts:
        if not weights:
            continue
        ranks = {rename[n]: a.shape[0] for n, (a, _, _) in weights.items()}
        alphas = {rename[n]: alpha for n, (_, _, alpha) in weights.items()}
        r, alpha = max(ranks.values()), max(alphas.values())
        config[prefix] = dict(r=r, lora_alpha=alpha, target_modules=sorted(ranks), init_lora_weights=True,
                              rank_pattern={k: v for k, v in ranks.items() if v != r},
                              alpha_pattern={k: v for k, v in alphas.items() if v != alpha}, peft_type="LORA",
                              bias="none", lora_dropout=0.0, use_dora=False, use_rslora=False)
        for name, (a, b, alpha) in weights.items():
            theirs = rename[name]
            peft_tensors[f"{prefix}.{theirs}.lora_A.weight"] = a.contiguous()
            peft_tensors[f"{prefix}.{theirs}.lora_B.weight"] = b.contiguous()
            stem = kohya_prefix + kohya_rename[name].replace(".", "_")
            kohya_tensors[f"{stem}.lora_down.weight"] = a.contiguous()
            kohya_tensors[f"{stem}.lora_up.weight"] = b.contiguous()
            kohya_tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    if not peft_tensors:
        raise LoraError("the model has no LoRA layers to save")
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {f"{prefix}.{k}": v for prefix, c in config.items() for k, v in c.items()}, sort_keys=True)}
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    out = []
    for name, tensors, meta in ((WEIGHT_NAME, peft_tensors, metadata),
                                (KOHYA_NAME, kohya_tensors, {"format": "pt", **(extra_metadata or {})})):
        path = folder / name
        with atomic_write(path) as f:
            f.write(to_bytes(tensors, metadata={k: str(v) for k, v in meta.items()}))
        out.append(path)
    return out


# --- reading -------------------------------------------------------------------------------------------------
def lora_file(path: str | Path) -> Path:
    """The LoRA file at `path`: the file itself, or WEIGHT_NAME (else the only .safetensors) in a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / WEIGHT_NAME).exists():
            return path / WEIGHT_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise LoraError(f"{path} holds {len(found)} .safetensors files; name the LoRA file itself")
        return found[0]
    if not path.exists():
        raise LoraError(f"no LoRA file at {path}")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRA files load from .safetensors only (no pickle), got {path.suffix or 'no suffix'}")
    return path


def read(path: str | Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """{"unet": {diffusers module: (A, B, alpha)}, "text_encoder": {module: (A, B, alpha)}} from a LoRA file in
    diffusers/PEFT, older diffusers (`processor.to_q_lora.down`) or kohya layout."""
    from safetensors import safe_open

    path = lora_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one message
        raise LoraError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    lycoris = sorted({m for k in tensors for m in LYCORIS_MARKERS if m in k})
    if lycoris:
        raise LoraError(f"{path.name} is a LyCORIS file (LoHa/LoKr/LoCon-style keys: {', '.join(lycoris)}); "
                        f"ImageCraft loads plain LoRA only")
    config = {}
    if metadata.get("lora_adapter_metadata"):
        try:
            config = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError as e:
            raise LoraError(f"{path.name}: its lora_adapter_metadata is not JSON ({e})") from e
    out, unknown = {"unet": {}, "text_encoder": {}}, []
    pairs = {}  # (part, module) -> {"A": tensor, "B": tensor, "alpha": float}
    for key, value in tensors.items():
        m = (re.fullmatch(r"(unet|text_encoder)\.(.+)\.lora_([AB])\.weight", key)
             or re.fullmatch(r"(unet|text_encoder)\.(.+)\.lora\.(down|up)\.weight", key))
        if m:
            part, module, which = m.groups()
            module = re.sub(r"\.processor\.(to_[qkv]|to_out)_lora$", lambda x: "." + x.group(1).replace(
                "to_out", "to_out.0"), module)
            pairs.setdefault((part, module), {})["A" if which in ("A", "down") else "B"] = value
            continue
        m = re.fullmatch(r"lora_(unet|te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if m:
            part, module, which = m.groups()
            entry = pairs.setdefault(("unet" if part == "unet" else "text_encoder", "kohya:" + module), {})
            if which == "alpha":
                entry["alpha"] = value
            else:
                entry["A" if which.startswith("lora_down") else "B"] = value
            continue
        unknown.append(key)
    if unknown:
        raise LoraError(f"{path.name}: {len(unknown)} keys are not LoRA weights ImageCraft knows (diffusers/PEFT "
                        f"lora_A/lora_B or kohya lora_down/lora_up/alpha): {unknown[:5]}")
    for (part, module), entry in pairs.items():
        plain = module.removeprefix("kohya:")
        if "A" not in entry or "B" not in entry:
            raise LoraError(f"{path.name}: {part} module {plain} has only one of its two LoRA matrices")
        a, b = entry["A"], entry["B"]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or b.shape[1] != a.shape[0]:
            raise LoraError(f"{path.name}: {part} module {plain} has LoRA matrices of shapes {tuple(a.shape)} and "
                            f"{tuple(b.shape)}; a LoRA pair is (rank, in) and (out, rank), 2-d (or 4-d for a conv)")
        rank = a.shape[0]
        if not 1 <= rank <= MAX_RANK:
            raise LoraError(f"{path.name}: {part} module {plain} has rank {rank}; at most {MAX_RANK} is allowed")
        for which, tensor in (("A", a), ("B", b)):
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise LoraError(f"{path.name}: {part} module {plain}'s LoRA matrix {which} holds NaN or infinite "
                                f"values (or is not floating point); every image would come out black")
        alpha = entry.get("alpha")
        if alpha is None:  # PEFT layout: alpha from the metadata (per module where a pattern names it), else rank
            alpha = config.get(f"{part}.alpha_pattern", {}).get(plain, config.get(f"{part}.lora_alpha", rank))
        alpha = _checked_alpha(alpha, rank, f"{path.name}: {part} module {plain}")
        out[part][module] = (a.float(), b.float(), alpha)
    if not out["unet"] and not out["text_encoder"]:
        raise LoraError(f"{path.name} holds no LoRA weights")
    return out


def _checked_alpha(alpha, rank: int, where: str) -> float:
    """A LoRA's alpha as a float: one finite number above 0 and at most MAX_ALPHA_RATIO x its rank (a larger one
    scales the LoRA past anything trained)."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise LoraError(f"{where}: alpha must be one number, got a tensor of shape {tuple(alpha.shape)}")
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise LoraError(f"{where}: alpha must be a number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0 or alpha > MAX_ALPHA_RATIO * rank:
        raise LoraError(f"{where}: alpha is {alpha:g}; it must be a finite number above 0 and at most "
                        f"{MAX_ALPHA_RATIO} x the rank ({rank})")
    return alpha


def _resolve(modules: dict, names: dict[str, str], kind: str, path_name: str) -> dict[str, tuple]:
    """Maps the file's module names (diffusers, or kohya's with underscores) onto ours; refuses what names none.
    Text encoder modules match with or without transformers' older `text_model.` prefix."""
    by_kohya = {theirs.replace(".", "_"): ours for ours, theirs in names.items()}
    by_kohya.update({ours.replace(".", "_"): ours for ours in names})  # kohya files in LDM naming
    by_theirs = {theirs: ours for ours, theirs in names.items()}
    if kind == "text encoder":
        for ours in names:
            by_kohya.setdefault(("text_model." + ours).replace(".", "_"), ours)
            by_theirs.setdefault("text_model." + ours, ours)
    resolved, unknown = {}, []
    for module, value in modules.items():
        ours = by_kohya.get(module[len("kohya:"):]) if module.startswith("kohya:") else by_theirs.get(module)
        if ours is None:
            unknown.append(module.removeprefix("kohya:"))
        else:
            resolved[ours] = value
    if unknown:
        raise LoraError(f"{path_name}: {len(unknown)} {kind} modules of this LoRA are not in the model "
                        f"(a LoRA for another architecture, e.g. SDXL?): {sorted(unknown)[:5]}")
    return resolved


def apply(path: str | Path, unet: UNet_SD, text_encoder: nn.Module, scale: float = 1.0) -> dict:
    """Loads a LoRA file into the UNet (and text encoder) as the adapter ADAPTER, replacing any earlier one;
    returns {"unet": n modules, "text_encoder": n modules}. Shapes are checked before anything changes: a LoRA
    trained on another base model is refused with the first module that does not fit."""
    path = lora_file(path)
    parts = read(path)
    plan = []
    for part, model, names in (("unet", unet, unet_module_map(unet)),
                               ("text_encoder", text_encoder, {n: n for n in base_modules(text_encoder)})):
        if not parts[part]:
            continue
        resolved = _resolve(parts[part], names, part.replace("_", " "), path.name)
        for name, (a, b, _) in resolved.items():
            base = model.get_submodule(name)
            base = getattr(base, "base_layer", base)
            w = base.weight
            ok = a.shape[1] == w.shape[1] and b.shape[0] == w.shape[0] and b.shape[1] == a.shape[0] and \
                a.ndim == w.ndim and (a.ndim == 2 or a.shape[2:] == w.shape[2:]) and b.shape[2:] in ((), (1, 1))
            if not ok:
                raise LoraError(f"{path.name} does not fit this model: {part} module {names.get(name, name)} has a "
                                f"weight of shape {tuple(w.shape)}, the LoRA has A {tuple(a.shape)} and B "
                                f"{tuple(b.shape)} (a LoRA trained on a different base model?)")
        plan.append((model, resolved))
    remove_lora(unet)
    remove_lora(text_encoder)
    for model, resolved in plan:
        param = next(model.parameters())
        add_lora(model, sorted(resolved), {n: v[0].shape[0] for n, v in resolved.items()},
                 {n: v[2] for n, v in resolved.items()})
        layers = lora_layers(model)
        with torch.no_grad():
            for name, (a, b, _) in resolved.items():
                layers[name].lora_A[ADAPTER].weight.copy_(a.reshape(layers[name].lora_A[ADAPTER].weight.shape))
                layers[name].lora_B[ADAPTER].weight.copy_(b.reshape(layers[name].lora_B[ADAPTER].weight.shape))
        model.to(device=param.device, dtype=param.dtype)
        model.requires_grad_(False)
        set_scale(model, scale)
    return {"unet": len(parts["unet"]), "text_encoder": len(parts["text_encoder"])}
