"""What the app's buttons do, without Gradio: a shared model cache, generation to PNG files, PNG restore, and
the Attention tab's explain and redraws.

`app.py` holds only the layout and the wiring; every action it exposes is a function here, testable on its own.
State is per call: the only module-level object is the model cache, which holds loaded models, never results.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from .explain.maps import DEFAULT_BLOCKS, AttentionMaps
from .loading import DEFAULT_MODEL
from .png import pipeline_settings, restore_settings
from .pipeline import MAX_SEED, ImageCraftPipeline
from .settings import DEFAULT_STEPS, check, check_cost, shown

BUILTIN = "built-in shapes model"
OUTPUT_ROOT = Path(tempfile.gettempdir()) / "imagecraft-outputs"


class ModelCache:
    """Loaded pipelines, shared by all users and requests, each loaded once (concurrent first requests wait).

    Keyed on what a source resolves to (a folder's real path, a Hub id), so spellings of one folder share one copy,
    and least-recently-used models beyond `max_models` (IMAGECRAFT_MAX_MODELS, default 2) are dropped. With an
    allowlist (IMAGECRAFT_MODELS: comma-separated folders or Hub ids, "default" for the built-in model) it loads
    only those, and its errors never say what exists on the server's disk.
    """

    def __init__(self, device: str | None = None, dtype=None, max_models: int | None = None,
                 allowed: list[str] | None = None):
        self.device, self.dtype = device, dtype
        self.max_models = max_models or int(os.environ.get("IMAGECRAFT_MAX_MODELS", "2"))
        if allowed is None and os.environ.get("IMAGECRAFT_MODELS"):
            allowed = [a.strip() for a in os.environ["IMAGECRAFT_MODELS"].split(",") if a.strip()]
        self.allowed = {self._parse(a)[2]: a for a in allowed} if allowed else None
        self._pipes: OrderedDict[str, ImageCraftPipeline] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @property
    def choices(self) -> list[str]:
        """What the model box offers: the allowlist when there is one."""
        if self.allowed is None:
            return [BUILTIN]
        return [BUILTIN if k == "default" else name for k, name in self.allowed.items()]

    @staticmethod
    def key(source: str | None) -> str:
        """"default" for the built-in model, the resolved path for a local folder or file, else the text (a Hub id)."""
        source = (str(source) if source is not None else "").strip()
        if source in ("", "default", BUILTIN):
            return "default"
        try:
            path = Path(source).expanduser()
            if path.exists():
                resolved = path.resolve()
                return "default" if resolved == DEFAULT_MODEL.resolve() else str(resolved)
        except (OSError, ValueError, RuntimeError):  # not a path this system can have (a NUL byte, too long, ~user)
            pass
        return source

    def get(self, source: str | None) -> ImageCraftPipeline:
        """The pipeline for `source`: the built-in model (None, "", "default"), a folder, a Hub id, or a single
        `.safetensors` file with its config as "FILE.safetensors | CONFIG" (a diffusers folder or Hub id of the
        same SD version, which supplies the tokenizer and configs)."""
        if source is not None and not isinstance(source, str):
            raise ValueError(f"the model must be a name, a path or a Hub id, got {type(source).__name__}")
        if source is not None and len(source) > 1000:
            raise ValueError("the model name is too long (over 1,000 characters)")
        source, config, key = self._parse(source)
        if self.allowed is not None and key not in self.allowed:
            raise ValueError(f"this server serves only these models: {', '.join(self.choices)}")
        with self._guard:
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._pipes:
                    return self._pipes[key]
            try:
                pipe = ImageCraftPipeline.from_pretrained(self.key(source), device=self.device, dtype=self.dtype,
                                                          config=self.key(config) if config else None)
            except (ValueError, OSError) as e:
                with self._guard:
                    self._locks.pop(key, None)  # failed names leave nothing behind
                if self.allowed is not None:  # a public server does not describe its disk
                    raise ValueError(f"the model {source!r} could not be loaded") from e
                raise
            with self._guard:
                self._pipes[key] = pipe
                while len(self._pipes) > self.max_models:
                    self._pipes.popitem(last=False)  # requests still running keep their own reference
            return pipe

    def _parse(self, text: str | None) -> tuple[str, str | None, str]:
        """(source, config or None, cache key) of what the model box holds: a source, or "FILE | CONFIG"."""
        source, bar, config = (text or "").partition("|")
        config = config.strip() or None
        if bar and (config is None or not source.strip().endswith(".safetensors")):
            raise ValueError("'FILE | CONFIG' names a single .safetensors file and, after the bar, the folder or Hub "
                             "id of its SD version; for a folder or a Hub id give it alone")
        return source, config, self.key(source) + (f" | {self.key(config)}" if config else "")

    def __len__(self) -> int:
        return len(self._pipes)

    def source(self, text: str | None) -> str | None:
        """What `text` names, for a fine-tune to load its own copy from: None for the built-in model, else the
        resolved folder or Hub id; checked against the allowlist, loading nothing."""
        source, config, key = self._parse(text)
        if self.allowed is not None and key not in self.allowed:
            raise ValueError(f"this server serves only these models: {', '.join(self.choices)}")
        if config:
            raise ValueError("fine-tuning takes a diffusers folder or Hub id, not a single .safetensors file")
        return None if key == "default" else key

    def allow(self, folder: Path) -> str:
        """Adds a model this server trained (a full fine-tune's folder) to the allowlist, if there is one; returns
        the name to pick it by."""
        name = str(Path(folder).resolve())
        if self.allowed is not None:
            self.allowed[self.key(name)] = name
        return name


def pick_seed(seed) -> int:
    """A seed from the UI: -1 or empty means a fresh random one (AUTOMATIC1111's convention); otherwise it is
    checked like any seed."""
    if seed is None or seed == "" or (isinstance(seed, (int, float)) and not isinstance(seed, bool) and seed == -1):
        return random.randint(0, MAX_SEED - 16)
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
             guidance: float = 7.5, seed: int = -1, scheduler: str | None = None, width: int | None = None,
             height: int | None = None, num_images: int = 1, progress: Callable | None = None,
             should_stop: Callable | None = None, lora: str | None = None, lora_scale: float = 1.0,
             trusted_paths: bool = True, cache_interval: int | None = None):
    """Generates and writes each image as a PNG with its metadata to a fresh folder of its own.

    Every value is checked by `imagecraft.settings` (the same schema as the API and CLI), and the request's
    width x height x steps x images must be within `settings.max_cost`. Returns (PNG paths, the first seed,
    warnings). `progress(step, total)` is called after each sampling step; `should_stop()` too, and when it says
    yes sampling stops there (`Cancelled`). `lora` (a file or folder; only this server's fine-tunes unless
    `trusted_paths`) applies at `lora_scale` for this request only: the shared model is left as it was.
    """
    _check_text(prompt=prompt, negative_prompt=negative_prompt)
    w, h = _size(pipe, width, "width"), _size(pipe, height, "height")
    check_cost(w, h, check("num_inference_steps", steps), check("num_images", num_images), pipe.device)
    lora_path = check_lora_path(lora, trusted_paths)
    lock = model_lock(pipe)
    with lock.exclusive() if lora_path else lock.shared():
        try:
            if lora_path:
                pipe.load_lora(lora_path, lora_scale)
            result = pipe(prompt if prompt is not None else "", negative_prompt=negative_prompt or "",
                          num_inference_steps=steps, guidance_scale=guidance, seed=pick_seed(seed),
                          scheduler=scheduler or None, width=w, height=h, num_images=num_images,
                          callback=_callback(progress, should_stop), cache_interval=cache_interval)
        finally:
            if lora_path:
                pipe.unload_lora()
    paths = result.save(new_output_folder() / "imagecraft-{seed}.png")
    return [str(p) for p in paths], result.seeds[0], result.warnings


class ModelLock:
    """Requests on one shared model: plain ones run together (`shared()`), one that applies a LoRA to it runs alone
    (`exclusive()`), so no request ever samples with another request's LoRA."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers, self._writer, self._waiting_writers = 0, False, 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


_model_locks: dict[int, ModelLock] = {}
_model_locks_guard = threading.Lock()


def model_lock(pipe) -> ModelLock:
    """The lock of one loaded model (see ModelLock)."""
    with _model_locks_guard:
        return _model_locks.setdefault(id(pipe), ModelLock())


def check_lora_path(lora, trusted_paths: bool) -> Path | None:
    """The LoRA a request names, or None for none; a public server (`trusted_paths` False) takes only the
    fine-tunes it trained itself."""
    if lora in (None, "", "none"):
        return None
    if not isinstance(lora, str) or len(lora) > 1000:
        raise ValueError(f"the LoRA must be a path, got {shown(lora)}")
    path = Path(lora).expanduser()
    if not trusted_paths:
        try:
            inside = path.resolve().is_relative_to((FINETUNE_ROOT / "jobs").resolve())
        except (OSError, RuntimeError, ValueError):
            inside = False
        if not inside:
            raise ValueError("this server applies only LoRAs trained here (the Fine-tune tab)")
    from .lora import lora_file

    return lora_file(path)


def output_limits() -> tuple[float, float]:
    """(seconds, bytes): IMAGECRAFT_OUTPUT_TTL (default 3600) and IMAGECRAFT_OUTPUT_MB (default 500)."""
    return float(os.environ.get("IMAGECRAFT_OUTPUT_TTL", "3600")), float(os.environ.get("IMAGECRAFT_OUTPUT_MB",
                                                                                          "500")) * 2**20


PRUNE_EVERY = 10.0  # seconds between two sweeps of one folder: a sweep reads every entry, too slow per request
_last_pruned: dict[Path, float] = {}


def prune(root: Path, keep_younger: float = 0.0) -> None:
    """Drops the entries of `root` older than the output TTL, then the oldest while all of them take more than the
    output cap; entries younger than `keep_younger` seconds stay (another request may still be serving them).
    Sweeps at most every PRUNE_EVERY seconds, so the cap may be passed by that much traffic in between."""
    if time.time() - _last_pruned.get(root, 0.0) < PRUNE_EVERY:
        return
    _last_pruned[root] = time.time()
    ttl, cap = output_limits()
    entries = []
    for entry in root.iterdir() if root.is_dir() else ():
        try:
            files = [f.stat() for f in entry.rglob("*") if f.is_file()] if entry.is_dir() else [entry.stat()]
            entries.append((entry.stat().st_mtime, sum(f.st_size for f in files), entry))
        except OSError:  # removed meanwhile by another request
            continue
    entries.sort(key=lambda e: e[0])
    total, now = sum(size for _, size, _ in entries), time.time()
    for mtime, size, entry in entries:
        if now - mtime < keep_younger:
            break
        if now - mtime > ttl or total > cap:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            total -= size


def new_output_folder() -> Path:
    """A fresh folder under OUTPUT_ROOT, after `prune` kept the others within the output TTL and size cap."""
    return new_folder(OUTPUT_ROOT, keep_younger=0.0)


def new_folder(root: Path, keep_younger: float | None = None) -> Path:
    """A fresh folder under `root`; with `keep_younger`, after `prune` kept the others within the output TTL and
    size cap, sparing those younger than that many seconds (None: no pruning, as for training jobs, which
    _drop_old_jobs keeps instead)."""
    root.mkdir(parents=True, exist_ok=True)
    if keep_younger is not None:
        prune(root, keep_younger=keep_younger)
    folder = root / uuid.uuid4().hex
    folder.mkdir()
    return folder


def settings_from_png(path) -> tuple[dict, list[str]]:
    """The generation settings of one of our PNGs (or an AUTOMATIC1111 one) that pass the settings checks, and notes
    on those left out. The PNG's model is never returned, only named in a note when it is not the built-in one: a
    PNG can name any path or Hub id, and loading one is the user's choice."""
    stored, notes = restore_settings(path)
    model = stored.get("model")
    if model is not None and model != DEFAULT_MODEL.name:
        notes.append(f"this image was made with the model {shown(model)}; load it in the Model box to use it")
    return pipeline_settings(stored), notes


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


def explain(pipe: ImageCraftPipeline, prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
            guidance: float = 7.5, seed: int = -1, scheduler: str | None = None, width: int | None = None,
            height: int | None = None, progress: Callable | None = None,
            should_stop: Callable | None = None) -> Explained:
    """Generates one image with its cross-attention, as `generate` would draw it (same seed, same pixels), and
    writes the PNG and the maps (`attention.npz`) to a fresh folder."""
    _check_text(prompt=prompt, negative_prompt=negative_prompt)
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt first: attention maps show where each word of the prompt went")
    w, h = _size(pipe, width, "width"), _size(pipe, height, "height")
    check_cost(w, h, check("num_inference_steps", steps), 1, pipe.device)
    with model_lock(pipe).shared():  # never while another request's LoRA is applied to the shared model
        result = pipe(prompt, negative_prompt=negative_prompt or "", num_inference_steps=steps,
                      guidance_scale=guidance, seed=pick_seed(seed), scheduler=scheduler or None, width=w, height=h,
                      callback=_callback(progress, should_stop), attention=True)
    folder = new_output_folder()
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
    from .explain import plots

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
    from .explain import plots

    fig = plots.plot_token_distribution(explained.maps, int(x), int(y), **filters)
    return str(plots.save(fig, explained.folder / "pixel.png"))


# --- the Fine-tune tab ------------------------------------------------------------------------------------------
FINETUNE_ROOT = Path(tempfile.gettempdir()) / "imagecraft-finetune"
MAX_UPLOAD_IMAGES = 200  # a Space trains on a shared CPU: a few dozen images is what a LoRA needs
MAX_UPLOAD_ZIP_BYTES = 256 * 2**20  # what one uploaded zip may unpack to
KEEP_JOBS = int(os.environ.get("IMAGECRAFT_KEEP_JOBS", "8"))  # finished jobs' folders kept, oldest dropped first


def read_upload(paths) -> tuple[list[list[str]], list[str]]:
    """The caption table and the image files of an upload: images, their same-name .txt captions, and zips of
    both (unpacked safely). Rows are [file name, caption, note]; the note flags a missing caption."""
    from .train.data import IMAGE_SUFFIXES, extract_zip

    if not paths:
        return [], []
    files: list[Path] = []
    for p in paths if isinstance(paths, (list, tuple)) else [paths]:
        path = Path(p if isinstance(p, (str, Path)) else getattr(p, "name", p))
        if path.suffix.lower() == ".zip":
            folder = extract_zip(path, new_upload_folder(), max_bytes=MAX_UPLOAD_ZIP_BYTES)
            files += sorted(f for f in folder.rglob("*") if f.is_file())
        else:
            files.append(path)
    captions = {f.stem: f for f in files if f.suffix.lower() == ".txt"}
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    names = [f.name for f in images]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two images are named {twice[0]!r}: the caption table matches captions by file name, so "
                         f"rename one of them")
    if len(images) > MAX_UPLOAD_IMAGES:
        raise ValueError(f"{len(images)} images uploaded; the Fine-tune tab takes at most {MAX_UPLOAD_IMAGES}")
    rows = []
    for image in images:
        caption = ""
        if image.stem in captions:
            try:
                caption = captions[image.stem].read_text(encoding="utf-8").strip()[:1000]
            except (OSError, UnicodeDecodeError):
                caption = ""
        rows.append([image.name, caption, "" if caption else "missing caption"])
    return rows, [str(f) for f in images]


def demo_data(n: int = 24, seed: int = 0) -> tuple[list[list[str]], list[str]]:
    """The demo set: n images of pink circles and squares, a colour the built-in model does not know, captioned in
    its grammar; written as PNGs to a fresh folder. Returns the caption table and the files."""
    from . import shapes

    folder = new_upload_folder()
    rows, files = [], []
    for i, (caption, image) in enumerate(shapes.colour_word_scenes(random.Random(seed), n, "pink")):
        path = folder / f"pink-{i:02d}.png"
        Image.fromarray(image).save(path)
        rows.append([path.name, caption, ""])
        files.append(str(path))
    return rows, files


def demo_class_prompts() -> list[str]:
    """Prior-preservation prompts for the demo's data: every colour and shape the built-in model knows, one object
    each, so that learning "pink" does not repaint them (bench_finetune.py --prior). The app's demo leaves prior
    preservation off: on the built-in model it keeps the old colours as well as the plain LoRA does, and stops pink
    reaching triangles (docs/figures.md, fine-tuning)."""
    from . import shapes

    return [shapes.prompt_of(shapes.Spec([shapes.Obj(colour, shape)])) for colour in shapes.COLOURS
            for shape in shapes.SHAPES if (colour, shape) not in shapes.HELD_OUT]


MAX_CLASS_PROMPTS = 100


def class_prompts_of(text: str) -> tuple[str, ...]:
    """The prior-preservation prompts typed in the Fine-tune tab, one per line; blank lines are skipped."""
    if not isinstance(text, str):
        raise ValueError(f"class prompts must be text, one prompt per line, got {shown(text)}")
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(prompts) > MAX_CLASS_PROMPTS:
        raise ValueError(f"at most {MAX_CLASS_PROMPTS} prior-preservation prompts are allowed, got {len(prompts)}")
    for prompt in prompts:
        _check_text(prompt=prompt)
    return prompts


def new_upload_folder() -> Path:
    """A fresh folder for an upload. Uploads are copied into their job's folder when training starts, so the
    output TTL is plenty; those under ten minutes old stay (another session may be about to train on them)."""
    return new_folder(FINETUNE_ROOT / "uploads", keep_younger=600)


def build_data_folder(files: list[str], rows, folder: Path) -> Path:
    """The training folder from the uploaded files and the (edited) caption table: each image beside a .txt of its
    caption. Every image needs a caption; the message lists those without."""
    if not files:
        raise ValueError("no training images: upload images (and their .txt captions, or a zip), or press "
                         "\"Use demo data\"")
    folder.mkdir(parents=True, exist_ok=True)
    table = rows.values.tolist() if hasattr(rows, "values") else list(rows or [])
    by_name = {}
    for row in table:
        if row and isinstance(row[0], str):
            by_name[row[0]] = "" if len(row) < 2 or row[1] is None else str(row[1]).strip()
    missing = [Path(f).name for f in files if not by_name.get(Path(f).name)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(files)} images have no caption ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}): write one in the caption table")
    for i, f in enumerate(files):
        source = Path(f)
        target = folder / f"{i:04d}{source.suffix.lower()}"
        shutil.copyfile(source, target)
        target.with_suffix(".txt").write_text(by_name[source.name][:1000], encoding="utf-8")
    return folder


@dataclass
class TrainingJob:
    """One fine-tune requested from the app: its folder, recipe, progress and result. Jobs run one at a time."""
    id: str
    folder: Path
    model: str | None
    recipe: object
    state: str = "queued"  # queued, running, done, stopped, failed
    step: int = 0
    message: str = ""
    result: object = None
    started: float = 0.0

    def __post_init__(self):
        self.stop_event = threading.Event()

    @property
    def output(self) -> Path:
        return self.folder / "output"

    @property
    def finished(self) -> bool:
        return self.state in ("done", "stopped", "failed")

    def stop(self):
        self.stop_event.set()

    def latest_preview(self) -> str | None:
        previews = sorted((self.output / "previews").glob("step-*.png"))
        return str(previews[-1]) if previews else None

    def loss_plot(self) -> str | None:
        path = self.output / "loss.png"
        return str(path) if path.exists() else None

    def files(self) -> list[str]:
        if self.result is None or not self.result.files:
            return []
        return [str(f) for f in self.result.files if Path(f).is_file()] + \
            [str(p) for p in (self.output / "loss.csv", self.output / "loss.png") if p.exists()]


class TrainingQueue:
    """Fine-tunes one job at a time, in order, each on a thread of its own; the others wait and know their place.
    Generation never waits for training: they only share the CPU."""

    def __init__(self):
        self._cond = threading.Condition()
        self._waiting: list[TrainingJob] = []
        self.running: TrainingJob | None = None

    def submit(self, job: TrainingJob) -> TrainingJob:
        with self._cond:
            self._waiting.append(job)
        threading.Thread(target=self._run, args=(job,), daemon=True, name=f"finetune-{job.id[:8]}").start()
        return job

    def ahead(self, job: TrainingJob) -> int:
        """How many jobs will train before this one (0 once it trains)."""
        with self._cond:
            if job not in self._waiting:
                return 0
            return self._waiting.index(job) + (self.running is not None)

    def _run(self, job: TrainingJob):
        from .train.finetune import TrainingError, finetune

        with self._cond:
            while self._waiting[0] is not job or self.running is not None:
                if job.stop_event.is_set():  # stopped while waiting
                    self._waiting.remove(job)
                    job.state, job.message = "stopped", "stopped before it started"
                    self._cond.notify_all()
                    return
                self._cond.wait(timeout=0.5)
            self._waiting.pop(0)
            self.running = job
        job.state, job.started = "running", time.time()
        try:
            def progress(step, steps, loss):
                job.step, job.message = step, f"step {step} of {steps}, loss {loss:.4f}"

            job.result = finetune(job.model, job.folder / "data", job.output, job.recipe, progress=progress,
                                  should_stop=job.stop_event.is_set, show_bar=False)
            job.state = "stopped" if job.result.stopped else "done"
            job.message = (f"stopped at step {job.result.step}; the checkpoint is kept" if job.result.stopped
                           else f"{job.result.step} steps in {(time.time() - job.started) / 60:.1f} min")
        except (ValueError, TrainingError, OSError) as e:
            job.state, job.message = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the queue: the job says so, the log has it
            import logging

            logging.getLogger("imagecraft.service").exception("fine-tune job %s failed", job.id)
            job.state, job.message = "failed", f"failed: {type(e).__name__}: {e}"
        finally:
            (job.folder / "finished").touch()
            with self._cond:
                self.running = None
                self._cond.notify_all()
            _drop_old_jobs()


TRAINING = TrainingQueue()


def _drop_old_jobs():
    """Keeps the newest KEEP_JOBS finished job folders under FINETUNE_ROOT / "jobs"."""
    root = FINETUNE_ROOT / "jobs"
    if not root.is_dir():
        return
    folders = sorted((p for p in root.iterdir() if (p / "finished").exists()), key=lambda p: p.stat().st_mtime)
    for folder in folders[:-KEEP_JOBS] if KEEP_JOBS else folders:
        shutil.rmtree(folder, ignore_errors=True)


def start_finetune(model: str | None, files: list[str], rows, method: str = "lora", steps: int = 400,
                   rank: int = 8, lr: float | None = None, validation_prompt: str = "",
                   class_prompts: str = "") -> TrainingJob:
    """Checks the request, writes the training folder and queues the job. `model` is what the fine-tune loads
    (None: the built-in model; see `ModelCache.source`). `class_prompts`: prior preservation's prompts, one per
    line (none: off). Defaults are the CLI's."""
    from .train.recipe import FinetuneRecipe as Recipe, check_recipe

    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {shown(method)}")
    for name, value, low, high in (("steps", steps, 1, 5000), ("rank", rank, 1, 128)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or \
                not low <= value <= high:
            raise ValueError(f"{name} must be a whole number from {low} to {high}, got {shown(value)}")
    if lr in (None, "", 0):
        lr = None
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 0.1:
        raise ValueError(f"learning rate must be a number in (0, 0.1], got {shown(lr)}")
    if validation_prompt:
        _check_text(prompt=validation_prompt)
    recipe = check_recipe(Recipe(method=method, steps=int(steps), rank=int(rank), lr=lr,
                                 validation_prompts=(validation_prompt.strip(),) if validation_prompt else (),
                                 class_prompts=class_prompts_of(class_prompts or ""),
                                 checkpoint_every=max(1, min(100, int(steps) // 4)),
                                 preview_every=max(1, int(steps) // 4)))
    folder = new_folder(FINETUNE_ROOT / "jobs")
    build_data_folder(files, rows, folder / "data")
    job = TrainingJob(folder.name, folder, model, recipe)
    return TRAINING.submit(job)
