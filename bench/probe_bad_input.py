"""A hostile-user probe of ImageCraft's three entrances, and what bad input costs a running server.

    python bench/probe_bad_input.py                          # all four parts, about 13 minutes on 2 cores
    python bench/probe_bad_input.py --only probe             # the bad-input table: app API, CLI, Python API
    python bench/probe_bad_input.py --only probe --entrance app python   # some entrances only
    python bench/probe_bad_input.py --only stall             # ping latency while hostile requests are served
    python bench/probe_bad_input.py --only memory            # server RSS over 100 /load_model spellings
    python bench/probe_bad_input.py --only disk --disk-requests 1000     # outputs under IMAGECRAFT_OUTPUT_MB=5
    python bench/probe_bad_input.py --only disk --disk-mb 1              # a tighter cap, to see it act
    python bench/probe_bad_input.py --only probe --json probe.json       # also every case's outcome as JSON

Probe. A table of cases, each an entrance, what is probed, a description, the input, and whether it should be
refused (True), should work (False) or may do either (None). Entrances:
- app: the Gradio app launched in this process on a free localhost port (concurrency 2, as tests/test_app.py
  does), called through gradio_client; what gradio_client cannot send (NaN, inf, lone surrogates, a FileData
  naming a path on the server) goes as raw JSON to Gradio's REST route /gradio_api/call/<api>. The server's
  stderr and logging are captured during each case, and the tracebacks it logged are counted per case.
- cli: `python -m imagecraft generate|attention ...` as a subprocess, with the built-in model and --steps 1.
- python: ImageCraftPipeline, UNetConfig, AttentionMaps and ModelCache called directly.
Each outcome is one of
- sentence: refused with a clear message: for the app an AppError carrying a message that is not Gradio's
  generic "upstream Gradio app has raised an exception" (the `by` column says whether the sentence is ours or
  Gradio's own, e.g. "Value 200 is greater than maximum value 150."); for the CLI exit status 2 and "error: ..."
  without a traceback (ours, or argparse's); for Python a ValueError (ModelLoadError, PortingError),
  FileNotFoundError, or Python's own TypeError for a wrong keyword;
- ok: worked, as a case that should work must;
- accepted: worked although it should have been refused, or refused although it should have worked;
- generic: refused with Gradio's generic message (or no message), or a CLI exit status other than 0 or 2;
- traceback: a CLI traceback, or a Python exception of another type (the user sees a stack, not a sentence);
- hang: no answer within --timeout seconds; crash: the server or the process died.
Sentences that read wrong (an empty "must be , ", HTML entities sent to an API client) are listed after the summary.
Model files are made in a temporary folder, among them pickles that would create a marker file if unpickled:
the probe checks that it was never created.

Stall. `python app.py` as a subprocess (IMAGECRAFT_CONCURRENCY=2); a thread calls /random_seed every 50 ms and
records each latency while hostile requests that cost the server work which is not their own generation go in
one at a time (three times each), then a 1-step generation once 10,000 earlier outputs are kept (what
`service.prune` scans before each one). Reported: the worst ping during each against a quiet baseline, and the load
average (another developer's tests show up here). Target: no request stalls the server by more than 0.5 s beyond
the baseline, other than through its own generation.

Memory. `python app.py` as a subprocess; VmRSS from /proc/PID/status before and after 100 /load_model calls with
spellings of the built-in folder, after loading a copy of it (one more model, the yardstick), and over 60
"default | CONFIG" spellings. Target: the spellings add less than one copy.

Disk. `python app.py` as a subprocess with IMAGECRAFT_OUTPUT_MB=5, a private TMPDIR and GRADIO_TEMP_DIR; N
/generate requests (1 step, 64x64). Reported: the size of TMPDIR/imagecraft-outputs and of Gradio's cache, at the
end and at most along the way, and what `service.prune` costs over 10,000 kept outputs. Target: the outputs stay
within the cap (plus one request); Gradio's cache is reported as it is (the app prunes it to the same cap but keeps
files under five minutes old; delete_cache sweeps it hourly).

The code measured is printed first and last (commit, and a hash of uncommitted changes): CLI cases and servers
import the checkout as it is when they start, so run it on a checkout nobody is editing (e.g. a `git clone
--shared` of it, with this file copied in).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Hub ids are probed offline: the error must say so, fast
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

BUILTIN = "built-in shapes model"  # imagecraft.serve.models.BUILTIN, without importing torch before the temp dir is set
DEFAULT_MODEL = ROOT / "assets" / "shapes-sd"
GENERIC = "upstream Gradio app has raised an exception"
GRADIO_WORDING = re.compile(r"^Value:? |is not in the list of choices|^Invalid file type|maximum value|"
                            r"minimum value|Input should be|not allowed|cannot be accessed|Cannot find")
# A refusal that reads wrong although it is a sentence: an empty "allowed" text, or HTML entities sent to an API
# client (the app escapes messages for the browser)
GARBLED = re.compile(r"must be , |&lt;|&gt;|&amp;|&quot;")
UPDATE = {"__type__": "update"}  # what gradio_client returns for a field left unchanged
GENERATE_PARAMS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "scheduler", "width", "height",
                   "num_images", "model")
ATTENTION_PARAMS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "scheduler", "width", "height", "model")
READ_PNG_FIELDS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "scheduler", "width", "height",
                   "num_images", "model")


# --- cases and outcomes -----------------------------------------------------------------------------------------------
@dataclass
class Case:
    entrance: str  # "app", "cli" or "python"
    what: str  # the endpoint and parameter, flag, or function probed
    description: str  # the input in words
    input: object  # app: ("api" | "raw", api_name, kwargs); cli: argv; python: (target, args, kwargs)
    refuse: bool | None = True  # True: must be refused; False: must work; None: either is fine
    verify: Callable | None = None  # for a case that works: a problem with its result, or None
    control: bool = False  # a valid request, not a bad-input kind

    def __post_init__(self):
        self.control = self.control or self.description.startswith("valid")

    @property
    def label(self) -> str:
        return f"{self.entrance} {self.what}: {self.description}"


@dataclass
class Outcome:
    case: Case
    kind: str  # sentence, ok, accepted, generic, traceback, hang, crash
    message: str  # the refusal, the traceback's last line, or what came back
    seconds: float
    by: str = ""  # whose sentence: ours, gradio, argparse, python
    server_tracebacks: int = 0  # app only: tracebacks the server logged during the case
    log_lines: int = 0  # app only: "refused:" lines the app logged


def classify(case: Case, refused: bool, message: str, result=None, generic: bool = False) -> str:
    if refused:
        if generic:
            return "generic"
        return "accepted" if case.refuse is False else "sentence"
    if case.refuse is True:
        return "accepted"
    if case.verify is not None and case.verify(result):
        return "accepted"
    return "ok"


def short(value, limit: int = 110) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # NUL, newlines, surrogates shown escaped
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- files the cases read ---------------------------------------------------------------------------------------------
class Evil:
    """Unpickling this runs `touch MARKER`: a pickle model file that must never be loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_with(*chunks: bytes) -> bytes:
    """An 8x8 PNG with `chunks` inserted before IEND."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = buf.getvalue()
    return data[:-12] + b"".join(chunks) + data[-12:]


def text_chunk(key: str, text: str) -> bytes:
    return png_chunk(b"tEXt", key.encode() + b"\0" + text.encode("latin-1"))


def make_files(work: Path, pipe) -> SimpleNamespace:
    """Every file a case names: PNGs good and bad, pickles, safetensors, fake model folders, attention maps."""
    import numpy as np
    import torch
    from PIL import Image, PngImagePlugin
    from safetensors.torch import save_file

    f = SimpleNamespace(work=work, marker=work / "PWNED")

    def put(name: str, data: bytes) -> Path:
        (work / name).write_bytes(data)
        return work / name

    def a1111(name: str, text: str) -> Path:
        return put(name, png_with(text_chunk("parameters", text)))

    # PNGs
    info = PngImagePlugin.PngInfo()  # the quadratic-parse PNG of the hardening brief
    info.add_text("parameters", "x\nSteps: 1, " + "a " * 30000, zip=True)
    Image.new("RGB", (8, 8)).save(work / "quadratic.png", pnginfo=info)
    f.quadratic = work / "quadratic.png"
    f.ztxt_bomb = put("ztxt-bomb.png", png_with(png_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(
        b"a" * 50_000_000, 9))))  # 50 MB of text in ~50 KB
    f.plain = put("plain.png", png_with())
    Image.new("RGB", (8, 8)).save(work / "photo.jpg")
    f.jpeg = work / "photo.jpg"
    f.jpeg_as_png = put("jpeg-named.png", f.jpeg.read_bytes())
    f.random = put("random.png", random.Random(0).randbytes(10_000))
    f.text_file = put("notes.png", b"just some text, not an image\n")
    f.ours = pipe("a red circle", seed=1, num_inference_steps=1).save(work / "ours.png")[0]
    f.truncated = put("truncated.png", f.ours.read_bytes()[: f.ours.stat().st_size // 2])
    f.nosize = a1111("a1111-nosize.png", "a castle\nNegative prompt: fog\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
                                         "Seed: 3")
    f.sampler = a1111("a1111-sampler.png", "a castle\nSteps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 3, "
                                           "Size: 64x64")
    f.steps9999 = a1111("a1111-steps.png", "a castle\nSteps: 9999, Sampler: Euler a, CFG scale: 7, Seed: 3, "
                                           "Size: 64x64")
    f.cfg_neg = a1111("a1111-cfg.png", "a castle\nSteps: 20, Sampler: Euler a, CFG scale: -3, Seed: 3, Size: 64x64")
    f.model_path = a1111("a1111-model.png", "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, "
                                            "Size: 64x64, Model: ../../../etc/passwd")
    f.html = a1111("a1111-html.png", "<img src=x onerror=alert(1)>\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
                                     "Seed: 3, Size: 64x64, Model: <script>alert(1)</script>")
    f.digits = a1111("a1111-digits.png", "a castle\nSteps: " + "9" * 5000 + ", Seed: " + "9" * 30 + ", Size: 64x-8")
    f.json_bad = put("json-bad.png", png_with(text_chunk("imagecraft", "{nope")))
    f.json_list = put("json-list.png", png_with(text_chunk("imagecraft", "[1, 2]")))
    f.json_deep = put("json-deep.png", png_with(text_chunk("imagecraft", "[" * 60_000 + "]" * 60_000)))
    f.json_bigint = put("json-bigint.png", png_with(text_chunk("imagecraft", '{"seed": ' + "9" * 5000 + "}")))
    f.json_types = put("json-types.png", png_with(text_chunk("imagecraft", json.dumps(
        {"prompt": ["a", "b"], "num_inference_steps": "x", "width": True, "seed": -5, "scheduler": {"a": 1}}))))
    f.json_noprompt = put("json-noprompt.png", png_with(text_chunk("imagecraft", '{"num_inference_steps": 3}')))
    body = b"parameters\0a castle"
    f.bad_crc = put("bad-crc.png", png_with(png_chunk(b"tEXt", body, crc=zlib.crc32(b"tEXt" + body) ^ 1)))
    f.huge_length = put("huge-length.png", png_with()[:-12] + struct.pack(">I", 2**31 - 1) + b"tEXtparameters\0x")
    f.many_chunks = put("many-chunks.png", png_with(*[png_chunk(b"teSt", b"")] * 100_001))
    f.itxt_utf8 = put("itxt-utf8.png", png_with(png_chunk(b"iTXt", b"parameters\0\0\0\0\0\xff\xfe not utf-8")))
    f.text_200k = put("text-200k.png", png_with(text_chunk("parameters", "a " * 100_000)))
    f.ztxt_method = put("ztxt-method.png", png_with(png_chunk(b"zTXt", b"parameters\0\x05" + zlib.compress(b"x"))))
    f.big = put("big.png", png_with(*[png_chunk(b"teSt", bytes(2**20))] * 20))  # 20 MB, no settings

    # model files
    for suffix in (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".safetensors"):
        put(f"evil{suffix}", pickle.dumps(Evil(f.marker)))
    f.evil = {s: work / f"evil{s}" for s in (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".safetensors")}
    f.random_st = put("random.safetensors", random.Random(1).randbytes(4096))
    save_file({"foo": torch.zeros(2)}, work / "unrelated.safetensors")
    f.unrelated = work / "unrelated.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)}, work / "ldm-partial.safetensors")
    f.ldm_partial = work / "ldm-partial.safetensors"
    f.huge_header = put("huge-header.safetensors", struct.pack("<Q", 2**40) + b"{}")
    f.fake_index = work / "fake-index"
    f.fake_index.mkdir()
    (f.fake_index / "model_index.json").write_text("{}")
    f.fake_badjson, f.fake_pickle, f.fake_shapes = (work / "fake-badjson", work / "fake-pickle", work / "fake-shapes")
    for folder in (f.fake_badjson, f.fake_pickle, f.fake_shapes):
        shutil.copytree(DEFAULT_MODEL, folder)
    (f.fake_badjson / "unet" / "config.json").write_text("{")
    for st in (f.fake_pickle / "unet").glob("*.safetensors"):
        st.unlink()
    shutil.copy(f.evil[".bin"], f.fake_pickle / "unet" / "diffusion_pytorch_model.bin")
    config = json.loads((f.fake_shapes / "unet" / "config.json").read_text())
    config["block_out_channels"] = [32, 64, 64]
    (f.fake_shapes / "unet" / "config.json").write_text(json.dumps(config))
    f.link_etc, f.link_builtin, f.loop = work / "link-etc", work / "link-builtin", work / "loop"
    os.symlink("/etc", f.link_etc)
    os.symlink(DEFAULT_MODEL, f.link_builtin)
    os.symlink(f.loop, f.loop)
    f.afile = put("afile", b"a plain file")
    (work / "cli").mkdir()

    # attention maps
    maps = pipe("a blue square above a green triangle", seed=7, num_inference_steps=2, guidance_scale=5.0,
                attention=True).attention[0]
    f.maps_good = maps.save(work / "maps.npz")
    f.maps_truncated = put("maps-truncated.npz", f.maps_good.read_bytes()[:2000])
    np.savez(work / "maps-nometa.npz", x=np.zeros(2))
    np.savez(work / "maps-notjson.npz", meta=np.array("{nope"))
    np.savez(work / "maps-list.npz", meta=np.array("[1, 2]"))
    np.savez(work / "maps-layers.npz", meta=np.array(json.dumps(dict(maps.meta(), layers=5))))
    np.savez(work / "maps-object.npz", meta=np.array([{"a": 1}], dtype=object))
    f.maps_empty = put("maps-empty.npz", b"")
    f.maps_random = put("maps-random.npz", random.Random(2).randbytes(4096))
    return f


# --- the app entrance -------------------------------------------------------------------------------------------------
def api(name: str, **kwargs):
    return ("api", name, kwargs)


def needs_raw(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value)


def app_cases(f: SimpleNamespace, scheduler: str) -> list[Case]:
    """Every parameter of /generate, /attention, /load_model and /read_png, with valid requests interleaved."""
    from gradio_client import handle_file

    gen_base = dict(prompt="a red circle", steps=1, seed=1)
    att_base = dict(prompt="a red circle", steps=2, seed=1)  # 2: a 1-step explain fails (see the steps rows)
    defaults = {"/generate": dict(zip(GENERATE_PARAMS, ("", "", 25, 5.0, -1, scheduler, 64, 64, 1, BUILTIN))),
                "/attention": dict(zip(ATTENTION_PARAMS, ("", "", 25, 5.0, -1, scheduler, 0, 0, BUILTIN)))}

    def call(name, base, kwargs):
        kwargs = {**base, **kwargs}
        if any(needs_raw(v) for v in kwargs.values()):  # NaN, Infinity, lone surrogates: JSON gradio_client won't send
            return ("raw", name, [{**defaults[name], **kwargs}[p] for p in defaults[name]])
        return api(name, **kwargs)

    def rows(name, param, base, table):
        return [Case("app", f"{name} {param}", desc, call(name, base, {param: value}), refuse)
                for desc, value, refuse in table]

    def file_data(path: str | None, **extra):
        """A raw FileData naming a path on the server (gradio_client would upload a local path instead)."""
        return ("raw", "/read_png", [{"path": path, "meta": {"_type": "gradio.FileData"}, **extra}])

    def kept(*names):
        """The result must leave these fields unchanged."""
        return lambda result: next((f"restored {n}={short(result[READ_PNG_FIELDS.index(n)], 40)}" for n in names
                                    if result[READ_PNG_FIELDS.index(n)] != UPDATE), None)

    control = lambda what, desc, inp: Case("app", what, desc, inp, False, control=True)  # noqa: E731
    gen_control = lambda: control("/generate", "valid: 1 step, seed 7",  # noqa: E731
                                  api("/generate", prompt="a blue square", steps=1, seed=7))
    builtin = str(DEFAULT_MODEL)
    model_table = [
        ("bool", True, True), ("int", 5, True), ("list", ["/etc"], True), ("dict", {"a": 1}, True),
        ("None (the built-in one)", None, None), ("empty (the built-in one)", "", False),
        ("spelling: 'default'", "default", False), ("spelling: '  default  '", "  default  ", False),
        ("spelling: absolute path", builtin, False), ("spelling: 'assets/shapes-sd/'", "assets/shapes-sd/", False),
        ("spelling: './assets/../assets/shapes-sd'", "./assets/../assets/shapes-sd", False),
        ("spelling: a symlink to it", str(f.link_builtin), False),
        ("nonexistent path", "/no/such/model", True), ("/etc", "/etc", True), ("/root", "/root", True),
        ("the repo's .git", str(ROOT / ".git"), True), ("/", "/", True), ("/dev/null", "/dev/null", True),
        ("/etc/passwd", "/etc/passwd", True), ("/proc/self/environ", "/proc/self/environ", True),
        ("../ traversal to /etc", "../../../../../../etc", True), ("~root", "~root", True),
        ("~nosuchuser/x (expanduser fails)", "~nosuchuser/x", True),
        *[(f"pickle file {s}", str(p), True) for s, p in f.evil.items()],
        ("random .safetensors, no '| CONFIG'", str(f.random_st), True),
        ("random .safetensors | default", f"{f.random_st} | default", True),
        ("unrelated .safetensors | default", f"{f.unrelated} | default", True),
        ("partial LDM .safetensors | default", f"{f.ldm_partial} | default", True),
        ("safetensors with a 1 TB header | default", f"{f.huge_header} | default", True),
        ("unrelated .safetensors | /etc", f"{f.unrelated} | /etc", True),
        ("unrelated .safetensors | a pickle", f"{f.unrelated} | {f.evil['.ckpt']}", True),
        ("unrelated .safetensors | Hub id offline", f"{f.unrelated} | nobody/nothing", True),
        ("' | ' (empty source and config)", " | ", None), ("'|||'", "|||", True),
        ("'default | default' (config on a folder)", "default | default", None),
        ("folder with only model_index.json", str(f.fake_index), True),
        ("folder with a broken unet/config.json", str(f.fake_badjson), True),
        ("folder whose unet has only a pickle", str(f.fake_pickle), True),
        ("folder whose unet config mismatches its weights", str(f.fake_shapes), True),
        ("symlink to /etc", str(f.link_etc), True), ("symlink loop", str(f.loop), True),
        ("Hub id offline 'nobody/nothing'", "nobody/nothing", True),
        ("Hub id offline 'CompVis/stable-diffusion-v1-4'", "CompVis/stable-diffusion-v1-4", True),
        ("'owner/name/extra'", "owner/name/extra", True), ("1,001 characters", "m" * 1001, True),
        ("100,000 characters", "m" * 100_000, True), ("999-character file name", "a" * 999, True),
        ("NUL byte", "assets/shapes-sd\x00/etc", True), ("emoji", "🎨/🎨", True),
        ("HTML", "<img src=x onerror=alert(1)>", True), ("Windows path", "C:\\Windows\\System32", True),
    ]
    cases = [
        control("/random_seed", "valid", api("/random_seed")),
        control("/load_model", "valid: the built-in model", api("/load_model", model=BUILTIN)),
        control("/read_png", "valid: one of our PNGs", api("/read_png", file=handle_file(str(f.ours)))),
        gen_control(),
        *rows("/generate", "prompt", gen_base, [
            ("bool", True, True), ("int", 12345, True), ("list of 3 strings", ["a red circle"] * 3, True),
            ("list of 20 strings", ["a"] * 20, True), ("dict", {"a": 1}, True),
            ("None (unconditional)", None, None), ("4,001 characters", "a" * 4001, True),
            ("10k characters", "a " * 5000, True), ("100k characters", "a " * 50_000, True),
            ("1M characters", "a " * 500_000, True), ("4,000 emoji (truncated with a warning)", "🎨" * 4000, False),
            ("NUL bytes", "a red\x00 circle\x00", None), ("HTML", "<img src=x onerror=alert(1)>", False),
            ("lone surrogate", "a red \ud800 circle", None),
            ("right-to-left and zero-width", "a \u202e\u200b red", False),
        ]),
        *rows("/generate", "negative_prompt", gen_base, [
            ("bool", True, True), ("list", ["blurry"], True), ("None", None, None),
            ("4,001 characters", "a" * 4001, True), ("1M characters", "a " * 500_000, True),
            ("NUL bytes", "blu\x00rry", None), ("HTML", "<img src=x onerror=alert(1)>", False),
            ("lone surrogate", "\udfff", None),
        ]),
        gen_control(),
        *rows("/generate", "steps", gen_base, [
            ("bool True", True, True), ("bool False", False, True), ("string '25'", "25", True),
            ("string 'abc'", "abc", True), ("list", [25], True), ("dict", {"a": 1}, True), ("None", None, True),
            ("2.5", 2.5, True), ("25.0 (whole float)", 25.0, False), ("-1", -1, True), ("0", 0, True),
            ("151", 151, True), ("2**64", 2**64, True), ("1e308", 1e308, True), ("NaN", math.nan, True),
            ("inf", math.inf, True), ("-inf", -math.inf, True),
        ]),
        *rows("/generate", "guidance", gen_base, [
            ("bool", True, True), ("string '7'", "7", True), ("list", [7], True), ("None", None, True),
            ("-3", -3, True), ("30.5", 30.5, True), ("1e308", 1e308, True), ("NaN", math.nan, True),
            ("inf", math.inf, True), ("-inf", -math.inf, True), ("7.25", 7.25, False), ("0 (guidance off)", 0, False),
        ]),
        gen_control(),
        *rows("/generate", "seed", gen_base, [
            ("bool", True, True), ("string '42'", "42", True), ("list", [1], True), ("dict", {"a": 1}, True),
            ("None (random)", None, False), ("-1 (random)", -1, False), ("-2", -2, True), ("2**32", 2**32, True),
            ("2**64", 2**64, True), ("2**70", 2**70, True), ("1.5", 1.5, True), ("42.0 (whole float)", 42.0, False),
            ("NaN", math.nan, True), ("inf", math.inf, True),
        ]),
        *rows("/generate", "scheduler", gen_base, [
            ("bool", True, True), ("int", 5, True), ("list", ["euler"], True), ("None (the model's)", None, None),
            ("'' (the model's, says on_generate)", "", None), ("unknown 'karras_magic'", "karras_magic", True),
            ("A1111 name 'Euler a'", "Euler a", None), ("A1111 name 'DPM++ 2M Karras'", "DPM++ 2M Karras", None),
            ("'EULER_A'", "EULER_A", True), ("HTML", "<img src=x onerror=alert(1)>", True),
            ("NUL byte", "euler\x00", True),
        ]),
        gen_control(),
        *rows("/generate", "width", gen_base, [
            ("bool", True, True), ("string '64'", "64", True), ("list", [64], True),
            ("None (the model's, says service._size)", None, None), ("0 (the model's, says on_generate)", 0, None),
            ("100 (not a multiple of 8)", 100, True),
            ("63", 63, True), ("-64", -64, True), ("4096", 4096, True), ("2**64", 2**64, True),
            ("64.5", 64.5, True), ("NaN", math.nan, True), ("inf", math.inf, True), ("72", 72, False),
            ("64.0 (whole float)", 64.0, False),
        ]),
        *rows("/generate", "height", gen_base, [
            ("string 'abc'", "abc", True), ("100", 100, True), ("0 (the model's)", 0, None), ("-8", -8, True),
        ]),
        *rows("/generate", "num_images", gen_base, [
            ("bool", True, True), ("string '2'", "2", True), ("list", [2], True), ("None", None, True), ("0", 0, True),
            ("-1", -1, True), ("17", 17, True), ("2.5", 2.5, True), ("10**9", 10**9, True), ("NaN", math.nan, True),
        ]),
        Case("app", "/generate cost", "2048x2048 x 150 steps x 16 images (must be refused at once)",
             api("/generate", prompt="a", width=2048, height=2048, steps=150, num_images=16)),
        Case("app", "/generate cost", "2048x2048 x 4 steps x 1 image",
             api("/generate", prompt="a", width=2048, height=2048, steps=4)),
        gen_control(),
        *rows("/generate", "model", gen_base, [m for m in model_table if m[0] in (
            "bool", "int", "list", "dict", "None (the built-in one)", "empty (the built-in one)", "/etc",
            "nonexistent path", "pickle file .ckpt", "1,001 characters", "999-character file name", "NUL byte",
            "HTML")]),
        *rows("/load_model", "model", {}, model_table),
        gen_control(),
        control("/attention", "valid: 2 steps", api("/attention", prompt="a blue square", steps=2, seed=3)),
        *rows("/attention", "prompt", att_base, [
            ("empty", "", True), ("spaces", "   ", True), ("None", None, True), ("bool", True, True),
            ("list", ["a", "b"], True), ("1M characters", "a " * 500_000, True), ("emoji", "🎨 🎨 🎨", False),
            ("NUL bytes", "a red\x00 circle", None), ("HTML", "<img src=x onerror=alert(1)>", False),
        ]),
        *rows("/attention", "steps", att_base, [("string 'abc'", "abc", True), ("0", 0, True), ("151", 151, True),
                                                ("2.5", 2.5, True), ("1 (valid)", 1, False)]),
        *rows("/attention", "guidance", att_base, [("NaN", math.nan, True), ("-3", -3, True)]),
        *rows("/attention", "seed", att_base, [("-2", -2, True), ("1.5", 1.5, True)]),
        *rows("/attention", "scheduler", att_base, [("unknown", "nope", True)]),
        *rows("/attention", "width", att_base, [("100", 100, True), ("-8", -8, True), ("string 'x'", "x", True)]),
        Case("app", "/attention cost", "2048x2048 x 150 steps", api("/attention", prompt="a red circle", width=2048,
                                                                     height=2048, steps=150)),
        *rows("/attention", "model", att_base, [("/etc", "/etc", True), ("pickle file", str(f.evil[".ckpt"]), True)]),
        gen_control(),
        *[Case("app", "/read_png file", desc, api("/read_png", file=handle_file(str(path))), refuse, verify)
          for desc, path, refuse, verify in [
              ("quadratic-parse A1111 text (60k characters)", f.quadratic, None, None),
              ("zTXt bomb (50 MB in 50 KB)", f.ztxt_bomb, True, None),
              ("PNG without metadata", f.plain, True, None), ("a JPEG (.jpg)", f.jpeg, True, None),
              ("a JPEG named .png", f.jpeg_as_png, True, None), ("random bytes named .png", f.random, True, None),
              ("a text file named .png", f.text_file, True, None), ("truncated PNG", f.truncated, True, None),
              ("A1111 with no Size", f.nosize, False, kept("width", "height", "num_images", "model")),
              ("A1111 with an unknown sampler", f.sampler, False, kept("scheduler")),
              ("A1111 with Steps: 9999", f.steps9999, False, kept("steps")),
              ("A1111 with CFG scale: -3", f.cfg_neg, False, kept("guidance")),
              ("A1111 naming a model path", f.model_path, False, kept("model")),
              ("A1111 with HTML prompt and model", f.html, False, kept("model")),
              ("A1111 with 5,000-digit steps, 30-digit seed, Size 64x-8", f.digits, False,
               kept("steps", "seed", "width", "height")),
              ("'imagecraft' chunk not JSON", f.json_bad, True, None),
              ("'imagecraft' chunk a JSON list", f.json_list, True, None),
              ("'imagecraft' chunk nested 60,000 deep", f.json_deep, True, None),
              ("'imagecraft' chunk with a 5,000-digit int", f.json_bigint, True, None),
              ("'imagecraft' chunk with wrong types", f.json_types, False, kept("prompt", "steps", "width", "seed",
                                                                                 "scheduler")),
              ("chunk with a bad CRC", f.bad_crc, True, None), ("chunk claiming 2 GB", f.huge_length, True, None),
              ("100,001 chunks", f.many_chunks, True, None), ("iTXt not UTF-8", f.itxt_utf8, True, None),
              ("200 KB tEXt", f.text_200k, True, None), ("zTXt with an unknown method", f.ztxt_method, True, None),
              ("20 MB PNG without settings", f.big, True, None),
          ]],
        Case("app", "/read_png file", "None (nothing uploaded)", api("/read_png", file=None), False),
        Case("app", "/read_png file", "a string, not a file", api("/read_png", file="hello"), True),
        Case("app", "/read_png file", "FileData naming /etc/passwd", file_data("/etc/passwd"),
             True),
        Case("app", "/read_png file", "FileData naming a server-side .png outside the uploads",
             file_data(str(f.ours)), True),
        Case("app", "/read_png file", "FileData with ../ traversal",
             file_data("../../../../../etc/hostname.png"), True),
        Case("app", "/read_png file", "FileData with a URL to a closed local port",
             file_data(None, url="http://127.0.0.1:1/x.png"), True),
        Case("app", "raw request", "/generate with 9 of its 10 values",
             ("raw", "/generate", ["a", "", 1, 5, 1, scheduler, 64, 64, 1]), True),
        Case("app", "raw request", "/generate with 11 values", ("raw", "/generate", ["a", "", 1, 5, 1, scheduler, 64,
                                                                                     64, 1, BUILTIN, "extra"]), None),
        Case("app", "raw request", "/generate with data a string, not a list", ("raw", "/generate", "a"), True),
        Case("app", "raw request", "/random_seed with 3 values", ("raw", "/random_seed", [1, 2, 3]), None),
        gen_control(),
    ]
    return cases


class Capture(io.TextIOBase):
    """The in-process server's stderr and logging, kept (not shown) so that each case's tracebacks can be counted."""

    def __init__(self):
        self.parts: list[str] = []
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.parts.append(text)
        return len(text)

    def flush(self):
        pass

    def text(self) -> str:
        with self.lock:
            return "".join(self.parts)


def count_tracebacks(text: str) -> int:
    """Tracebacks logged, a chained exception ("The above exception ...") counted once."""
    chained = text.count("The above exception was the direct cause") + text.count("During handling of the above")
    return text.count("Traceback (most recent call last)") - chained


def raw_call(base_url: str, name: str, data, timeout: float):
    """Gradio's REST route: POST the data as JSON (NaN and Infinity allowed), then read the event stream.
    Returns (refused, message, result)."""
    import httpx

    body = json.dumps({"data": data}, allow_nan=True)
    route = f"{base_url}gradio_api/call/{name.lstrip('/')}"
    response = httpx.post(route, content=body, headers={"content-type": "application/json"}, timeout=timeout)
    if response.status_code != 200:
        return True, f"HTTP {response.status_code}: {response.text}", None
    event_id = response.json()["event_id"]
    event = None
    with httpx.stream("GET", f"{route}/{event_id}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1])
                if event == "complete":
                    return False, "", payload
                error = payload.get("error") if isinstance(payload, dict) else payload
                return True, error or "", None
    return True, "", None


def run_app_case(case: Case, client, base_url: str, capture: Capture, timeout: float) -> Outcome:
    from gradio_client.exceptions import AppError

    kind_of_call, name, data = case.input
    before = capture.text()
    start = time.perf_counter()
    refused, message, result, generic, crashed = False, "", None, False, False
    try:
        if kind_of_call == "raw":
            refused, message, result = raw_call(base_url, name, data, timeout)
            generic = refused and (not message or GENERIC in message)
        else:
            job = client.submit(api_name=name, **data)
            try:
                result = job.result(timeout=timeout)
            except TimeoutError:
                job.cancel()
                return Outcome(case, "hang", f"no answer in {timeout:.0f} s", time.perf_counter() - start)
    except AppError as e:
        refused, message = True, str(e)
        generic = GENERIC in message or not message
    except TimeoutError:
        return Outcome(case, "hang", f"no answer in {timeout:.0f} s", time.perf_counter() - start)
    except Exception as e:  # the server went away, or the client failed before sending
        refused, message = True, f"{type(e).__name__}: {e}"
        generic, crashed = True, not server_alive(base_url)
    seconds = time.perf_counter() - start
    time.sleep(0.05)  # let the server finish logging this request
    logged = capture.text()[len(before):]
    if crashed:
        kind = "crash"
    else:
        kind = classify(case, refused, message, result, generic)
    if not refused:
        message = summarize(name, result)
        problem = case.verify(result) if case.verify else None
        message = f"{problem}; {message}" if problem else message
    by = "" if not refused or generic else ("gradio" if GRADIO_WORDING.search(message) else "ours")
    return Outcome(case, kind, message, seconds, by, count_tracebacks(logged), logged.count(" refused: "))


def summarize(name: str, result) -> str:
    """What a successful call returned, in a few words."""
    if name == "/generate" and isinstance(result, (list, tuple)) and len(result) == 2:
        return f"worked: {len(result[0])} image(s), seed {result[1]}"
    if name == "/load_model" and isinstance(result, (list, tuple)):
        return f"worked: {short(result[0], 90)}"
    if name == "/read_png" and isinstance(result, (list, tuple)):
        restored = {n: v for n, v in zip(READ_PNG_FIELDS, result) if v != UPDATE}
        return f"worked: restored {short(restored, 90)}" if restored else "worked: nothing restored"
    if name == "/attention" and isinstance(result, (list, tuple)):
        return f"worked: {len(result)} outputs"
    return f"worked: {short(result, 90)}"


def server_alive(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url, timeout=10) as response:
            return response.status == 200
    except OSError:
        return False


def probe_app(f: SimpleNamespace, timeout: float) -> list[Outcome]:
    """Launches the app in this process (concurrency 2), runs every app case, and closes it."""
    from gradio_client import Client

    import app

    capture = Capture()
    stderr = sys.stderr
    logging.basicConfig(level=logging.INFO, stream=capture, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # as app.main() does
    for noisy in ("httpx", "httpcore", "gradio_client", "urllib3", "asyncio", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.stderr = capture
    demo = app.build_demo()
    port = free_port()
    demo.queue(default_concurrency_limit=2).launch(server_name="127.0.0.1", server_port=port,
                                                    prevent_thread_lock=True, quiet=True)
    base_url = f"http://127.0.0.1:{port}/"
    outcomes = []
    try:
        client = Client(base_url, verbose=False, download_files=False)
        cases = app_cases(f, app.models.get(None).default_scheduler)
        print_header("app")
        for i, case in enumerate(cases, 1):
            outcome = run_app_case(case, client, base_url, capture, timeout)
            outcomes.append(outcome)
            print_row(i, outcome)
    finally:
        demo.close()
        sys.stderr = stderr
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
    (f.work / "server-stderr.log").write_text(capture.text())
    return outcomes


# --- the CLI entrance -------------------------------------------------------------------------------------------------
def cli_cases(f: SimpleNamespace) -> list[Case]:
    out = str(f.work / "cli" / "out.png")
    gen_base = ["--prompt", "a red circle", "--steps", "1", "--seed", "1", "--output", out]
    att_base = ["--prompt", "a blue square above a green triangle", "--steps", "1", "--seed", "1",
                "--output", str(f.work / "cli" / "fig.png"), "--image", str(f.work / "cli" / "img.png")]

    def argv(command, base, given):
        """`command` with `given` flags, plus the base flags that `given` does not set."""
        flags = {a for a in given if a.startswith("--")}
        kept, i = [], 0
        while i < len(base):
            if base[i] in flags:
                i += 2
                continue
            kept += base[i:i + 2]
            i += 2
        return [command, *kept, *given]

    def gen(description, *given, refuse=True, control=False):
        return Case("cli", "generate " + (given[0] if given else ""), description, argv("generate", gen_base, given),
                    refuse, control=control)

    def from_png(description, path, *more, refuse=True):
        return Case("cli", "generate --from-png", description, ["generate", "--from-png", str(path), "--steps", "1",
                                                                 "--output", out, *more], refuse)

    def att(description, *given, refuse=True, control=False):
        return Case("cli", "attention " + (given[0] if given else ""), description,
                    argv("attention", att_base, given), refuse, control=control)

    return [
        gen("valid: 1 step", refuse=False, control=True),
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
        gen("cuda (absent here)", "--device", "cuda"), gen("cuda:7", "--device", "cuda:7"),
        gen("tpu", "--device", "tpu"), gen("empty (detected)", "--device", "", refuse=None),
        gen("'CPU'", "--device", "CPU"), gen("mps (absent here)", "--device", "mps"),
        gen("'cpu:0'", "--device", "cpu:0"),
        gen("5,000 characters", "--prompt", "a " * 2500), gen("100k characters", "--prompt", "a " * 50_000),
        gen("300 emoji", "--prompt", "🎨" * 300, refuse=False),
        gen("HTML", "--prompt", "<img src=x onerror=alert(1)>", refuse=False),
        gen("empty (unconditional)", "--prompt", "", refuse=False),
        gen("a byte that is not UTF-8 (0xff)", "--prompt", "a red \udcff circle", refuse=None),
        Case("cli", "generate --prompt", "missing", ["generate", "--steps", "1", "--output", out], True),
        gen("5,000 characters", "--negative-prompt", "a " * 2500),
        gen("nonexistent path", "--model", "/no/such/model"), gen("/etc", "--model", "/etc"),
        gen("pickle .ckpt", "--model", str(f.evil[".ckpt"])), gen("random .safetensors", "--model", str(f.random_st)),
        gen("unrelated .safetensors with --config built-in", "--model", str(f.unrelated), "--config",
            str(DEFAULT_MODEL)),
        gen("random .safetensors with --config /etc", "--model", str(f.random_st), "--config", "/etc"),
        gen("Hub id offline", "--model", "nobody/nothing"), gen("999-character file name", "--model", "a" * 999),
        gen("folder with a broken unet/config.json", "--model", str(f.fake_badjson)),
        gen("a folder", "--output", str(f.work)), gen("under a file", "--output", str(f.afile / "out.png")),
        gen(".jpg", "--output", str(f.work / "cli" / "out.jpg")), gen("/dev/full", "--output", "/dev/full"),
        gen("/proc/probe.png", "--output", "/proc/probe.png"), gen("empty", "--output", ""),
        gen("no suffix", "--output", str(f.work / "cli" / "out")),
        gen("'.PNG' (upper case)", "--output", str(f.work / "cli" / "upper.PNG"), refuse=False),
        gen("unknown field '{foo}'", "--output", str(f.work / "cli" / "out-{foo}.png")),
        gen("positional field '{0}'", "--output", str(f.work / "cli" / "out-{0}.png")),
        gen("'{seed:>300}' (file name too long)", "--output", str(f.work / "cli" / "out-{seed:>300}.png")),
        from_png("nonexistent file", f.work / "nope.png"), from_png("a folder", f.work),
        from_png("a JPEG", f.jpeg), from_png("random bytes", f.random), from_png("truncated PNG", f.truncated),
        from_png("zTXt bomb", f.ztxt_bomb), from_png("PNG without metadata", f.plain),
        from_png("/dev/zero", "/dev/zero"), from_png("A1111 with Steps: 9999 (--steps 1 given)", f.steps9999,
                                                     refuse=False),
        from_png("A1111 naming a model path", f.model_path, refuse=False),
        from_png("quadratic-parse A1111 text", f.quadratic, refuse=False),
        att("valid: 1 step, --npz", "--npz", str(f.work / "cli" / "maps.npz"), refuse=False, control=True),
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
        att("/dev/full", "--npz", "/dev/full"), att("a folder", "--npz", str(f.work)),
        att(".jpg", "--image", str(f.work / "cli" / "img.jpg")), att(".jpg", "--output", str(f.work / "cli" / "f.jpg")),
        att("empty", "--prompt", ""), att("spaces", "--prompt", "   "),
        att("with guidance off (no negative maps)", "--negative", "--guidance", "1"),
        att("a word not in the (empty) negative prompt", "--negative", "--words", "nope"),
        att("0", "--steps", "0"),
    ]


def run_cli_case(case: Case, work: Path, timeout: float) -> Outcome:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "imagecraft", *case.input], cwd=work, env=env,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(case, "hang", f"no exit in {timeout:.0f} s", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    err = proc.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    if proc.returncode < 0:
        return Outcome(case, "crash", f"killed by signal {-proc.returncode}", seconds)
    if "Traceback (most recent call last)" in err:
        return Outcome(case, "traceback", lines[-1] if lines else "", seconds)
    if proc.returncode == 0:
        printed = proc.stdout.decode("utf-8", "replace").strip().splitlines()
        return Outcome(case, classify(case, False, ""), f"worked: {short(printed[-1] if printed else '', 90)}",
                       seconds)
    errors = [line for line in lines if "error:" in line]
    if proc.returncode == 2 and errors:
        by = "argparse" if "usage:" in err else "ours"
        return Outcome(case, classify(case, True, errors[-1]), errors[-1], seconds, by)
    return Outcome(case, "generic", f"exit status {proc.returncode}: {lines[-1] if lines else ''}", seconds)


# --- the Python entrance ----------------------------------------------------------------------------------------------
def py(target: str, *args, **kwargs):
    return (target, args, kwargs)


def python_cases(f: SimpleNamespace) -> list[Case]:
    import numpy as np
    import torch

    def case(what, description, inp, refuse=True, control=False):
        return Case("python", what, description, inp, refuse, control=control)

    def call(description, refuse=True, control=False, **kwargs):
        what = "pipe(" + ", ".join(kwargs) + ")" if kwargs else "pipe()"
        return case(what, description, py("call", **kwargs), refuse, control)

    def config(description, refuse=True, **kwargs):
        return case("UNetConfig(" + ", ".join(kwargs) + ")", description, py("config", **kwargs), refuse)

    def maps(method, description, *args, refuse=True, **kwargs):
        return case(f"maps.{method}", description, py(method, *args, **kwargs), refuse)

    def load(description, path, refuse=True):
        return case("AttentionMaps.load", description, py("load", str(path)), refuse)

    def pretrained(description, *args, refuse=True, **kwargs):
        return case("from_pretrained", description, py("from_pretrained", *args, **kwargs), refuse)

    return [
        call("valid: 1 step", refuse=False, control=True),
        call("None", prompt=None), call("int", prompt=5), call("empty list", prompt=[]), call("[5]", prompt=[5]),
        call("lone surrogate", prompt="a red \ud800 circle", refuse=None),
        call("lone surrogate", negative_prompt="\udfff", refuse=None),
        call("65 prompts (over 64)", prompt=["a"] * 65), call("4,001 characters", prompt="a" * 4001),
        call("a tuple of 2 prompts", prompt=("a", "b"), refuse=False), call("dict", prompt={"a": 1}),
        call("int", negative_prompt=5), call("list", negative_prompt=["a"]),
        call("4,001 characters", negative_prompt="a" * 4001), call("None", negative_prompt=None, refuse=False),
        call("bool", num_inference_steps=True), call("string '25'", num_inference_steps="25"),
        call("2.5", num_inference_steps=2.5), call("0", num_inference_steps=0), call("151", num_inference_steps=151),
        call("np.int64(1)", num_inference_steps=np.int64(1), refuse=False),
        call("np.float64(1.0)", num_inference_steps=np.float64(1.0), refuse=False),
        call("np.float32(2.5)", num_inference_steps=np.float32(2.5)),
        call("torch.tensor(1)", num_inference_steps=torch.tensor(1), refuse=None),
        call("10**30", num_inference_steps=10**30), call("NaN", num_inference_steps=float("nan")),
        call("NaN", guidance_scale=float("nan")), call("inf", guidance_scale=float("inf")),
        call("-1", guidance_scale=-1), call("31", guidance_scale=31), call("string '7'", guidance_scale="7"),
        call("None", guidance_scale=None), call("bool", guidance_scale=True),
        call("Decimal('7')", guidance_scale=Decimal("7"), refuse=None),
        call("np.float32(5.0)", guidance_scale=np.float32(5.0), refuse=False),
        call("Fraction(15, 2)", guidance_scale=Fraction(15, 2), refuse=False),
        call("-1", seed=-1), call("2**32", seed=2**32), call("1.5", seed=1.5), call("bool", seed=True),
        call("string '1'", seed="1"), call("np.uint64(2**63)", seed=np.uint64(2**63)),
        call("None (random)", seed=None, refuse=False), call("np.int64(5)", seed=np.int64(5), refuse=False),
        call("100", width=100), call("63", width=63), call("2049", width=2049), call("0", width=0),
        call("-64", width=-64), call("None (the model's)", width=None, refuse=False),
        call("72", width=72, refuse=False), call("string '64'", width="64"),
        call("np.int32(64)", width=np.int32(64), refuse=False),
        call("0", num_images=0), call("17", num_images=17), call("bool", num_images=True), call("2.5", num_images=2.5),
        call("string '2'", num_images="2"), call("np.int64(2)", num_images=np.int64(2), refuse=False),
        call("unknown 'karras_magic'", scheduler="karras_magic"), call("int", scheduler=5),
        call("list", scheduler=["euler"]), call("A1111 'Euler a'", scheduler="Euler a", refuse=False),
        call("A1111 'DPM++ 2M Karras'", scheduler="DPM++ 2M Karras", refuse=False),
        call("'' (the model's)", scheduler="", refuse=False),
        call("an int, not callable", callback=5), call("a function of no arguments", callback=lambda: None),
        call("string 'yes'", attention="yes"), call("1", attention=1),
        call("np.True_", attention=np.True_, refuse=None),
        call("with an empty prompt", attention=True, prompt=""),
        call("unknown keyword 'foo'", foo=1),
        call("2 prompts with num_images=3 (ignored, documented)", prompt=["a", "b"], num_images=3, refuse=False),
        case("UNetConfig.sd15()", "valid", py("config_sd15"), False, control=True),
        config("0", in_channels=0), config("-1", in_channels=-1), config("bool", in_channels=True),
        config("4.0", in_channels=4.0), config("string '4'", in_channels="4"), config("None", in_channels=None),
        config("np.int64(4)", in_channels=np.int64(4), refuse=False),
        config("0", model_channels=0), config("33 (not divisible by 32 groups)", model_channels=33),
        config("()", channel_mult=()), config("string '124'", channel_mult="124"), config("(1, 2.5)",
                                                                                          channel_mult=(1, 2.5)),
        config("(1, 0)", channel_mult=(1, 0)), config("int 5", channel_mult=5),
        config("list [1, 2, 4, 4]", channel_mult=[1, 2, 4, 4], refuse=False),
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
        maps("segment", "threshold=2", ["blue"], threshold=2), maps("segment", "threshold=NaN", ["blue"],
                                                                     threshold=float("nan")),
        maps("segment", "threshold='0.4'", ["blue"], threshold="0.4"),
        maps("segment", "a string, not a list", "blue"),
        load("valid", f.maps_good, refuse=False), load("nonexistent", f.work / "nope.npz"), load("a folder", f.work),
        load("a PNG", f.plain), load("random bytes", f.maps_random), load("empty file", f.maps_empty),
        load("truncated .npz", f.maps_truncated), load("no meta", f.work / "maps-nometa.npz"),
        load("meta not JSON", f.work / "maps-notjson.npz"), load("meta a JSON list", f.work / "maps-list.npz"),
        load("meta with layers=5", f.work / "maps-layers.npz"), load("an object (pickle) array",
                                                                     f.work / "maps-object.npz"),
        pretrained("valid: the built-in model", refuse=False),
        pretrained("nonexistent path", "/no/such/model"), pretrained("/etc", "/etc"),
        pretrained("pickle .ckpt", str(f.evil[".ckpt"])), pretrained("pickle named .safetensors",
                                                                     str(f.evil[".safetensors"]), config="default"),
        pretrained("random .safetensors, no config", str(f.random_st)),
        pretrained("random .safetensors, config built-in", str(f.random_st), config="default"),
        pretrained("unrelated .safetensors, config built-in", str(f.unrelated), config="default"),
        pretrained("partial LDM .safetensors, config built-in", str(f.ldm_partial), config="default"),
        pretrained("1 TB header, config built-in", str(f.huge_header), config="default"),
        pretrained("unrelated .safetensors, config /etc", str(f.unrelated), config="/etc"),
        pretrained("unrelated .safetensors, config a Hub id offline", str(f.unrelated), config="nobody/nothing"),
        pretrained("Hub id offline", "nobody/nothing"), pretrained("int 5", 5), pretrained("list", ["a"]),
        pretrained("empty string (the current folder)", ""),
        pretrained("999-character file name", "a" * 999), pretrained("NUL byte", "a\x00b"),
        pretrained("folder with only model_index.json", str(f.fake_index)),
        pretrained("folder with a broken unet/config.json", str(f.fake_badjson)),
        pretrained("folder whose unet has only a pickle", str(f.fake_pickle)),
        pretrained("folder whose unet config mismatches its weights", str(f.fake_shapes)),
        pretrained("device 'tpu'", device="tpu"), pretrained("device 'cuda' (absent here)", device="cuda"),
        pretrained("device 'cuda:7'", device="cuda:7"), pretrained("device 'CPU'", device="CPU"),
        pretrained("device 5", device=5), pretrained("dtype 'fp8'", dtype="fp8"), pretrained("dtype 5", dtype=5),
        pretrained("dtype [1]", dtype=[1]), pretrained("dtype torch.int8", dtype=torch.int8),
        case("ModelCache(allowed=['default']).get", "valid: 'default'", py("cache", "default"), False),
        case("ModelCache(allowed=['default']).get", "/etc", py("cache", "/etc")),
        case("ModelCache(allowed=['default']).get", "nonexistent path", py("cache", "/no/such/model")),
        case("ModelCache(allowed=['default']).get", "pickle", py("cache", str(f.evil[".ckpt"]))),
        case("ModelCache(allowed=['default']).get", "Hub id", py("cache", "nobody/nothing")),
        case("pipe.reproduce", "PNG without metadata", py("reproduce", str(f.plain))),
        case("pipe.reproduce", "zTXt bomb", py("reproduce", str(f.ztxt_bomb))),
        case("pipe.reproduce", "JSON without a prompt", py("reproduce", str(f.json_noprompt))),
        case("pipe.reproduce", "a JPEG", py("reproduce", str(f.jpeg))),
        case("pipe.reproduce", "nonexistent file", py("reproduce", str(f.work / "nope.png"))),
        case("pipe.reproduce", "quadratic-parse A1111 text (1 step)", py("reproduce", str(f.quadratic)), False),
    ]


def python_targets(f: SimpleNamespace) -> dict[str, Callable]:
    from imagecraft.explain.maps import AttentionMaps
    from imagecraft.pipeline import ImageCraftPipeline
    from imagecraft.serve.models import ModelCache
    from imagecraft.unet import UNetConfig

    pipe = ImageCraftPipeline.from_pretrained()
    maps = AttentionMaps.load(f.maps_good)
    unguided = pipe("a blue square above a green triangle", seed=7, num_inference_steps=2, guidance_scale=1.0,
                    attention=True).attention[0]
    cache = ModelCache(allowed=["default"])
    base = dict(prompt="a red circle", num_inference_steps=1, seed=1)
    return {
        "call": lambda **kw: pipe(**{**base, **kw}),
        "config": lambda **kw: UNetConfig(**kw),
        "config_sd15": lambda: UNetConfig.sd15(),
        "word": maps.word, "token": maps.token, "at": maps.at, "segment": maps.segment,
        "word_unguided": unguided.word,
        "load": AttentionMaps.load,
        "from_pretrained": ImageCraftPipeline.from_pretrained,
        "cache": cache.get,
        "reproduce": pipe.reproduce,
    }


def run_python_case(case: Case, targets: dict, timeout: float) -> Outcome:
    import warnings

    target, args, kwargs = case.input
    box = {}

    def work():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                box["result"] = targets[target](*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 (classified below)
            box["error"] = e

    start = time.perf_counter()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    seconds = time.perf_counter() - start
    if thread.is_alive():
        return Outcome(case, "hang", f"no return in {timeout:.0f} s", seconds)
    error = box.get("error")
    if error is None:
        return Outcome(case, classify(case, False, ""), f"worked: {describe(box.get('result'))}", seconds)
    message = f"{type(error).__name__}: {error}"
    signature = isinstance(error, TypeError) and re.search(r"unexpected keyword argument|required positional",
                                                            str(error))
    if isinstance(error, (ValueError, FileNotFoundError)) or signature:
        return Outcome(case, classify(case, True, message), message, seconds, "python" if signature else "ours")
    return Outcome(case, "traceback", message, seconds)


def describe(result) -> str:
    if hasattr(result, "images"):
        return f"{len(result.images)} image(s)"
    if hasattr(result, "shape"):
        return f"array {tuple(result.shape)}"
    return short(type(result).__name__ if hasattr(result, "__dict__") else result, 90)


# --- the table --------------------------------------------------------------------------------------------------------
def print_header(entrance: str):
    print(f"\n== {entrance} ==")
    print(f"{'#':>3}  {'expect':6} {'outcome':9} {'by':8} {'s':>6} {'tb':>2}  case  ->  message or result")


def print_row(i: int, o: Outcome):
    expect = {True: "refuse", False: "work", None: "either"}[o.case.refuse]
    tb = str(o.server_tracebacks) if o.case.entrance == "app" else ""
    line = (f"{i:>3}  {expect:6} {o.kind:9} {o.by:8} {o.seconds:6.2f} {tb:>2}  {o.case.what}: "
            f"{o.case.description}  ->  {short(o.message, 140)}")
    print(line, flush=True)


def summary(outcomes: list[Outcome]) -> list[str]:
    bad = [o for o in outcomes if not o.case.control]
    controls = [o for o in outcomes if o.case.control]
    must = [o for o in bad if o.case.refuse is True]
    sentences = [o for o in must if o.kind == "sentence"]
    by = {who: sum(o.by == who for o in sentences) for who in ("ours", "gradio", "argparse", "python")}
    accepted = [o.case.label for o in bad if o.kind == "accepted"]
    other = [f"{o.case.label} ({o.kind})" for o in bad if o.kind not in ("sentence", "ok", "accepted")]
    lines = [f"{len(bad)} bad-input kinds, {len(must)} should be refused: {len(sentences)} refused with a clear "
             f"sentence ({', '.join(f'{v} {k}' for k, v in by.items() if v)}); accepted: {accepted}; other: {other}"]
    rest = [o for o in bad if o.case.refuse is not True]
    lines.append(f"{len(rest)} odd but valid (or either-way) inputs: "
                 + ", ".join(f"{sum(o.kind == k for o in rest)} {k}" for k in sorted({o.kind for o in rest})))
    failed = [f"{o.case.label} ({o.kind}: {short(o.message, 80)})" for o in controls if o.kind != "ok"]
    lines.append(f"{len(controls)} valid controls: {len(controls) - len(failed)} worked" +
                 (f"; failed: {failed}" if failed else ""))
    app = [o for o in outcomes if o.case.entrance == "app"]
    if app:
        logged = [o for o in app if o.server_tracebacks]
        expected = [o for o in logged if o.kind in ("sentence", "ok") or o.case.refuse is True]
        lines.append(f"app server: {sum(o.server_tracebacks for o in app)} tracebacks logged in {len(logged)} of "
                     f"{len(app)} app cases ({len(expected)} of them expected user errors); "
                     f"{sum(o.log_lines for o in app)} one-line 'refused:' log entries")
    return lines


def probe(args, work: Path, f: SimpleNamespace) -> list[Outcome]:
    outcomes = []
    if "app" in args.entrance:
        outcomes += probe_app(f, args.timeout)
    if "cli" in args.entrance:
        print_header("cli")
        for i, case in enumerate(cli_cases(f), 1):
            outcome = run_cli_case(case, work, args.timeout)
            outcomes.append(outcome)
            print_row(i, outcome)
    if "python" in args.entrance:
        targets = python_targets(f)
        print_header("python")
        for i, case in enumerate(python_cases(f), 1):
            outcome = run_python_case(case, targets, args.timeout)
            outcomes.append(outcome)
            print_row(i, outcome)
    print(f"\npickle marker {f.marker} {'EXISTS: a pickle was loaded' if f.marker.exists() else 'never created'}")
    print("\n== summary by entrance ==")
    for entrance in ("app", "cli", "python"):
        some = [o for o in outcomes if o.case.entrance == entrance]
        if some:
            counts = {k: sum(o.kind == k for o in some) for k in
                      ("sentence", "ok", "accepted", "generic", "traceback", "hang", "crash")}
            print(f"{entrance:7} {len(some):4} cases: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    print()
    for line in summary(outcomes):
        print(line)
    garbled = [f"{o.case.label}: {short(o.message, 100)}" for o in outcomes if o.kind == "sentence"
               and GARBLED.search(o.message)]
    print(f"{len(garbled)} sentences that read wrong (an empty 'must be , ', or HTML entities):")
    for line in garbled:
        print(f"  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(entrance=o.case.entrance, what=o.case.what,
                                                    description=o.case.description, refuse=o.case.refuse,
                                                    control=o.case.control, outcome=o.kind, by=o.by,
                                                    seconds=round(o.seconds, 3), message=o.message,
                                                    server_tracebacks=o.server_tracebacks) for o in outcomes],
                                              indent=1))
    return outcomes


# --- a server in a subprocess (stall, memory, disk) -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python app.py` on a free port, its output in a log file; `rss_mb()` reads its VmRSS."""

    def __init__(self, work: Path, name: str, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = work / f"server-{name}.log"
        self.env = dict(os.environ, GRADIO_SERVER_PORT=str(self.port), PYTHONUNBUFFERED="1", **env)

    def __enter__(self):
        self.out = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while not server_alive(self.url):
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"app.py did not start; see {self.log}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def tracebacks(self) -> int:
        return count_tracebacks(self.log.read_text(errors="replace"))


def load() -> str:
    """The machine's load: on a shared machine, other work shows up in every latency."""
    return "load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + \
        f" on {os.cpu_count()} cores"


def client_for(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def attempt(client, api_name: str, **kwargs) -> str:
    """Calls the API; 'ok' or the refusal's message."""
    try:
        client.predict(api_name=api_name, **kwargs)
        return "ok"
    except Exception as e:  # noqa: BLE001 (a refusal is what is expected here)
        return f"{type(e).__name__}: {e}"


# --- stall ------------------------------------------------------------------------------------------------------------
class Pinger(threading.Thread):
    """Calls /random_seed every `every` seconds and keeps (start, latency) of each call."""

    def __init__(self, url: str, every: float = 0.05):
        super().__init__(daemon=True)
        self.client, self.every = client_for(url), every
        self.pings: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            start = time.perf_counter()
            try:
                self.client.predict(api_name="/random_seed")
            except Exception:  # noqa: BLE001 (a failed ping counts with its latency)
                pass
            latency = time.perf_counter() - start
            self.pings.append((start, latency))
            time.sleep(max(0.0, self.every - latency))

    def during(self, start: float, stop: float) -> list[float]:
        """Latencies of the pings that overlapped [start, stop]."""
        return [lat for t, lat in list(self.pings) if t <= stop and t + lat >= start]


def stall(args, work: Path, f: SimpleNamespace):
    from gradio_client import handle_file

    print("\n== stall: worst /random_seed latency (pinged every 50 ms) while one hostile request is served ==")
    print(load())
    tmp = work / "stall-tmp"
    outputs = tmp / "imagecraft-outputs"
    outputs.mkdir(parents=True)
    with Server(work, "stall", IMAGECRAFT_CONCURRENCY="2", TMPDIR=str(tmp),
                GRADIO_TEMP_DIR=str(work / "stall-gradio")) as server:
        client = client_for(server.url)
        attempt(client, "/generate", prompt="warm up", steps=1)
        pinger = Pinger(server.url)
        pinger.start()
        time.sleep(6)
        quiet = [lat for _, lat in pinger.pings[10:]]
        base_median, base_max = statistics.median(quiet), max(quiet)
        print(f"quiet baseline: {len(quiet)} pings, median {base_median * 1000:.0f} ms, "
              f"p95 {sorted(quiet)[int(0.95 * len(quiet))] * 1000:.0f} ms, max {base_max * 1000:.0f} ms")
        hostile = [
            ("quadratic-parse PNG via /read_png", "/read_png", dict(file=handle_file(str(f.quadratic)))),
            ("zTXt bomb via /read_png", "/read_png", dict(file=handle_file(str(f.ztxt_bomb)))),
            ("1M-character prompt via /generate", "/generate", dict(prompt="a " * 500_000, steps=1)),
            ("2048x2048 x 16 x 150 via /generate", "/generate", dict(prompt="a", width=2048, height=2048,
                                                                     num_images=16, steps=150)),
            ("bad model path via /load_model", "/load_model", dict(model="/no/such/model")),
            ("pickle model via /load_model", "/load_model", dict(model=str(f.evil[".ckpt"]))),
            ("20 MB PNG without settings via /read_png", "/read_png", dict(file=handle_file(str(f.big)))),
            ("PNG of 100,001 chunks via /read_png", "/read_png", dict(file=handle_file(str(f.many_chunks)))),
            ("JSON chunk nested 60,000 deep via /read_png", "/read_png", dict(file=handle_file(str(f.json_deep)))),
            ("reference, its own work: a valid 25-step generation", "/generate", dict(prompt="a red circle",
                                                                                       steps=25)),
            ("1-step /generate with 10,000 earlier outputs kept", "/generate", dict(prompt="a red circle", steps=1)),
        ]
        print(f"{'request':52} {'own s':>6} {'pings':>5} {'worst ping':>10} {'stall':>7}  answer")
        worst_stall, worst_name = 0.0, ""
        for name, api_name, kwargs in hostile:
            if "10,000 earlier outputs" in name:  # what service.prune scans before every generation
                for i in range(10_000):
                    (outputs / f"old-{i:05d}").mkdir()
                    (outputs / f"old-{i:05d}" / "imagecraft-1.png").write_bytes(bytes(5600))
            runs = []
            for _ in range(args.stall_repeats):
                time.sleep(1.0)
                start = time.perf_counter()
                answer = attempt(client, api_name, **kwargs)
                stop = time.perf_counter()
                time.sleep(0.5)  # pings still in flight at `stop` finish
                during = pinger.during(start, stop)
                runs.append((stop - start, len(during), max(during) if during else float("nan"), answer))
            own, count, worst, answer = max(runs, key=lambda r: r[2])
            excess = worst - base_median
            if not name.startswith("reference") and excess > worst_stall:
                worst_stall, worst_name = excess, name
            print(f"{name:52} {own:6.2f} {count:5d} {worst * 1000:8.0f} ms {excess:6.2f}s  {short(answer, 70)}")
        pinger.done.set()
        pinger.join()
        print(f"worst stall from one request other than its own generation (worst ping minus the quiet median): "
              f"{worst_stall:.2f} s, {worst_name} (target <= 0.5 s: {'met' if worst_stall <= 0.5 else 'MISSED'}); "
              f"server tracebacks logged: {server.tracebacks()}")


# --- memory -----------------------------------------------------------------------------------------------------------
def memory(args, work: Path, f: SimpleNamespace):
    print("\n== memory: server RSS over 100 /load_model calls with spellings of the built-in folder ==")
    print(load())
    builtin = str(DEFAULT_MODEL)
    spellings = [builtin, builtin + "/", builtin + "//", builtin + "/.", "./assets/shapes-sd", "././assets/shapes-sd",
                 "assets/shapes-sd/", "assets//shapes-sd", "assets/../assets/shapes-sd", str(f.link_builtin),
                 str(f.link_builtin) + "/", "default", " default ", BUILTIN, "",
                 "~/" + os.path.relpath(DEFAULT_MODEL, Path.home())]
    copy = work / "shapes-sd-copy"
    shutil.copytree(DEFAULT_MODEL, copy)
    with Server(work, "memory") as server:
        client = client_for(server.url)
        attempt(client, "/load_model", model=BUILTIN)
        attempt(client, "/generate", prompt="warm up", steps=1)
        before = server.rss_mb()
        answers, marks, timings = [], {}, []
        for i in range(100):
            try:
                start = time.perf_counter()
                status = client.predict(spellings[i % len(spellings)], api_name="/load_model")[0]
                timings.append(time.perf_counter() - start)
                answers.append("shapes-sd" in status)
            except Exception as e:  # noqa: BLE001
                answers.append(False)
                print(f"  {spellings[i % len(spellings)]!r} refused: {short(str(e), 100)}")
            if i + 1 in (10, 50, 100):
                marks[i + 1] = server.rss_mb()
        print(f"{len(spellings)} spellings, cycled: {sum(answers)} of 100 loaded the built-in model")
        print(f"RSS before {before:.0f} MB; after 10 calls {marks[10]:.0f} MB, 50 {marks[50]:.0f} MB, "
              f"100 {marks[100]:.0f} MB (growth {marks[100] - before:+.1f} MB)")
        attempt(client, "/load_model", model=str(copy))
        with_copy = server.rss_mb()
        one_copy = with_copy - marks[100]
        print(f"yardstick: loading a copy of the folder (one more model) adds {one_copy:.1f} MB -> "
              f"{'met' if marks[100] - before < one_copy else 'MISSED'} (100 plain spellings grew by less than one "
              f"copy)")
        config_spellings = ["default | default", f"{builtin} | default", "default | ||"] + [
            f"default | x{i}" for i in range(57)]  # "| CONFIG" is ignored for a folder, but keys the cache
        seconds, rss, loaded = [], [], 0
        for i, spelling in enumerate(config_spellings, 1):
            start = time.perf_counter()
            loaded += attempt(client, "/load_model", model=spelling) == "ok"
            seconds.append(time.perf_counter() - start)
            if i % 20 == 0:
                rss.append(f"after {i}: {server.rss_mb():.0f} MB")
        print(f"then {len(config_spellings)} spellings with a '| CONFIG' suffix ('default | default', "
              f"'default | x0', ...): {loaded} loaded, {len(config_spellings) - loaded} refused; "
              f"{statistics.median(seconds):.2f} s median per call (a plain spelling: "
              f"{statistics.median(timings):.2f} s, from the cache); RSS {', '.join(rss)} "
              f"({server.rss_mb() - with_copy:+.1f} MB); server tracebacks logged: {server.tracebacks()}")


# --- disk -------------------------------------------------------------------------------------------------------------
def folder_size(folder: Path) -> tuple[float, int]:
    """(MB, files) of everything under `folder`; files removed meanwhile are skipped."""
    total, count = 0, 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
                count += 1
            except OSError:
                pass
    return total / 2**20, count


def disk(args, work: Path, f: SimpleNamespace):
    from concurrent.futures import ThreadPoolExecutor

    n = args.disk_requests
    cap = args.disk_mb
    print(f"\n== disk: {n} /generate requests (1 step, 64x64) with IMAGECRAFT_OUTPUT_MB={cap:g} ==")
    print(load())
    tmp, cache = work / "disk-tmp", work / "disk-gradio"
    tmp.mkdir()
    cache.mkdir()
    outputs = tmp / "imagecraft-outputs"
    with Server(work, "disk", TMPDIR=str(tmp), GRADIO_TEMP_DIR=str(cache), IMAGECRAFT_OUTPUT_MB=f"{cap:g}",
                IMAGECRAFT_CONCURRENCY="2") as server:
        peaks = {"outputs": 0.0, "cache": 0.0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                peaks["outputs"] = max(peaks["outputs"], folder_size(outputs)[0])
                peaks["cache"] = max(peaks["cache"], folder_size(cache)[0])
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        clients = [client_for(server.url), client_for(server.url)]
        failures = []
        start = time.perf_counter()

        def one(i):
            answer = attempt(clients[i % 2], "/generate", prompt=f"a red circle {i}", steps=1, seed=i)
            if answer != "ok":
                failures.append(answer)
            if (i + 1) % 100 == 0:
                print(f"  {i + 1} requests, {time.perf_counter() - start:.0f} s: outputs "
                      f"{folder_size(outputs)[0]:.2f} MB, Gradio cache {folder_size(cache)[0]:.2f} MB", flush=True)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, range(n)))
        done.set()
        sampler.join()
        seconds = time.perf_counter() - start
        (out_mb, out_files), (cache_mb, cache_files) = folder_size(outputs), folder_size(cache)
        peaks = {k: max(v, out_mb if k == "outputs" else cache_mb) for k, v in peaks.items()}
        print(f"{n} requests in {seconds:.0f} s ({n / seconds:.1f}/s), {len(failures)} failed"
              + (f" (first: {short(failures[0], 100)})" if failures else ""))
        print(f"imagecraft-outputs: {out_mb:.2f} MB in {out_files} files at the end, at most {peaks['outputs']:.2f} MB "
              f"(cap {cap:g} MB, plus one request's files: {'met' if peaks['outputs'] <= cap + 0.1 else 'MISSED'})")
        print(f"Gradio cache (GRADIO_TEMP_DIR): {cache_mb:.2f} MB in {cache_files} files at the end, at most "
              f"{peaks['cache']:.2f} MB ({cache_mb / n * 1024:.1f} KB per request; the app prunes it to the cap "
              f"but keeps files under five minutes old, and delete_cache sweeps hourly); "
              f"server tracebacks logged: {server.tracebacks()}")
    prune_cost(outputs.parent / "prune-10k", 10_000)


def prune_cost(root: Path, entries: int):
    """What `service.prune` (run on both folders before every generation) costs as the folders fill: it stats every
    entry, so its time grows with the outputs kept (up to IMAGECRAFT_OUTPUT_MB, default 500 MB, and one hour)."""
    from imagecraft.serve import outputs as service  # where prune lives

    if not hasattr(service, "prune"):
        return
    root.mkdir()
    for i in range(entries):
        (root / f"{i:05d}").mkdir()
        (root / f"{i:05d}" / "imagecraft-1.png").write_bytes(bytes(5600))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        service.prune(root)
        times.append(time.perf_counter() - start)
    print(f"service.prune over {entries:,} output folders (nothing to delete): {statistics.median(times):.2f} s "
          f"median of 3, paid twice per /generate (outputs and Gradio's cache); 500 MB of 64x64 PNGs is ~90,000")


# --- main -------------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def code_state() -> str:
    """The commit measured, and the files changed since it with a hash of the changes (another developer may be
    editing the checkout while this runs: the CLI cases and the servers import the code as it is then)."""
    import hashlib

    git = lambda *cmd: subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout  # noqa: E731
    changed = [line[3:] for line in git("status", "--short", "--untracked-files=no").splitlines()]
    diff = hashlib.sha256(git("diff", "HEAD").encode()).hexdigest()[:8]
    return git("rev-parse", "--short", "HEAD").strip() + (
        f" with uncommitted changes (diff {diff}) in {', '.join(changed)}" if changed else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=["probe", "stall", "memory", "disk"],
                        default=["probe", "stall", "memory", "disk"])
    parser.add_argument("--entrance", nargs="+", choices=["app", "cli", "python"], default=["app", "cli", "python"])
    parser.add_argument("--timeout", type=float, default=60, help="seconds per case before it counts as a hang")
    parser.add_argument("--stall-repeats", type=int, default=3, help="times each hostile request is sent")
    parser.add_argument("--disk-requests", type=int, default=1000)
    parser.add_argument("--disk-mb", type=float, default=5, help="IMAGECRAFT_OUTPUT_MB for the disk run")
    parser.add_argument("--json", default=None, help="also write the probe's outcomes to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, files made)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imagecraft-probe-"))
    (work / "tmp").mkdir()
    tempfile.tempdir = str(work / "tmp")  # this process's outputs (imagecraft-outputs) stay in the work folder
    os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")  # and Gradio's cache of the in-process app
    import torch
    import gradio
    from imagecraft.pipeline import ImageCraftPipeline

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), gradio {gradio.__version__}; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}; work {work}")
    started_on = code_state()
    print(f"code: {started_on}")
    try:
        f = make_files(work, ImageCraftPipeline.from_pretrained())
        if "probe" in args.only:
            probe(args, work, f)
        if "stall" in args.only:
            stall(args, work, f)
        if "memory" in args.only:
            memory(args, work, f)
        if "disk" in args.only:
            disk(args, work, f)
        ended_on = code_state()
        print(f"\ncode at the end: {ended_on}" + ("" if ended_on == started_on else
                                                 " -- CHANGED during the run: the parts mix two versions"))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
