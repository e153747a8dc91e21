"""The app's event handlers: Gradio's values in, `actions` and `jobs` do the work, Gradio's updates out.

This is the one module of `serve` that knows Gradio: our errors become a message in the UI (`ui_errors`), progress
goes to Gradio's bar, warnings to its toasts, and sampling stops when Gradio drops the event (`event_cancelled`).
Handlers that fill several components return a dict keyed by name; `to_components` maps it onto the components
where app.py wires the event.

Module state: `models`, the ModelCache every request of this process shares (IMAGECRAFT_DEVICE, IMAGECRAFT_DTYPE,
IMAGECRAFT_MODELS, IMAGECRAFT_MAX_MODELS); the training queue is `jobs.TRAINING`.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import os
import time
from pathlib import Path

import gradio as gr

from ..schedulers import SCHEDULERS
from ..settings import DEFAULT_GUIDANCE, DEFAULT_STEPS, EDIT, FINETUNE, GENERATION, LORA_SCALE, OVERLAY_ALPHA
from . import actions, jobs, outputs, zerogpu
from .models import BUILTIN, ModelCache

log = logging.getLogger("imagecraft.app")
models = ModelCache(device=os.environ.get("IMAGECRAFT_DEVICE"), dtype=os.environ.get("IMAGECRAFT_DTYPE"))


def gpu(fn):
    """For a handler that runs a model: on a ZeroGPU Space `spaces.GPU` attaches a GPU for the duration of each call;
    on a CPU server a fine-tune gives way while it runs (`jobs.CoreShare`)."""
    return jobs.CORES.serves(zerogpu.spaces_gpu()(fn))


# --- Gradio's side: errors, cancellation, outputs by name ------------------------------------------------------
def ui_errors(fn):
    """Our errors (ValueError with a sentence) become a message in the UI and one log line; only bugs log a
    traceback. The message goes through `as_text`: Gradio renders it as HTML, and it may quote the user's input.
    Works for plain handlers and for streaming ones (generators)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streamed(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (ValueError, FileNotFoundError) as e:
                raise _refused(fn, e) from e

        return streamed

    @functools.wraps(fn)  # keeps the signature: the API's parameter names and defaults come from it
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            raise _refused(fn, e) from e
        except actions.Cancelled as e:
            log.info("%s: %s", fn.__name__, e)
            raise gr.Error(str(e), print_exception=False) from e

    return wrapped


def quiet_gradio_refusals(blocks: gr.Blocks) -> gr.Blocks:
    """Gradio's own checks of a value before any handler runs (a slider's range, a dropdown's choices, a file's
    type, a malformed value for a component's data model) become one log line like ours, not a traceback: Gradio
    prints one for every such gr.Error unless its `print_exception` is off (queueing.py), and answers anything else
    with its generic message. Wraps this app's `preprocess_data`, the one place those checks run."""
    check = blocks.preprocess_data

    @functools.wraps(check)
    async def preprocess_data(block_fn, *args, **kwargs):
        try:
            return await check(block_fn, *args, **kwargs)
        except gr.Error as e:
            log.info("%s refused by Gradio: %s", block_fn.name, str(e.message)[:300])
            e.print_exception = False
            raise
        except Exception as e:  # noqa: BLE001 - a value a component cannot read (pydantic's and its own errors)
            log.info("%s refused by Gradio: %s: %s", block_fn.name, type(e).__name__, str(e).splitlines()[0][:300])
            raise gr.Error(as_text(f"a value sent to {block_fn.name} is not one its fields take "
                                   f"({type(e).__name__})"), print_exception=False) from None

    blocks.preprocess_data = preprocess_data
    return blocks


def _refused(fn, error: Exception) -> gr.Error:
    """One log line, and the sentence as the UI's message (through `as_text`)."""
    log.info("%s refused: %s", fn.__name__, str(error)[:300])
    return gr.Error(as_text(str(error)), print_exception=False)


def as_text(message: str) -> str:
    """Gradio shows an error as HTML, and ours may quote the user's input: angle brackets become look-alike
    characters, so nothing in it can become markup, while API clients still read plain text (not &lt;)."""
    return message.replace("<", "\u2039").replace(">", "\u203a")


def event_cancelled() -> bool:
    """Whether Gradio has dropped the event this thread runs: its client cancelled it or went away.

    Gradio cannot stop a running thread, so sampling asks this after every step. Gradio 6.31 has no public API for
    it (`gr.Request` carries no such state, and `cancels=` stops only events not yet started or generators between
    yields), so this reads its queue: the events running are `blocks._queue.active_jobs`, and `/cancel` or a lost
    client removes an event from them. This is the one place that reads Gradio's private state;
    tests/test_app.py::test_event_cancelled_reads_what_gradio_has fails when Gradio changes it.
    """
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return False
    return not any(event._id == event_id for job in queue.active_jobs if job for event in job)


def to_components(handler, components: dict):
    """`handler`, whose result is a dict keyed by name (or None: nothing changes), as Gradio wants it: a dict keyed
    by the components in `components`. The signature is kept: the API's parameter names and defaults come from it."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        result = handler(*args, **kwargs)
        return gr.skip() if result is None else {components[name]: value for name, value in result.items()}

    return wrapped


def _prune_gradio_cache():
    """Gradio keeps its own copies of served files (expired hourly by `delete_cache`); between those sweeps they are
    held to the same size cap as our outputs. Files under five minutes old may still be downloading, so stay."""
    from gradio.utils import get_upload_folder

    outputs.prune(Path(get_upload_folder()), keep_younger=300)


def _loras(request) -> dict:
    """Which LoRAs a request may apply: any file on a server without a model allowlist, else those its session
    trained and the server's own (`actions.check_lora_path`)."""
    return dict(trusted_paths=models.allowed is None,
                allowed_loras=jobs.loras_for(getattr(request, "session_hash", None)))


# --- the Generate tab -------------------------------------------------------------------------------------------
@gpu
@ui_errors
def on_generate(prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
                guidance: float = DEFAULT_GUIDANCE, seed: int = -1, scheduler: str = "", width: int = 0,
                height: int = 0, num_images: int = GENERATION["num_images"].default, model: str = BUILTIN,
                lora: str = "none", lora_scale: float = LORA_SCALE.default,
                cache_interval: int = GENERATION["cache_interval"].default, progress=gr.Progress(),
                request: gr.Request = None):
    """Generates images for a prompt; returns the PNGs (with metadata) and the seed of the first one.
    width/height 0 and scheduler "" mean the model's own; lora "none" means none (else a LoRA this session trained
    in the Fine-tune tab or one of IMAGECRAFT_LORAS, or any LoRA file on a server without a model allowlist);
    cache_interval 1 means no DeepCache."""
    progress(0, desc="loading model")
    pipe = models.get(model)
    _prune_gradio_cache()
    progress(0, desc="sampling")
    paths, first_seed, notes = actions.generate(
        pipe, prompt, negative_prompt, steps, guidance, seed, scheduler or None, width, height, num_images,
        progress=lambda step, total: progress((step, total), desc="sampling"), should_stop=event_cancelled,
        lora=lora, lora_scale=lora_scale, cache_interval=cache_interval, **_loras(request))
    for note in notes:
        gr.Warning(note)
    return paths, first_seed


@ui_errors
def on_load_model(model: str, progress=gr.Progress()):
    """Loads a model (built-in, folder, .safetensors file or Hub id) once, for everyone; returns its status and
    sizes."""
    progress(0, desc=f"loading {model}")
    pipe = models.get(model)
    size = pipe.default_size
    name = html.escape(pipe.model_id).replace("*", "\\*").replace("_", "\\_")  # shown as Markdown
    return (f"Loaded **{name}** ({pipe.device}, {str(pipe.dtype).replace('torch.', '')}); "
            f"trained at {size}x{size}, sampler {SCHEDULERS[pipe.default_scheduler][0]}."), size, size


# GENERATION's names for the settings a PNG restores, by /generate's parameter names
_GENERATE_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}


@ui_errors
def on_png(file) -> tuple[dict, list[str]]:
    """The settings of one of our PNGs (or an AUTOMATIC1111 one) that pass the settings checks, keyed by /generate's
    parameter names so that an API client can pass them on (`client.predict(**settings, api_name="/generate")`), and
    a note on each one left out (shown as warnings too). The number of images and the model are never returned: a
    PNG can name any model, and a note names it for the user to load."""
    if file is None:
        return {}, []
    settings, notes = actions.settings_from_png(file)
    for note in notes:
        gr.Warning(as_text(note))  # rendered as HTML, and it quotes the PNG's text
    # cache_interval always: 1 for a PNG made without caching (png.pipeline_settings)
    return {_GENERATE_NAMES.get(name, name): value for name, value in settings.items()}, notes


def png_fields(settings: dict | None) -> dict | None:
    """The settings `on_png` read, into the Generate tab's fields (the page's second step, not an API)."""
    return settings or None


def on_random_seed():
    return actions.pick_seed(-1)


# --- the Attention tab ------------------------------------------------------------------------------------------
@gpu
@ui_errors
def on_attention(prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, seed: int = -1, scheduler: str = "", width: int = 0,
                 height: int = 0, model: str = BUILTIN, lora: str = "none", lora_scale: float = LORA_SCALE.default,
                 progress=gr.Progress(), request: gr.Request = None) -> dict:
    """Generates the image again with its cross-attention (the same pixels as Generate gives for these settings,
    the LoRA included) and shows every word's map: the overlay figure, the image (scaled up for clicking), the maps
    (.npz), the figure (PNG), the controls filled for this prompt and the first step's maps. The explained image
    becomes the Edit panel's source (for an API client too: "edit" then edits it)."""
    progress(0, desc="loading model")
    pipe = models.get(model)
    _prune_gradio_cache()
    explained = actions.explain(
        pipe, prompt, negative_prompt, steps, guidance, seed, scheduler or None, width, height,
        progress=lambda step, total: progress((step, total), desc="sampling with attention"),
        should_stop=event_cancelled, lora=lora, lora_scale=lora_scale, **_loras(request))
    maps = explained.maps
    words = maps.words()
    figure = actions.draw_attention(explained, words, {})
    sizes = sorted({f"{l.size[0]}x{l.size[1]}" for l in maps.layers}, key=lambda s: -int(s.split("x")[0]))
    heads, last = min(l.heads for l in maps.layers), maps.num_steps
    return dict(state=explained, figure=figure, image=explained.view_path, npz=str(explained.folder / "attention.npz"),
                png=figure, words=gr.update(choices=words, value=words),
                resolution=gr.update(choices=["all", *sizes], value="all"),
                heads=gr.update(choices=["all", *map(str, range(heads))], value="all"),
                # a slider needs its maximum above its minimum: with one step the range sliders stay put
                step_from=gr.update(maximum=max(last - 1, 1), value=0, interactive=last > 1),
                step_to=gr.update(maximum=max(last, 2), value=last, interactive=last > 1),
                step=gr.update(maximum=max(last - 1, 1), value=0, interactive=last > 1), pixel=None,
                step_figure=actions.draw_step(explained, words, 0, {}), edit_source=actions.source_of(explained, model))


def _filters(explained, blocks, resolution, step_from, step_to, heads):
    if explained is None:
        raise ValueError("explain an image first: press \"Explain the last image\"")
    return actions.attention_filters(explained.maps, blocks, resolution, step_from, step_to, heads)


@ui_errors
def on_redraw(explained, words, blocks, resolution, step_from, step_to, heads, alpha, cmap, normalize):
    """Redraws the overlay from the stored maps (no model call): the figure and its PNG."""
    if explained is None:
        return gr.skip()
    figure = actions.draw_attention(explained, words,
                                    _filters(explained, blocks, resolution, step_from, step_to, heads),
                                    alpha, cmap, normalize)
    return figure, figure


@ui_errors
def on_scrub(explained, words, step, blocks, resolution, alpha, cmap, normalize):
    """The time scrubber: the ticked words' maps at one sampling step."""
    if explained is None:
        return gr.skip()
    filters = _filters(explained, blocks, resolution, 0, None, "all")
    return actions.draw_step(explained, words, step, filters, alpha, cmap, normalize)


@ui_errors
def on_pixel(explained, blocks, resolution, step_from, step_to, heads, evt: gr.SelectData):
    """Clicking a pixel of the image: how that pixel's attention splits over the prompt's tokens, and the image with
    that pixel marked."""
    if explained is None:
        return gr.skip(), gr.skip()
    x, y = explained.pixel(evt.index[0], evt.index[1])
    return actions.draw_pixel(explained, x, y, _filters(explained, blocks, resolution, step_from, step_to, heads))


@gpu
@ui_errors
def on_lora_compare(prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
                    guidance: float = DEFAULT_GUIDANCE, seed: int = -1, scheduler: str = "", width: int = 0,
                    height: int = 0, model: str = BUILTIN, lora: str = "none", words: list | None = None,
                    alpha: float = OVERLAY_ALPHA.default, cmap: str = "jet", normalize: str = "word",
                    progress=gr.Progress(), request: gr.Request = None) -> str:
    """What a LoRA changed in where words look: the image at LoRA scale 0 and 1 (one seed), and each ticked word's
    map (every word when none is ticked) over both, side by side."""
    progress(0, desc="loading model")
    pipe = models.get(model)
    _prune_gradio_cache()
    return actions.compare_lora(
        pipe, prompt, negative_prompt, steps, guidance, seed, scheduler or None, width, height, lora, words or [],
        alpha, cmap, normalize, progress=lambda step, total: progress((step, total), desc="sampling at LoRA 0 and 1"),
        should_stop=event_cancelled, **_loras(request))


def lora_shown(lora) -> dict:
    """The LoRA comparison is offered while the settings followed name a LoRA."""
    return gr.update(visible=lora not in (None, "", "none"))


# --- the Edit panel (in the Attention tab) -------------------------------------------------------------------------
def _markdown_text(text: str) -> str:
    """The user's text inside Markdown: no HTML, and no character that Markdown reads as formatting."""
    return "".join("\\" + c if c in "\\`*_[](){}#+!|~" else c for c in html.escape(text))


def _edit_view(source: actions.EditSource | None, image: str, status: str) -> dict:
    """The panel filled for a new source: its picture, the edited prompt prefilled with its prompt, its words to
    blend and reweight (none ticked), the last edit cleared. No source: a picture waiting to be inverted."""
    words = actions.prompt_words(models.get(source.model), source.prompt) if source is not None else []
    return dict(source=source, source_image=image, status=status, prompt=source.prompt if source else "",
                blend=gr.update(choices=words, value=[]), reweight_words=gr.update(choices=words, value=[]),
                edit_image=None, difference=None, edit_maps=None, result=None)


@ui_errors
def on_edit_explained(source) -> dict | None:
    """After "Explain the last image" (which made the explained image the Edit panel's source): the panel filled."""
    if source is None:
        return None
    return _edit_view(source, source.image_path, f"Editing the explained image: *{_markdown_text(source.prompt)}*.")


@gpu
@ui_errors
def on_edit_upload(picture, model: str = BUILTIN, progress=gr.Progress()) -> dict:
    """A picture to edit. A PNG that ImageCraft made is drawn again from its settings and becomes the source; any
    other picture waits for "Invert", under what the user says it shows."""
    progress(0, desc="loading model")
    pipe = models.get(model)
    source, image, notes = actions.load_source(
        pipe, picture, model, progress=lambda step, total: progress((step, total), desc="drawing the PNG again"),
        should_stop=event_cancelled)
    for note in notes:
        gr.Warning(as_text(note))
    if source is not None:
        return dict(_edit_view(source, image, f"Editing the PNG, drawn again from its settings: "
                                              f"*{_markdown_text(source.prompt)}*."), shows=source.prompt)
    return _edit_view(None, image, "**ImageCraft did not make this picture**: say what it shows, in the words the "
                                   "model knows, and press **Invert** to make it editable.")


@gpu
@ui_errors
def on_invert(picture, prompt: str, model: str = BUILTIN, progress=gr.Progress()) -> dict:
    """Makes a picture editable that ImageCraft did not make: DDIM inversion with null-text optimisation under
    `prompt` (what it shows). The source becomes the picture as the inversion draws it again."""
    progress(0, desc="loading model")
    pipe = models.get(model)
    _prune_gradio_cache()
    source, notes = actions.invert(pipe, picture, prompt, model,
                                   progress=lambda step, total: progress((step, total), desc="inverting"),
                                   should_stop=event_cancelled)
    for note in notes:
        gr.Warning(as_text(note))
    inversion = source.edit_from
    return _edit_view(source, source.image_path, f"**Inverted** in {inversion.seconds:.1f} s: drawn again at "
                                                 f"{inversion.psnr:.1f} dB PSNR (the source shown). Edit its prompt.")


def _kept(ticked, choices: list[str]) -> list[str]:
    return [w for w in choices if w in set(ticked or [])]


@ui_errors
def on_edit_words(source, prompt: str, blend, reweight_words) -> tuple:
    """The words to tick, following the edited prompt as it is typed: to blend, those of both prompts; to reweight,
    the edited prompt's (ticks kept where the word still is); and the cross-attention share the edit's kind takes
    (`settings.edit_cross_steps`: 1.0 for a swap, 0.8 once words are added)."""
    if source is None or not isinstance(prompt, str):
        return gr.skip(), gr.skip(), gr.skip()
    pipe = models.get(source.model)
    try:
        edited = actions.prompt_words(pipe, prompt, each_once=False)
    except ValueError:  # a prompt being typed can be over the limit for a moment: its words then wait
        return gr.skip(), gr.skip(), gr.skip()
    original = actions.prompt_words(pipe, source.prompt, each_once=False)  # every occurrence, as `pipe.edit` aligns
    both, own = list(dict.fromkeys([*original, *edited])), list(dict.fromkeys(edited))
    return (gr.update(choices=both, value=_kept(blend, both)),
            gr.update(choices=own, value=_kept(reweight_words, own)),
            gr.update(value=actions.edit_cross_steps_for(original, edited)))


def on_reweight_slots(words, slots, *factors) -> tuple:
    """One reweight slider per ticked word, in the order ticked, each keeping its factor while its word stays
    ticked; the words the sliders stand for, then every slider."""
    kept = dict(zip(slots or [], factors))
    words = list(words or [])[:len(factors)]
    shown = [gr.update(visible=True, label=f"{EDIT['reweight'].ui} '{w}'", value=kept.get(w, EDIT['reweight'].default))
             for w in words]
    return (words, *shown, *[gr.update(visible=False)] * (len(factors) - len(words)))


def reweight_of(slots, *factors) -> dict:
    """The sliders as the {word: factor} that "edit" takes."""
    return dict(zip(slots or [], factors))


@gpu
@ui_errors
def on_edit(source, prompt: str, blend: list | None = None, reweight: dict | None = None,
            cross_steps: float = EDIT["cross_steps"].default, self_steps: float = EDIT["self_steps"].default,
            progress=gr.Progress()) -> dict:
    """Edits the source (the explained image, an uploaded ImageCraft PNG, or an inverted picture) by editing its
    prompt, with Prompt-to-Prompt: the edited image (a PNG holding the edit), its difference from the source
    (amplified), and the changed words' maps over it. `blend`: words whose region alone changes; `reweight`:
    {word: factor} scales a word's attention; the step shares: how long the source's cross- and self-attention
    are kept."""
    pipe = models.get(source.model) if source is not None else None
    _prune_gradio_cache()
    edited = actions.edit(pipe, source, prompt, blend, reweight, cross_steps, self_steps,
                          progress=lambda step, total: progress((step, total), desc="editing"),
                          should_stop=event_cancelled, trusted_paths=models.allowed is None)
    for note in edited.notes:
        gr.Warning(as_text(note))
    return dict(edit_image=edited.path, difference=edited.difference, edit_maps=edited.maps, result=edited.path)


@ui_errors
def on_edit_use(result) -> dict:
    """Sends the edited image to the Generate tab: into its gallery (to download, with the edit in its metadata),
    and its settings into the fields (Generate then draws the edited prompt afresh, unedited)."""
    if result is None:
        raise ValueError("edit first: \"Use in Generate\" takes the edited image")
    settings, notes = actions.settings_from_png(result)
    for note in notes:
        gr.Info(as_text(note))
    return dict(gallery=[result], tabs=gr.Tabs(selected="generate"),
                **{_GENERATE_NAMES.get(name, name): value for name, value in settings.items()})


# --- the Fine-tune tab ------------------------------------------------------------------------------------------
def _data_view(rows, files) -> dict:
    """The caption table, the gallery of training images, their paths and a line on how many lack a caption."""
    gallery = [(f, row[1] or "missing caption") for f, row in zip(files, rows)]
    missing = sum(1 for row in rows if not row[1])
    note = (f"{len(files)} images" + (f"; **{missing} without a caption**: write them in the table" if missing
                                      else ", all captioned")) if files else ""
    return dict(table=rows, gallery=gallery, data=files, note=note)


@ui_errors
def on_upload(files) -> dict:
    """Images with same-name .txt captions, or zips of them: the caption table (editable) and the images."""
    try:
        rows, images = jobs.read_upload(files)
    finally:
        _drop_gradio_copies(files)
    if files and not images:
        raise ValueError("no images in the upload: add .png, .jpg or .webp files (with .txt captions), or a zip")
    return _data_view(rows, images)


def _drop_gradio_copies(files) -> None:
    """Deletes Gradio's cached copies of an upload once `read_upload` has taken what it keeps into its own folder
    (held to IMAGECRAFT_UPLOAD_MB) or refused it: otherwise each upload, refused ones included, would stay in
    Gradio's cache until its hourly sweep, outside any cap."""
    from gradio.utils import get_upload_folder

    if not files:
        return
    cache = Path(get_upload_folder()).resolve()
    for path in (p.resolve() for p in jobs.upload_paths(files)):
        if path.is_file() and cache in path.parents:
            path.unlink(missing_ok=True)
            if path.parent != cache and not any(path.parent.iterdir()):
                path.parent.rmdir()  # Gradio keeps each file in a folder named by its hash


@ui_errors
def on_demo_data() -> dict:
    """24 images of pink circles and squares: the built-in model does not know the word "pink". Prior preservation
    is left off (its prompts cleared): on the built-in model the plain LoRA keeps the old colours (100% -> 97% right)
    and draws pink triangles, which prior preservation prevents (docs/figures.md, fine-tuning)."""
    return dict(_data_view(*jobs.demo_data()), class_prompts="")


def _status(job) -> str:
    if job is None:
        return ""
    if job.state == "queued":
        ahead = jobs.TRAINING.ahead(job)
        return f"**Waiting**: {ahead} training job{'s' if ahead != 1 else ''} ahead of yours (one trains at a time)."
    if job.state == "running":
        return f"**Training** ({job.recipe.method}): {job.message or 'starting'}"
    resume = " Press **Resume** to continue from it." if job.state == "stopped" and job.step else ""
    return {"done": "**Done**: ", "stopped": "**Stopped**: ", "failed": "**Failed**: "}[job.state] + \
        as_text(job.message) + resume


@ui_errors
def on_finetune(files, table, method: str = FINETUNE["method"].default, steps: int = FINETUNE["steps"].default,
                rank: int = FINETUNE["rank"].default, lr: float = 0.0, validation_prompt: str = "",
                model: str = BUILTIN, class_prompts: str = "", job=None, progress=gr.Progress(),
                request: gr.Request = None):
    """Trains on the uploaded (or demo) images, one job at a time on this server; streams the status, the loss
    curve, the latest previews, the result files (at the end) and the job. lr 0: the method's default. The job
    belongs to this browser session."""
    if job is not None and not job.finished:
        raise ValueError("your previous fine-tune is still running: stop it first")
    started = jobs.start_finetune(models.source(model), files or [], table, method, steps, rank, lr or None,
                                  validation_prompt or "", class_prompts or "")
    started.previous = job.last_done() if job is not None else None  # "Use in Generate" falls back to it
    jobs.own(getattr(request, "session_hash", None), started)  # with a model allowlist, only it applies the LoRA
    log.info("fine-tune job %s queued (%s, %s steps)", started.id[:8], method, steps)
    yield from _follow(started, progress)


@ui_errors
def on_resume(job=None, progress=gr.Progress()):
    """Continues this session's stopped fine-tune from the checkpoint it kept, to its number of steps; streams as
    "finetune" does."""
    if job is None or job.state != "stopped":
        raise ValueError("nothing to resume: \"Resume\" continues a stopped fine-tune from its checkpoint")
    yield from _follow(jobs.resume_finetune(job), progress)


def _follow(job, progress):
    """Streams a job until it finishes: the status, the loss curve, the latest preview, the result files, the job.
    What the previous run showed stays until this one has its own (gr.skip), so a second run never blanks the
    first's results before it has any; the result files change only when this run ends with some."""
    def shown(value):
        return gr.skip() if value is None else value

    yield _status(job), gr.skip(), gr.skip(), gr.skip(), job
    while not job.finished:
        if event_cancelled():  # the browser went away: stop, keeping the checkpoint
            job.stop()
        if job.state == "running":
            progress((job.step, job.recipe.steps), desc="training")
        else:
            progress(0, desc="waiting for the job ahead")
        yield _status(job), shown(job.loss_plot()), shown(job.latest_preview()), gr.skip(), job
        time.sleep(1.0)
    yield _status(job), shown(job.loss_plot()), shown(job.latest_preview()), shown(job.files() or None), job


def on_stop(job):
    """Stops this session's fine-tune after the current step; the checkpoint is saved."""
    if job is None or job.finished:
        return _status(job) or "No fine-tune of yours is running."
    job.stop()
    return "**Stopping** after this step; the checkpoint will be kept."


def on_finetune_status(job=None) -> str:
    """This session's fine-tune: waiting, training (step and loss), done, stopped or failed."""
    return _status(job) or "No fine-tune in this session."


@ui_errors
def on_use(job) -> dict:
    """Puts a finished fine-tune into the Generate tab: a LoRA into the LoRA box at scale 1, a full model into the
    model box."""
    job = job.last_done() if job is not None else None  # after a Stop: the last run that finished its steps
    if job is None:
        raise ValueError("train something first: \"Use in Generate\" takes a finished fine-tune")
    if job.recipe.method == "lora":
        name = job.name
        return dict(lora=gr.update(choices=[("none", "none"), *jobs.shared_loras(), (name, str(job.output))],
                                   value=str(job.output)),
                    lora_scale=1.0, tabs=gr.Tabs(selected="generate"))
    path = models.allow(job.output)
    return dict(model=gr.update(choices=[*models.choices, path], value=path), tabs=gr.Tabs(selected="generate"))
