"""Finding and checking model weights: the built-in model, a diffusers folder, a Hub repo id or a single file.

Weights load only from safetensors; pickle files (`.bin`, `.ckpt`, `.pt`) are refused, because unpickling runs
arbitrary code. Every error names the file or key that is missing or wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "shapes-sd"
COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
CONFIG_FILES = {"text_encoder": "config.json", "vae": "config.json", "unet": "config.json",
                "scheduler": "scheduler_config.json"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelLoadError(ValueError):
    """A model source that cannot be used; the message names what is missing or wrong."""


def refuse_pickle(path: Path):
    raise ModelLoadError(f"refusing to load {path}: it is a pickle file, and unpickling can run arbitrary code. "
                         f"ImageCraft loads weights only from .safetensors; convert it first "
                         f"(e.g. load it yourself in a trusted environment and save it with safetensors)")


def resolve(source: str | Path | None) -> tuple[str, Path, str]:
    """(kind, local path, model id) for a source; kind is "folder" or "single_file"."""
    if source is None or str(source) == "default":
        if not (DEFAULT_MODEL / "model_index.json").exists():
            raise ModelLoadError(f"the built-in model is missing from {DEFAULT_MODEL}; "
                                 f"train it with `python -m imagecraft.shapes.train` or pass a model folder")
        return "folder", DEFAULT_MODEL, DEFAULT_MODEL.name
    if not isinstance(source, (str, Path)):
        raise ModelLoadError(f"a model source must be a folder, a file or a Hub id (a string), got {source!r:.80}")
    try:
        path = Path(source).expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError, RuntimeError) as e:  # too long a name, a NUL byte, ~nosuchuser
        raise ModelLoadError(f"no model folder or file at {str(source)[:100]!r}: {type(e).__name__}") from None
    if is_dir:
        return "folder", path, path.name
    if is_file:
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"{path} is not a .safetensors checkpoint or a diffusers model folder")
        return "single_file", path, path.stem
    text = str(source)
    if HUB_ID.match(text) and not text.startswith((".", "~")) and path.suffix != ".safetensors":
        return "folder", download(text), text
    raise ModelLoadError(f"no model folder or file at {text!r} (and it is not a Hub id like 'owner/name')")


def download(repo_id: str) -> Path:
    """A Hub repo's diffusers files (safetensors only) via huggingface_hub's cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["model_index.json", "*/*.json", "*/*.txt", "unet/*.safetensors", "vae/*.safetensors",
                "text_encoder/*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(f"cannot download {repo_id!r} from the Hugging Face Hub: there is no network (or "
                             f"HF_HUB_OFFLINE is set) and it is not in the local cache") from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"cannot download {repo_id!r} from the Hugging Face Hub: {e}") from e
    except OSError as e:  # connection failures surface as OSError subclasses
        raise ModelLoadError(f"cannot download {repo_id!r} from the Hugging Face Hub: {e}") from e


def check_folder(folder: Path, weights: bool = True) -> None:
    """Raises ModelLoadError naming the first missing or pickle-only file of a diffusers SD folder (configs and
    tokenizer only when `weights` is False)."""
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder: model_index.json is missing")
    for name in COMPONENTS:
        if not (folder / name).is_dir():
            raise ModelLoadError(f"{folder} is missing the {name}/ folder")
        if name in CONFIG_FILES and not (folder / name / CONFIG_FILES[name]).is_file():
            raise ModelLoadError(f"{folder / name / CONFIG_FILES[name]} is missing")
    tokenizer = folder / "tokenizer"
    if not ((tokenizer / "tokenizer.json").is_file() or (tokenizer / "vocab.json").is_file()):
        raise ModelLoadError(f"{tokenizer} has neither tokenizer.json nor vocab.json")
    for name in ("text_encoder", "vae", "unet") if weights else ():
        weights_file(folder / name)


def weights_file(component: Path) -> list[Path]:
    """The safetensors file(s) of a component folder; refuses a folder that has only pickles."""
    files = sorted(component.glob("*.safetensors"))
    if files:
        plain = [f for f in files if f.name.count(".") == 1 or "-of-" in f.name]  # skip .fp16 variants if possible
        return plain or files
    pickles = [f for f in component.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(pickles[0])
    raise ModelLoadError(f"{component} has no .safetensors weights")


def load_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f} is not a readable safetensors file ({e})") from e
    return state


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not a readable JSON file ({e})") from e


def file_hash(files: list[Path]) -> str:
    """AUTOMATIC1111-style short model hash: the first 10 hex digits of the SHA-256 of the weights."""
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:10]


# What an original SD checkpoint may hold besides the three models: EMA copies and LDM's noise-schedule buffers.
LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
LDM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
               "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
               "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2", "logvar"}


def check_ldm_keys(checkpoint: dict, path: Path) -> None:
    """Refuses a single file with keys that belong to no part of an SD checkpoint, naming them."""
    unknown = sorted(k for k in checkpoint if not k.startswith(LDM_PREFIXES) and k not in LDM_BUFFERS)
    if unknown:
        raise ModelLoadError(f"{path} is not an SD checkpoint in the original (LDM) layout: {len(unknown)} unknown "
                             f"keys, e.g. {unknown[:6]}; expected keys under {', '.join(LDM_PREFIXES)}")
