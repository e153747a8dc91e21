"""PNG metadata: AUTOMATIC1111's `parameters` text chunk, and our JSON chunk that reproduces the image exactly.

The `parameters` text is what A1111, ComfyUI, Civitai and friends read:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e, Model: name

The `imagecraft` chunk is JSON with every setting, the scheduler config, dtype and library versions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from .schedulers import A1111_NAMES, SCHEDULERS

JSON_KEY = "imagecraft"
# Settings that `ImageCraftPipeline.__call__` takes and a PNG restores.
SETTINGS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "width", "height",
            "scheduler")


def a1111_parameters(settings: dict) -> str:
    """The A1111 `parameters` text for one image's settings (see the module docstring)."""
    lines = [settings["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = [
        ("Steps", settings["num_inference_steps"]),
        ("Sampler", SCHEDULERS[settings["scheduler"]][0]),
        ("CFG scale", f"{settings['guidance_scale']:g}"),
        ("Seed", settings["seed"]),
        ("Size", f"{settings['width']}x{settings['height']}"),
        ("Model hash", settings.get("model_hash")),
        ("Model", settings.get("model")),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v not in (None, "")))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict:
    """Pipeline settings from an A1111 `parameters` text (ours or another tool's)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines and re.match(r"^\s*Steps: ", lines[-1]) else ""
    body = lines[:-1] if last else lines
    negative = [i for i, line in enumerate(body) if line.startswith("Negative prompt:")]
    if negative:
        prompt = "\n".join(body[: negative[0]])
        negative_prompt = "\n".join(body[negative[0]:])[len("Negative prompt:"):].strip()
    else:
        prompt, negative_prompt = "\n".join(body), ""
    fields = dict(m.groups() for m in re.finditer(r"\s*([\w ]+):\s*((?:\"[^\"]*\")|[^,]*)(?:,|$)", last))
    settings = {"prompt": prompt, "negative_prompt": negative_prompt}
    if "Steps" in fields:
        settings["num_inference_steps"] = int(fields["Steps"])
    if "CFG scale" in fields:
        settings["guidance_scale"] = float(fields["CFG scale"])
    if "Seed" in fields:
        settings["seed"] = int(fields["Seed"])
    if "Size" in fields:
        width, height = fields["Size"].lower().split("x")
        settings["width"], settings["height"] = int(width), int(height)
    if fields.get("Sampler") in A1111_NAMES:
        settings["scheduler"] = A1111_NAMES[fields["Sampler"]]
    if "Model" in fields:
        settings["model"] = fields["Model"]
    return settings


def pipeline_settings(record: dict) -> dict:
    """The part of a stored record (or parsed A1111 text) that `ImageCraftPipeline.__call__` takes."""
    return {k: record[k] for k in SETTINGS if k in record}


def png_info(record: dict) -> PngImagePlugin.PngInfo:
    """The two text chunks for one image's full record (settings plus model and environment)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(record))
    info.add_text(JSON_KEY, json.dumps(record, sort_keys=True))
    return info


def save_png(image: Image.Image, path, record: dict) -> Path:
    path = Path(path)
    image.save(path, pnginfo=png_info(record))
    return path


def read_png_settings(source) -> dict:
    """The settings stored in a PNG (a path, file object or PIL image): our JSON chunk if present, else A1111's
    `parameters` text. Raises ValueError when the PNG carries neither."""
    image = source if isinstance(source, Image.Image) else Image.open(source)
    text = getattr(image, "text", None) or image.info
    if JSON_KEY in text:
        record = json.loads(text[JSON_KEY])
        return record
    if "parameters" in text:
        return parse_a1111_parameters(text["parameters"])
    raise ValueError("this PNG carries no generation settings (no 'imagecraft' or 'parameters' text chunk)")
