"""What the Fine-tune tab's buttons do, without Gradio: read an upload (images, captions, zips), make the demo data,
and train one job at a time.

Module state: TRAINING, the one training queue of this process (fine-tunes run one at a time, each on a thread of
its own, whoever submits them), and the jobs it holds. Their folders live under `outputs.FINETUNE_ROOT`.
"""

from __future__ import annotations

import logging
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..settings import FINETUNE, shown
from ..train.data import IMAGE_SUFFIXES, extract_zip
from ..train.finetune import TrainingError, finetune
from ..train.recipe import FinetuneRecipe, check_recipe
from .. import shapes
from . import outputs

MAX_UPLOAD_IMAGES = 200  # a Space trains on a shared CPU: a few dozen images is what a LoRA needs
MAX_UPLOAD_ZIP_BYTES = 256 * 2**20  # what one uploaded zip may unpack to
log = logging.getLogger("imagecraft.serve")


def read_upload(paths) -> tuple[list[list[str]], list[str]]:
    """The caption table and the image files of an upload: images, their same-name .txt captions, and zips of
    both (unpacked safely). Rows are [file name, caption, note]; the note flags a missing caption."""
    if not paths:
        return [], []
    files: list[Path] = []
    for p in paths if isinstance(paths, (list, tuple)) else [paths]:
        path = Path(p if isinstance(p, (str, Path)) else getattr(p, "name", p))
        if path.suffix.lower() == ".zip":
            folder = extract_zip(path, outputs.new_upload_folder(), max_bytes=MAX_UPLOAD_ZIP_BYTES)
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
    folder = outputs.new_upload_folder()
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
    return [shapes.prompt_of(shapes.Spec([shapes.Obj(colour, shape)])) for colour in shapes.COLOURS
            for shape in shapes.SHAPES if (colour, shape) not in shapes.HELD_OUT]


def prompts_of(name: str, text: str) -> tuple[str, ...]:
    """The prompts typed in a box of the Fine-tune tab, one per line (blank lines are skipped), checked as the
    FINETUNE field `name`."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text, one prompt per line, got {shown(text)}")
    return FINETUNE[name].check([line.strip() for line in text.splitlines() if line.strip()])


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
    recipe: FinetuneRecipe
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
            log.exception("fine-tune job %s failed", job.id)
            job.state, job.message = "failed", f"failed: {type(e).__name__}: {e}"
        finally:
            (job.folder / "finished").touch()
            with self._cond:
                self.running = None
                self._cond.notify_all()
            outputs.drop_old_jobs()


TRAINING = TrainingQueue()


def start_finetune(model: str | None, files: list[str], rows, method: str = FINETUNE["method"].default,
                   steps: int = FINETUNE["steps"].default, rank: int = FINETUNE["rank"].default,
                   lr: float | None = None, validation_prompt: str = "", class_prompts: str = "") -> TrainingJob:
    """Checks the request, writes the training folder and queues the job. `model` is what the fine-tune loads
    (None: the built-in model; see `ModelCache.source`). `lr` None or 0: the method's default. `validation_prompt`
    and `class_prompts` (prior preservation's): prompts one per line, none by default. Every value is checked by
    `settings.FINETUNE`, as the CLI's and the Python API's are."""
    steps = FINETUNE["steps"].check(steps)  # before the checkpoint and preview intervals are made from it
    recipe = check_recipe(FinetuneRecipe(method=method, steps=steps, rank=rank, lr=None if lr in ("", 0) else lr,
                                         validation_prompts=prompts_of("validation_prompts", validation_prompt or ""),
                                         class_prompts=prompts_of("class_prompts", class_prompts or ""),
                                         checkpoint_every=max(1, min(100, steps // 4)),
                                         preview_every=max(1, steps // 4)))
    folder = outputs.new_folder(outputs.FINETUNE_ROOT / "jobs")
    build_data_folder(files, rows, folder / "data")
    return TRAINING.submit(TrainingJob(folder.name, folder, model, recipe))
