"""The models a server holds: `ModelCache` loads each pipeline once and shares it among all users and requests, and
`ModelLock` keeps a request that applies a LoRA to a shared model from running beside any other on it.

Module state: `_model_locks`, one ModelLock per loaded pipeline (keyed by its id; a lock outlives a model the cache
dropped, which costs a few bytes). The cache itself is an object its owner makes (the app holds one).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

from ..loading import DEFAULT_MODEL
from ..pipeline import ImageCraftPipeline

BUILTIN = "built-in shapes model"


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
