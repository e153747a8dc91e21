"""Fine-tunes a Stable Diffusion model on your own captioned images: LoRA through peft (the default) or the whole
UNet with an EMA, on accelerate (CPU or GPU, bf16 autocast where the hardware runs bf16 natively, one process or
many).

    imagecraft finetune --data my-images/ --output my-lora/                  # LoRA on the built-in model
    imagecraft finetune --data my-images/ --output my-model/ --method full
    imagecraft finetune --data my-images/ --output my-lora/ --model PATH --steps 1000 --rank 16
    accelerate launch --multi_gpu --num_processes 2 -m imagecraft.finetune --data my-images/ --output my-lora/

More than one process (DDP): `accelerate launch --multi_gpu --num_processes N` starts N processes, on GPUs where
there are, else on CPU cores (gloo); without --multi_gpu accelerate starts one process only. Every process draws
the same global batch from one seeded generator and trains on its slice, so N processes with --batch-size B train
exactly as one process with --batch-size N x B.

Data: a folder (subfolders too) of images, each with a same-name .txt caption beside it (kohya's layout), or a
metadata.jsonl / metadata.csv with `file_name` and `text` (diffusers' imagefolder). Images are turned upright
(EXIF), made RGB (transparency onto white, 16-bit scaled to 8), resized and centre-cropped to the model's size.
Horizontal flips are off unless asked: they swap "left" and "right". Latents are encoded once and cached.

Prior preservation (DreamBooth's, kohya's regularisation images): `--class-prompt P` (repeatable) has the base model
draw --class-images images for those prompts before training, and every step trains on as many of them as data
images, so that what the data does not show (the other colours, when the data teaches a new one) stays as it was.

The output folder gets:
  pytorch_lora_weights.safetensors   LoRA, diffusers/PEFT layout: `pipe.load_lora_weights(folder)` in diffusers
  lora_kohya.safetensors             the same LoRA in kohya layout, for AUTOMATIC1111 and ComfyUI
  (or, with --method full, a diffusers model folder: `StableDiffusionPipeline.from_pretrained(folder)`)
  loss.csv, loss.png                 training loss per step and a deterministic held-out loss
  previews/step-NNNNNN.png           fixed-seed samples: the base model, LoRA at scale 0.5, at scale 1
  README.md                          a model card: base, recipe, data, loss, previews
  checkpoints/last.pt, cache/        written atomically; rerun the same command to resume, Ctrl-C saves first
  cache/class-images/                the prior-preservation images and their captions, to look at
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import json
import logging
import math
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from . import lora as lora_lib
from .files import atomic_write
from .training import (check_output_folder, diffusion_loss, ema_update, load_checkpoint, lr_at, noise_scheduler, noised_and_target,
                       refuse_other_objective, save_checkpoint)

log = logging.getLogger("imagecraft.finetune")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused before they are decoded
MAX_IMAGES = 5000
SKIPPED_FOLDERS = {"checkpoints", "cache", "previews", "__MACOSX"}


@dataclass
class Recipe:
    """Everything that decides the result. Defaults are measured on the built-in model: see bench_finetune.py."""

    method: str = "lora"  # "lora" (peft, the UNet's attention projections) or "full" (the whole UNet, with EMA)
    steps: int = 400
    batch_size: int = 4  # per process; the global batch is batch_size x processes x grad_accum
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-4 for LoRA, 5e-5 for full (see bench_finetune.py)
    lr_schedule: str = "constant"  # or "cosine" (to 10% of the peak)
    warmup: int = 20
    rank: int = 8
    alpha: float | None = None  # None: the rank (LoRA scale 1)
    targets: tuple = ("attn",)  # UNet module groups for LoRA: attn, ff, proj (lora.UNET_TARGETS)
    text_encoder_lora: bool = False  # LoRA on the text encoder's attention too
    snr_gamma: float = 5.0  # Min-SNR weighting; 0: plain MSE
    noise_offset: float = 0.0  # e.g. 0.05: darker darks and brighter brights (Guttenberg 2023)
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    ema_decay: float = 0.999  # full fine-tune only
    precision: str = "auto"  # "auto": bf16 autocast where the CPU or GPU runs bf16 natively; "bf16"; "fp32"
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.0  # share of captions replaced by "" (keeps classifier-free guidance trained)
    flip: bool = False
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 25  # held-out loss
    preview_every: int = 100  # 0: previews only at the end
    preview_steps: int = 20
    preview_guidance: float = 5.0
    validation_prompts: tuple = ()  # default: the data's first two captions
    heldout_images: int = 4
    # Prior preservation (DreamBooth, Ruiz et al. 2022; kohya's regularisation images): the base model's own images
    # for these prompts, made once before training, are trained on beside the data with weight prior_weight, so
    # what the data does not show stays as the base model drew it. Off when empty; each step then costs twice, and
    # the loss logged is the data's plus prior_weight times the prior images'.
    class_prompts: tuple = ()
    class_images: int = 100  # how many, the prompts taken in turn
    prior_weight: float = 1.0

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.method == "lora" else 5e-5)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def check_recipe(recipe: Recipe) -> Recipe:
    """Refuses nonsense before any work starts, naming the setting and what is allowed."""
    if recipe.method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {recipe.method!r}")
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "eval_every", "preview_steps"):
        value = getattr(recipe, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    for name in ("warmup", "preview_every", "heldout_images"):
        value = getattr(recipe, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number of 0 or more, got {value!r}")
    if recipe.steps > 1_000_000:
        raise ValueError(f"steps must be at most 1,000,000, got {recipe.steps}")
    if not (isinstance(recipe.peak_lr, (int, float)) and 0 < recipe.peak_lr <= 1 and math.isfinite(recipe.peak_lr)):
        raise ValueError(f"lr must be a number in (0, 1], got {recipe.lr!r}")
    if recipe.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {recipe.lr_schedule!r}")
    if not (isinstance(recipe.rank, int) and 1 <= recipe.rank <= 1024):
        raise ValueError(f"rank must be a whole number from 1 to 1024, got {recipe.rank!r}")
    if not (0 < recipe.lora_alpha <= 4096 and math.isfinite(recipe.lora_alpha)):
        raise ValueError(f"alpha must be a positive number up to 4096, got {recipe.alpha!r}")
    unknown = [t for t in recipe.targets if t not in lora_lib.UNET_TARGETS]
    if unknown or not recipe.targets:
        raise ValueError(f"targets must be some of {', '.join(lora_lib.UNET_TARGETS)}, got {list(recipe.targets)}")
    for name, low, high in (("snr_gamma", 0, 100), ("noise_offset", 0, 1), ("max_grad_norm", 0, 1e6),
                            ("weight_decay", 0, 1), ("caption_dropout", 0, 1), ("preview_guidance", 0, 30)):
        value = getattr(recipe, name)
        if not (isinstance(value, (int, float)) and low <= value <= high and math.isfinite(value)):
            raise ValueError(f"{name} must be a number from {low} to {high}, got {value!r}")
    if not 0 < recipe.ema_decay < 1:
        raise ValueError(f"ema_decay must be in (0, 1), got {recipe.ema_decay!r}")
    if recipe.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {recipe.precision!r}")
    if not (isinstance(recipe.class_images, int) and 1 <= recipe.class_images <= MAX_IMAGES):
        raise ValueError(f"class_images must be a whole number from 1 to {MAX_IMAGES}, got {recipe.class_images!r}")
    if not (isinstance(recipe.prior_weight, (int, float)) and 0 < recipe.prior_weight <= 100
            and math.isfinite(recipe.prior_weight)):
        raise ValueError(f"prior_weight must be a number in (0, 100], got {recipe.prior_weight!r}")
    if not isinstance(recipe.class_prompts, (tuple, list)):
        raise ValueError(f"class_prompts must be a list of prompts, got {recipe.class_prompts!r}")
    empty = [p for p in recipe.class_prompts if not isinstance(p, str) or not p.strip()]
    if empty:
        raise ValueError(f"class prompts must be non-empty text, got {empty[0]!r}")
    if recipe.class_prompts and recipe.class_images < len(recipe.class_prompts):
        raise ValueError(f"class_images ({recipe.class_images}) is fewer than the class prompts "
                         f"({len(recipe.class_prompts)}): each prompt needs at least one image")
    if recipe.method == "full" and recipe.text_encoder_lora:
        raise ValueError("text_encoder_lora goes with method 'lora'; a full fine-tune trains the UNet only")
    return recipe


# --- data ----------------------------------------------------------------------------------------------------
@dataclass
class Example:
    path: Path
    caption: str


def find_examples(folder: str | Path) -> list[Example]:
    """The folder's images and their captions (see the module's docstring); a ValueError naming what is wrong."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ValueError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"data {folder} is a file; give a folder of images with captions (or unzip it first)")
    root = folder.resolve()
    for name in ("metadata.jsonl", "metadata.csv"):
        if (folder / name).is_file():
            return _from_metadata(folder / name, root)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") or part in SKIPPED_FOLDERS
                                for part in p.relative_to(folder).parts[:-1]))
    if not images:
        raise ValueError(f"no images in {folder}: looked for {', '.join(IMAGE_SUFFIXES)} in it and its subfolders")
    if len(images) > MAX_IMAGES:
        raise ValueError(f"{folder} holds {len(images)} images; at most {MAX_IMAGES} are allowed")
    examples, missing = [], []
    for path in images:
        text = path.with_suffix(".txt")
        if not text.is_file():
            missing.append(path)
            continue
        try:
            caption = text.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"caption {text} cannot be read as UTF-8 text: {e}") from e
        if not caption:
            missing.append(path)
            continue
        examples.append(Example(path, caption))
    if missing:
        names = ", ".join(str(p.relative_to(folder)) for p in missing[:5])
        more = ", ..." if len(missing) > 5 else ""
        raise ValueError(f"{len(missing)} of {len(images)} images have no caption ({names}{more}):"
                         f" put each caption in a same-name .txt file beside its image, or list file_name and text"
                         f" in a metadata.jsonl")
    return examples


def _from_metadata(path: Path, root: Path) -> list[Example]:
    rows = []
    try:
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"line {n} is not a JSON object")
                    rows.append((n, row))
        else:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(enumerate(csv.DictReader(f), 2))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error, ValueError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from e
    if not rows:
        raise ValueError(f"{path} lists no images")
    if len(rows) > MAX_IMAGES:
        raise ValueError(f"{path} lists {len(rows)} images; at most {MAX_IMAGES} are allowed")
    examples = []
    for n, row in rows:
        name, text = row.get("file_name"), row.get("text")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path.name}, row {n}: no file_name (each row needs file_name and text)")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path.name}, row {n}: {name} has no caption (text)")
        image = (path.parent / name).resolve()
        if not image.is_relative_to(root):
            raise ValueError(f"{path.name}, row {n}: {name!r} points outside the data folder")
        if not image.is_file():
            raise ValueError(f"{path.name}, row {n}: no image file {name!r}")
        examples.append(Example(image, text.strip()))
    return examples


def load_image(path: Path, size: int) -> Image.Image:
    """An RGB size x size image: upright by its EXIF orientation, transparency onto white, 16-bit scaled to 8,
    shorter side resized to `size` (Lanczos), centre-cropped."""
    try:
        with Image.open(path) as image:
            w, h = image.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"image {path} is {w} x {h} px; at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels "
                                 f"are allowed")
            image.load()
            image = ImageOps.exif_transpose(image)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; one message for all
        raise ValueError(f"image {path} cannot be read ({type(e).__name__}: {e})") from e
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels / 257 if pixels.max() > 255 else pixels
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


MAX_ZIP_BYTES = 1 << 30  # 1 GiB uncompressed
MAX_ZIP_RATIO = 200  # uncompressed / compressed, per member: more is a zip bomb


def extract_zip(archive: str | Path, folder: str | Path, max_bytes: int = MAX_ZIP_BYTES) -> Path:
    """Extracts the images and captions of a zip into `folder`, refusing path traversal, links, zip bombs and
    archives over `max_bytes` uncompressed or MAX_IMAGES files."""
    archive, folder = Path(archive), Path(folder)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{archive.name} is not a readable zip file: {e}") from e
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > 2 * MAX_IMAGES + 2:
            raise ValueError(f"{archive.name} holds {len(members)} files; at most {2 * MAX_IMAGES + 2} are allowed")
        total = 0
        for m in members:
            name = m.filename
            if name.startswith(("/", "\\")) or ".." in Path(name.replace("\\", "/")).parts or ":" in name:
                raise ValueError(f"{archive.name}: the entry {name!r} points outside the folder it unpacks to")
            if (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise ValueError(f"{archive.name}: the entry {name!r} is a symbolic link; links are not unpacked")
            total += m.file_size
            if m.compress_size and m.file_size / m.compress_size > MAX_ZIP_RATIO and m.file_size > 1 << 20:
                raise ValueError(f"{archive.name}: the entry {name!r} expands {m.file_size // m.compress_size}x "
                                 f"(a zip bomb?); at most {MAX_ZIP_RATIO}x is allowed")
        if total > max_bytes:
            raise ValueError(f"{archive.name} unpacks to {total / 2**20:.0f} MiB; at most "
                             f"{max_bytes // 2**20} MiB are allowed")
        folder.mkdir(parents=True, exist_ok=True)
        for m in members:
            suffix = Path(m.filename).suffix.lower()
            if suffix not in IMAGE_SUFFIXES + (".txt", ".jsonl", ".csv"):
                continue
            target = folder / m.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                copied = 0
                while chunk := src.read(1 << 20):
                    copied += len(chunk)
                    if copied > m.file_size:  # the header lied about the size
                        raise ValueError(f"{archive.name}: the entry {m.filename!r} is larger than it says")
                    dst.write(chunk)
    return folder


def images_digest(examples: list[Example]) -> str:
    """One hash of every image's bytes, in order (read once per run)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(hashlib.sha256(ex.path.read_bytes()).digest())
    return digest.hexdigest()


def data_key(images: str, size: int, flip: bool, model_key: str) -> str:
    """What the cached latents depend on: the images (`images_digest`), the size, flips and the VAE's weights."""
    return hashlib.sha256(f"{images}|{size}|{flip}|{model_key}".encode()).hexdigest()[:16]


def vae_key(vae) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_images(pipe, examples: list[Example], size: int, flip: bool, cache: Path,
                  digest: str | None = None) -> torch.Tensor:
    """Latents (N or 2N with flips, 4, size / f, size / f), scaled as the UNet sees them; cached under `cache`
    keyed on the images (`digest`: their `images_digest`, computed when not given), the size, flips and the VAE."""
    key = data_key(digest or images_digest(examples), size, flip, vae_key(pipe.vae))
    path = cache / f"latents-{key}.pt"
    state = load_checkpoint(path)
    if state is not None and state.get("key") == key:
        return state["latents"]
    images = [load_image(ex.path, size) for ex in examples]
    if flip:
        images += [ImageOps.mirror(im) for im in images]
    latents = []
    vae = pipe.vae
    for start in range(0, len(images), 8):
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images[start:start + 8]])).permute(0, 3, 1, 2)
        x = (x.float() / 127.5 - 1).to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean  # the mean: the VAE's sampling noise is tiny and only blurs the data
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents.append(((z - shift) * vae.config.scaling_factor).float().cpu())
    latents = torch.cat(latents)
    cache.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, dict(latents=latents, key=key))
    return latents


CLASS_SEED = 5000


def class_examples(pipe, recipe: Recipe, folder: Path, rank: int = 0, world: int = 1, wait=lambda: None,
                   should_stop=None) -> list[Example] | None:
    """Prior preservation's images: the base model's own for recipe.class_prompts (taken in turn; image i with seed
    CLASS_SEED + i, the previews' steps and guidance), written once to `folder` as captioned PNGs (kohya's layout,
    so they can be looked at) and reused while the base model, the prompts and the settings are the same. With
    several processes each draws its share, a contiguous run of images (`wait` is their barrier). None when
    `should_stop()` turned True between batches."""
    prompts = [recipe.class_prompts[i % len(recipe.class_prompts)] for i in range(recipe.class_images)]
    key = hashlib.sha256(json.dumps([pipe.model_id, pipe.model_hash, pipe.default_size, prompts, CLASS_SEED,
                                     recipe.preview_steps, recipe.preview_guidance]).encode()).hexdigest()[:16]
    stamp = folder / "key.txt"
    if stamp.is_file() and stamp.read_text().strip() == key:
        return find_examples(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # the set of another base or other prompts; only the files this function writes
        stamp.unlink(missing_ok=True)
        for old in folder.glob("[0-9][0-9][0-9][0-9].*"):
            if old.suffix in (".png", ".txt") and old.stem.isdigit() and int(old.stem) >= len(prompts):
                old.unlink()
    wait()
    log.info("making %d prior-preservation images with the base model", len(prompts))
    first, last = len(prompts) * rank // world, len(prompts) * (rank + 1) // world  # this process's share
    for start in range(first, last, 8):
        if should_stop is not None and should_stop():
            return None
        batch = prompts[start:min(start + 8, last)]
        images = pipe(batch, seed=CLASS_SEED + start, num_inference_steps=recipe.preview_steps,
                      guidance_scale=recipe.preview_guidance).images  # image i: seed CLASS_SEED + i
        for i, image in enumerate(images, start):
            with atomic_write(folder / f"{i:04d}.png") as f:
                image.save(f, format="PNG")
            with atomic_write(folder / f"{i:04d}.txt") as f:
                f.write(prompts[i].encode())
    wait()
    if rank == 0:
        with atomic_write(stamp) as f:
            f.write(key.encode())
    wait()
    return find_examples(folder)


# --- training ------------------------------------------------------------------------------------------------
class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (NaN loss); the last good checkpoint is kept."""


@dataclass
class FinetuneResult:
    output: Path
    method: str
    step: int
    steps: int
    stopped: bool  # stopped early (Ctrl-C, the app's Stop), resumable
    history: list = field(default_factory=list)  # [step, loss, lr, heldout or None]
    files: list = field(default_factory=list)
    preview: Path | None = None


def use_bf16(precision: str, device: str) -> bool:
    from .pipeline import native_bf16

    if precision == "auto":
        return (device == "cuda" and torch.cuda.is_bf16_supported()) or (device == "cpu" and native_bf16())
    return precision == "bf16"


def finetune(model, data, output, recipe: Recipe | None = None, progress=None, should_stop=None,
             show_bar: bool = True) -> FinetuneResult:
    """Fine-tunes `model` (anything ImageCraftPipeline.from_pretrained loads) on the captioned images in `data`,
    writing to `output` (see the module's docstring). Resumes from output/checkpoints/last.pt when its recipe,
    base and data match. `progress(step, steps, loss)` is called after every step; training stops, saving a
    checkpoint first, when `should_stop()` returns True or on Ctrl-C."""
    from accelerate import Accelerator

    from .pipeline import ImageCraftPipeline

    recipe = check_recipe(recipe or Recipe())
    output = Path(output)
    check_output_folder(output)
    examples = find_examples(data)
    cuda = torch.cuda.is_available()
    bf16 = use_bf16(recipe.precision, "cuda" if cuda else "cpu")
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not cuda,
                              gradient_accumulation_steps=recipe.grad_accum)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_process = accelerator.is_main_process

    log.info("training on %d process%s (%s), %s", world, "es" if world > 1 else "", device.type,
             "bf16 autocast" if bf16 else "fp32")
    # this process's own device (cuda:N under DDP); weights in fp32, the forward passes in accelerate's autocast
    pipe = ImageCraftPipeline.from_pretrained(model, device=str(device) if device.type == "cuda" else device.type,
                                              dtype="fp32")
    size = pipe.default_size
    digest = images_digest(examples)
    latents = encode_images(pipe, examples, size, recipe.flip, output / "cache", digest) if main_process else None
    accelerator.wait_for_everyone()
    if latents is None:
        latents = encode_images(pipe, examples, size, recipe.flip, output / "cache", digest)  # now a cache hit
    latents = latents.to(device)
    captions = [ex.caption for ex in examples]
    prompts = list(recipe.validation_prompts) or captions[:2]

    objective = dict(method=recipe.method, rank=recipe.rank, alpha=recipe.lora_alpha, targets=list(recipe.targets),
                     text_encoder_lora=recipe.text_encoder_lora, model=pipe.model_id, model_hash=pipe.model_hash,
                     data=data_key(digest, size, recipe.flip, "")[:12], batch=recipe.batch_size * world,
                     grad_accum=recipe.grad_accum, seed=recipe.seed)
    if recipe.class_prompts:
        objective["prior"] = dict(prompts=list(recipe.class_prompts), images=recipe.class_images,
                                  weight=recipe.prior_weight)
    checkpoint_path = output / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint_path)
    if state:  # before anything is made for this recipe
        refuse_other_objective(checkpoint_path, state, objective)

    prior_latents = prior_captions = None
    if recipe.class_prompts:  # made by the base model, before any LoRA is added
        prior_examples = class_examples(pipe, recipe, output / "cache" / "class-images", rank, world,
                                        accelerator.wait_for_everyone, should_stop)
        if prior_examples is None:
            log.info("stopped while making the prior-preservation images; rerun to go on")
            return FinetuneResult(output, recipe.method, state["step"] if state else 0, recipe.steps, True,
                                  [list(h) for h in state["history"]] if state else [])
        prior_latents = encode_images(pipe, prior_examples, size, False, output / "cache") if main_process else None
        accelerator.wait_for_everyone()
        if prior_latents is None:
            prior_latents = encode_images(pipe, prior_examples, size, False, output / "cache")  # now a cache hit
        prior_latents = prior_latents.to(device)
        prior_captions = [ex.caption for ex in prior_examples]

    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.gradient_checkpointing = recipe.gradient_checkpointing
    torch.manual_seed(recipe.seed)  # LoRA's initial A: the same in every process and every run
    if recipe.method == "lora":
        lora_lib.remove_lora(unet)
        lora_lib.add_lora(unet, lora_lib.unet_targets(unet, recipe.targets), recipe.rank, recipe.lora_alpha,
                          gaussian=True)
        if recipe.text_encoder_lora:
            lora_lib.add_lora(text_encoder, lora_lib.target_names(text_encoder, lora_lib.TEXT_TARGETS), recipe.rank,
                              recipe.lora_alpha, gaussian=True)
        ema = None
    else:
        unet.requires_grad_(True)
        ema = copy.deepcopy(unet).requires_grad_(False)
    trainable = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=recipe.peak_lr, weight_decay=recipe.weight_decay)

    def tokenize(texts):
        return pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device)

    @torch.no_grad()
    def embed(ids):
        return torch.cat([text_encoder(ids[i:i + 64])[0] for i in range(0, len(ids), 64)])

    # token ids of every caption (and of "" for caption dropout) and of the prior images' captions; their contexts
    # once, when the text encoder does not train
    ids_all = tokenize(captions + [""])
    prior_ids = tokenize(prior_captions) if prior_captions else None
    contexts = prior_contexts = None
    if not recipe.text_encoder_lora:
        contexts = embed(ids_all)
        prior_contexts = embed(prior_ids) if prior_ids is not None else None

    scheduler = noise_scheduler(config=pipe.scheduler_config)
    alphas = scheduler.alphas_cumprod.to(device)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"the model predicts {prediction_type!r}; fine-tuning knows epsilon and v_prediction")

    generator = torch.Generator().manual_seed(recipe.seed)
    step, history = 0, []
    if state:
        _load_trainable(unet, text_encoder, state, recipe)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], [list(h) for h in state["history"]]
        generator.set_state(state["generator"])
        log.info("resumed at step %d of %d from %s", step, recipe.steps, checkpoint_path)

    unet, opt = accelerator.prepare(unet, opt)
    if recipe.text_encoder_lora:
        text_encoder = accelerator.prepare(text_encoder)
    base_unet = accelerator.unwrap_model(unet)

    heldout = _heldout_batch(latents, ids_all, contexts, recipe, scheduler, device)
    n_data = len(captions)
    global_batch = recipe.batch_size * world

    def compute_loss(index, noise, t, drop, flipped, offset, *prior):
        x0 = latents[index]
        if recipe.flip:
            x0 = torch.where(flipped.view(-1, 1, 1, 1), latents[index + n_data], x0)
        row = torch.where(drop, torch.full_like(index, n_data), index)
        ids, context = ids_all[row], None if contexts is None else contexts[row]
        if prior:  # the prior-preservation images in the same forward pass, after the data's
            p_index, p_noise, p_t, p_offset = prior
            x0, noise, t = torch.cat([x0, prior_latents[p_index]]), torch.cat([noise, p_noise]), torch.cat([t, p_t])
            offset, ids = torch.cat([offset, p_offset]), torch.cat([ids, prior_ids[p_index]])
            context = None if context is None else torch.cat([context, prior_contexts[p_index]])
        noise = noise + recipe.noise_offset * offset  # offset noise: one value per sample and channel
        xt, target = noised_and_target(prediction_type, alphas, x0, noise, t)
        pred = unet(xt, t, context if context is not None else text_encoder(ids)[0])
        n = len(index)
        loss = diffusion_loss(pred[:n], target[:n], prediction_type, alphas, t[:n], recipe.snr_gamma)
        if prior:
            loss = loss + recipe.prior_weight * diffusion_loss(pred[n:], target[n:], prediction_type, alphas, t[n:],
                                                               recipe.snr_gamma)
        return loss

    base_images = None
    if main_process:
        base_images = _base_previews(pipe, base_unet, prompts, recipe, ema)
    result = FinetuneResult(output, recipe.method, step, recipe.steps, False, history)
    bar = None
    if main_process and show_bar:
        from tqdm import tqdm

        bar = tqdm(total=recipe.steps, initial=step, desc=f"finetune ({recipe.method})", unit="step")
    last_saved = step
    started = time.time()
    try:
        unet.train()
        while step < recipe.steps:
            lr = lr_at(step, recipe.steps, recipe.peak_lr, recipe.warmup, recipe.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            losses = []
            for _ in range(recipe.grad_accum):
                # one global batch drawn from the shared generator, each process taking its slice: the same
                # samples, noise and timesteps as one process with the whole batch
                index = torch.randint(0, n_data, (global_batch,), generator=generator)
                noise = torch.randn((global_batch, *latents.shape[1:]), generator=generator)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (global_batch,), generator=generator)
                drop = torch.rand(global_batch, generator=generator) < recipe.caption_dropout
                flipped = torch.rand(global_batch, generator=generator) < 0.5
                offset = torch.randn((global_batch, latents.shape[1], 1, 1), generator=generator)
                draws = [index, noise, t, drop, flipped, offset]
                if prior_latents is not None:  # as many prior images as data images
                    draws += [torch.randint(0, len(prior_latents), (global_batch,), generator=generator),
                              torch.randn((global_batch, *latents.shape[1:]), generator=generator),
                              torch.randint(0, scheduler.config.num_train_timesteps, (global_batch,),
                                            generator=generator),
                              torch.randn((global_batch, latents.shape[1], 1, 1), generator=generator)]
                mine = slice(rank * recipe.batch_size, (rank + 1) * recipe.batch_size)
                batch = [v[mine].to(device) for v in draws]
                with accelerator.accumulate(unet):
                    loss = compute_loss(*batch)
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"the loss became {loss.item()} at step {step + 1} (learning rate {lr:.2e}); training "
                            f"stopped and the last good checkpoint (step {last_saved}) is kept: lower the learning "
                            f"rate (--lr) and rerun")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and recipe.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, recipe.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
            step += 1
            if ema is not None:
                ema_update(base_unet, ema, step, recipe.ema_decay)
            value = sum(losses) / len(losses)
            held = None
            if step % recipe.eval_every == 0 or step == recipe.steps:
                held = _heldout_loss(unet, text_encoder, heldout, prediction_type, alphas, recipe)
                unet.train()
            history.append([step, value, lr, held])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", **({"heldout": f"{held:.4f}"} if held is not None else {}))
            if progress is not None:
                progress(step, recipe.steps, value)
            if step % recipe.checkpoint_every == 0 and step < recipe.steps:
                _save(accelerator, checkpoint_path, base_unet, text_encoder, ema, opt, step, generator, history,
                      objective, recipe)
                last_saved = step
            if main_process and recipe.preview_every and step % recipe.preview_every == 0 and step < recipe.steps:
                result.preview = _previews(pipe, base_unet, prompts, recipe, ema, base_images, output, step)
                _write_curves(output, history)
                unet.train()
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        _save(accelerator, checkpoint_path, base_unet, text_encoder, ema, opt, step, generator, history, objective,
              recipe)
        if main_process:
            _write_curves(output, history)
        log.info("stopped at step %d of %d; the checkpoint is saved: run the same command again to resume", step,
                 recipe.steps)
        result.step, result.stopped = step, True
        return result
    if bar is not None:
        bar.close()
    unet.eval()
    _save(accelerator, checkpoint_path, base_unet, text_encoder, ema, opt, step, generator, history, objective,
          recipe)
    if main_process:
        result.preview = _previews(pipe, base_unet, prompts, recipe, ema, base_images, output, step)
        _write_curves(output, history)
        result.files = _export(pipe, base_unet, text_encoder if recipe.text_encoder_lora else None, ema, recipe,
                               output, examples, history, time.time() - started)
    accelerator.wait_for_everyone()
    result.step = step
    return result


def _load_trainable(unet, text_encoder, state, recipe):
    if recipe.method == "lora":
        for model, key in ((unet, "unet"), (text_encoder, "text_encoder")):
            layers = lora_lib.lora_layers(model)
            with torch.no_grad():
                for name, (a, b) in state.get(key, {}).items():
                    layers[name].lora_A[lora_lib.ADAPTER].weight.copy_(a)
                    layers[name].lora_B[lora_lib.ADAPTER].weight.copy_(b)
    else:
        unet.load_state_dict(state["unet"])


def _save(accelerator, path, unet, text_encoder, ema, opt, step, generator, history, objective, recipe):
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = dict(step=step, optimizer=opt.state_dict(), generator=generator.get_state(), history=history,
                     objective=objective)
        if recipe.method == "lora":
            state["unet"] = {n: (a, b) for n, (a, b, _) in lora_lib.lora_weights(unet).items()}
            state["text_encoder"] = {n: (a, b) for n, (a, b, _) in lora_lib.lora_weights(text_encoder).items()}
        else:
            state["unet"], state["ema"] = unet.state_dict(), ema.state_dict()
        save_checkpoint(path, state)
    accelerator.wait_for_everyone()


def _heldout_batch(latents, ids_all, contexts, recipe, scheduler, device):
    """A fixed batch for the held-out loss: the first images at five fixed timesteps each, with fixed noise."""
    n = min(recipe.heldout_images, len(ids_all) - 1)
    if n == 0:
        return None
    generator = torch.Generator().manual_seed(12345)
    steps = scheduler.config.num_train_timesteps
    t = torch.tensor([int(steps * f) for f in (0.1, 0.3, 0.5, 0.7, 0.9)] * n)
    index = torch.arange(n).repeat_interleave(5)
    noise = torch.randn((len(index), *latents.shape[1:]), generator=generator)
    index = index.to(device)
    return dict(x0=latents[index], noise=noise.to(device), t=t.to(device), index=index, ids=ids_all[index],
                contexts=None if contexts is None else contexts[index])


@torch.no_grad()
def _heldout_loss(unet, text_encoder, batch, prediction_type, alphas, recipe) -> float | None:
    """The loss on a fixed batch (same images, noise and timesteps every time): it moves only when the model does.
    The images are training images, so it shows fitting, not generalisation; with few images that is the useful
    signal, and it is free of the batch-to-batch noise of the training loss."""
    if batch is None:
        return None
    unet.eval()
    xt, target = noised_and_target(prediction_type, alphas, batch["x0"], batch["noise"], batch["t"])
    context = batch["contexts"] if batch["contexts"] is not None else text_encoder(batch["ids"])[0]
    pred = unet(xt, batch["t"], context)
    return float(diffusion_loss(pred, target, prediction_type, alphas, batch["t"], recipe.snr_gamma))


PREVIEW_SEED = 1234


@torch.no_grad()
def _sample(pipe, unet, prompts, recipe) -> list[Image.Image]:
    original = pipe.unet
    pipe.unet = unet
    was_training = unet.training
    unet.eval()
    try:
        return pipe(prompts, seed=PREVIEW_SEED, num_inference_steps=recipe.preview_steps,
                    guidance_scale=recipe.preview_guidance).images
    finally:
        pipe.unet = original
        unet.train(was_training)


def _base_previews(pipe, unet, prompts, recipe, ema):
    if recipe.method == "lora":
        lora_lib.set_scale(unet, 0.0)
        images = _sample(pipe, unet, prompts, recipe)
        lora_lib.set_scale(unet, 1.0)
        return images
    return _sample(pipe, ema, prompts, recipe)  # before training the EMA is the base model


def _previews(pipe, unet, prompts, recipe, ema, base_images, output: Path, step: int) -> Path:
    """A grid, one row per prompt: the base model, then LoRA at scale 0.5 and 1 (or the fine-tuned EMA UNet)."""
    columns = [("base", base_images)]
    if recipe.method == "lora":
        for scale in (0.5, 1.0):
            lora_lib.set_scale(unet, scale)
            columns.append((f"LoRA {scale:g}", _sample(pipe, unet, prompts, recipe)))
        lora_lib.set_scale(unet, 1.0)
    else:
        columns.append(("fine-tuned", _sample(pipe, ema, prompts, recipe)))
    grid = preview_grid(columns, prompts, f"step {step}")
    path = output / "previews" / f"step-{step:06d}.png"
    with atomic_write(path) as f:
        grid.save(f, format="PNG")
    return path


def preview_grid(columns, prompts, title: str) -> Image.Image:
    """Columns of images (one per prompt) side by side under their labels, prompts on the left."""
    from PIL import ImageDraw

    cell = max(128, columns[0][1][0].size[0])
    label_w, head = 220, 22
    grid = Image.new("RGB", (label_w + cell * len(columns), head + cell * len(prompts)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), title, fill=(0, 0, 0))
    for c, (label, images) in enumerate(columns):
        draw.text((label_w + c * cell + 4, 4), label, fill=(0, 0, 0))
        for r, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_w + c * cell, head + r * cell))
    for r, prompt in enumerate(prompts):
        words, lines = prompt.split(), [""]
        for word in words:
            lines[-1:] = [lines[-1] + " " + word] if len(lines[-1]) + len(word) < 34 else [lines[-1], word]
        draw.multiline_text((4, head + r * cell + 4), "\n".join(x.strip() for x in lines[:8]), fill=(0, 0, 0))
    return grid


def _write_curves(output: Path, history):
    """loss.csv (step, loss, lr, heldout) and loss.png, both atomically."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["step", "loss", "lr", "heldout_loss"])
    for step, loss, lr, held in history:
        writer.writerow([step, f"{loss:.6f}", f"{lr:.3e}", "" if held is None else f"{held:.6f}"])
    with atomic_write(output / "loss.csv") as f:
        f.write(text.getvalue().encode())
    figure = plot_loss(history)
    with atomic_write(output / "loss.png") as f:
        figure.savefig(f, format="png", dpi=100)


def plot_loss(history):
    """A matplotlib Figure of the training loss (raw and smoothed) and the held-out loss."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.2))
    ax = figure.add_subplot()
    if history:
        steps = np.array([h[0] for h in history])
        loss = np.array([h[1] for h in history])
        ax.plot(steps, loss, color="#bbbbbb", linewidth=0.8, label="training loss")
        if len(loss) > 5:
            k = max(2, len(loss) // 20)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, color="#1f77b4", label=f"mean of {k} steps")
        held = [(h[0], h[3]) for h in history if h[3] is not None]
        if held:
            ax.plot(*zip(*held), "o-", color="#d62728", markersize=3, label="held-out loss (fixed noise)")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _export(pipe, unet, text_encoder, ema, recipe, output: Path, examples, history, seconds: float) -> list[Path]:
    info = dict(base_model=pipe.model_id, base_hash=pipe.model_hash, steps=recipe.steps, images=len(examples),
                method=recipe.method)
    if recipe.method == "lora":
        files = lora_lib.save(output, unet, text_encoder,
                              extra_metadata={"imagecraft_" + k: v for k, v in info.items()})
    else:
        files = save_full_model(pipe, ema, output)
    card = output / "README.md"
    with atomic_write(card) as f:
        f.write(model_card(recipe, pipe, examples, history, seconds).encode())
    return files + [card]


def save_full_model(pipe, unet, output: Path) -> list[Path]:
    """The fine-tuned UNet with the base model's other parts, as a plain diffusers folder (safetensors)."""
    from diffusers import StableDiffusionPipeline

    from .porting import to_diffusers
    from .schedulers import make_scheduler

    theirs = to_diffusers(copy.deepcopy(unet).float().cpu())
    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=theirs,
                                 scheduler=make_scheduler(pipe.default_scheduler, pipe.scheduler_config),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(output, safe_serialization=True)
    return [output / "model_index.json"]


def model_card(recipe: Recipe, pipe, examples, history, seconds: float) -> str:
    last = history[-1] if history else [0, float("nan"), 0, None]
    held = [h[3] for h in history if h[3] is not None]
    use = ("```python\nfrom diffusers import StableDiffusionPipeline\n"
           f"pipe = StableDiffusionPipeline.from_pretrained({pipe.model_id!r})\npipe.load_lora_weights('THIS_FOLDER')\n"
           "```\n\n```python\nfrom imagecraft import ImageCraftPipeline\n"
           f"pipe = ImageCraftPipeline.from_pretrained({pipe.model_id!r})\n"
           "pipe.load_lora('THIS_FOLDER', scale=1.0)\n```"
           "\n\nAUTOMATIC1111 / ComfyUI: copy `lora_kohya.safetensors` into the LoRA folder and write "
           "`<lora:lora_kohya:1>` in the prompt.") if recipe.method == "lora" else (
           "```python\nfrom diffusers import StableDiffusionPipeline\n"
           "pipe = StableDiffusionPipeline.from_pretrained('THIS_FOLDER')\n```")
    settings = "\n".join(f"| {k} | {str(v).replace('|', '&#124;')} |" for k, v in asdict(recipe).items())
    return (f"# {'LoRA' if recipe.method == 'lora' else 'Fine-tuned model'} trained with ImageCraft\n\n"
            f"Base model: `{pipe.model_id}` (UNet hash {pipe.model_hash or 'n/a'}). {len(examples)} training images "
            f"at {pipe.default_size} px, {last[0]} steps in {seconds / 60:.1f} min.\n\n"
            f"Final training loss {last[1]:.4f}"
            + (f", held-out loss {held[0]:.4f} at the first evaluation and {held[-1]:.4f} at the last" if held else "")
            + ". The curve is in `loss.png` and `loss.csv`; previews (base model, LoRA at 0.5 and 1) are in "
              "`previews/`.\n\n## Use\n\n" + use + "\n\n## Recipe\n\n| setting | value |\n|---|---|\n"
            + settings + "\n")


# --- CLI -----------------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="imagecraft finetune", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Recipe()
    parser.add_argument("--data", required=True, help="folder of images with captions (or a .zip of one)")
    parser.add_argument("--output", required=True, help="folder for the LoRA or model, curves, previews, checkpoints")
    parser.add_argument("--model", default=None, help="base model (default: the built-in model)")
    parser.add_argument("--method", choices=("lora", "full"), default=d.method)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (LoRA 1e-4, full 5e-5)")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d.lr_schedule)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--targets", default=",".join(d.targets),
                        help=f"LoRA targets in the UNet, comma-separated: {', '.join(lora_lib.UNET_TARGETS)}")
    parser.add_argument("--text-encoder-lora", action="store_true")
    parser.add_argument("--snr-gamma", type=float, default=d.snr_gamma)
    parser.add_argument("--noise-offset", type=float, default=d.noise_offset)
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=d.precision)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    parser.add_argument("--flip", action="store_true", help="random horizontal flips (they swap left and right)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--preview-every", type=int, default=d.preview_every, help="0: at the end only")
    parser.add_argument("--validation-prompt", action="append", default=None,
                        help="a preview prompt (repeat for more; default: the data's first two captions)")
    parser.add_argument("--class-prompt", action="append", default=None,
                        help="prior preservation: the base model's images for this prompt are trained on beside the "
                             "data, so that what the data does not show stays (repeat for more; default: off)")
    parser.add_argument("--class-images", type=int, default=d.class_images,
                        help="how many prior-preservation images to make, the class prompts in turn")
    parser.add_argument("--prior-weight", type=float, default=d.prior_weight,
                        help="weight of the prior-preservation loss")
    return parser


def recipe_from_args(args) -> Recipe:
    return Recipe(method=args.method, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                  lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup, rank=args.rank, alpha=args.alpha,
                  targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                  text_encoder_lora=args.text_encoder_lora, snr_gamma=args.snr_gamma, noise_offset=args.noise_offset,
                  max_grad_norm=args.max_grad_norm, precision=args.precision,
                  gradient_checkpointing=args.gradient_checkpointing, caption_dropout=args.caption_dropout,
                  flip=args.flip, seed=args.seed, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                  preview_every=args.preview_every, validation_prompts=tuple(args.validation_prompt or ()),
                  class_prompts=tuple(args.class_prompt or ()), class_images=args.class_images,
                  prior_weight=args.prior_weight)


def run(args) -> int:
    from .loading import ModelLoadError

    try:
        recipe = check_recipe(recipe_from_args(args))
        data = Path(args.data)
        if data.is_file() and data.suffix.lower() == ".zip":
            data = extract_zip(data, Path(args.output) / "data")
        result = finetune(args.model, data, args.output, recipe)
    except (ValueError, ModelLoadError, TrainingError, lora_lib.LoraError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 1
    except OSError as e:  # a full disk mid-run: the last checkpoint is whole (atomic writes)
        print(f"error: {e}; the last checkpoint is kept, rerun the same command to resume", file=sys.stderr)
        return 1
    if result.stopped:
        print(f"stopped at step {result.step} of {result.steps}; rerun the same command to resume", file=sys.stderr)
        return 130
    for path in result.files:
        print(path)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
