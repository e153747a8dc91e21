"""PNG metadata: AUTOMATIC1111's `parameters` text chunk, and our JSON chunk that reproduces the image exactly.

The `parameters` text is what A1111, ComfyUI, Civitai and friends read:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e, Model: name

The `imagecraft` chunk is JSON with every setting, the scheduler config, dtype and library versions.

A PNG is untrusted input (an upload to the app): its chunks are read with a size limit, each setting it restores is
checked as user input is (`imagecraft.settings.check`), and one that fails is left out with a note saying why.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from pathlib import Path

from PIL import Image, PngImagePlugin

from .files import atomic_write
from .schedulers import SCHEDULERS
from .settings import GENERATION, check, check_edit, shown

JSON_KEY = "imagecraft"
TEXT_KEYS = ("parameters", JSON_KEY)  # the text chunks we read; every other chunk is skipped unread
# The most one text may hold once inflated: our JSON record is at most about 100 KB (two 4,000-character prompts of
# emoji, each escaped as 12 characters); an A1111 text is a few KB
MAX_TEXT = 128 * 1024
MAX_CHUNKS = 100_000  # libpng and PIL write pixels in IDAT chunks of 8 KB or more: this is over 800 MB of them
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# How restore notes name each setting (A1111's words: they are what the PNG's text shows)
LABELS = {"prompt": "prompt", "negative_prompt": "negative prompt", "num_inference_steps": "steps",
          "guidance_scale": "CFG scale", "seed": "seed", "width": "size", "scheduler": "sampler"}
# Settings that `ImageCraftPipeline.__call__` takes and a PNG restores: one image's, so all but the number of images
SETTINGS = ("prompt", *(name for name in GENERATION if name != "num_images"))


def a1111_parameters(settings: dict) -> str:
    """The A1111 `parameters` text for one image's settings (see the module docstring)."""
    lora = settings.get("lora")
    # A1111 writes the LoRA it used into the prompt as <lora:name:scale>, and its hash as "Lora hashes"
    lines = [settings["prompt"] + (f" <lora:{lora['name']}:{lora['scale']:g}>" if lora else "")]
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
        ("Lora hashes", json.dumps(f"{lora['name']}: {lora['hash']}") if lora else None),
        ("Cache interval", settings.get("cache_interval")),  # DeepCache; A1111 has none, absent means none
        ("Edit", json.dumps(edit_summary(settings["edit"])) if settings.get("edit") else None),  # read by people only
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v not in (None, "")))
    return "\n".join(lines)


def edit_summary(edit: dict) -> str:
    """A Prompt-to-Prompt edit in words, for the A1111 text (our JSON chunk holds the edit itself)."""
    parts = [f"from {edit['source_prompt']!r}", f"cross {edit['cross_steps']:g}", f"self {edit['self_steps']:g}"]
    if edit.get("reweight"):
        parts.append("reweight " + " ".join(f"{w}={f:g}" for w, f in edit["reweight"].items()))
    if edit.get("blend"):
        parts.append("blend " + " ".join(edit["blend"]))
    if edit.get("inverted"):
        parts.append("of an inverted picture")
    return "; ".join(parts)


def parse_a1111_parameters(text: str) -> dict:
    """The settings of an A1111 `parameters` text (ours or another tool's) that pass the settings checks; see
    `restore_settings`."""
    return _restore_a1111(text)[0]


def _restore_a1111(text: str) -> tuple[dict, list[str]]:
    """(settings, notes) from an A1111 `parameters` text. Numbers that do not parse stay text, so that the
    settings check names them in its note."""
    if len(text) > MAX_TEXT:
        raise _too_long("the 'parameters' text", "characters")
    lines = text.strip().split("\n")
    last = lines[-1] if lines[-1].lstrip().startswith("Steps: ") else ""
    body = lines[:-1] if last else lines
    negative = [i for i, line in enumerate(body) if line.startswith("Negative prompt:")]
    if negative:
        prompt = "\n".join(body[: negative[0]])
        negative_prompt = "\n".join(body[negative[0]:])[len("Negative prompt:"):].strip()
    else:
        prompt, negative_prompt = "\n".join(body), ""
    fields = _a1111_fields(last)
    sampler, schedule = fields.get("Sampler"), fields.get("Schedule type")
    if sampler is not None and schedule not in (None, "Automatic"):
        sampler = f"{sampler} {schedule}"  # A1111 1.9+ writes "Sampler: DPM++ 2M, Schedule type: Karras"
    prompt, loras = LORA_TAG.sub("", prompt).strip(), LORA_TAG.findall(prompt)
    raw = {"prompt": prompt, "negative_prompt": negative_prompt, "scheduler": sampler, "model": fields.get("Model"),
           "num_inference_steps": _number(fields.get("Steps"), int),
           "guidance_scale": _number(fields.get("CFG scale"), float), "seed": _number(fields.get("Seed"), int),
           "cache_interval": _number(fields.get("Cache interval"), int)}
    if "Size" in fields:
        width, x, height = fields["Size"].lower().partition("x")
        raw["width"], raw["height"] = (_number(width, int), _number(height, int)) if x else (fields["Size"],) * 2
    settings, notes = _checked(raw)
    notes += [_lora_note(name, scale) for name, scale in loras[:8]]
    return settings, notes


def _lora_note(name: str, scale: str) -> str:
    return (f"the image was made with the LoRA {name[:200]!r} at scale {scale[:20]}: load that LoRA (load_lora, "
            f"--lora) to reproduce it")


LORA_TAG = re.compile(r"<lora:([^:<>]{1,200}):([^<>]{1,40})>")


def _a1111_fields(line: str) -> dict[str, str]:
    """The "key: value" pairs of A1111's settings line, split at the commas outside double quotes in one pass. (A
    regex with backtracking took quadratic time here: 60,000 characters held the server for 25 s.)"""
    pieces, start, quoted, escaped = [], 0, False, False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            pieces.append(line[start:i])
            start = i + 1
    pieces.append(line[start:])
    fields = {}
    for piece in pieces:
        key, colon, value = piece.partition(":")
        if colon and key.strip():
            fields[key.strip()] = _unquote(value.strip())
    return fields


def _unquote(value: str) -> str:
    """A1111 writes a value with commas as a JSON string ("Lora hashes: \"a: 1, b: 2\"")."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        text = json.loads(value)
    except ValueError:
        return value[1:-1]
    return text if isinstance(text, str) else value[1:-1]


def _number(text: str | None, kind: type):
    """The text as an int or float; the text itself when it is not one (the settings check then names it)."""
    try:
        return None if text is None else kind(text)
    except ValueError:  # also for ints of over 4,300 digits, which Python refuses to parse
        return text


def _checked(raw: dict) -> tuple[dict, list[str]]:
    """The settings of `raw` that pass `settings.check`, and a note for each one left out (out of range, of the
    wrong type, a sampler ImageCraft lacks, or not given): the caller's own value or the model's default applies
    there. Width and height go together, as A1111's Size does. "model" is kept if it is a name."""
    settings, notes, missing = {}, [], []
    for names in (("prompt",), ("negative_prompt",), ("num_inference_steps",), ("guidance_scale",), ("seed",),
                  ("width", "height"), ("scheduler",)):
        label = LABELS[names[0]]
        if all(raw.get(name) is None for name in names):
            missing.append(label)
            continue
        try:
            settings.update({name: _check_restored(name, raw.get(name)) for name in names})
        except ValueError as e:
            notes.append(f"left out the PNG's {label}: {e}")
    if missing:
        listed = " or ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        notes.append(f"the PNG gives no {listed}; the current or default value is used")
    if raw.get("cache_interval") is not None:  # absent: made without caching (see pipeline_settings)
        try:
            settings["cache_interval"] = _check_restored("cache_interval", raw["cache_interval"])
        except ValueError as e:
            notes.append(f"left out the PNG's cache interval: {e}")
    if isinstance(raw.get("model"), str) and raw["model"].strip():
        settings["model"] = raw["model"]
    return settings, notes


def _check_restored(name: str, value):
    """One setting from a PNG, checked as user input is; a PNG may hold only single values, never a list."""
    label = GENERATION[name].label if name in GENERATION else name
    if value is None:
        raise ValueError(f"{label} is missing")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"{label} must be a single value, got {shown(value)}")
    if name == "scheduler":
        try:
            return check(name, value)
        except ValueError:  # its message lists every name; here the name alone says it
            raise ValueError(f"ImageCraft has no sampler {shown(value)}") from None
    return check(name, value)


def pipeline_settings(record: dict) -> dict:
    """The part of a stored record (or parsed A1111 text) that `ImageCraftPipeline.__call__` takes. A record without
    a cache interval was made without caching (A1111 has none; ours records it only when on), so it gets 1: the
    image is made again as it was, whatever the caller's default."""
    return dict({"cache_interval": 1}, **{k: record[k] for k in SETTINGS if k in record})


def png_info(record: dict) -> PngImagePlugin.PngInfo:
    """The two text chunks for one image's full record (settings plus model and environment)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(record))
    info.add_text(JSON_KEY, json.dumps(record, sort_keys=True))
    return info


def check_png_path(path, label: str = "the output") -> Path:
    """`path` as a Path if it is a .png name. JPEG and WebP would drop the two text chunks, and with them the
    settings that reproduce the image, so they are refused rather than written without them."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{label} must be a .png name (ImageCraft writes PNG, which keeps the settings), "
                         f"got {str(path)!r}")
    return path


def save_png(image: Image.Image, path, record: dict) -> Path:
    """Writes the PNG atomically (`files.atomic_write`): a full disk never leaves a partial file at `path`."""
    path = check_png_path(path)
    with atomic_write(path) as f:
        image.save(f, format="PNG", pnginfo=png_info(record))
    return path


def read_png_settings(source) -> dict:
    """`restore_settings` without its notes, for callers that want only the valid settings."""
    return restore_settings(source)[0]


def restore_settings(source) -> tuple[dict, list[str]]:
    """The settings stored in a PNG (a path, binary file object or PIL image), each checked as user input is, and a
    note for each one left out (out of range, a sampler ImageCraft lacks, not given), where the caller's own value
    or the model's default then applies. Our JSON chunk is read if present, else A1111's `parameters` text.
    "model" is the name the PNG gives its model: to show, never to load unasked (it can be any path or Hub id).

    Raises ValueError (one sentence) for a file that is not a readable PNG or that carries neither chunk.
    """
    texts = _texts(source)
    if JSON_KEY in texts:
        record = _json_record(texts[JSON_KEY])
        settings, notes = _checked(record)
        used = record.get("lora")
        if isinstance(used, dict) and isinstance(used.get("name"), str):
            notes.append(_lora_note(used["name"], str(used.get("scale"))))
        if isinstance(record.get("edit"), dict):
            notes.append("the image is a Prompt-to-Prompt edit: generating from these settings draws the edited prompt "
                         "unedited; reproduce() or `imagecraft edit --from-png` makes the edit again")
        return settings, notes
    if "parameters" in texts:
        return _restore_a1111(texts["parameters"])
    raise ValueError("this PNG carries no generation settings (no 'imagecraft' or 'parameters' text chunk)")


def restore_source(source) -> tuple[dict, list[str]]:
    """The settings that draw the picture an edit of this PNG starts from, and notes as `restore_settings` gives:
    the image's own, or, for a PNG of an edit, its source's (the same settings with the source prompt). ValueError
    for a PNG without ImageCraft's record (its picture cannot be drawn again from settings: invert it) and for an
    edit of an inverted picture (the PNG does not hold that picture)."""
    record = _our_record(source)
    edit = record.get("edit")
    if isinstance(edit, dict):
        if edit.get("inverted"):
            raise ValueError("this PNG is an edit of an inverted picture, which it does not hold: invert that picture "
                             "again (invert) and edit it")
        record = dict(record, prompt=edit.get("source_prompt"))
    settings, notes = _checked(record)
    if isinstance(edit, dict):
        notes.append(f"the PNG is an edit of {shown(edit.get('source_prompt'))}; this edit starts from that")
    # what made it, to say when this pipeline differs (shown, never loaded)
    settings.update({k: record[k] for k in ("model_hash", "dtype") if isinstance(record.get(k), str)})
    if isinstance(record.get("lora"), dict):
        settings["lora"] = record["lora"]
    if "prompt" not in settings or "seed" not in settings:
        raise ValueError(f"the PNG's ImageCraft record lacks a usable prompt or seed to draw its picture again "
                         f"({'; '.join(notes)})")
    return settings, notes


def restore_edit(source) -> dict | None:
    """For a PNG of a Prompt-to-Prompt edit, the edit's keywords (`ImageCraftPipeline.edit`'s but the source:
    prompt, cross_steps, self_steps, reweight, blend), checked as user input is; None for any other PNG."""
    texts = _texts(source)
    record = _json_record(texts[JSON_KEY]) if JSON_KEY in texts else {}
    edit = record.get("edit")
    if edit is None:
        return None
    if not isinstance(edit, dict):
        raise ValueError(f"the PNG's edit record must be a JSON object, got {type(edit).__name__}")
    try:
        return check_edit({"prompt": record.get("prompt"),
                           **{k: edit.get(k) for k in ("cross_steps", "self_steps", "reweight", "blend")}})
    except ValueError as e:
        raise ValueError(f"the PNG's edit record is not valid: {e}") from None


def _our_record(source) -> dict:
    texts = _texts(source)
    if JSON_KEY not in texts:
        raise ValueError("this PNG was not made by ImageCraft (it has no 'imagecraft' record), so its picture cannot "
                         "be drawn again from settings: invert it (invert, or `imagecraft edit --invert`) to edit it")
    return _json_record(texts[JSON_KEY])


def _json_record(text: str) -> dict:
    if len(text) > MAX_TEXT:
        raise _too_long(f"the {JSON_KEY!r} text", "characters")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise ValueError(f"the PNG's {JSON_KEY!r} text is not valid JSON") from None
    if not isinstance(record, dict):
        raise ValueError(f"the PNG's {JSON_KEY!r} text must be a JSON object of settings, "
                         f"got {type(record).__name__}")
    return record


def _texts(source) -> dict[str, str]:
    """Our two texts of a PNG. From a PIL image, those PIL has read (within its own limits); from a file, those
    `read_png_texts` reads."""
    if isinstance(source, Image.Image):
        info = getattr(source, "text", None) or source.info
        return {k: info[k] for k in TEXT_KEYS if isinstance(info.get(k), str)}
    return read_png_texts(source)


def read_png_texts(source) -> dict[str, str]:
    """The 'parameters' and 'imagecraft' texts of a PNG file (a path or binary file object), MAX_TEXT at most each.

    The chunks are read here, not by PIL: `Image.open(...).text` inflates every text chunk of a file, up to 1 MB each
    and 64 MB in all (PngImagePlugin.MAX_TEXT_CHUNK and MAX_TEXT_MEMORY), and lowering those globals would change
    how every other PNG in the process is read. Here other chunks are skipped unread and ours are inflated only up
    to MAX_TEXT, so a small upload (a zTXt bomb) cannot make the server allocate more.
    """
    if isinstance(source, (str, os.PathLike)):
        if os.path.isdir(source):
            raise ValueError(f"{str(source)!r} is a folder, not a PNG file")
        with open(source, "rb") as f:
            return _read_png_texts(f)
    return _read_png_texts(source)


def _read_png_texts(f) -> dict[str, str]:
    if f.read(8) != PNG_SIGNATURE:
        raise ValueError("this file is not a PNG; generation settings are read only from PNG files")
    truncated = ValueError("this PNG is truncated or corrupt: it ends before its IEND chunk")
    texts = {}
    for _ in range(MAX_CHUNKS):
        header = f.read(8)
        if len(header) < 8:
            raise truncated
        length, kind = struct.unpack(">I4s", header)
        if not kind.isalpha() or length >= 2**31:
            raise ValueError(f"this PNG is corrupt: it has a chunk of type {kind!r} and length {length:,}")
        if kind == b"IEND":
            return texts
        start = f.read(min(length, 80)) if kind in (b"tEXt", b"zTXt", b"iTXt") else b""  # keyword: 1-79 bytes, NUL
        key = start.split(b"\0", 1)[0].decode("latin-1")
        if key not in TEXT_KEYS or key in texts:
            f.seek(length - len(start) + 4, os.SEEK_CUR)  # the rest of the chunk and its CRC, unread
            continue
        if length > MAX_TEXT + 1024:  # deflate adds at most 5 bytes per 16 KB; iTXt a language tag
            raise _too_long(f"the PNG's {key!r} text", "bytes")
        data = start + f.read(length - len(start))
        crc = f.read(4)
        if len(data) < length or len(crc) < 4:
            raise truncated
        if zlib.crc32(kind + data) != int.from_bytes(crc, "big"):
            raise ValueError(f"this PNG is corrupt: its {key!r} chunk fails its checksum")
        texts[key] = _chunk_text(kind, key, data)
    raise ValueError(f"this PNG has over {MAX_CHUNKS:,} chunks, more than any image needs")


def _chunk_text(kind: bytes, key: str, data: bytes) -> str:
    """The text of one tEXt, zTXt or iTXt chunk (PNG spec, section 11.3.4)."""
    corrupt = ValueError(f"this PNG is corrupt: its {key!r} {kind.decode()} chunk is malformed")
    body = data[len(key) + 1:]
    if kind == b"tEXt":
        text, encoding = body, "latin-1"
    elif kind == b"zTXt":  # compression method (0, deflate), then the compressed text
        if body[:1] != b"\0":
            raise corrupt
        text, encoding = _inflate(key, body[1:]), "latin-1"
    else:  # iTXt: compressed or not, method, language tag NUL, translated keyword NUL, UTF-8 text
        parts = body[2:].split(b"\0", 2)
        if len(parts) < 3 or body[:1] not in (b"\0", b"\1") or body[1:2] != b"\0":
            raise corrupt
        text, encoding = (_inflate(key, parts[2]) if body[:1] == b"\1" else parts[2]), "utf-8"
    if len(text) > MAX_TEXT:
        raise _too_long(f"the PNG's {key!r} text", "bytes")
    try:
        return text.decode(encoding)
    except UnicodeDecodeError:
        raise ValueError(f"this PNG is corrupt: its {key!r} text is not valid UTF-8") from None


def _inflate(key: str, data: bytes) -> bytes:
    """Inflates at most MAX_TEXT + 1 bytes: a 50 KB zTXt can hold 50 MB, which is refused without being made."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_TEXT + 1)
    except zlib.error:
        raise ValueError(f"this PNG is corrupt: its {key!r} text does not inflate") from None
    if len(text) > MAX_TEXT:
        raise _too_long(f"the PNG's {key!r} text", "bytes")
    if not inflater.eof:
        raise ValueError(f"this PNG is corrupt: its {key!r} text ends early")
    return text


def _too_long(what: str, unit: str) -> ValueError:
    return ValueError(f"{what} is over the limit of {MAX_TEXT:,} {unit}, far more than generation settings need")
