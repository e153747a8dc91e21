"""What the app's buttons do, without Gradio: a shared model cache, generation to PNG files, PNG restore.

`app.py` holds only the layout and the wiring; every action it exposes is a function here, testable on its own.
State is per call: the only module-level object is the model cache, which holds loaded models, never results.
"""

from __future__ import annotations

import random
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Callable

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
