"""What a fine-tune leaves beside its weights: fixed-seed previews, the loss curves (CSV and figure), the exported
LoRA or model folder, and a model card."""

from __future__ import annotations

import copy
import csv
import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from .. import lora as lora_lib
from ..files import atomic_write
from ..port import to_diffusers
from ..schedulers import make_scheduler

PREVIEW_SEED = 1234


@torch.no_grad()
def sample(pipe, unet, prompts, recipe) -> list[Image.Image]:
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


def base_previews(pipe, unet, prompts, recipe, ema):
    if recipe.method == "lora":
        lora_lib.set_scale(unet, 0.0)
        images = sample(pipe, unet, prompts, recipe)
        lora_lib.set_scale(unet, 1.0)
        return images
    return sample(pipe, ema, prompts, recipe)  # before training the EMA is the base model


def previews(pipe, unet, prompts, recipe, ema, base_images, output: Path, step: int) -> Path:
    """A grid, one row per prompt: the base model, then LoRA at scale 0.5 and 1 (or the fine-tuned EMA UNet)."""
    columns = [("base", base_images)]
    if recipe.method == "lora":
        for scale in (0.5, 1.0):
            lora_lib.set_scale(unet, scale)
            columns.append((f"LoRA {scale:g}", sample(pipe, unet, prompts, recipe)))
        lora_lib.set_scale(unet, 1.0)
    else:
        columns.append(("fine-tuned", sample(pipe, ema, prompts, recipe)))
    grid = preview_grid(columns, prompts, f"step {step}")
    path = output / "previews" / f"step-{step:06d}.png"
    with atomic_write(path) as f:
        grid.save(f, format="PNG")
    return path


def preview_grid(columns, prompts, title: str) -> Image.Image:
    """Columns of images (one per prompt) side by side under their labels, prompts on the left."""
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


def write_curves(output: Path, history):
    """loss.csv (step, loss, lr, fixed-batch loss) and loss.png, both atomically."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["step", "loss", "lr", "fixed_batch_loss"])
    for step, loss, lr, held in history:
        writer.writerow([step, f"{loss:.6f}", f"{lr:.3e}", "" if held is None else f"{held:.6f}"])
    with atomic_write(output / "loss.csv") as f:
        f.write(text.getvalue().encode())
    figure = plot_loss(history)
    with atomic_write(output / "loss.png") as f:
        figure.savefig(f, format="png", dpi=100)


def plot_loss(history):
    """A matplotlib Figure of the training loss (raw and smoothed) and the loss on a fixed batch."""
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
            ax.plot(*zip(*held), "o-", color="#d62728", markersize=3, label="loss on a fixed batch (same images, noise, timesteps)")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def export(pipe, unet, text_encoder, ema, recipe, output: Path, examples, history, seconds: float) -> list[Path]:
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
    theirs = to_diffusers(copy.deepcopy(unet).float().cpu())
    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=theirs,
                                 scheduler=make_scheduler(pipe.default_scheduler, pipe.scheduler_config),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(output, safe_serialization=True)
    return [output / "model_index.json"]


def model_card(recipe, pipe, examples, history, seconds: float) -> str:
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
            + (f", loss on a fixed batch {held[0]:.4f} at the first evaluation and {held[-1]:.4f} at the last" if held else "")
            + ". The curve is in `loss.png` and `loss.csv`; previews (base model, LoRA at 0.5 and 1) are in "
              "`previews/`.\n\n## Use\n\n" + use + "\n\n## Recipe\n\n| setting | value |\n|---|---|\n"
            + settings + "\n")

