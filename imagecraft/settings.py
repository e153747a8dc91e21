"""One schema for the generation settings, checked the same way at every entrance: the Python API, the CLI, the
app and restore-from-PNG.

Each field has a type, a range or a set of allowed values, and one sentence for a bad value that names the field,
the value and what is allowed. Written by hand rather than with pydantic: the checks are a dozen lines, and the
errors must read as sentences a user can act on, which pydantic's multi-line reports do not.

Numbers: an integer field takes ints and numpy ints, and a float only when it is whole (25.0 from a slider is 25,
2.5 is refused); True and False are never numbers. A float field takes any finite int or float.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

from .schedulers import check_scheduler_name

MAX_SEED = 2**32 - 1
MAX_PROMPTS = 64  # prompts in one list-of-prompts call
MAX_PROMPT_CHARS = 4000  # CLIP reads 77 tokens (about 300 characters); more is truncated anyway
MAX_IMAGES = 16
# Sampling steps when none are given (pipeline, CLI, app). The fastest setting within 2 points of the best accuracy
# on the built-in model's speed/quality frontier (bench/bench_speed_quality.py, docs/figures.md); also
# AUTOMATIC1111's default.
DEFAULT_STEPS = 20


@dataclass(frozen=True)
class Field:
    name: str  # the pipeline's keyword
    label: str  # how errors name it
    kind: str  # "int", "float", "text" or "scheduler"
    low: float | None = None
    high: float | None = None
    allowed: str = ""  # what is allowed, as the error says it

    def check(self, value):
        """The value, normalised (whole floats to int); ValueError with one sentence otherwise."""
        if self.kind == "int":
            whole = _whole(value)
            ok = whole is not None and self.low <= whole <= self.high
            value = whole if ok else value
        elif self.kind == "float":
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
                and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
            value = float(value) if ok else value
        elif self.kind == "text":
            ok = isinstance(value, str) and len(value) <= self.high
            if ok:
                _check_unicode(self.label, value)
        else:  # scheduler: our short names or A1111's display names
            if not isinstance(value, str):
                ok = False
            else:
                return check_scheduler_name(value)
        if not ok:
            raise ValueError(f"{self.label} must be {self.allowed}, got {shown(value)}")
        return value


FIELDS = {f.name: f for f in (
    Field("negative_prompt", "negative_prompt", "text", high=MAX_PROMPT_CHARS,
          allowed=f"a string of at most {MAX_PROMPT_CHARS} characters"),
    Field("num_inference_steps", "steps", "int", 1, 150, "an integer from 1 to 150"),
    Field("guidance_scale", "guidance scale", "float", 0, 30, "a number from 0 to 30"),
    Field("width", "width", "int", 64, 2048, "a multiple of 8 between 64 and 2048"),
    Field("height", "height", "int", 64, 2048, "a multiple of 8 between 64 and 2048"),
    Field("num_images", "number of images", "int", 1, MAX_IMAGES, f"from 1 to {MAX_IMAGES}"),
    Field("seed", "seed", "int", 0, MAX_SEED, f"an integer from 0 to {MAX_SEED}, or None for a random one"),
    Field("scheduler", "scheduler", "scheduler", allowed="a sampler's name (a string)"),
    Field("cache_interval", "cache_interval", "int", 1, 150,
          "a whole number from 1 (no caching) to 150 (DeepCache: the whole UNet every that many steps)"),
)}


def check_prompt(prompt) -> str | list[str]:
    """A string, or a list of 1 to MAX_PROMPTS strings, each at most MAX_PROMPT_CHARS long."""
    many = isinstance(prompt, (list, tuple))
    prompts = list(prompt) if many else [prompt]
    if not prompts or len(prompts) > MAX_PROMPTS or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings, got {shown(prompt)}")
    long = [len(p) for p in prompts if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise ValueError(f"prompt must be at most {MAX_PROMPT_CHARS} characters (the text encoder reads about 300), "
                         f"got {long[0]}")
    for p in prompts:
        _check_unicode("prompt", p)
    return prompts if many else prompts[0]


def _check_unicode(label: str, text: str) -> None:
    """Text that UTF-8 cannot encode (a lone surrogate) would fail later, writing the PNG; refuse it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{label} must be valid Unicode text; it has an unpaired surrogate at character "
                         f"{e.start}") from None


def check(name: str, value):
    """One setting, normalised; None passes for the optional ones (seed, width, height, scheduler, cache_interval)."""
    if name == "prompt":
        return check_prompt(value)
    if value is None and name in ("seed", "width", "height", "scheduler", "cache_interval"):
        return None
    if name in ("width", "height"):
        clean = FIELDS[name].check(value)
        if clean % 8:
            raise ValueError(f"{name} must be a multiple of 8 between 64 and 2048, got {clean}")
        return clean
    return FIELDS[name].check(value)


def check_settings(settings: dict) -> dict:
    """Every setting of a dict checked and normalised; unknown names are refused by name."""
    unknown = sorted(set(settings) - set(FIELDS) - {"prompt"})
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: prompt, {', '.join(FIELDS)}")
    return {name: check(name, value) for name, value in settings.items()}


def max_cost(device: str) -> int:
    """The largest width x height x steps x images one request may ask for: IMAGECRAFT_MAX_COST, else sized for
    the device (on a CPU, one 512x512 image at 50 steps, a few minutes; 16x that on a GPU)."""
    text = os.environ.get("IMAGECRAFT_MAX_COST")
    if text:
        try:
            return int(float(text))
        except ValueError:
            raise ValueError(f"IMAGECRAFT_MAX_COST must be a number, got {text!r}") from None
    base = 512 * 512 * 50
    return base if device == "cpu" else 16 * base


def check_cost(width: int, height: int, steps: int, images: int, device: str) -> None:
    """Refuses a request whose width x height x steps x images is over `max_cost`, with the limit."""
    cost, limit = width * height * steps * images, max_cost(device)
    if cost > limit:
        raise ValueError(f"this request is too large for this server: {width}x{height} x {steps} steps x {images} "
                         f"image(s) = {cost:,} pixel-steps, over the limit of {limit:,} (IMAGECRAFT_MAX_COST); "
                         f"ask for fewer steps, images or pixels")


def _whole(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def shown(value) -> str:
    """A value as an error quotes it: its repr, cut at 60 characters (a 1 MB prompt is not echoed back)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
