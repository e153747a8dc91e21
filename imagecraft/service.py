"""What the app's buttons do, without Gradio: a shared model cache, generation to PNG files, PNG restore, and
the Attention tab's explain and redraws.

`app.py` holds only the layout and the wiring; every action it exposes is a function here, testable on its own.
State is per call: the only module-level object is the model cache, which holds loaded models, never results.
"""

from __future__ import annotations

import random
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from .attention import DEFAULT_BLOCKS, AttentionMaps
from .metadata import pipeline_settings, read_png_settings
from .pipeline import MAX_SEED, ImageCraftPipeline

BUILTIN = "built-in shapes model"
OUTPUT_ROOT = Path(tempfile.gettempdir()) / "imagecraft-outputs"


class ModelCache:
    """Loaded pipelines, shared by all users and requests, each loaded once (concurrent first requests wait)."""

    def __init__(self, device: str | None = None, dtype=None):
        self.device, self.dtype = device, dtype
        self._pipes: dict[str, ImageCraftPipeline] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @staticmethod
    def key(source: str | None) -> str:
        source = (source or "").strip()
        return "default" if source in ("", "default", BUILTIN) else source

    def get(self, source: str | None) -> ImageCraftPipeline:
        key = self.key(source)
        with self._guard:
            if key in self._pipes:
                return self._pipes[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._pipes:
                self._pipes[key] = ImageCraftPipeline.from_pretrained(key, device=self.device, dtype=self.dtype)
            return self._pipes[key]


def pick_seed(seed) -> int:
    """A seed from the UI: -1 or empty means a fresh random one (AUTOMATIC1111's convention)."""
    if seed is None or seed == "" or int(seed) < 0:
        return random.randint(0, MAX_SEED - 16)
    return int(seed)


def generate(pipe: ImageCraftPipeline, prompt: str, negative_prompt: str = "", steps: int = 25,
             guidance: float = 7.5, seed: int = -1, scheduler: str | None = None, width: int | None = None,
             height: int | None = None, num_images: int = 1, progress: Callable | None = None):
    """Generates and writes each image as a PNG with its metadata to a fresh folder of its own.

    Returns (PNG paths, the first seed, warnings). `progress(step, total)` is called after each sampling step.
    """
    callback = (lambda step, total, latents: progress(step + 1, total)) if progress else None
    result = pipe(prompt or "", negative_prompt=negative_prompt or "", num_inference_steps=int(steps),
                  guidance_scale=float(guidance), seed=pick_seed(seed), scheduler=scheduler or None,
                  width=None if width is None else int(width), height=None if height is None else int(height),
                  num_images=int(num_images), callback=callback)
    folder = OUTPUT_ROOT / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    paths = result.save(folder / "imagecraft-{seed}.png")
    return [str(p) for p in paths], result.seeds[0], result.warnings


def settings_from_png(path) -> dict:
    """The generation settings stored in one of our PNGs (or an AUTOMATIC1111 one), plus its model."""
    stored = read_png_settings(path)
    settings = pipeline_settings(stored)
    if "model" in stored:
        settings["model"] = stored["model"]
    return settings


# --- attention maps ------------------------------------------------------------------------------------------------
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


def explain(pipe: ImageCraftPipeline, prompt: str, negative_prompt: str = "", steps: int = 25, guidance: float = 7.5,
            seed: int = -1, scheduler: str | None = None, width: int | None = None, height: int | None = None,
            progress: Callable | None = None) -> Explained:
    """Generates one image with its cross-attention, as `generate` would draw it (same seed, same pixels), and
    writes the PNG and the maps (`attention.npz`) to a fresh folder."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("type a prompt first: attention maps show where each word of the prompt went")
    callback = (lambda step, total, latents: progress(step + 1, total)) if progress else None
    result = pipe(prompt, negative_prompt=negative_prompt or "", num_inference_steps=int(steps),
                  guidance_scale=float(guidance), seed=pick_seed(seed), scheduler=scheduler or None,
                  width=None if width is None else int(width), height=None if height is None else int(height),
                  callback=callback, attention=True)
    folder = OUTPUT_ROOT / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
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


def draw_attention(explained: Explained, words: list[str], filters: dict, alpha: float = 0.5, cmap: str = "jet",
                   normalize: str = "word", name: str = "attention.png") -> str:
    """The overlay figure of the ticked words, written next to the image; returns its path."""
    from . import plots

    if not words:
        raise ValueError("tick at least one word to show its map")
    fig = plots.plot_overlay(explained.image, explained.maps, words, cmap=cmap, alpha=float(alpha),
                             normalize=normalize, **filters)
    return str(plots.save(fig, explained.folder / name))


def draw_step(explained: Explained, words: list[str], step: int, filters: dict, alpha: float = 0.5,
              cmap: str = "jet", normalize: str = "word") -> str:
    """The overlay at one sampling step (the time scrubber)."""
    filters = {k: v for k, v in filters.items() if k not in ("steps", "heads")}
    filters["steps"] = (int(step), int(step) + 1)
    return draw_attention(explained, words, filters, alpha, cmap, normalize, name=f"step-{int(step)}.png")


def draw_pixel(explained: Explained, x: int, y: int, filters: dict) -> str:
    """The bar chart of how the attention at one pixel splits over the prompt's tokens."""
    from . import plots

    fig = plots.plot_token_distribution(explained.maps, int(x), int(y), **filters)
    return str(plots.save(fig, explained.folder / "pixel.png"))
