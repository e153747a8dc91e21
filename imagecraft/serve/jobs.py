"""What the Fine-tune tab's buttons do, without Gradio: read an upload (images, captions, zips), make the demo data,
and train one job at a time.

Module state: TRAINING, the one training queue of this process (fine-tunes run one at a time, each on a thread of
its own, whoever submits them), and the jobs it holds; CORES, which has a fine-tune give way to the requests that run
a model; `_disk`, which lets one upload or job at a time write under `outputs.FINETUNE_ROOT`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import random
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..settings import FINETUNE, check_train_cost, shown
from ..train.data import take_upload, upload_bytes
from ..train.finetune import TrainingError, finetune
from ..train.recipe import FinetuneRecipe, check_recipe
from .. import shapes
from . import outputs, zerogpu

MAX_UPLOAD_IMAGES = 200  # a Space trains on a shared CPU: a few dozen images is what a LoRA needs
MAX_UPLOAD_ZIP_BYTES = 256 * 2**20  # what one upload (its files, its zips unpacked) may take on disk
MAX_UPLOAD_MEMBERS = 2 * MAX_UPLOAD_IMAGES + 16  # files, or entries of one zip: an image and a caption each
log = logging.getLogger("imagecraft.serve")
_disk = threading.Lock()  # one upload, demo set or job folder written under FINETUNE_ROOT at a time


def upload_paths(paths) -> list[Path]:
    """An upload's files as paths: Gradio gives one path or a list, of strings or of file objects with a `.name`."""
    return [Path(p if isinstance(p, (str, Path)) else getattr(p, "name", p))
            for p in (paths if isinstance(paths, (list, tuple)) else [paths])]


def read_upload(paths) -> tuple[list[list[str]], list[str]]:
    """The caption table and the image files of an upload: images, their same-name .txt captions, metadata.jsonl /
    metadata.csv, and zips of them, checked completely now by `take_upload` (as the CLI's --data) into a fresh
    folder, which stays only if the upload is accepted. Rows are [file name, caption, note]; the note flags a
    missing caption. Uploads and jobs are held to one disk cap (`outputs.hold_finetune_disk`): room is made for
    what the upload says it unpacks to, and it may unpack no more than that room."""
    if not paths:
        return [], []
    sources = upload_paths(paths)
    with _disk:  # the room made for this upload stays its own while it unpacks
        need = upload_bytes(sources, MAX_UPLOAD_ZIP_BYTES, MAX_UPLOAD_MEMBERS)  # every zip's directory checked
        room = outputs.hold_finetune_disk(TRAINING.active_folders(), incoming=need)
        folder = outputs.new_upload_folder()
        try:
            examples = take_upload(sources, folder, max_bytes=min(MAX_UPLOAD_ZIP_BYTES, room),
                                   max_members=MAX_UPLOAD_MEMBERS, require_captions=False)
            names = [ex.path.name for ex in examples]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"two images are named {twice[0]!r}: the caption table matches captions by file "
                                 f"name, so rename one of them")
            if len(examples) > MAX_UPLOAD_IMAGES:
                raise ValueError(f"{len(examples)} images uploaded; the Fine-tune tab takes at most "
                                 f"{MAX_UPLOAD_IMAGES}")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    rows = [[ex.path.name, ex.caption[:1000], "" if ex.caption else "missing caption"] for ex in examples]
    return rows, [str(ex.path) for ex in examples]


def demo_data(n: int = 24, seed: int = 0) -> tuple[list[list[str]], list[str]]:
    """The demo set: n images of pink circles and squares, a colour the built-in model does not know, captioned in
    its grammar; written as PNGs to a fresh folder, held to the disk cap as an upload is. Returns the caption table
    and the files."""
    rows, files = [], []
    with _disk:
        folder = outputs.new_upload_folder()
        for i, (caption, image) in enumerate(shapes.colour_word_scenes(random.Random(seed), n, "pink")):
            path = folder / f"pink-{i:02d}.png"
            Image.fromarray(image).save(path)
            rows.append([path.name, caption, ""])
            files.append(str(path))
        outputs.hold_finetune_disk([*TRAINING.active_folders(), folder])
    return rows, files


def demo_class_prompts() -> list[str]:
    """Prior-preservation prompts for the demo's data: every colour and shape the built-in model knows, one object
    each, so that learning "pink" does not repaint them (bench_finetune.py --prior). The app's demo leaves prior
    preservation off: on the built-in model it keeps the old colours as well as the plain LoRA does, and stops pink
    reaching triangles (docs/figures.md, fine-tuning)."""
    return [shapes.prompt_of(shapes.Spec([shapes.Obj(colour, shape)])) for colour in shapes.COLOURS
            for shape in shapes.SHAPES if (colour, shape) not in shapes.HELD_OUT]


def prompts_of(name: str, text: str) -> tuple[str, ...]:
    """The prompts typed in a box of the Fine-tune tab, one per line (blank lines are skipped), checked as the
    FINETUNE field `name`."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text, one prompt per line, got {shown(text)}")
    return FINETUNE[name].check([line.strip() for line in text.splitlines() if line.strip()])


# --- which LoRAs a session may apply (a server with a model allowlist) ------------------------------------------
_trained: dict[str, list[Path]] = {}  # session -> the LoRA folders its fine-tunes write


def own(session: str | None, job: "TrainingJob") -> None:
    """Records that `session` trained `job`: on a server with a model allowlist, only it may apply the LoRA."""
    if session and job.recipe.method == "lora":
        mine = _trained.setdefault(session, [])
        mine[:] = [p for p in mine if p.parent.is_dir()] + [job.output]  # forgets the jobs the disk cap dropped


def shared_loras() -> list[tuple[str, str]]:
    """(name, path) of the LoRAs every session may apply: IMAGECRAFT_LORAS, comma-separated paths."""
    paths = [p.strip() for p in os.environ.get("IMAGECRAFT_LORAS", "").split(",") if p.strip()]
    return [(Path(p).stem if Path(p).suffix else Path(p).name, p) for p in paths]


def loras_for(session: str | None) -> list[str]:
    """The LoRA paths a session may apply on a server with a model allowlist: those it trained and the shared."""
    return [str(p) for p in _trained.get(session or "", [])] + [path for _, path in shared_loras()]


def table_rows(table) -> list[list[str]]:
    """The caption table's rows [image, caption, note], as the app's Dataframe sends it (a dict with "data", raw
    with preprocess=False), a pandas DataFrame or a list of rows; a sentence for anything else."""
    if hasattr(table, "values") and hasattr(table, "columns"):  # a pandas DataFrame
        table = table.values.tolist()
    elif isinstance(table, dict):
        table = table.get("data")
    if table is None:
        return []
    if not isinstance(table, (list, tuple)):
        raise ValueError(f"the caption table must be rows of [image, caption, note], got {shown(table)}")
    rows = []
    for n, row in enumerate(table, 1):
        if not isinstance(row, (list, tuple)) or not 2 <= len(row) <= 3:
            raise ValueError(f"row {n} of the caption table must be [image, caption, note], got {shown(row)}")
        image, caption = row[0], "" if row[1] is None else row[1]
        if not isinstance(image, str) or not isinstance(caption, str):
            raise ValueError(f"row {n} of the caption table must hold text, got {shown(row)}")
        rows.append([image, caption, *row[2:]])
    return rows


def build_data_folder(files: list[str], rows, folder: Path) -> Path:
    """The training folder from the uploaded files and the (edited) caption table: each image beside a .txt of its
    caption. Every image needs a caption; the message lists those without."""
    if not files:
        raise ValueError("no training images: upload images (and their .txt captions, or a zip), or press "
                         "\"Use demo data\"")
    folder.mkdir(parents=True, exist_ok=True)
    by_name = {}
    for row in table_rows(rows):
        by_name[row[0]] = row[1].strip()
    gone = [f for f in files if not Path(f).is_file()]
    if gone:
        raise ValueError(f"{len(gone)} of the uploaded images were cleared to keep the server's disk within its cap "
                         f"(uploads are kept while there is room): upload them again")
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
    recipe: FinetuneRecipe
    state: str = "queued"  # queued, running, done, stopped, failed
    step: int = 0
    message: str = ""
    result: object = None
    started: float = 0.0
    previous: TrainingJob | None = None  # the job this browser session ran before: its last finished run stays usable

    def __post_init__(self):
        self.stop_event = threading.Event()

    @property
    def name(self) -> str:
        """The LoRA's or model's name: its folder's, so that PNGs record it (<lora:NAME:1>) and the app shows it."""
        return f"finetune-{self.id[:8]}"

    @property
    def output(self) -> Path:
        return self.folder / self.name

    @property
    def finished(self) -> bool:
        return self.state in ("done", "stopped", "failed")

    def last_done(self) -> TrainingJob | None:
        """This job if it finished its steps, else the newest earlier one of its session that did."""
        job = self
        while job is not None and job.state != "done":
            job = job.previous
        return job

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


class CoreShare:
    """Requests first: a fine-tune that trains on the CPU serving the app's requests gives way to them.

    A fine-tune is a thread of this process. Side by side with a generation, both run torch's threads on the same
    cores (2 on a basic Space) and take turns at the GIL, so every request slows down while a job trains
    (bench/server_load.py --only training measures it, with and without this). Giving training fewer threads is not
    an option: torch's thread count is one setting for the whole process, generation's included. So the trainer
    waits instead, at the step boundary: every handler that runs a model counts itself in `serving` while it runs
    (`serves`, through `handlers.gpu`), and the trainer, after each step (`give_way`), waits while any is counted
    and `settle` seconds after the last ended, so that queued requests run back to back. A request that arrives
    mid-step waits for the rest of that step only. After `max_wait` seconds of waiting the trainer takes one step
    regardless, so that a busy server still trains, slowly. Off (`active` False) where training has a GPU of its
    own (CUDA, ZeroGPU) or IMAGECRAFT_SHARE_CORES is 0.
    """

    def __init__(self, active: bool = True, settle: float = 0.2, max_wait: float = 10.0):
        self.active, self.settle, self.max_wait = active, settle, max_wait
        self._cond = threading.Condition()
        self.serving = 0  # requests running a model now
        self._ended = 0.0  # time.monotonic() when the last one ended
        self.waits = 0  # times the trainer waited for requests

    @contextmanager
    def request(self):
        """One request running a model, for the duration of the block."""
        with self._cond:
            self.serving += 1
        try:
            yield
        finally:
            with self._cond:
                self.serving -= 1
                self._ended = time.monotonic()
                self._cond.notify_all()

    def serves(self, fn):
        """`fn` (a handler; a generator function too) counted as a request while it runs."""
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def streamed(*args, **kwargs):
                with self.request():
                    yield from fn(*args, **kwargs)

            return streamed

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self.request():
                return fn(*args, **kwargs)

        return wrapped

    @property
    def busy(self) -> bool:
        """Whether a trainer would wait now."""
        return self.active and (self.serving > 0 or time.monotonic() < self._ended + self.settle)

    def give_way(self, stop=None) -> float:
        """The trainer's, between steps: waits while requests run and `settle` s after the last, at most `max_wait` s
        or until `stop()` says so; returns the seconds waited."""
        if not self.busy:
            return 0.0
        start = time.monotonic()
        with self._cond:
            self.waits += 1
            while not (stop is not None and stop()):
                now = time.monotonic()
                left = self.max_wait - (now - start)
                calm = 0.25 if self.serving else self._ended + self.settle - now  # 0.25: how often `stop` is asked
                if calm <= 0 or left <= 0:
                    break
                self._cond.wait(timeout=min(calm, left, 0.25))
        return time.monotonic() - start


CORES = CoreShare(active=not zerogpu.ZERO_GPU and not torch.cuda.is_available()
                  and os.environ.get("IMAGECRAFT_SHARE_CORES", "1") != "0")


class TrainingQueue:
    """Fine-tunes one job at a time, in order, each on a thread of its own; the others wait and know their place.
    Generation never waits for training: on a CPU the trainer waits for it instead (`CoreShare`)."""

    def __init__(self, trainer=finetune, cores: CoreShare | None = None):
        self.trainer = trainer  # `finetune`, or on ZeroGPU `zerogpu.finetune_in_slots` (same arguments and result)
        self.cores = cores or CORES  # whom the trainer gives way to between steps
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

    def active_folders(self) -> list[Path]:
        """The folders of the jobs queued or training: the disk cap never drops them."""
        with self._cond:
            return [job.folder for job in [*self._waiting, self.running] if job is not None]

    def _run(self, job: TrainingJob):
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

            def should_stop():  # after every step, and between batches of prior-preservation images
                if self.cores.busy:
                    job.message = job.message.split(" (")[0] + " (paused while the server generates images)"
                self.cores.give_way(job.stop_event.is_set)
                return job.stop_event.is_set()

            job.result = self.trainer(job.model, job.folder / "data", job.output, job.recipe, progress=progress,
                                      should_stop=should_stop, show_bar=False)
            job.state = "stopped" if job.result.stopped else "done"
            job.message = (f"stopped at step {job.result.step}; the checkpoint is kept" if job.result.stopped
                           else f"{job.result.step} steps in {(time.time() - job.started) / 60:.1f} min"
                           + (f"; saved step {job.result.kept_step}, whose loss on the held-out images was lowest"
                              if job.result.kept_step not in (None, job.result.step) else ""))
        except (ValueError, TrainingError, OSError) as e:
            job.state, job.message = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the queue: the job says so, the log has it
            log.exception("fine-tune job %s failed", job.id)
            job.state, job.message = "failed", f"failed: {type(e).__name__}: {e}"
        finally:
            (job.folder / "finished").touch()
            with self._cond:
                self.running = None
                self._cond.notify_all()
            outputs.drop_old_jobs()


TRAINING = TrainingQueue(zerogpu.trainer())


def start_finetune(model: str | None, files: list[str], rows, method: str = FINETUNE["method"].default,
                   steps: int = FINETUNE["steps"].default, rank: int = FINETUNE["rank"].default,
                   lr: float | None = None, validation_prompt: str = "", class_prompts: str = "") -> TrainingJob:
    """Checks the request, writes the training folder and queues the job. `model` is what the fine-tune loads
    (None: the built-in model; see `ModelCache.source`). `lr` None or 0: the method's default. `validation_prompt`
    and `class_prompts` (prior preservation's): prompts one per line, none by default. Every value is checked by
    `settings.FINETUNE`, as the CLI's and the Python API's are."""
    steps = FINETUNE["steps"].check(steps)  # before the checkpoint and preview intervals are made from it
    lr = None if lr is None or (lr in ("", 0) and not isinstance(lr, bool)) else lr
    recipe = check_recipe(FinetuneRecipe(method=method, steps=steps, rank=rank, lr=lr,
                                         validation_prompts=prompts_of("validation_prompts", validation_prompt or ""),
                                         class_prompts=prompts_of("class_prompts", class_prompts or ""),
                                         checkpoint_every=max(1, min(100, steps // 4)),
                                         preview_every=max(1, steps // 4)))
    check_train_cost(dataclasses.asdict(recipe))
    if not isinstance(files, (list, tuple)) or not all(isinstance(f, (str, Path)) for f in files):
        raise ValueError("upload the training images again: the list of files is not one this server made")
    with _disk:
        folder = outputs.new_folder(outputs.FINETUNE_ROOT / "jobs")
        try:
            build_data_folder(files, rows, folder / "data")
            outputs.hold_finetune_disk([*TRAINING.active_folders(), folder])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    return TRAINING.submit(TrainingJob(folder.name, folder, model, recipe))


def resume_finetune(job: TrainingJob) -> TrainingJob:
    """Queues a stopped job again on its own folder: the trainer continues from the checkpoint it kept, to the same
    number of steps, as one straight run would have gone."""
    if job.state != "stopped" or not (job.output / "checkpoints" / "last.pt").is_file():
        raise ValueError("nothing to resume: \"Resume\" continues a stopped fine-tune from its checkpoint")
    (job.folder / "finished").unlink(missing_ok=True)  # in training again: drop_old_jobs leaves it alone
    return TRAINING.submit(TrainingJob(job.id, job.folder, job.model, job.recipe, previous=job.previous))
