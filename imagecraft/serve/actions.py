"""What the Generate and Attention tabs' buttons do, without Gradio: generation to PNG files, PNG restore, and the
attention maps' explain and redraws. Every value is checked by `imagecraft.settings`, as at every other entrance.

No module state: a request's results live in its own folder (`outputs.new_output_folder`) and in what it returns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from ..explain import DEFAULT_BLOCKS, AttentionMaps
from ..loading import DEFAULT_MODEL
from ..lora import lora_file
from ..pipeline import ImageCraftPipeline
from ..png import pipeline_settings, restore_settings
from ..settings import (DEFAULT_GUIDANCE, DEFAULT_STEPS, GENERATION, LORA_SCALE, MAX_IMAGES, check, check_cost,
                        shown)
from . import outputs
from .models import model_lock


def pick_seed(seed) -> int:
    """A seed from the UI: -1 or empty means a fresh random one (AUTOMATIC1111's convention); otherwise it is
    checked like any seed."""
    if seed is None or seed == "" or (isinstance(seed, (int, float)) and not isinstance(seed, bool) and seed == -1):
        return random.randint(0, GENERATION["seed"].high - MAX_IMAGES)  # room for a batch's seed + i
    return check("seed", seed)


class Cancelled(Exception):
    """The request was cancelled or its client went away; sampling stopped after the current step."""


def _callback(progress: Callable | None, should_stop: Callable | None):
    """The pipeline's step callback: progress, then a stop within one step when the request is no longer wanted."""
    if progress is None and should_stop is None:
        return None

    def callback(step, total, latents):
        if progress is not None:
            progress(step + 1, total)
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped after step {step + 1} of {total}: the request was cancelled")

    return callback


def _check_text(**texts) -> None:
    """The app's prompts are single strings (the Python API also takes a list of prompts; the app does not)."""
    for name, value in texts.items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {shown(value)}")
        check("negative_prompt" if name == "negative_prompt" else "prompt", value or "")


def _size(pipe, value, name: str) -> int:
    """A width or height from the UI: 0 or None means the model's own."""
    return pipe.default_size if value is None or (value == 0 and not isinstance(value, bool)) else check(name, value)


def generate(pipe: ImageCraftPipeline, prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, seed: int = -1, scheduler: str | None = None, width: int | None = None,
             height: int | None = None, num_images: int = 1, progress: Callable | None = None,
             should_stop: Callable | None = None, lora: str | None = None, lora_scale: float = 1.0,
             trusted_paths: bool = True, cache_interval: int | None = None, allowed_loras=()):
    """Generates and writes each image as a PNG with its metadata to a fresh folder of its own.

    Every value is checked by `imagecraft.settings` (the same schema as the API and CLI), and the request's
    UNet work (`settings.check_cost`: pixels, steps, images and self-attention's square) must be within
    `settings.max_cost`. Returns (PNG paths, the first seed,
    warnings). `progress(step, total)` is called after each sampling step; `should_stop()` too, and when it says
    yes sampling stops there (`Cancelled`). `lora` (a file or folder; only this server's fine-tunes unless
    `trusted_paths`) applies at `lora_scale` for this request only: the shared model is left as it was.
    """
    _check_text(prompt=prompt, negative_prompt=negative_prompt)
    w, h = _size(pipe, width, "width"), _size(pipe, height, "height")
    check_cost(w, h, check("num_inference_steps", steps), check("num_images", num_images), pipe.device,
               pipe.unet.config, pipe.vae_scale_factor)
    LORA_SCALE.check(lora_scale)  # also when the LoRA is "none": a bad value is refused, not ignored
    lora_path = check_lora_path(lora, trusted_paths, allowed_loras)
    lock = model_lock(pipe)
    with lock.exclusive() if lora_path else lock.shared():
        try:
            if lora_path:
                try:
                    pipe.load_lora(lora_path, lora_scale)
                except ValueError as e:  # a public server's sentence names the file, not where it is
                    raise ValueError(str(e) if trusted_paths else str(e).replace(str(lora_path.parent) + "/", "")
                                     ) from None
            result = pipe(prompt if prompt is not None else "", negative_prompt=negative_prompt or "",
                          num_inference_steps=steps, guidance_scale=guidance, seed=pick_seed(seed),
                          scheduler=scheduler or None, width=w, height=h, num_images=num_images,
                          callback=_callback(progress, should_stop), cache_interval=cache_interval)
        finally:
            if lora_path:
                pipe.unload_lora()
    paths = result.save(outputs.new_output_folder() / "imagecraft-{seed}.png")
    return [str(p) for p in paths], result.seeds[0], result.warnings


def check_lora_path(lora, trusted_paths: bool, allowed=()) -> Path | None:
    """The LoRA a request names, or None for none; a public server (`trusted_paths` False) takes only those in
    `allowed` (the session's own fine-tunes and IMAGECRAFT_LORAS), and its sentences name no path and do not say
    what exists."""
    if lora in (None, "", "none"):
        return None
    if not isinstance(lora, str) or len(lora) > 1000:
        raise ValueError(f"the LoRA must be a path, got {shown(lora)}")
    if trusted_paths:
        return lora_file(Path(lora).expanduser())
    if lora not in allowed:
        raise ValueError("this server applies only the LoRAs its LoRA box offers: those this session trained in the "
                         "Fine-tune tab, and the server's own")
    try:
        return lora_file(Path(lora))
    except ValueError:
        raise ValueError("this LoRA cannot be loaded: its fine-tune has not finished, or was cleared to keep the "
                         "server's disk within its cap") from None


def settings_from_png(path) -> tuple[dict, list[str]]:
    """The generation settings of one of our PNGs (or an AUTOMATIC1111 one) that pass the settings checks, and notes
    on those left out. The PNG's model is never returned, only named in a note when it is not the built-in one: a
    PNG can name any path or Hub id, and loading one is the user's choice."""
    stored, notes = restore_settings(path)
    model = stored.get("model")
    if model is not None and model != DEFAULT_MODEL.name:
        notes.append(f"this image was made with the model {shown(model)}; load it in the Model box to use it")
    return pipeline_settings(stored), notes


@dataclass
class Explained:
    """One explained image, kept per browser session: every redraw reads it instead of running the model again."""

    maps: AttentionMaps
    image: Image.Image
    image_path: str
    folder: Path
    view_path: str = ""  # the image scaled up with nearest neighbour to about 512 px, for clicking a pixel
    view_scale: int = 1  # view pixels per image pixel

    def pixel(self, x: int, y: int) -> tuple[int, int]:
        """The image pixel under a click at (x, y) on the scaled-up view."""
        return int(x) // self.view_scale, int(y) // self.view_scale


def explain(pipe: ImageCraftPipeline, prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
            guidance: float = DEFAULT_GUIDANCE, seed: int = -1, scheduler: str | None = None, width: int | None = None,
            height: int | None = None, progress: Callable | None = None,
            should_stop: Callable | None = None) -> Explained:
    """Generates one image with its cross-attention, as `generate` would draw it (same seed, same pixels), and
    writes the PNG and the maps (`attention.npz`) to a fresh folder."""
    _check_text(prompt=prompt, negative_prompt=negative_prompt)
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt first: attention maps show where each word of the prompt went")
    w, h = _size(pipe, width, "width"), _size(pipe, height, "height")
    check_cost(w, h, check("num_inference_steps", steps), 1, pipe.device, pipe.unet.config, pipe.vae_scale_factor)
    with model_lock(pipe).shared():  # never while another request's LoRA is applied to the shared model
        result = pipe(prompt, negative_prompt=negative_prompt or "", num_inference_steps=steps,
                      guidance_scale=guidance, seed=pick_seed(seed), scheduler=scheduler or None, width=w, height=h,
                      callback=_callback(progress, should_stop), attention=True)
    folder = outputs.new_output_folder()
    image_path = result.save(folder / "imagecraft-{seed}.png")[0]
    maps = result.attention[0]
    maps.save(folder / "attention.npz")
    image = result.images[0]
    scale = max(1, 512 // max(image.size))
    view = folder / "view.png"
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(view)
    return Explained(maps, image, str(image_path), folder, str(view), scale)


def attention_filters(maps: AttentionMaps, blocks=None, resolution: str = "all", step_from: int = 0,
                      step_to: int | None = None, heads: str = "all") -> dict:
    """The app's filter controls as `AttentionMaps.word` arguments: resolution "all" keeps DAAM's choice, a step
    range over all steps and head "all" add no filter."""
    filters = {}
    if blocks is not None and sorted(blocks) != sorted(DEFAULT_BLOCKS):
        filters["blocks"] = list(blocks)
    if resolution not in (None, "", "all"):
        filters["resolutions"] = [int(str(resolution).split("x")[0])]
    step_to = maps.num_steps if step_to is None else int(step_to)
    if (int(step_from), step_to) != (0, maps.num_steps):
        if int(step_from) >= step_to:
            raise ValueError(f"the step range must run forwards: from {int(step_from)} to {step_to}")
        filters["steps"] = (int(step_from), step_to)
    if heads not in (None, "", "all"):
        filters["heads"] = int(heads)
    return filters


# Gradio draws an image's label over its top left and its buttons over its top right: a figure shown there keeps
# this band (inches) free at its top, so that no panel title sits under them
UNDER_GRADIO_BARS = 0.45


def _clear_of_bars(fig):
    """Leaves `UNDER_GRADIO_BARS` free at the top of a constrained-layout figure."""
    fig.get_layout_engine().set(rect=(0, 0, 1, 1 - UNDER_GRADIO_BARS / fig.get_figheight()))
    return fig


def in_prompt_order(maps, words) -> list[str]:
    """The ticked words in the prompt's order: a CheckboxGroup appends a re-ticked word to the end of its value."""
    ticked = set(words or [])
    return [w for w in maps.words() if w in ticked]


def draw_attention(explained: Explained, words: list[str], filters: dict, alpha: float = 0.5, cmap: str = "jet",
                   normalize: str = "word", name: str = "attention.png") -> str:
    """The overlay figure of the ticked words (in the prompt's order, four panels a row, so that the app shows its
    titles at a readable size), written next to the image; returns its path."""
    from ..explain import plots

    words = in_prompt_order(explained.maps, words)
    if not words:
        raise ValueError("tick at least one word to show its map")
    fig = plots.plot_overlay(explained.image, explained.maps, words, cmap=cmap, alpha=float(alpha),
                             normalize=normalize, columns=3, **filters)
    return str(plots.save(_clear_of_bars(fig), explained.folder / name))


def draw_step(explained: Explained, words: list[str], step: int, filters: dict, alpha: float = 0.5,
              cmap: str = "jet", normalize: str = "word") -> str:
    """The overlay at one sampling step (the time scrubber)."""
    filters = {k: v for k, v in filters.items() if k not in ("steps", "heads")}
    filters["steps"] = (int(step), int(step) + 1)
    return draw_attention(explained, words, filters, alpha, cmap, normalize, name=f"step-{int(step)}.png")


def draw_pixel(explained: Explained, x: int, y: int, filters: dict) -> tuple[str, str]:
    """The bar chart of how the attention at one pixel splits over the prompt's tokens, and the clickable view with
    that pixel marked (a white ring with a black edge, seen on any colour)."""
    from PIL import ImageDraw

    from ..explain import plots

    fig = plots.plot_token_distribution(explained.maps, int(x), int(y), **filters)
    chart = str(plots.save(_clear_of_bars(fig), explained.folder / "pixel.png"))
    view = Image.open(explained.view_path).convert("RGB")
    s = explained.view_scale
    cx, cy, r = (int(x) + 0.5) * s, (int(y) + 0.5) * s, max(6, 1.5 * s)
    draw = ImageDraw.Draw(view)
    draw.ellipse((cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2), outline=(0, 0, 0), width=2)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 255, 255), width=2)
    marked = explained.folder / f"view-{int(x)}-{int(y)}.png"
    view.save(marked)
    return chart, str(marked)
