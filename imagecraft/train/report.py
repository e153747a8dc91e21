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
from PIL import Image, ImageDraw, ImageFont

from .. import embeddings, lora as lora_lib
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
    """Columns of images (one per prompt) side by side under their labels, each row under its prompt.

    Sized to be read where the app shows it (scaled to about 530 px wide): 16 px text, a top margin under the
    component's label (which covers the image's top left), and the prompts above their rows rather than in a column
    of their own beside the images."""
    cell = max(192, columns[0][1][0].size[0])
    font = ImageFont.load_default(size=16)
    top, head, line = 24, 26, 24  # the margin under the app's label, the column labels, each prompt's line
    width = cell * len(columns)
    grid = Image.new("RGB", (width, top + head + (line + cell) * len(prompts) + line), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, (label, images) in enumerate(columns):
        draw.text((c * cell + cell / 2, top + head / 2), label, fill=(0, 0, 0), font=font, anchor="mm")
        for r, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (c * cell, top + head + r * (line + cell) + line))
    # the title below: the app's label covers the top left, its buttons the top right
    draw.text((4, grid.size[1] - line / 2), title, fill=(90, 90, 90), font=font, anchor="lm")
    for r, prompt in enumerate(prompts):
        text = prompt if draw.textlength(prompt, font=font) <= width - 8 else prompt[:70] + "…"
        while draw.textlength(text, font=font) > width - 8:
            text = text[:-2] + "…"
        draw.text((4, top + head + r * (line + cell) + line / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return grid


def write_curves(output: Path, history):
    """loss.csv (step, loss, lr, fixed-batch loss: on the held-out images where there are) and loss.png, both
    atomically."""
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
            ax.plot(*zip(*held), "o-", color="#d62728", markersize=3, label="fixed-batch loss: held-out images (else training ones), fixed noise and timesteps")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def export(pipe, unet, text_encoder, ema, recipe, output: Path, examples, history, seconds: float,
           kept: int | None = None, word_ids: dict[str, int] | None = None) -> list[Path]:
    info = dict(base_model=pipe.model_id, base_hash=pipe.model_hash, steps=recipe.steps, images=len(examples),
                method=recipe.method)
    if recipe.method == "lora":
        files = lora_lib.save(output, unet, text_encoder,
                              extra_metadata={"imagecraft_" + k: v for k, v in info.items()})
        files += embeddings.save(output, pipe.text_encoder, word_ids or {})
    else:
        files = save_full_model(pipe, ema, output)
    card = output / "README.md"
    with atomic_write(card) as f:
        f.write(model_card(recipe, pipe, examples, history, seconds, kept, list(word_ids or {})).encode())
    return files + [card]


def save_full_model(pipe, unet, output: Path) -> list[Path]:
    """The fine-tuned UNet with the base model's other parts, as a plain diffusers folder (safetensors)."""
    theirs = to_diffusers(copy.deepcopy(unet).float().cpu())
    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=theirs,
                                 scheduler=make_scheduler(pipe.default_scheduler, pipe.scheduler_config),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(output, safe_serialization=True)
    return [output / "model_index.json"]


def model_card(recipe, pipe, examples, history, seconds: float, kept: int | None = None, words=()) -> str:
    last = history[-1] if history else [0, float("nan"), 0, None]
    held = [h[3] for h in history if h[3] is not None]
    base = getattr(pipe, "source", pipe.model_id)  # what loads the base model: a Hub id, a folder or a file
    use = ("```python\nfrom diffusers import StableDiffusionPipeline\n"
           f"pipe = StableDiffusionPipeline.from_pretrained({base!r})\npipe.load_lora_weights('THIS_FOLDER')\n"
           + "".join(f"pipe.load_textual_inversion('THIS_FOLDER/embeddings/{w}.safetensors')\n" for w in words)
           + "```\n\n```python\nfrom imagecraft import ImageCraftPipeline\n"
           f"pipe = ImageCraftPipeline.from_pretrained({base!r})\n"
           "pipe.load_lora('THIS_FOLDER', scale=1.0)  # and the words' embeddings beside it\n```"
           "\n\nAUTOMATIC1111 / ComfyUI: copy `lora_kohya.safetensors` into the LoRA folder"
           + (" and the files of `embeddings/` into the embeddings folder" if words else "")
           + " and write `<lora:lora_kohya:1>` in the prompt.") if recipe.method == "lora" else (
           "```python\nfrom diffusers import StableDiffusionPipeline\n"
           "pipe = StableDiffusionPipeline.from_pretrained('THIS_FOLDER')\n```")
    # the values used, not the recipe's None for "the default": the learning rate and LoRA alpha it resolved to
    used = dict(asdict(recipe), lr=recipe.peak_lr, alpha=recipe.lora_alpha if recipe.method == "lora" else None)
    settings = "\n".join(f"| {k} | {str(v).replace('|', '&#124;')} |" for k, v in used.items() if v is not None
                         or k not in ("lr", "alpha"))
    return (f"# {'LoRA' if recipe.method == 'lora' else 'Fine-tuned model'} trained with ImageCraft\n\n"
            f"Base model: `{pipe.model_id}` (UNet hash {pipe.model_hash or 'n/a'}). {len(examples)} training images "
            f"at {pipe.default_size} px, {last[0]} steps in {seconds / 60:.1f} min.\n\n"
            f"Final training loss {last[1]:.4f}"
            + (f", loss on a fixed batch {held[0]:.4f} at the first evaluation and {held[-1]:.4f} at the last" if held else "")
            + (f"; the weights saved are step {kept}'s, where the loss on the held-out images was lowest"
               if kept is not None else "")
            + (f". The taught word{'s' if len(words) > 1 else ''} {', '.join(f'`{w}`' for w in words)} "
               f"{'have tokens' if len(words) > 1 else 'has a token'} of {'their' if len(words) > 1 else 'its'} own "
               "with a trained embedding (`embeddings/`), loaded with the LoRA" if words else "")
            + ". The curve is in `loss.png` and `loss.csv`; previews (base model, LoRA at 0.5 and 1) are in "
              "`previews/`.\n\n## Use\n\n" + use + "\n\n## Recipe\n\n| setting | value |\n|---|---|\n"
            + settings + "\n")

