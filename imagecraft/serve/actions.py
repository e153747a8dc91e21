"""What the Generate and Attention tabs' buttons do, without Gradio: generation to PNG files, PNG restore, the
attention maps' explain and redraws, a LoRA's maps at scale 0 and 1, and the Edit panel's Prompt-to-Prompt edits and
inversions. Every value is checked by `imagecraft.settings`, as at every other entrance.

No module state: a request's results live in its own folder (`outputs.new_output_folder`) and in what it returns.
"""

from __future__ import annotations

import itertools
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..explain import DEFAULT_BLOCKS, AttentionMaps
from ..explain.edit import Inversion, align_words
from ..explain.maps import group_words
from ..loading import DEFAULT_MODEL
from ..lora import lora_file
from ..pipeline import ImageCraftPipeline
from ..png import JSON_KEY, LABELS, PNG_SIGNATURE, pipeline_settings, read_png_texts, restore_settings, restore_source
from ..prompts import parse
from ..settings import (DEFAULT_GUIDANCE, DEFAULT_STEPS, GENERATION, LORA_SCALE, MAX_IMAGES, check, check_cost,
                        check_edit, edit_cross_steps, shown)
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
    with lora_applied(pipe, lora_path, lora_scale, trusted_paths):
        result = pipe(prompt if prompt is not None else "", negative_prompt=negative_prompt or "",
                      num_inference_steps=steps, guidance_scale=guidance, seed=pick_seed(seed),
                      scheduler=scheduler or None, width=w, height=h, num_images=num_images,
                      callback=_callback(progress, should_stop), cache_interval=cache_interval)
    paths = result.save(outputs.new_output_folder() / "imagecraft-{seed}.png")
    return [str(p) for p in paths], result.seeds[0], result.warnings


@contextmanager
def lora_applied(pipe: ImageCraftPipeline, lora_path: Path | None, scale: float, trusted_paths: bool = True):
    """The shared model with a LoRA applied for one request, which then runs alone on it (`ModelLock.exclusive`);
    without one, beside the other plain requests. The LoRA is removed when the request ends, however it ends."""
    lock = model_lock(pipe)
    with lock.exclusive() if lora_path else lock.shared():
        try:
            if lora_path:
                try:
                    pipe.load_lora(lora_path, scale)
                except ValueError as e:  # a public server's sentence names the file, not where it is
                    raise ValueError(str(e) if trusted_paths else str(e).replace(str(lora_path.parent) + "/", "")
                                     ) from None
            yield
        finally:
            if lora_path:
                pipe.unload_lora()


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
    lora: Path | None = None  # the LoRA it was drawn with (a checked file), at `lora_scale`
    lora_scale: float = 1.0

    def pixel(self, x: int, y: int) -> tuple[int, int]:
        """The image pixel under a click at (x, y) on the scaled-up view."""
        return int(x) // self.view_scale, int(y) // self.view_scale


def _needs_words(prompt, refusal: str) -> None:
    """A prompt that must have words (`refusal` says why when it has none)."""
    _check_text(prompt=prompt)
    if not prompt or not prompt.strip():
        raise ValueError(refusal)


def explain(pipe: ImageCraftPipeline, prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
            guidance: float = DEFAULT_GUIDANCE, seed: int = -1, scheduler: str | None = None, width: int | None = None,
            height: int | None = None, progress: Callable | None = None,
            should_stop: Callable | None = None, lora: str | None = None, lora_scale: float = 1.0,
            trusted_paths: bool = True, allowed_loras=()) -> Explained:
    """Generates one image with its cross-attention, as `generate` would draw it (same seed, same pixels, the same
    LoRA), and writes the PNG and the maps (`attention.npz`) to a fresh folder."""
    _check_text(negative_prompt=negative_prompt)
    _needs_words(prompt, "type a prompt first: attention maps show where each word of the prompt went")
    w, h = _size(pipe, width, "width"), _size(pipe, height, "height")
    check_cost(w, h, check("num_inference_steps", steps), 1, pipe.device, pipe.unet.config, pipe.vae_scale_factor)
    LORA_SCALE.check(lora_scale)
    lora_path = check_lora_path(lora, trusted_paths, allowed_loras)
    with lora_applied(pipe, lora_path, lora_scale, trusted_paths):
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
    return Explained(maps, image, str(image_path), folder, str(view), scale, lora_path, float(lora_scale))


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


# --- a LoRA's maps at scale 0 and 1 ---------------------------------------------------------------------------------
def _in_turn(progress: Callable | None, runs: int) -> Callable | None:
    """One progress over `runs` step loops run one after the other (each loop's steps count from 0 again)."""
    if progress is None:
        return None
    calls = itertools.count(1)
    return lambda step, total: progress(next(calls), runs * total)


def compare_lora(pipe: ImageCraftPipeline, prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, seed: int = -1, scheduler: str | None = None,
                 width: int | None = None, height: int | None = None, lora: str | None = None, words=(),
                 alpha: float = 0.5, cmap: str = "jet", normalize: str = "word", progress: Callable | None = None,
                 should_stop: Callable | None = None, trusted_paths: bool = True, allowed_loras=()) -> str:
    """What a fine-tune changed in where words look: the image drawn with one seed at LoRA scale 0 (the base model)
    and 1, and each word's map (the ticked words, or all) over both, side by side. Returns the figure's path."""
    from ..explain import plots

    _check_text(negative_prompt=negative_prompt)
    _needs_words(prompt, "type a prompt first: the comparison shows where its words went with and without the LoRA")
    lora_path = check_lora_path(lora, trusted_paths, allowed_loras)
    if lora_path is None:
        raise ValueError("pick a LoRA in the Generate tab first: this compares its maps at scale 0 and 1")
    w, h = _size(pipe, width, "width"), _size(pipe, height, "height")
    check_cost(w, h, check("num_inference_steps", steps), 2, pipe.device, pipe.unet.config, pipe.vae_scale_factor)
    seed, callback = pick_seed(seed), _callback(_in_turn(progress, 2), should_stop)
    results = []
    with lora_applied(pipe, lora_path, 0.0, trusted_paths):
        for scale in (0.0, 1.0):
            pipe.set_lora_scale(scale)
            results.append(pipe(prompt, negative_prompt=negative_prompt or "", num_inference_steps=steps,
                                guidance_scale=guidance, seed=seed, scheduler=scheduler or None, width=w, height=h,
                                callback=callback, attention=True))
    maps = [r.attention[0] for r in results]
    shown_words = in_prompt_order(maps[0], words) or maps[0].words()
    fig = plots.plot_side_by_side([(r.images[0], m) for r, m in zip(results, maps)], shown_words,
                                  labels=("LoRA 0", "LoRA 1"), cmap=cmap, alpha=float(alpha), normalize=normalize)
    fig.suptitle(f"seed {seed}", fontsize=11)  # short: it sits between the app's label and buttons
    return str(plots.save(_clear_of_bars(fig), outputs.new_output_folder() / "lora-0-and-1.png"))


# --- the Edit panel: Prompt-to-Prompt edits and inversions -----------------------------------------------------------
# Costs in generated images, for `check_cost`. An edit draws the source beside the edit: twice a generation's UNet
# work. An inversion runs DDIM backwards (one pass a step), then null-text optimisation (a conditional pass, at most
# 10 optimiser steps of a forward and a backward pass, about 3 passes each, and the step), then draws the picture
# again under guidance: at most about 35 passes a step, where a guided generation's image takes 2. (Measured on the
# built-in model, where the optimiser mostly stops early: an inversion takes about 7 generations' time.)
EDIT_IMAGES = 2
INVERT_IMAGES = 18
MAX_PICTURE_PIXELS = 4096 * 4096  # an upload larger than this is refused before it is decoded
AMPLIFY = 4  # the difference image shows |edit - source| times this


@dataclass
class EditSource:
    """What the Edit panel edits, kept per browser session: a picture, and what `pipe.edit` draws it again from."""

    image_path: str  # the picture as the edit draws it again: the edit's difference is taken against it
    prompt: str  # the prompt it is drawn with (for an inverted picture, what the user said it shows)
    model: str  # the model box's name of the model that draws it
    settings: dict  # width, height, num_inference_steps, cache_interval: the edit's cost, and whether it has maps
    edit_from: str | Inversion  # what `pipe.edit` takes: an ImageCraft PNG's path, or `pipe.invert`'s result
    lora: Path | None = None  # the LoRA it was drawn with (a checked file), at `lora_scale`
    lora_scale: float = 1.0


@dataclass
class Edited:
    """What one edit wrote, in a fresh folder of its own."""

    path: str  # the edited image: a PNG whose metadata holds the edit, so `reproduce` makes it again
    difference: str  # |edit - source| x AMPLIFY
    maps: str | None  # the changed words' maps over the edited image; None for a source made with DeepCache
    notes: list[str]


def _edit_settings(record: dict) -> dict:
    return {"width": record["width"], "height": record["height"],
            "num_inference_steps": record["num_inference_steps"],
            "cache_interval": record.get("cache_interval") or 1}


def edit_cross_steps_for(source_words: list[str], edited_words: list[str]) -> float:
    """The cross_steps `pipe.edit` takes by default for an edit between these words (`settings.edit_cross_steps`)."""
    return edit_cross_steps(any(i is None for i, _ in align_words(source_words, edited_words)))


def prompt_words(pipe: ImageCraftPipeline, prompt: str, each_once: bool = True) -> list[str]:
    """A prompt's words as the attention maps name them (weighting syntax left out), in order: each once, or every
    occurrence (as an edit aligns them)."""
    tokens, _ = pipe.tokens(prompt)
    words = [word for word, _ in group_words(tokens)]
    return list(dict.fromkeys(words)) if each_once else words


def source_of(explained: Explained, model: str) -> EditSource:
    """The explained image as the Edit panel's source: its PNG holds every setting that draws it again."""
    settings, _ = restore_source(explained.image_path)
    return EditSource(explained.image_path, settings["prompt"], model, _edit_settings(settings), explained.image_path,
                      explained.lora, explained.lora_scale)


def open_picture(path) -> Image.Image:
    """An uploaded picture in RGB; a sentence for a file that is not one, or one too large to decode."""
    if path is None:
        raise ValueError("drop a picture to edit: a PNG ImageCraft made, or any other picture to invert")
    try:
        with Image.open(path) as opened:
            if opened.width * opened.height > MAX_PICTURE_PIXELS:
                raise ValueError(f"the picture is {opened.width}x{opened.height}, over the "
                                 f"{MAX_PICTURE_PIXELS // 2**20} megapixels this app takes")
            return opened.convert("RGB")
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - whatever PIL raises for a file it cannot decode
        raise ValueError("this file is not a picture ImageCraft can read: drop a PNG, JPEG or WebP image") from None


def made_by_imagecraft(path) -> bool:
    """Whether a picture is a PNG with ImageCraft's record, whose settings draw it again; any other is inverted."""
    with open(path, "rb") as f:
        if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            return False
    return JSON_KEY in read_png_texts(path)


def load_source(pipe: ImageCraftPipeline, path, model: str, progress: Callable | None = None,
                should_stop: Callable | None = None) -> tuple[EditSource | None, str, list[str]]:
    """An uploaded picture for the Edit panel: (its source, the picture to show, notes). An ImageCraft PNG is drawn
    again from its settings (of an edit, its source's): that is the picture an edit of it starts from. Any other
    picture has no source until `invert` makes one (None, the picture as uploaded, no notes)."""
    open_picture(path)
    if not made_by_imagecraft(path):
        return None, str(path), []
    settings, notes = restore_source(path)
    drawn = pipeline_settings(settings)
    missing = [LABELS[name] for name in ("width", "num_inference_steps") if name not in drawn]
    if missing:  # an edit draws the picture again with every setting it was made with
        raise ValueError(f"the PNG's ImageCraft record gives no usable {' or '.join(missing)}, so its picture cannot "
                         f"be drawn again: say what it shows and press \"Invert\" to edit it as a picture")
    check_cost(drawn["width"], drawn["height"], drawn["num_inference_steps"], 1, pipe.device, pipe.unet.config,
               pipe.vae_scale_factor)
    with model_lock(pipe).shared():
        result = pipe(**drawn, callback=_callback(progress, should_stop))
    again = result.save(outputs.new_output_folder() / "source.png")[0]
    return EditSource(str(again), settings["prompt"], model, _edit_settings(drawn), str(path)), str(again), notes


def fit_to_model(pipe: ImageCraftPipeline, picture: Image.Image) -> tuple[Image.Image, list[str]]:
    """A picture scaled so that its longer side is the model's size and both sides are sizes it takes (multiples of
    8 and of its VAE's factor, at least 64), with a note when it was scaled."""
    grid = math.lcm(GENERATION["width"].step, pipe.vae_scale_factor)
    scale = pipe.default_size / max(picture.size)
    size = tuple(max(GENERATION["width"].low, round(side * scale / grid) * grid) for side in picture.size)
    if size == picture.size:
        return picture, []
    return picture.resize(size, Image.LANCZOS), [f"the picture is {picture.width}x{picture.height}: it is inverted at "
                                                 f"{size[0]}x{size[1]}, the size this model draws"]


def invert(pipe: ImageCraftPipeline, path, prompt: str, model: str, progress: Callable | None = None,
           should_stop: Callable | None = None) -> tuple[EditSource, list[str]]:
    """A picture ImageCraft did not make, made editable (`pipe.invert`: DDIM inversion and null-text optimisation)
    under what the user says it shows: the Edit panel's source, and notes. Its picture is the inversion's drawn
    again, which an edit keeps wherever it changes nothing."""
    _needs_words(prompt, "say what the picture shows first, in words the model knows: it is inverted under that "
                         "prompt")
    picture, notes = fit_to_model(pipe, open_picture(path))
    check_cost(picture.width, picture.height, DEFAULT_STEPS, INVERT_IMAGES, pipe.device, pipe.unet.config,
               pipe.vae_scale_factor)
    with model_lock(pipe).shared():
        inversion = pipe.invert(picture, prompt, callback=_callback(_in_turn(progress, 2), should_stop))
    drawn = outputs.new_output_folder() / "inverted.png"
    inversion.images[0].save(drawn)
    record = inversion.records[0]
    return EditSource(str(drawn), record["prompt"], model, _edit_settings(record), inversion), \
        notes + list(inversion.warnings)


def changed_words(source: list[str], target: list[str], reweight: dict, blend: list[str]) -> list[str]:
    """The words of the edited prompt whose maps show what an edit did: those it swaps or adds (`align_words`), and
    those it reweights; with none of these the blend words, and with none of those every word."""
    def named(keys):
        return {w for key in keys for w in parse(key).text.lower().split()}

    pairs = align_words(source, target)
    changed = [target[j] for i, j in pairs if j is not None and (i is None or source[i].lower() != target[j].lower())]
    changed += [w for w in target if w.lower() in named(reweight)]
    changed = changed or [w for w in target if w.lower() in named(blend)] or target
    return list(dict.fromkeys(changed))


def edit(pipe: ImageCraftPipeline, source: EditSource | None, prompt: str, blend=None, reweight=None,
         cross_steps: float | None = None, self_steps: float | None = None, progress: Callable | None = None,
         should_stop: Callable | None = None, trusted_paths: bool = True) -> Edited:
    """Edits the panel's source by editing its prompt (`pipe.edit`, Prompt-to-Prompt) and writes the edited PNG, the
    difference from the source and the changed words' maps to a fresh folder. The values are checked by
    `settings.check_edit`, and the work (source and edit: twice a generation) by `check_cost`."""
    from ..explain import plots

    if source is None:
        raise ValueError("nothing to edit yet: press \"Explain the last image\", or drop a picture above (one that "
                         "ImageCraft did not make, then \"Invert\")")
    _needs_words(prompt, "type the edited prompt: the picture is drawn again under it, keeping what it keeps")
    e = check_edit(dict(prompt=prompt, blend=blend, reweight=reweight, cross_steps=cross_steps,
                        self_steps=self_steps))
    s = source.settings
    check_cost(s["width"], s["height"], s["num_inference_steps"], EDIT_IMAGES, pipe.device, pipe.unet.config,
               pipe.vae_scale_factor)
    attention = s["cache_interval"] <= 1  # DeepCache skips layers at some steps: such an edit has no full maps
    try:
        lora = lora_file(source.lora) if source.lora else None
    except ValueError:  # its fine-tune was cleared since; a public server's sentence names no path
        raise ValueError("the LoRA the source was drawn with cannot be loaded any more (its fine-tune was cleared to "
                         "keep the server's disk within its cap): explain the image again") from None
    with lora_applied(pipe, lora, source.lora_scale, trusted_paths):
        result = pipe.edit(source.edit_from, e["prompt"], reweight=e["reweight"], blend=e["blend"],
                           cross_steps=e["cross_steps"], self_steps=e["self_steps"], attention=attention,
                           callback=_callback(progress, should_stop))
    folder = outputs.new_output_folder()
    path = result.save(folder / "imagecraft-edit.png")[0]
    edited = result.images[0]
    with Image.open(source.image_path) as opened:
        before = np.asarray(opened.convert("RGB"), dtype=np.int16)
    difference = np.abs(np.asarray(edited, dtype=np.int16) - before) * AMPLIFY
    Image.fromarray(np.clip(difference, 0, 255).astype(np.uint8)).save(folder / "difference.png")
    notes, figure = list(result.warnings), None
    if attention:
        maps = result.attention[0]
        words = changed_words(prompt_words(pipe, source.prompt), maps.words(), e["reweight"], e["blend"])
        fig = plots.plot_overlay(edited, maps, in_prompt_order(maps, words), columns=3)
        fig.suptitle("")  # the app names it; over a figure narrower than its box, a title would run under the label
        figure = str(plots.save(_clear_of_bars(fig), folder / "edit-attention.png"))
    else:
        notes.append("the source was made with DeepCache, which skips layers at some steps: its edit has no attention "
                     "maps to show")
    return Edited(str(path), str(folder / "difference.png"), figure, notes)
