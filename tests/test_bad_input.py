"""Bad input at ImageCraft's three entrances, one test per case: the app's API, the CLI and the Python API.

Each case must be refused with a sentence, or must work, or (`refuse=None`) may do either. Refused with a sentence
means: from the app an AppError carrying a message that is not Gradio's generic one (ours, or Gradio's own such as
"Value 200 is greater than maximum value 150."), and the server logs no traceback; from the CLI exit status 2 and
an "error: ..." line; from Python a ValueError (ModelLoadError, PortingError), FileNotFoundError, or Python's
TypeError for a wrong keyword. A sentence must not read wrong (an empty "must be , ", HTML entities sent to an API
client). Among the files the cases name are pickles that would create a marker file if unpickled: it must never
appear.

- app: the app launched in this process (concurrency 2), called through gradio_client; what gradio_client cannot
  send (NaN, infinities, lone surrogates, a FileData naming a path on the server) goes as raw JSON to Gradio's REST
  route /gradio_api/call/<api>.
- cli: `imagecraft.cli.main(argv)` in this process (a process per case would cost seconds each); the one case about
  a command line byte that is not UTF-8 runs `python -m imagecraft` as a process.
- python: ImageCraftPipeline, UNetConfig, AttentionMaps and ModelCache called directly.

What bad input costs a running server (stalls, memory, disk) is measured by bench/server_load.py.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import serve_app
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from imagecraft.cli import main as cli_main
from imagecraft.explain.maps import AttentionMaps
from imagecraft.loading import DEFAULT_MODEL
from imagecraft.pipeline import ImageCraftPipeline
from imagecraft.serve.models import BUILTIN, ModelCache
from imagecraft.testing import hostile_loose, hostile_zips, png_chunk, png_with, tiny_png, zip_of
from imagecraft.unet import UNetConfig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
GENERIC = "upstream Gradio app has raised an exception"
GARBLED = re.compile(r"must be , |&lt;|&gt;|&amp;|&quot;")  # a sentence that reads wrong
TIMEOUT = 120  # seconds an app case may take before it counts as a hang

WORK = "<work>"  # the folder the files below are made in, which exists only once the tests run


def at(name: str) -> str:
    """A file the `files` fixture makes, as the cases name it."""
    return f"{WORK}/{name}"


class Upload(str):
    """A file that gradio_client uploads (its `handle_file`)."""


@dataclass
class Case:
    what: str  # the endpoint and parameter, flag, or function probed
    description: str  # the input in words
    input: object  # app: ("api" | "raw", api_name, kwargs or data); cli: argv; python: (target, args, kwargs)
    refuse: bool | None = True  # True: must be refused; False: must work; None: either is fine
    verify: Callable | None = None  # for a case that works: a problem with its result, or None
    sentence: bool = True  # False: Gradio refuses it before any handler runs, with its generic message or none

    def __str__(self) -> str:
        return f"{self.what}: {self.description}"


def resolve(value, work: Path):
    """`value` with the files' folder filled in, and uploads made ready for gradio_client."""
    if isinstance(value, Upload):
        return handle_file(value.replace(WORK, str(work)))
    if isinstance(value, str):
        return value.replace(WORK, str(work))
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(v, work) for v in value)
    if isinstance(value, dict):
        return {k: resolve(v, work) for k, v in value.items()}
    return value


def short(value, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expect(case: Case, files: Path, refusal: str | None, result=None):
    """The outcome against what the case expects: `refusal` is the sentence, or None when the call worked."""
    assert not (files / "PWNED").exists(), "a pickle was loaded"
    if refusal is None:
        assert case.refuse is not True, f"accepted: {short(result, 200)}"
        problem = case.verify(result) if case.verify else None
        assert problem is None, problem
    else:
        assert case.refuse is not False, f"refused: {refusal}"
        if not case.sentence:
            return
        assert refusal.strip() and GENERIC not in refusal, f"no sentence: {refusal!r}"
        assert not GARBLED.search(refusal), f"the sentence reads wrong: {refusal}"


# --- the files the cases name ----------------------------------------------------------------------------------------
class Evil:
    """Unpickling this runs `touch MARKER`: a pickle model file that must never be loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def text_chunk(key: str, text: str) -> bytes:
    return png_chunk(b"tEXt", key.encode() + b"\0" + text.encode("latin-1"))


EVIL_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".safetensors")


@pytest.fixture(scope="module")
def builtin():
    return ImageCraftPipeline.from_pretrained()


@pytest.fixture(scope="module")
def files(tmp_path_factory, builtin) -> Path:
    """Every file a case names, in one folder: PNGs good and bad, pickles, safetensors, fake model folders, maps."""
    work = tmp_path_factory.mktemp("bad-input")

    def put(name: str, data: bytes):
        (work / name).write_bytes(data)

    def a1111(name: str, text: str):
        put(name, png_with(text_chunk("parameters", text)))

    info = PngImagePlugin.PngInfo()  # parsed in quadratic time by an old regex
    info.add_text("parameters", "x\nSteps: 1, " + "a " * 30000, zip=True)
    Image.new("RGB", (8, 8)).save(work / "quadratic.png", pnginfo=info)
    put("ztxt-bomb.png", png_with(png_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a" * 50_000_000, 9))))
    put("plain.png", png_with())
    Image.new("RGB", (8, 8)).save(work / "photo.jpg")
    put("jpeg-named.png", (work / "photo.jpg").read_bytes())
    put("random.png", random.Random(0).randbytes(10_000))
    put("notes.png", b"just some text, not an image\n")
    assert builtin("a red circle", seed=1, num_inference_steps=1).save(work / "ours.png")[0] == work / "ours.png"
    put("truncated.png", (work / "ours.png").read_bytes()[:(work / "ours.png").stat().st_size // 2])
    a1111("a1111-nosize.png", "a castle\nNegative prompt: fog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3")
    a1111("a1111-sampler.png", "a castle\nSteps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 3, Size: 64x64")
    a1111("a1111-steps.png", "a castle\nSteps: 9999, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64")
    a1111("a1111-cfg.png", "a castle\nSteps: 20, Sampler: Euler a, CFG scale: -3, Seed: 3, Size: 64x64")
    a1111("a1111-model.png", "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64, "
                             "Model: ../../../etc/passwd")
    a1111("a1111-html.png", "<img src=x onerror=alert(1)>\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, "
                            "Size: 64x64, Model: <script>alert(1)</script>")
    a1111("a1111-digits.png", "a castle\nSteps: " + "9" * 5000 + ", Seed: " + "9" * 30 + ", Size: 64x-8")
    put("json-bad.png", png_with(text_chunk("imagecraft", "{nope")))
    put("json-list.png", png_with(text_chunk("imagecraft", "[1, 2]")))
    put("json-deep.png", png_with(text_chunk("imagecraft", "[" * 60_000 + "]" * 60_000)))
    put("json-bigint.png", png_with(text_chunk("imagecraft", '{"seed": ' + "9" * 5000 + "}")))
    put("json-types.png", png_with(text_chunk("imagecraft", json.dumps(
        {"prompt": ["a", "b"], "num_inference_steps": "x", "width": True, "seed": -5, "scheduler": {"a": 1}}))))
    put("json-noprompt.png", png_with(text_chunk("imagecraft", '{"num_inference_steps": 3}')))
    body = b"parameters\0a castle"
    put("bad-crc.png", png_with(png_chunk(b"tEXt", body, crc=zlib.crc32(b"tEXt" + body) ^ 1)))
    put("huge-length.png", png_with()[:-12] + struct.pack(">I", 2**31 - 1) + b"tEXtparameters\0x")
    put("many-chunks.png", png_with(*[png_chunk(b"teSt", b"")] * 100_001))
    put("itxt-utf8.png", png_with(png_chunk(b"iTXt", b"parameters\0\0\0\0\0\xff\xfe not utf-8")))
    put("text-200k.png", png_with(text_chunk("parameters", "a " * 100_000)))
    put("ztxt-method.png", png_with(png_chunk(b"zTXt", b"parameters\0\x05" + zlib.compress(b"x"))))
    put("big.png", png_with(*[png_chunk(b"teSt", bytes(2**20))] * 20))  # 20 MB, no settings

    for suffix in EVIL_SUFFIXES:
        put(f"evil{suffix}", pickle.dumps(Evil(work / "PWNED")))
    put("random.safetensors", random.Random(1).randbytes(4096))
    save_file({"foo": torch.zeros(2)}, work / "unrelated.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)}, work / "ldm-partial.safetensors")
    put("huge-header.safetensors", struct.pack("<Q", 2**40) + b"{}")
    (work / "fake-index").mkdir()
    (work / "fake-index" / "model_index.json").write_text("{}")
    for name in ("fake-badjson", "fake-pickle", "fake-shapes"):
        shutil.copytree(DEFAULT_MODEL, work / name)
    (work / "fake-badjson" / "unet" / "config.json").write_text("{")
    for weights in (work / "fake-pickle" / "unet").glob("*.safetensors"):
        weights.unlink()
    shutil.copy(work / "evil.bin", work / "fake-pickle" / "unet" / "diffusion_pytorch_model.bin")
    config = json.loads((work / "fake-shapes" / "unet" / "config.json").read_text())
    config["block_out_channels"] = [32, 64, 64]
    (work / "fake-shapes" / "unet" / "config.json").write_text(json.dumps(config))
    os.symlink("/etc", work / "link-etc")
    os.symlink(DEFAULT_MODEL, work / "link-builtin")
    os.symlink(work / "loop", work / "loop")
    put("afile", b"a plain file")
    (work / "cli").mkdir()

    maps = builtin("a blue square above a green triangle", seed=7, num_inference_steps=2, guidance_scale=5.0,
                   attention=True).attention[0]
    maps.save(work / "maps.npz")
    put("maps-truncated.npz", (work / "maps.npz").read_bytes()[:2000])
    np.savez(work / "maps-nometa.npz", x=np.zeros(2))
    np.savez(work / "maps-notjson.npz", meta=np.array("{nope"))
    np.savez(work / "maps-list.npz", meta=np.array("[1, 2]"))
    np.savez(work / "maps-layers.npz", meta=np.array(json.dumps(dict(maps.meta(), layers=5))))
    np.savez(work / "maps-object.npz", meta=np.array([{"a": 1}], dtype=object))
    put("maps-empty.npz", b"")
    put("maps-random.npz", random.Random(2).randbytes(4096))
    return work


# --- the app ---------------------------------------------------------------------------------------------------------
def api(name: str, **kwargs):
    return ("api", name, kwargs)


def needs_raw(value) -> bool:
    """NaN, infinities and lone surrogates: JSON that gradio_client will not send."""
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value)


def call(name: str, base: dict, kwargs: dict):
    kwargs = {**base, **kwargs}
    return ("raw" if any(needs_raw(v) for v in kwargs.values()) else "api", name, kwargs)


def rows(name: str, param: str, base: dict, table) -> list[Case]:
    return [Case(f"{name} {param}", desc, call(name, base, {param: value}), refuse) for desc, value, refuse in table]


def file_data(path: str | None, **extra):
    """A raw FileData naming a path on the server (gradio_client would upload a local path instead). Gradio refuses
    it before our handler runs."""
    return ("raw", "/read_png", [{"path": path, "meta": {"_type": "gradio.FileData"}, **extra}])


def kept(*names):
    """The result (/read_png's settings and notes) must leave these fields out."""
    return lambda result: next((f"restored {n}={short(result[0][n], 40)}" for n in names if n in result[0]), None)


GEN = dict(prompt="a red circle", steps=1, seed=1)
FT_TABLE = {"headers": ["image", "caption", "note"], "data": [["a.png", "a red square", ""]]}
ATT = dict(prompt="a red circle", steps=2, seed=1)  # 2: a 1-step explain fails (see the steps rows)
MODELS = [
    ("bool", True, True), ("int", 5, True), ("list", ["/etc"], True), ("dict", {"a": 1}, True),
    ("None (the built-in one)", None, None), ("empty (the built-in one)", "", False),
    ("spelling: 'default'", "default", False), ("spelling: '  default  '", "  default  ", False),
    ("spelling: absolute path", str(DEFAULT_MODEL), False),
    ("spelling: 'assets/shapes-sd/'", "assets/shapes-sd/", False),
    ("spelling: './assets/../assets/shapes-sd'", "./assets/../assets/shapes-sd", False),
    ("spelling: a symlink to it", at("link-builtin"), False),
    ("nonexistent path", "/no/such/model", True), ("/etc", "/etc", True), ("/root", "/root", True),
    ("the repo's .git", str(ROOT / ".git"), True), ("/", "/", True), ("/dev/null", "/dev/null", True),
    ("/etc/passwd", "/etc/passwd", True), ("/proc/self/environ", "/proc/self/environ", True),
    ("../ traversal to /etc", "../../../../../../etc", True), ("~root", "~root", True),
    ("~nosuchuser/x (expanduser fails)", "~nosuchuser/x", True),
    *[(f"pickle file {s}", at(f"evil{s}"), True) for s in EVIL_SUFFIXES],
    ("random .safetensors, no '| CONFIG'", at("random.safetensors"), True),
    ("random .safetensors | default", at("random.safetensors") + " | default", True),
    ("unrelated .safetensors | default", at("unrelated.safetensors") + " | default", True),
    ("partial LDM .safetensors | default", at("ldm-partial.safetensors") + " | default", True),
    ("safetensors with a 1 TB header | default", at("huge-header.safetensors") + " | default", True),
    ("unrelated .safetensors | /etc", at("unrelated.safetensors") + " | /etc", True),
    ("unrelated .safetensors | a pickle", at("unrelated.safetensors") + " | " + at("evil.ckpt"), True),
    ("unrelated .safetensors | Hub id offline", at("unrelated.safetensors") + " | nobody/nothing", True),
    ("' | ' (empty source and config)", " | ", None), ("'|||'", "|||", True),
    ("'default | default' (config on a folder)", "default | default", None),
    ("folder with only model_index.json", at("fake-index"), True),
    ("folder with a broken unet/config.json", at("fake-badjson"), True),
    ("folder whose unet has only a pickle", at("fake-pickle"), True),
    ("folder whose unet config mismatches its weights", at("fake-shapes"), True),
    ("symlink to /etc", at("link-etc"), True), ("symlink loop", at("loop"), True),
    ("Hub id offline 'nobody/nothing'", "nobody/nothing", True),
    ("Hub id offline 'CompVis/stable-diffusion-v1-4'", "CompVis/stable-diffusion-v1-4", True),
    ("'owner/name/extra'", "owner/name/extra", True), ("1,001 characters", "m" * 1001, True),
    ("100,000 characters", "m" * 100_000, True), ("999-character file name", "a" * 999, True),
    ("NUL byte", "assets/shapes-sd\x00/etc", True), ("emoji", "🎨/🎨", True),
    ("HTML", "<img src=x onerror=alert(1)>", True), ("Windows path", "C:\\Windows\\System32", True),
]
APP_CASES = [
    Case("/random_seed", "valid", api("/random_seed"), False),
    Case("/load_model", "valid: the built-in model", api("/load_model", model=BUILTIN), False),
    Case("/read_png", "valid: one of our PNGs", api("/read_png", file=Upload(at("ours.png"))), False),
    Case("/generate", "valid: 1 step, seed 7", api("/generate", prompt="a blue square", steps=1, seed=7), False),
    *rows("/generate", "prompt", GEN, [
        ("bool", True, True), ("int", 12345, True), ("list of 3 strings", ["a red circle"] * 3, True),
        ("list of 20 strings", ["a"] * 20, True), ("dict", {"a": 1}, True),
        ("None (unconditional)", None, None), ("4,001 characters", "a" * 4001, True),
        ("10k characters", "a " * 5000, True), ("100k characters", "a " * 50_000, True),
        ("1M characters", "a " * 500_000, True), ("4,000 emoji (16,000 tokens)", "🎨" * 4000, True),
        ("NUL bytes", "a red\x00 circle\x00", None), ("HTML", "<img src=x onerror=alert(1)>", False),
        ("lone surrogate", "a red \ud800 circle", None),
        ("right-to-left and zero-width", "a \u202e\u200b red", False),
    ]),
    *rows("/generate", "negative_prompt", GEN, [
        ("bool", True, True), ("list", ["blurry"], True), ("None", None, None),
        ("4,001 characters", "a" * 4001, True), ("1M characters", "a " * 500_000, True),
        ("NUL bytes", "blu\x00rry", None), ("HTML", "<img src=x onerror=alert(1)>", False),
        ("lone surrogate", "\udfff", None),
    ]),
    *rows("/generate", "steps", GEN, [
        ("bool True", True, True), ("bool False", False, True), ("string '25'", "25", True),
        ("string 'abc'", "abc", True), ("list", [25], True), ("dict", {"a": 1}, True), ("None", None, True),
        ("2.5", 2.5, True), ("25.0 (whole float)", 25.0, False), ("-1", -1, True), ("0", 0, True),
        ("151", 151, True), ("2**64", 2**64, True), ("1e308", 1e308, True), ("NaN", math.nan, True),
        ("inf", math.inf, True), ("-inf", -math.inf, True),
    ]),
    *rows("/generate", "guidance", GEN, [
        ("bool", True, True), ("string '7'", "7", True), ("list", [7], True), ("None", None, True),
        ("-3", -3, True), ("30.5", 30.5, True), ("1e308", 1e308, True), ("NaN", math.nan, True),
        ("inf", math.inf, True), ("-inf", -math.inf, True), ("7.25", 7.25, False), ("0 (guidance off)", 0, False),
    ]),
    *rows("/generate", "seed", GEN, [
        ("bool", True, True), ("string '42'", "42", True), ("list", [1], True), ("dict", {"a": 1}, True),
        ("None (random)", None, False), ("-1 (random)", -1, False), ("-2", -2, True), ("2**32", 2**32, True),
        ("2**64", 2**64, True), ("2**70", 2**70, True), ("1.5", 1.5, True), ("42.0 (whole float)", 42.0, False),
        ("NaN", math.nan, True), ("inf", math.inf, True),
    ]),
    *rows("/generate", "scheduler", GEN, [
        ("bool", True, True), ("int", 5, True), ("list", ["euler"], True), ("None (the model's)", None, None),
        ("'' (the model's)", "", None), ("unknown 'karras_magic'", "karras_magic", True),
        ("A1111 name 'Euler a'", "Euler a", None), ("A1111 name 'DPM++ 2M Karras'", "DPM++ 2M Karras", None),
        ("'EULER_A'", "EULER_A", True), ("HTML", "<img src=x onerror=alert(1)>", True),
        ("NUL byte", "euler\x00", True),
    ]),
    *rows("/generate", "width", GEN, [
        ("bool", True, True), ("string '64'", "64", True), ("list", [64], True),
        ("None (the model's)", None, None), ("0 (the model's)", 0, None), ("100 (not a multiple of 8)", 100, True),
        ("63", 63, True), ("-64", -64, True), ("4096", 4096, True), ("2**64", 2**64, True),
        ("64.5", 64.5, True), ("NaN", math.nan, True), ("inf", math.inf, True), ("72", 72, False),
        ("64.0 (whole float)", 64.0, False),
    ]),
    *rows("/generate", "height", GEN, [
        ("string 'abc'", "abc", True), ("100", 100, True), ("0 (the model's)", 0, None), ("-8", -8, True),
    ]),
    *rows("/generate", "num_images", GEN, [
        ("bool", True, True), ("string '2'", "2", True), ("list", [2], True), ("None", None, True), ("0", 0, True),
        ("-1", -1, True), ("17", 17, True), ("2.5", 2.5, True), ("10**9", 10**9, True), ("NaN", math.nan, True),
    ]),
    Case("/generate cost", "2048x2048 x 150 steps x 16 images (must be refused at once)",
         api("/generate", prompt="a", width=2048, height=2048, steps=150, num_images=16)),
    Case("/generate cost", "2048x2048 x 4 steps x 1 image",
         api("/generate", prompt="a", width=2048, height=2048, steps=4)),
    *rows("/generate", "model", GEN, [m for m in MODELS if m[0] in (
        "bool", "int", "list", "dict", "None (the built-in one)", "empty (the built-in one)", "/etc",
        "nonexistent path", "pickle file .ckpt", "1,001 characters", "999-character file name", "NUL byte",
        "HTML")]),
    *rows("/load_model", "model", {}, MODELS),
    Case("/attention", "valid: 2 steps", api("/attention", prompt="a blue square", steps=2, seed=3), False),
    *rows("/attention", "prompt", ATT, [
        ("empty", "", True), ("spaces", "   ", True), ("None", None, True), ("bool", True, True),
        ("list", ["a", "b"], True), ("1M characters", "a " * 500_000, True), ("emoji", "🎨 🎨 🎨", False),
        ("NUL bytes", "a red\x00 circle", None), ("HTML", "<img src=x onerror=alert(1)>", False),
    ]),
    *rows("/attention", "steps", ATT, [("string 'abc'", "abc", True), ("0", 0, True), ("151", 151, True),
                                       ("2.5", 2.5, True), ("1 (valid)", 1, False)]),
    *rows("/attention", "guidance", ATT, [("NaN", math.nan, True), ("-3", -3, True)]),
    *rows("/attention", "seed", ATT, [("-2", -2, True), ("1.5", 1.5, True)]),
    *rows("/attention", "scheduler", ATT, [("unknown", "nope", True)]),
    *rows("/attention", "width", ATT, [("100", 100, True), ("-8", -8, True), ("string 'x'", "x", True)]),
    Case("/attention cost", "2048x2048 x 150 steps",
         api("/attention", prompt="a red circle", width=2048, height=2048, steps=150)),
    *rows("/attention", "model", ATT, [("/etc", "/etc", True), ("pickle file", at("evil.ckpt"), True)]),
    *[Case("/read_png file", desc, api("/read_png", file=Upload(at(name))), refuse, verify)
      for desc, name, refuse, verify in [
          ("quadratic-parse A1111 text (60k characters)", "quadratic.png", None, None),
          ("zTXt bomb (50 MB in 50 KB)", "ztxt-bomb.png", True, None),
          ("PNG without metadata", "plain.png", True, None), ("a JPEG (.jpg)", "photo.jpg", True, None),
          ("a JPEG named .png", "jpeg-named.png", True, None), ("random bytes named .png", "random.png", True, None),
          ("a text file named .png", "notes.png", True, None), ("truncated PNG", "truncated.png", True, None),
          ("A1111 with no Size", "a1111-nosize.png", False, kept("width", "height", "num_images", "model")),
          ("A1111 with an unknown sampler", "a1111-sampler.png", False, kept("scheduler")),
          ("A1111 with Steps: 9999", "a1111-steps.png", False, kept("steps")),
          ("A1111 with CFG scale: -3", "a1111-cfg.png", False, kept("guidance")),
          ("A1111 naming a model path", "a1111-model.png", False, kept("model")),
          ("A1111 with HTML prompt and model", "a1111-html.png", False, kept("model")),
          ("A1111 with 5,000-digit steps, 30-digit seed, Size 64x-8", "a1111-digits.png", False,
           kept("steps", "seed", "width", "height")),
          ("'imagecraft' chunk not JSON", "json-bad.png", True, None),
          ("'imagecraft' chunk a JSON list", "json-list.png", True, None),
          ("'imagecraft' chunk nested 60,000 deep", "json-deep.png", True, None),
          ("'imagecraft' chunk with a 5,000-digit int", "json-bigint.png", True, None),
          ("'imagecraft' chunk with wrong types", "json-types.png", False,
           kept("prompt", "steps", "width", "seed", "scheduler")),
          ("chunk with a bad CRC", "bad-crc.png", True, None), ("chunk claiming 2 GB", "huge-length.png", True, None),
          ("100,001 chunks", "many-chunks.png", True, None), ("iTXt not UTF-8", "itxt-utf8.png", True, None),
          ("200 KB tEXt", "text-200k.png", True, None), ("zTXt with an unknown method", "ztxt-method.png", True, None),
          ("20 MB PNG without settings", "big.png", True, None),
      ]],
    Case("/read_png file", "None (nothing uploaded)", api("/read_png", file=None), False),
    Case("/read_png file", "a string, not a file", api("/read_png", file="hello"), sentence=False),
    Case("/read_png file", "FileData naming /etc/passwd", file_data("/etc/passwd"), sentence=False),
    Case("/read_png file", "FileData naming a server-side .png outside the uploads", file_data(at("ours.png")),
         sentence=False),
    Case("/read_png file", "FileData with ../ traversal", file_data("../../../../../etc/hostname.png"),
         sentence=False),
    Case("/read_png file", "FileData with a URL to a closed local port",
         file_data(None, url="http://127.0.0.1:1/x.png"), sentence=False),
    # /finetune takes preprocess=False: each value reaches FINETUNE's schema as sent (none of them gets to train)
    Case("/finetune steps", "'10'", api("/finetune", table=FT_TABLE, steps="10")),
    Case("/finetune steps", "NaN", call("/finetune", dict(table=FT_TABLE), dict(steps=float("nan")))),
    Case("/finetune rank", "None", api("/finetune", table=FT_TABLE, rank=None)),
    Case("/finetune class_prompts", "a list", api("/finetune", table=FT_TABLE, class_prompts=["a", "b"])),
    Case("/finetune table", "5-column rows", api("/finetune", table={"headers": list("abcde"),
                                                                      "data": [["a.png", "c", "", "x", "y"]]})),
    Case("/finetune steps", "20,000: over the training cost cap", api("/finetune", table=FT_TABLE, steps=20_000)),
    Case("/attention width, height", "1024x1024 at 12 steps: within a pixel cap, not within the UNet's work",
         api("/attention", **dict(ATT, width=1024, height=1024, steps=12))),
    Case("/generate width, height", "1024x1024 at 12 steps", api("/generate", **dict(GEN, width=1024, height=1024,
                                                                                   steps=12))),
    Case("raw request", "/generate with one value too few", ("raw", "/generate", "too few"), sentence=False),
    Case("raw request", "/generate with one value too many", ("raw", "/generate", "too many"), None),
    Case("raw request", "/generate with data a string, not a list", ("raw", "/generate", "a"), True),
    Case("raw request", "/random_seed with 3 values", ("raw", "/random_seed", [1, 2, 3]), None),
]


@pytest.fixture(scope="module")
def app_server():
    """(client, url, parameter names and defaults per API) of the app launched in this process."""
    with serve_app(concurrency=2) as url:
        client = Client(url, verbose=False, download_files=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        params = {name: [(p["parameter_name"], p["parameter_default"]) for p in info["parameters"]]
                  for name, info in endpoints.items()}
        yield client, url, params


def raw_data(name: str, data, params: dict):
    """The list of values Gradio's REST route takes: every parameter, from `data` (keyword values) or its default."""
    names = params[name]
    if isinstance(data, dict):
        return [data.get(p, default) for p, default in names]
    if data == "too few":
        return [GEN.get(p, default) for p, default in names][:-1]
    if data == "too many":
        return [GEN.get(p, default) for p, default in names] + ["extra"]
    return data


def raw_call(url: str, name: str, data) -> tuple[str | None, object]:
    """POSTs the data as JSON (NaN and Infinity allowed), then reads the event stream: (refusal or None, result)."""
    route = f"{url}gradio_api/call/{name.lstrip('/')}"
    response = httpx.post(route, content=json.dumps({"data": data}, allow_nan=True),
                          headers={"content-type": "application/json"}, timeout=TIMEOUT)
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text}", None
    event = None
    with httpx.stream("GET", f"{route}/{response.json()['event_id']}", timeout=TIMEOUT) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1])
                if event == "complete":
                    return None, payload
                return (payload.get("error") if isinstance(payload, dict) else payload) or "", None
    return "", None


def frames_of_ours(logged: str) -> list[str]:
    """The traceback lines in the server's log that point into ImageCraft's code: a bug, where a refusal is one log
    line. (Gradio logs a traceback of its own when it refuses a malformed request before any handler runs.)"""
    return [line for line in logged.splitlines() if line.lstrip().startswith('File "')
            and (f"{ROOT}/imagecraft/" in line or f"{ROOT}/app.py" in line)]


@pytest.mark.parametrize("case", APP_CASES, ids=str)
def test_app(case, app_server, files, monkeypatch, capfd, caplog):
    client, url, params = app_server
    monkeypatch.chdir(ROOT)  # the relative spellings of the built-in folder
    caplog.set_level(logging.INFO)
    kind, name, data = resolve(case.input, files)
    refusal, result = None, None
    if kind == "raw":
        refusal, result = raw_call(url, name, raw_data(name, data, params))
    else:
        job = client.submit(api_name=name, **data)
        try:
            result = job.result(timeout=TIMEOUT)
        except AppError as e:
            refusal = str(e)
        except TimeoutError:
            job.cancel()
            pytest.fail(f"no answer in {TIMEOUT} s")
    logged = capfd.readouterr().err + caplog.text
    assert not frames_of_ours(logged), logged[-3000:]
    expect(case, files, refusal, result)


def test_the_app_still_serves_after_the_bad_input(app_server):
    client, _, _ = app_server
    gallery, seed = client.predict(prompt="a blue square", steps=1, seed=7, api_name="/generate")
    assert len(gallery) == 1 and seed == 7


# --- the CLI ---------------------------------------------------------------------------------------------------------
def argv(command: str, base: list[str], given) -> list[str]:
    """`command` with `given` flags, plus the base flags that `given` does not set."""
    flags = {a for a in given if a.startswith("--")}
    kept_flags = [base[i:i + 2] for i in range(0, len(base), 2) if base[i] not in flags]
    return [command, *sum(kept_flags, []), *given]


GEN_FLAGS = ["--prompt", "a red circle", "--steps", "1", "--seed", "1", "--output", at("cli/out.png")]
ATT_FLAGS = ["--prompt", "a blue square above a green triangle", "--steps", "1", "--seed", "1",
             "--output", at("cli/fig.png"), "--image", at("cli/img.png")]


def gen(description, *given, refuse=True):
    return Case("generate " + (given[0] if given else ""), description, argv("generate", GEN_FLAGS, given), refuse)


def from_png(description, path, *more, refuse=True):
    return Case("generate --from-png", description,
                ["generate", "--from-png", path, "--steps", "1", "--output", at("cli/out.png"), *more], refuse)


def att(description, *given, refuse=True):
    return Case("attention " + (given[0] if given else ""), description, argv("attention", ATT_FLAGS, given), refuse)


CLI_CASES = [
    gen("valid: 1 step", refuse=False),
    gen("'abc'", "--steps", "abc"), gen("2.5", "--steps", "2.5"), gen("0", "--steps", "0"),
    gen("151", "--steps", "151"), gen("-1", "--steps", "-1"), gen("'1e3'", "--steps", "1e3"),
    gen("empty", "--steps", ""),
    gen("nan", "--guidance", "nan"), gen("inf", "--guidance", "inf"), gen("-3", "--guidance", "-3"),
    gen("31", "--guidance", "31"), gen("'abc'", "--guidance", "abc"),
    gen("-1", "--seed", "-1"), gen("'abc'", "--seed", "abc"), gen("2**32", "--seed", "4294967296"),
    gen("1.5", "--seed", "1.5"),
    gen("100", "--width", "100"), gen("0", "--width", "0"), gen("4096", "--width", "4096"),
    gen("'abc'", "--width", "abc"), gen("-64", "--width", "-64"), gen("63", "--height", "63"),
    gen("0", "--num-images", "0"), gen("17", "--num-images", "17"), gen("'abc'", "--num-images", "abc"),
    gen("unknown 'karras_magic'", "--scheduler", "karras_magic"),
    gen("A1111 name 'Euler a'", "--scheduler", "Euler a", refuse=None),
    gen("'EULER_A'", "--scheduler", "EULER_A"),
    gen("'fp8'", "--dtype", "fp8"), gen("empty", "--dtype", ""),
    gen("cuda (absent here)", "--device", "cuda", refuse=None if torch.cuda.is_available() else True),
    gen("cuda:7", "--device", "cuda:7"), gen("tpu", "--device", "tpu"),
    gen("empty (detected)", "--device", "", refuse=None), gen("'CPU'", "--device", "CPU"),
    gen("mps (absent here)", "--device", "mps"), gen("'cpu:0'", "--device", "cpu:0"),
    gen("5,000 characters", "--prompt", "a " * 2500), gen("100k characters", "--prompt", "a " * 50_000),
    gen("200 emoji", "--prompt", "🎨" * 200, refuse=False), gen("4,000 emoji", "--prompt", "🎨" * 4000),
    gen("HTML", "--prompt", "<img src=x onerror=alert(1)>", refuse=False),
    gen("empty (unconditional)", "--prompt", "", refuse=False),
    gen("a byte that is not UTF-8 (0xff)", "--prompt", "a red \udcff circle", refuse=None),
    Case("generate --prompt", "missing", ["generate", "--steps", "1", "--output", at("cli/out.png")], True),
    gen("5,000 characters", "--negative-prompt", "a " * 2500),
    gen("nonexistent path", "--model", "/no/such/model"), gen("/etc", "--model", "/etc"),
    gen("pickle .ckpt", "--model", at("evil.ckpt")), gen("random .safetensors", "--model", at("random.safetensors")),
    gen("unrelated .safetensors with --config built-in", "--model", at("unrelated.safetensors"), "--config",
        str(DEFAULT_MODEL)),
    gen("random .safetensors with --config /etc", "--model", at("random.safetensors"), "--config", "/etc"),
    gen("Hub id offline", "--model", "nobody/nothing"), gen("999-character file name", "--model", "a" * 999),
    gen("folder with a broken unet/config.json", "--model", at("fake-badjson")),
    gen("a folder", "--output", WORK), gen("under a file", "--output", at("afile/out.png")),
    gen(".jpg", "--output", at("cli/out.jpg")), gen("/dev/full", "--output", "/dev/full"),
    gen("/proc/probe.png", "--output", "/proc/probe.png"), gen("empty", "--output", ""),
    gen("no suffix", "--output", at("cli/out")),
    gen("'.PNG' (upper case)", "--output", at("cli/upper.PNG"), refuse=False),
    gen("unknown field '{foo}'", "--output", at("cli/out-{foo}.png")),
    gen("positional field '{0}'", "--output", at("cli/out-{0}.png")),
    gen("'{seed:>300}' (file name too long)", "--output", at("cli/out-{seed:>300}.png")),
    from_png("nonexistent file", at("nope.png")), from_png("a folder", WORK),
    from_png("a JPEG", at("photo.jpg")), from_png("random bytes", at("random.png")),
    from_png("truncated PNG", at("truncated.png")), from_png("zTXt bomb", at("ztxt-bomb.png")),
    from_png("PNG without metadata", at("plain.png")), from_png("/dev/zero", "/dev/zero"),
    from_png("A1111 with Steps: 9999 (--steps 1 given)", at("a1111-steps.png"), refuse=False),
    from_png("A1111 naming a model path", at("a1111-model.png"), refuse=False),
    from_png("quadratic-parse A1111 text", at("quadratic.png"), refuse=False),
    att("valid: 1 step, --npz", "--npz", at("cli/maps.npz"), refuse=False),
    att("a word not in the prompt", "--words", "purple"), att("empty word", "--words", ""),
    att("'BLUE' (any case)", "--words", "BLUE", refuse=False),
    att("'abc'", "--timesteps", "abc"), att("5:2 (backwards)", "--timesteps", "5:2"),
    att("0:999", "--timesteps", "0:999"), att("-1:3", "--timesteps", "-1:3"), att("':'", "--timesteps", ":"),
    att("'1:2:3'", "--timesteps", "1:2:3"),
    att("unknown layer", "--layers", "nosuch"), att("99", "--heads", "99"), att("-1", "--heads", "-1"),
    att("'abc'", "--heads", "abc"), att("7", "--resolutions", "7"), att("0", "--resolutions", "0"),
    att("'abc'", "--resolutions", "abc"), att("'side'", "--blocks", "side"),
    att("2", "--alpha", "2"), att("nan", "--alpha", "nan"), att("-1", "--alpha", "-1"),
    att("unknown colormap", "--cmap", "nosuch"), att("unknown plot", "--plot", "nosuch"),
    att("unknown normalize", "--normalize", "nope"),
    att("/dev/full", "--npz", "/dev/full"), att("a folder", "--npz", WORK),
    att(".jpg", "--image", at("cli/img.jpg")), att(".jpg", "--output", at("cli/f.jpg")),
    att("empty", "--prompt", ""), att("spaces", "--prompt", "   "),
    att("with guidance off (no negative maps)", "--negative", "--guidance", "1"),
    att("a word not in the (empty) negative prompt", "--negative", "--words", "nope"),
    att("0", "--steps", "0"),
]


def run_cli(args: list[str], work: Path, capsys) -> tuple[int, str]:
    """(exit status, stderr) of the CLI."""
    if any(0xDC80 <= ord(c) <= 0xDCFF for a in args for c in a):  # bytes that are not UTF-8, as Python decodes them
        done = subprocess.run([sys.executable, "-m", "imagecraft", *[os.fsencode(a) for a in args]], cwd=work,
                              capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=TIMEOUT)
        return done.returncode, done.stderr.decode("utf-8", "replace")
    try:
        status = cli_main(args)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case", CLI_CASES, ids=str)
def test_cli(case, files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    status, err = run_cli(resolve(case.input, files), files, capsys)
    assert "Traceback" not in err, err[-3000:]
    assert status in (0, 2), f"exit status {status}: {err[-1000:]}"
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 0 or errors, f"exit status 2 without an 'error:' line: {err[-1000:]}"
    expect(case, files, errors[-1] if status == 2 else None)


# --- the Python API --------------------------------------------------------------------------------------------------
def py(target: str, *args, **kwargs):
    return (target, args, kwargs)


def pipe_call(description, refuse=True, **kwargs):
    return Case("pipe(" + ", ".join(kwargs) + ")", description, py("call", **kwargs), refuse)


def config(description, refuse=True, **kwargs):
    return Case("UNetConfig(" + ", ".join(kwargs) + ")", description, py("config", **kwargs), refuse)


def maps(method, description, *args, refuse=True, **kwargs):
    return Case(f"maps.{method}", description, py(method, *args, **kwargs), refuse)


def load(description, path, refuse=True):
    return Case("AttentionMaps.load", description, py("load", path), refuse)


def pretrained(description, *args, refuse=True, **kwargs):
    return Case("from_pretrained", description, py("from_pretrained", *args, **kwargs), refuse)


def cache(description, name, refuse=True):
    return Case("ModelCache(allowed=['default']).get", description, py("cache", name), refuse)


def reproduce(description, path, refuse=True):
    return Case("pipe.reproduce", description, py("reproduce", path), refuse)


PYTHON_CASES = [
    pipe_call("valid: 1 step", refuse=False),
    pipe_call("None", prompt=None), pipe_call("int", prompt=5), pipe_call("empty list", prompt=[]),
    pipe_call("[5]", prompt=[5]), pipe_call("lone surrogate", prompt="a red \ud800 circle", refuse=None),
    pipe_call("lone surrogate", negative_prompt="\udfff", refuse=None),
    pipe_call("65 prompts (over 64)", prompt=["a"] * 65), pipe_call("4,001 characters", prompt="a" * 4001),
    pipe_call("a tuple of 2 prompts", prompt=("a", "b"), refuse=False), pipe_call("dict", prompt={"a": 1}),
    pipe_call("int", negative_prompt=5), pipe_call("list", negative_prompt=["a"]),
    pipe_call("4,001 characters", negative_prompt="a" * 4001),
    pipe_call("None", negative_prompt=None, refuse=False),
    pipe_call("bool", num_inference_steps=True), pipe_call("string '25'", num_inference_steps="25"),
    pipe_call("2.5", num_inference_steps=2.5), pipe_call("0", num_inference_steps=0),
    pipe_call("151", num_inference_steps=151),
    pipe_call("np.int64(1)", num_inference_steps=np.int64(1), refuse=False),
    pipe_call("np.float64(1.0)", num_inference_steps=np.float64(1.0), refuse=False),
    pipe_call("np.float32(2.5)", num_inference_steps=np.float32(2.5)),
    pipe_call("torch.tensor(1)", num_inference_steps=torch.tensor(1), refuse=None),
    pipe_call("10**30", num_inference_steps=10**30), pipe_call("NaN", num_inference_steps=float("nan")),
    pipe_call("NaN", guidance_scale=float("nan")), pipe_call("inf", guidance_scale=float("inf")),
    pipe_call("-1", guidance_scale=-1), pipe_call("31", guidance_scale=31),
    pipe_call("string '7'", guidance_scale="7"), pipe_call("None", guidance_scale=None),
    pipe_call("bool", guidance_scale=True), pipe_call("Decimal('7')", guidance_scale=Decimal("7"), refuse=None),
    pipe_call("np.float32(5.0)", guidance_scale=np.float32(5.0), refuse=False),
    pipe_call("Fraction(15, 2)", guidance_scale=Fraction(15, 2), refuse=False),
    pipe_call("-1", seed=-1), pipe_call("2**32", seed=2**32), pipe_call("1.5", seed=1.5),
    pipe_call("bool", seed=True), pipe_call("string '1'", seed="1"),
    pipe_call("np.uint64(2**63)", seed=np.uint64(2**63)),
    pipe_call("None (random)", seed=None, refuse=False), pipe_call("np.int64(5)", seed=np.int64(5), refuse=False),
    pipe_call("100", width=100), pipe_call("63", width=63), pipe_call("2049", width=2049), pipe_call("0", width=0),
    pipe_call("-64", width=-64), pipe_call("None (the model's)", width=None, refuse=False),
    pipe_call("72", width=72, refuse=False), pipe_call("string '64'", width="64"),
    pipe_call("np.int32(64)", width=np.int32(64), refuse=False),
    pipe_call("0", num_images=0), pipe_call("17", num_images=17), pipe_call("bool", num_images=True),
    pipe_call("2.5", num_images=2.5), pipe_call("string '2'", num_images="2"),
    pipe_call("np.int64(2)", num_images=np.int64(2), refuse=False),
    pipe_call("unknown 'karras_magic'", scheduler="karras_magic"), pipe_call("int", scheduler=5),
    pipe_call("list", scheduler=["euler"]), pipe_call("A1111 'Euler a'", scheduler="Euler a", refuse=False),
    pipe_call("A1111 'DPM++ 2M Karras'", scheduler="DPM++ 2M Karras", refuse=False),
    pipe_call("'' (the model's)", scheduler="", refuse=False),
    pipe_call("an int, not callable", callback=5), pipe_call("a function of no arguments", callback=lambda: None),
    pipe_call("string 'yes'", attention="yes"), pipe_call("1", attention=1),
    pipe_call("np.True_", attention=np.True_, refuse=None),
    pipe_call("with an empty prompt", attention=True, prompt=""),
    pipe_call("unknown keyword 'foo'", foo=1),
    pipe_call("2 prompts with num_images=3 (ignored, documented)", prompt=["a", "b"], num_images=3, refuse=False),
    Case("UNetConfig.sd15()", "valid", py("config_sd15"), False),
    config("0", in_channels=0), config("-1", in_channels=-1), config("bool", in_channels=True),
    config("4.0", in_channels=4.0), config("string '4'", in_channels="4"), config("None", in_channels=None),
    config("np.int64(4)", in_channels=np.int64(4), refuse=False),
    config("0", model_channels=0), config("33 (not divisible by 32 groups)", model_channels=33),
    config("()", channel_mult=()), config("string '124'", channel_mult="124"),
    config("(1, 2.5)", channel_mult=(1, 2.5)), config("(1, 0)", channel_mult=(1, 0)),
    config("int 5", channel_mult=5), config("list [1, 2, 4, 4]", channel_mult=[1, 2, 4, 4], refuse=False),
    config("(True,) for 4 levels", attention_levels=(True,)), config("ints", attention_levels=(1, 0, 1, 0)),
    config("string 'TTTF'", attention_levels="TTTF"),
    config("neither set", num_heads=None, head_dim=None), config("both set", num_heads=8, head_dim=64),
    config("(8, 8) for 4 levels", num_heads=(8, 8)), config("0", num_heads=0),
    config("7 (not a divisor of 320)", num_heads=7), config("3 (not a divisor)", num_heads=None, head_dim=3),
    config("0", transformer_depth=0), config("-1", transformer_depth=-1),
    config("(1, 1)", transformer_depth=(1, 1)),
    config("0", context_dim=0), config("768.5", context_dim=768.5), config("0", norm_groups=0),
    config("7", norm_groups=7), config("1.0", dropout=1.0), config("-0.1", dropout=-0.1),
    config("NaN", dropout=float("nan")), config("bool", dropout=True), config("string '0'", dropout="0"),
    config("string 'yes'", use_linear_projection="yes"), config("1", use_linear_projection=1),
    config("None", upcast_attention=None), config("unknown field 'foo'", foo=1),
    maps("word", "valid: 'green'", "green", refuse=False),
    maps("word", "not in the prompt", "purple"), maps("word", "empty", ""), maps("word", "None", None),
    maps("word", "int", 5), maps("word", "list", ["blue"]), maps("word", "'<start>'", "<start>", refuse=False),
    maps("word", "'BLUE'", "BLUE", refuse=False), maps("word", "'  blue  '", "  blue  ", refuse=False),
    maps("word", "phrase 'blue square'", "blue square", refuse=False),
    maps("word", "phrase not in order 'square blue'", "square blue"),
    maps("word", "blocks=['side']", "blue", blocks=["side"]), maps("word", "blocks=''", "blue", blocks=""),
    maps("word", "blocks=[]", "blue", blocks=[]), maps("word", "blocks='mid'", "blue", blocks="mid", refuse=False),
    maps("word", "resolutions=[7]", "blue", resolutions=[7]),
    maps("word", "resolutions='8'", "blue", resolutions="8"),
    maps("word", "resolutions=[]", "blue", resolutions=[]),
    maps("word", "resolutions=[8.5]", "blue", resolutions=[8.5]),
    maps("word", "layers=['nosuch']", "blue", layers=["nosuch"]), maps("word", "layers=[]", "blue", layers=[]),
    maps("word", "layers=5", "blue", layers=5),
    maps("word", "heads=99", "blue", heads=99), maps("word", "heads=-1", "blue", heads=-1),
    maps("word", "heads=True", "blue", heads=True), maps("word", "heads=1.5", "blue", heads=1.5),
    maps("word", "heads='0'", "blue", heads="0"), maps("word", "heads=[]", "blue", heads=[]),
    maps("word", "heads=0", "blue", heads=0, refuse=False),
    maps("word", "steps=(5, 2)", "blue", steps=(5, 2)), maps("word", "steps=(0, 999)", "blue", steps=(0, 999)),
    maps("word", "steps='ab'", "blue", steps="ab"), maps("word", "steps=(0,)", "blue", steps=(0,)),
    maps("word", "steps=-1", "blue", steps=-1), maps("word", "steps=True", "blue", steps=True),
    maps("word", "steps=(0, 1)", "blue", steps=(0, 1), refuse=False),
    maps("word", "heads=0 with steps=(0, 1)", "blue", heads=0, steps=(0, 1)),
    maps("word_unguided", "negative=True, guidance off", "blue", negative=True),
    maps("token", "999", 999), maps("token", "-1", -1), maps("token", "1.5", 1.5), maps("token", "True", True),
    maps("token", "string '1'", "1"), maps("token", "np.int64(1)", np.int64(1), refuse=False),
    maps("at", "(-1, 0)", -1, 0), maps("at", "(1000, 0)", 1000, 0), maps("at", "(1.5, 2)", 1.5, 2),
    maps("at", "('1', 2)", "1", 2), maps("at", "(True, 0)", True, 0),
    maps("segment", "[]", []), maps("segment", "['nope']", ["nope"]),
    maps("segment", "threshold=2", ["blue"], threshold=2),
    maps("segment", "threshold=NaN", ["blue"], threshold=float("nan")),
    maps("segment", "threshold='0.4'", ["blue"], threshold="0.4"),
    maps("segment", "a string, not a list", "blue"),
    load("valid", at("maps.npz"), refuse=False), load("nonexistent", at("nope.npz")), load("a folder", WORK),
    load("a PNG", at("plain.png")), load("random bytes", at("maps-random.npz")),
    load("empty file", at("maps-empty.npz")),
    load("truncated .npz", at("maps-truncated.npz")), load("no meta", at("maps-nometa.npz")),
    load("meta not JSON", at("maps-notjson.npz")), load("meta a JSON list", at("maps-list.npz")),
    load("meta with layers=5", at("maps-layers.npz")), load("an object (pickle) array", at("maps-object.npz")),
    pretrained("valid: the built-in model", refuse=False),
    pretrained("nonexistent path", "/no/such/model"), pretrained("/etc", "/etc"),
    pretrained("pickle .ckpt", at("evil.ckpt")),
    pretrained("pickle named .safetensors", at("evil.safetensors"), config="default"),
    pretrained("random .safetensors, no config", at("random.safetensors")),
    pretrained("random .safetensors, config built-in", at("random.safetensors"), config="default"),
    pretrained("unrelated .safetensors, config built-in", at("unrelated.safetensors"), config="default"),
    pretrained("partial LDM .safetensors, config built-in", at("ldm-partial.safetensors"), config="default"),
    pretrained("1 TB header, config built-in", at("huge-header.safetensors"), config="default"),
    pretrained("unrelated .safetensors, config /etc", at("unrelated.safetensors"), config="/etc"),
    pretrained("unrelated .safetensors, config a Hub id offline", at("unrelated.safetensors"),
               config="nobody/nothing"),
    pretrained("Hub id offline", "nobody/nothing"), pretrained("int 5", 5), pretrained("list", ["a"]),
    pretrained("empty string (the current folder)", ""),
    pretrained("999-character file name", "a" * 999), pretrained("NUL byte", "a\x00b"),
    pretrained("folder with only model_index.json", at("fake-index")),
    pretrained("folder with a broken unet/config.json", at("fake-badjson")),
    pretrained("folder whose unet has only a pickle", at("fake-pickle")),
    pretrained("folder whose unet config mismatches its weights", at("fake-shapes")),
    pretrained("device 'tpu'", device="tpu"),
    pretrained("device 'cuda' (absent here)", device="cuda", refuse=None if torch.cuda.is_available() else True),
    pretrained("device 'cuda:7'", device="cuda:7"), pretrained("device 'CPU'", device="CPU"),
    pretrained("device 5", device=5), pretrained("dtype 'fp8'", dtype="fp8"), pretrained("dtype 5", dtype=5),
    pretrained("dtype [1]", dtype=[1]), pretrained("dtype torch.int8", dtype=torch.int8),
    cache("valid: 'default'", "default", refuse=False), cache("/etc", "/etc"),
    cache("nonexistent path", "/no/such/model"), cache("pickle", at("evil.ckpt")), cache("Hub id", "nobody/nothing"),
    reproduce("PNG without metadata", at("plain.png")), reproduce("zTXt bomb", at("ztxt-bomb.png")),
    reproduce("JSON without a prompt", at("json-noprompt.png")), reproduce("a JPEG", at("photo.jpg")),
    reproduce("nonexistent file", at("nope.png")),
    reproduce("quadratic-parse A1111 text (1 step)", at("quadratic.png"), refuse=False),
]


@pytest.fixture(scope="module")
def targets(files, builtin) -> dict[str, Callable]:
    explained = AttentionMaps.load(files / "maps.npz")
    unguided = builtin("a blue square above a green triangle", seed=7, num_inference_steps=2, guidance_scale=1.0,
                       attention=True).attention[0]
    models = ModelCache(allowed=["default"])
    return {
        "call": lambda **kw: builtin(**{"prompt": "a red circle", "num_inference_steps": 1, "seed": 1, **kw}),
        "config": lambda **kw: UNetConfig(**kw), "config_sd15": UNetConfig.sd15,
        "word": explained.word, "token": explained.token, "at": explained.at, "segment": explained.segment,
        "word_unguided": unguided.word, "load": AttentionMaps.load,
        "from_pretrained": ImageCraftPipeline.from_pretrained, "cache": models.get, "reproduce": builtin.reproduce,
    }


@pytest.mark.parametrize("case", PYTHON_CASES, ids=str)
def test_python(case, files, targets, monkeypatch):
    monkeypatch.chdir(ROOT)
    target, args, kwargs = resolve(case.input, files)
    try:
        result = targets[target](*args, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        expect(case, files, f"{type(e).__name__}: {e}")
    except TypeError as e:  # Python's own, for a call that does not fit the signature
        assert re.search(r"unexpected keyword argument|required positional", str(e)), f"TypeError: {e}"
        expect(case, files, f"TypeError: {e}")
    else:
        expect(case, files, None, result)


# --- training uploads: the app's Fine-tune upload, the CLI's --data zip, take_upload --------------------------------
# Hostile zips from imagecraft.testing. Every refusal must be a sentence that names the entry (where there is one),
# quotes no server path, and leaves nothing on disk.
ZIPS = hostile_zips()  # name: (bytes, the entry the sentence must name, or None); all to be refused
LOOSE = hostile_loose()  # loose files (not zipped) to be refused
UPLOAD_CASES = [(entrance, kind) for kind in ZIPS for entrance in ("app", "cli")] + \
    [("app", "loose: " + kind) for kind in LOOSE]


@pytest.fixture
def upload_root(tmp_path, monkeypatch):
    from imagecraft.serve import outputs

    monkeypatch.setattr(outputs, "FINETUNE_ROOT", tmp_path / "finetune")
    return tmp_path / "finetune"


def upload(entrance: str, kind: str, tmp_path: Path, capsys) -> tuple[str | None, object]:
    """(the refusal's sentence or None, the result) of sending the hostile `kind` through `entrance`."""
    from imagecraft.serve import jobs

    if kind.startswith("loose: "):
        paths = []
        for name, data in LOOSE[kind.removeprefix("loose: ")].items():
            (tmp_path / name).write_bytes(data)
            paths.append(str(tmp_path / name))
    else:
        (tmp_path / "up.zip").write_bytes(ZIPS[kind][0])
        paths = [str(tmp_path / "up.zip")]
    if entrance == "app":
        try:
            return None, jobs.read_upload(paths)
        except ValueError as e:
            return str(e), None
    status, err = run_cli(["finetune", "--data", paths[0], "--output", str(tmp_path / "out")], tmp_path, capsys)
    assert "Traceback" not in err, err[-3000:]
    return ([line for line in err.splitlines() if "error:" in line] or [err])[-1] if status else None, status


@pytest.mark.parametrize("entrance,kind", UPLOAD_CASES, ids=lambda v: v)
def test_hostile_upload_is_refused_whole(entrance, kind, tmp_path, upload_root, capsys):
    refusal, result = upload(entrance, kind, tmp_path, capsys)
    assert refusal, f"accepted: {short(result, 200)}"
    assert GENERIC not in refusal and not GARBLED.search(refusal), refusal
    assert str(tmp_path) not in refusal and "/tmp" not in refusal, f"a server path in: {refusal}"
    entry = None if kind.startswith("loose: ") else ZIPS[kind][1]
    assert entry is None or entry in refusal, f"the entry {entry!r} is not named: {refusal}"
    left = [p for p in [*upload_root.rglob("*"), *(tmp_path / "out").rglob("*")] if p.is_file()]
    assert not left, f"left on disk: {left[:3]}"


@pytest.mark.parametrize("layout", ["txt", "metadata.jsonl", "metadata.csv", "two zips and a loose image"])
def test_upload_captions_come_from_every_source_the_cli_reads(layout, tmp_path, upload_root):
    from imagecraft.serve import jobs
    from imagecraft.train.data import find_examples, take_upload

    members = {"a.png": tiny_png(), "b.png": tiny_png()}
    if layout == "txt":
        members |= {"a.txt": "cap a", "b.txt": "cap b"}
    elif layout == "metadata.jsonl":
        members["metadata.jsonl"] = '{"file_name": "a.png", "text": "cap a"}\n{"file_name": "b.png", "text": "cap b"}'
    elif layout == "metadata.csv":
        members["metadata.csv"] = "file_name,text\na.png,cap a\nb.png,cap b\n"
    paths = [tmp_path / "up.zip"]
    if layout.startswith("two zips"):
        paths = [tmp_path / "1.zip", tmp_path / "2.zip", tmp_path / "c.png", tmp_path / "c.txt"]
        paths[0].write_bytes(zip_of({"a.png": tiny_png(), "a.txt": "cap a"}))
        paths[1].write_bytes(zip_of({"b.png": tiny_png(), "metadata.jsonl": '{"file_name": "b.png", "text": "cap b"}'}))
        paths[2].write_bytes(tiny_png())
        paths[3].write_text("cap c")
    else:
        paths[0].write_bytes(zip_of(members))
    rows, files = jobs.read_upload([str(p) for p in paths])
    expected = {"a.png": "cap a", "b.png": "cap b"} | ({"c.png": "cap c"} if len(paths) > 1 else {})
    assert {r[0]: r[1] for r in rows} == expected and all(Path(f).is_file() for f in files)
    if len(paths) == 1:  # the CLI reads the same zip the same way
        cli = {ex.path.name: ex.caption for ex in find_examples(take_upload(paths, tmp_path / "cli") and
                                                                tmp_path / "cli")}
        assert cli == expected


def test_upload_caps_on_bytes_and_entries(tmp_path):
    from imagecraft.train.data import take_upload

    (tmp_path / "up.zip").write_bytes(zip_of({f"{i}.png": tiny_png((64, 64)) for i in range(4)}))
    with pytest.raises(ValueError, match="unpacks to .* MiB; at most"):
        take_upload([tmp_path / "up.zip"], tmp_path / "a", max_bytes=500)
    with pytest.raises(ValueError, match="holds 4 entries; at most 3"):
        take_upload([tmp_path / "up.zip"], tmp_path / "b", max_members=3)
    assert not [p for p in tmp_path.iterdir() if p.name != "up.zip"]


def test_uploads_and_jobs_stay_within_one_disk_cap(tmp_path, upload_root, monkeypatch):
    """Many uploads of ~0.3 MB under a 2 MB cap: the oldest go whatever their age; a queued job's folder stays."""
    from imagecraft.serve import jobs

    monkeypatch.setenv("IMAGECRAFT_UPLOAD_MB", "2")
    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "n.png")
    (tmp_path / "n.txt").write_text("noise")
    active = upload_root / "jobs" / "queued-job"
    active.mkdir(parents=True)
    (active / "data.bin").write_bytes(b"\0" * 600_000)
    monkeypatch.setattr(jobs.TRAINING, "active_folders", lambda: [active])
    for _ in range(30):
        jobs.read_upload([str(tmp_path / "n.png"), str(tmp_path / "n.txt")])
        used = sum(f.stat().st_size for f in upload_root.rglob("*") if f.is_file())
        assert used <= 2 * 2**20
    assert (active / "data.bin").is_file()
    monkeypatch.setenv("IMAGECRAFT_UPLOAD_MB", "0.5")  # the queued job alone is over it: refused, nothing dropped
    with pytest.raises(ValueError, match="taken by the jobs training now"):
        jobs.read_upload([str(tmp_path / "n.png"), str(tmp_path / "n.txt")])
    assert (active / "data.bin").is_file()


def test_an_upload_gets_the_room_it_says_it_needs_and_no_more(tmp_path, upload_root, monkeypatch):
    """Under a 1 MB cap: a zip that unpacks to more than the room is refused before anything is dropped; one that
    fits has the oldest uploads dropped for it; the demo set is held to the cap as well."""
    from imagecraft.serve import jobs

    monkeypatch.setenv("IMAGECRAFT_UPLOAD_MB", "1")
    rng = np.random.default_rng(0)

    def noise_zip(name: str, images: int) -> str:  # ~120 KB a PNG
        members = {}
        for i in range(images):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buffer, "PNG")
            members |= {f"{i}.png": buffer.getvalue(), f"{i}.txt": "noise"}
        (tmp_path / name).write_bytes(zip_of(members))
        return str(tmp_path / name)

    def used() -> int:
        return sum(f.stat().st_size for f in upload_root.rglob("*") if f.is_file())

    small, big = noise_zip("small.zip", 3), noise_zip("big.zip", 10)
    _, first = jobs.read_upload([small])
    with pytest.raises(ValueError, match=r"the upload unpacks to 1\.\d MB; the server has room for 1\.0 MB of "
                                         r"uploads now \(IMAGECRAFT_UPLOAD_MB\)"):
        jobs.read_upload([big])
    assert all(Path(f).is_file() for f in first)  # nothing was dropped for the refused upload
    for _ in range(3):
        jobs.read_upload([small])
        assert used() <= 2**20
    assert not any(Path(f).is_file() for f in first)  # the oldest made room
    for _ in range(60):  # ~5.5 KB each, on top of ~1 MB of uploads
        jobs.demo_data()
        assert used() <= 2**20



@pytest.mark.parametrize("kind", ["accepted", "refused"])
def test_an_upload_leaves_no_copy_in_gradios_cache(tmp_path, upload_root, monkeypatch, kind):
    """Gradio copies every upload into its cache before the handler runs; the handler deletes those copies once the
    upload is taken into its own capped folder, or refused, so hostile uploads cannot fill the disk between Gradio's
    hourly sweeps."""
    import gradio as gr

    from imagecraft.serve import handlers

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    cached = tmp_path / "gradio" / "0123abcd"  # Gradio's layout: a folder per file, named by its hash
    cached.mkdir(parents=True)
    if kind == "accepted":
        Image.new("RGB", (32, 32), "red").save(cached / "a.png")
        (cached / "a.txt").write_text("a red square")
    else:
        (cached / "a.png").write_text("not a picture")
    files = [str(p) for p in sorted(cached.iterdir())]
    if kind == "accepted":
        assert handlers.on_upload(files)["note"] == "1 images, all captioned"
        assert any(upload_root.rglob("a.png"))  # the server's own copy stays
    else:
        with pytest.raises(gr.Error):
            handlers.on_upload(files)
    assert not cached.exists()


# --- LoRA files: validated on load, whatever the entrance ------------------------------------------------------------
KOHYA = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"  # a 128 x 128 Linear of the built-in
PEFT = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


def kohya(rank=4, a=None, b=None, alpha=None, dim=128, module=KOHYA) -> dict:
    a = torch.randn(rank, dim) * 0.01 if a is None else a
    b = torch.randn(dim, rank) * 0.01 if b is None else b
    return {f"{module}.lora_down.weight": a, f"{module}.lora_up.weight": b,
            f"{module}.alpha": torch.tensor(float(rank)) if alpha is None else alpha}


NAN = torch.full((4, 128), float("nan"))
LORAS = {  # name: (tensors, metadata, what the sentence must say); all refused
    "NaN weights": (kohya(a=NAN), None, "NaN or infinite"),
    "inf weights": (kohya(b=torch.full((128, 4), float("inf"))), None, "NaN or infinite"),
    "NaN alpha": (kohya(alpha=torch.tensor(float("nan"))), None, "alpha is nan"),
    "1e30 alpha": (kohya(alpha=torch.tensor(1e30)), None, "alpha is 1e+30"),
    "negative alpha": (kohya(alpha=torch.tensor(-4.0)), None, "alpha is -4"),
    "3-element alpha": (kohya(alpha=torch.tensor([4.0, 4.0, 4.0])), None, "alpha must be one number"),
    "0-d tensors": (kohya(a=torch.tensor(1.0), b=torch.tensor(1.0)), None, "shapes () and ()"),
    "rank 20000": (kohya(rank=20000), None, "rank 20000; at most 1024"),
    "integer weights": (kohya(a=torch.ones(4, 128, dtype=torch.int32)), None, "not floating point"),
    "shapes that do not fit": (kohya(dim=64), None, "does not fit this model"),
    "keys of another model": ({k.replace("down_blocks_1", "down_blocks_9"): v for k, v in kohya().items()}, None,
                              "not in the model"),
    "PEFT NaN alpha in metadata": ({f"{PEFT}.lora_A.weight": torch.randn(4, 128),
                                    f"{PEFT}.lora_B.weight": torch.zeros(128, 4)},
                                   {"lora_adapter_metadata": '{"unet.lora_alpha": NaN}'}, "alpha is nan"),
    "PEFT string alpha in metadata": ({f"{PEFT}.lora_A.weight": torch.randn(4, 128),
                                      f"{PEFT}.lora_B.weight": torch.zeros(128, 4)},
                                     {"lora_adapter_metadata": '{"unet.lora_alpha": "8"}'}, "alpha must be a number"),
}
LORA_CASES = [(entrance, kind) for kind in LORAS for entrance in ("python", "cli", "app")]


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    for name, (tensors, metadata, _) in LORAS.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / f"{name.replace(' ', '-')}.safetensors",
                  metadata=metadata)
    save_file(kohya(), folder / "good.safetensors")
    return folder


@pytest.mark.parametrize("entrance,kind", LORA_CASES, ids=lambda v: v)
def test_bad_lora_is_refused_with_a_sentence(entrance, kind, lora_folder, builtin, capsys, tmp_path):
    from imagecraft.serve import actions

    path = str(lora_folder / f"{kind.replace(' ', '-')}.safetensors")
    if entrance == "python":
        with pytest.raises(ValueError) as refused:
            builtin.load_lora(path)
        refusal = str(refused.value)
        assert builtin.lora is None
    elif entrance == "app":  # the Generate handler's body, on a server without an allowlist
        with pytest.raises(ValueError) as refused:
            actions.generate(builtin, "a red circle", steps=1, seed=1, lora=path, trusted_paths=True)
        refusal = str(refused.value)
    else:
        status, err = run_cli(["generate", "--prompt", "a red circle", "--steps", "1", "--lora", path,
                               "--output", str(tmp_path / "x.png")], tmp_path, capsys)
        assert status == 2 and "Traceback" not in err, err[-2000:]
        refusal = [line for line in err.splitlines() if "error:" in line][-1]
    assert LORAS[kind][2] in refusal, refusal
    assert "\n" not in refusal.strip()
    assert not lora_layers_left(builtin), "a refused LoRA left layers in the model"


def lora_layers_left(pipe) -> int:
    from imagecraft import lora

    return len(lora.lora_layers(pipe.unet)) + len(lora.lora_layers(pipe.text_encoder))


def test_a_good_lora_still_loads(lora_folder, builtin):
    builtin.load_lora(lora_folder / "good.safetensors", 0.5)
    try:
        assert builtin.lora["scale"] == 0.5 and lora_layers_left(builtin) == 1
    finally:
        builtin.unload_lora()


# --- non-finite images: never silent --------------------------------------------------------------------------------
def test_a_lora_that_blows_up_says_so(lora_folder, builtin, tmp_path):
    """Finite weights that overflow (on a self-attention's output, added to the residual stream): every tensor passes
    the load checks, the latents become inf and NaN."""
    from imagecraft.pipeline import NonFiniteError

    huge = tmp_path / "huge.safetensors"
    save_file(kohya(a=torch.full((4, 128), 1e19), b=torch.full((128, 4), 1e19),
                    module=KOHYA.replace("attn2_to_k", "attn1_to_out_0")), huge)
    builtin.load_lora(huge)
    try:
        with pytest.raises(NonFiniteError, match="NaN or infinite values.*the LoRA 'huge' at scale 1"):
            builtin("a red circle", num_inference_steps=2, seed=1)
    finally:
        builtin.unload_lora()
    assert builtin("a red circle", num_inference_steps=1, seed=1).images  # the model is clean again


def test_non_finite_without_a_lora_names_fp16_or_the_weights(builtin, monkeypatch):
    from imagecraft.pipeline import NonFiniteError

    monkeypatch.setattr(builtin, "dtype", torch.float16)  # only the sentence reads it
    with pytest.raises(NonFiniteError, match="fp16 overflowing"):
        builtin.check_finite(torch.tensor([1.0, float("nan")]), "sampling")
    monkeypatch.setattr(builtin, "dtype", torch.float32)
    with pytest.raises(NonFiniteError, match="the model's weights"):
        builtin.check_finite(torch.tensor([float("inf")]), "the VAE's decoding")


# --- fine-tune requests: FINETUNE's schema and the per-job cost cap --------------------------------------------------
TABLE = {"headers": ["image", "caption", "note"], "data": [["a.png", "a red square", ""]]}
FINETUNE_CASES = [  # (description, keyword values for jobs.start_finetune, what the sentence must say)
    ("steps '10'", dict(steps="10"), "steps must be"),
    ("steps None", dict(steps=None), "steps must be"),
    ("steps NaN", dict(steps=float("nan")), "steps must be"),
    ("rank '10'", dict(rank="10"), "rank must be"),
    ("rank None", dict(rank=None), "rank must be"),
    ("lr 'x'", dict(lr="x"), "lr must be"),
    ("lr inf", dict(lr=float("inf")), "lr must be"),
    ("method 'dreambooth'", dict(method="dreambooth"), "method must be"),
    ("table a string", dict(rows="a.png,cap"), "caption table must be rows"),
    ("table of 5-column rows", dict(rows={"data": [["a.png", "cap", "", "x", "y"]]}), "row 1 of the caption table"),
    ("table with a number for a caption", dict(rows=[["a.png", 5, ""]]), "row 1 of the caption table must hold text"),
    ("class prompts a list", dict(class_prompts=["a", "b"]), "class_prompts must be text"),
    ("validation prompt a dict", dict(validation_prompt={"a": 1}), "validation_prompts must be text"),
    ("over the cost cap: 20,000 steps", dict(steps=20_000), "IMAGECRAFT_MAX_TRAIN_COST"),
    ("over the cost cap: 1,000 steps with prior preservation (4,000 without; the cap 8,000)",
     dict(class_prompts="a red circle", steps=1000), "8,100 images to train on and draw"),
]


@pytest.mark.parametrize("description,kwargs,sentence", FINETUNE_CASES, ids=[c[0] for c in FINETUNE_CASES])
def test_bad_finetune_request_is_refused_at_once(description, kwargs, sentence, tmp_path, upload_root, monkeypatch):
    from imagecraft.serve import jobs

    submitted = []
    monkeypatch.setattr(jobs.TRAINING, "submit", submitted.append)
    (tmp_path / "a.png").write_bytes(tiny_png())
    args = dict(model=None, files=[str(tmp_path / "a.png")], rows=TABLE) | kwargs
    with pytest.raises(ValueError, match=re.escape(sentence)) as refused:
        jobs.start_finetune(**args)
    assert "\n" not in str(refused.value) and not submitted
    assert not (upload_root / "jobs").exists() or not any((upload_root / "jobs").iterdir())


def test_train_cost_counts_steps_batch_prior_and_class_images():
    from imagecraft.settings import train_cost

    assert train_cost(dict()) == 2400  # the Fine-tune tab's default: a LoRA, 600 steps of 4 images
    assert train_cost(dict(method="full")) == 4800  # a full fine-tune's default keeps preservation
    assert train_cost(dict(steps=400, preserve=0)) == 1600
    assert train_cost(dict(steps=400, preserve=0, class_prompts=("a",), class_images=100)) == 3300
    assert train_cost(dict(steps=400, preserve=0.3, class_prompts=("a",), class_images=100)) == 4900
    assert train_cost(dict(steps=10, batch_size=2, grad_accum=3, preserve=0)) == 60


# --- the cost cap: the UNet's work, self-attention's square included -------------------------------------------------
def test_the_cost_grows_with_the_square_of_the_pixels_where_there_is_attention():
    from imagecraft.settings import unet_work

    builtin_config = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                                attention_levels=(False, True, True), num_heads=(2, 4, 4), context_dim=128)
    convs_only = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                            attention_levels=(False, False, False), num_heads=(2, 4, 4), context_dim=128)
    def twice(config):
        return unet_work(config, 1024, 1024, 4) / unet_work(config, 512, 512, 4)

    assert 3.9 < twice(convs_only) < 4.5  # convolutions: linear in the pixels (but the middle block's attention)
    assert twice(builtin_config) > 8  # the built-in model at 1024: its self-attention dominates
    assert 8 < twice(UNetConfig()) < 11  # SD 1.5 at 1024 (latent 128): a step costs about 9 at 512, not 4


# --- allowlist mode: a session applies only its own LoRAs and IMAGECRAFT_LORAS -----------------------------------------
def test_allowlist_mode_applies_only_the_sessions_and_the_servers_loras(lora_folder, builtin, upload_root, tmp_path,
                                                                        monkeypatch):
    from types import SimpleNamespace

    from imagecraft.serve import actions, jobs

    theirs = upload_root / "jobs" / "a" / "finetune-a"
    theirs.mkdir(parents=True)
    shutil.copyfile(lora_folder / "good.safetensors", theirs / "pytorch_lora_weights.safetensors")
    mine = SimpleNamespace(output=upload_root / "jobs" / "b" / "finetune-b", recipe=SimpleNamespace(method="lora"))
    jobs.own("session-a", SimpleNamespace(output=theirs, recipe=SimpleNamespace(method="lora")))
    jobs.own("session-b", mine)
    monkeypatch.setenv("IMAGECRAFT_LORAS", str(lora_folder / "good.safetensors"))
    assert jobs.shared_loras() == [("good", str(lora_folder / "good.safetensors"))]

    def generate(lora, session="session-b", **kw):
        return actions.generate(builtin, "a red circle", steps=1, seed=1, lora=lora, trusted_paths=False,
                                allowed_loras=jobs.loras_for(session), **kw)

    for other in (str(theirs), str(theirs / "pytorch_lora_weights.safetensors"), str(upload_root / "jobs" / "zz"),
                  "/etc/passwd", "../" * 8 + "etc/hostname"):
        with pytest.raises(ValueError) as refused:
            generate(other)
        assert "only the LoRAs its LoRA box offers" in str(refused.value) and "/" not in str(refused.value)
    with pytest.raises(ValueError) as refused:  # its own, not written yet (still training, or cleared)
        generate(str(mine.output))
    assert "cannot be loaded" in str(refused.value) and "/" not in str(refused.value)
    paths, _, _ = generate(str(theirs), session="session-a")  # each session its own
    assert len(paths) == 1
    paths, _, _ = generate(str(lora_folder / "good.safetensors"), session="anyone")  # the server's own
    assert len(paths) == 1


@pytest.mark.parametrize("scale", [1e9, "x", float("nan"), None])
def test_lora_scale_is_checked_even_without_a_lora(scale, builtin):
    from imagecraft.serve import actions

    with pytest.raises(ValueError, match="LoRA scale"):
        actions.generate(builtin, "a red circle", steps=1, seed=1, lora="none", lora_scale=scale)


# --- logs: a refusal by Gradio's own checks is one line, like ours ---------------------------------------------------
@pytest.mark.parametrize("name,data,message", [
    ("/finetune_upload", "file of a type the upload does not take", "Invalid file type"),
    ("/read_png", "a string, not a file", "not one its fields take"),
    ("/read_png", "FileData naming /etc/passwd", ""),
], ids=lambda v: v if isinstance(v, str) else "")
def test_gradio_refusals_log_one_line(name, data, message, app_server, tmp_path, capfd, caplog):
    client, url, _ = app_server
    caplog.set_level(logging.INFO)
    capfd.readouterr()
    if data.startswith("file of a type"):
        (tmp_path / "x.exe").write_bytes(b"MZ")
        with pytest.raises(AppError) as refused:
            client.predict([handle_file(tmp_path / "x.exe")], api_name=name)
        refusal = str(refused.value)
    elif data.startswith("a string"):
        refusal, _ = raw_call(url, name, ["hello"])
    else:
        refusal, _ = raw_call(url, name, [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}])
    assert refusal and message in refusal and GENERIC not in refusal, refusal
    logged = capfd.readouterr().err + caplog.text
    assert "Traceback" not in logged, logged[-3000:]
    assert len([line for line in caplog.text.splitlines() if "refused by Gradio" in line]) == 1, caplog.text
