"""ImageCraft's web app: a Gradio Blocks UI over imagecraft, ready for Hugging Face Spaces.

    python app.py                      # http://127.0.0.1:7860, the built-in model, offline, on the CPU
    IMAGECRAFT_CONCURRENCY=2 python app.py

Layout is built in `build_demo()`, events are wired in `wire()`, and what each button does lives in
`imagecraft.service`. Every action has a stable api_name for gradio_client.
"""

from __future__ import annotations

import functools
import html
import logging
import os
import time
from pathlib import Path

import gradio as gr

from imagecraft import service
from imagecraft.schedulers import SCHEDULERS
from imagecraft.settings import DEFAULT_STEPS
from imagecraft.service import BUILTIN, ModelCache, generate, pick_seed, settings_from_png

EXAMPLES = [
    "a red circle on the left",
    "a blue square above a green triangle",
    "a yellow triangle at the top on a black background",
    "a purple circle to the left of an orange triangle",
    "a white square in the center on a red background",
    "a purple triangle on the right",  # a colour-shape pair the model never saw in training
]
CSS = "#gallery img { image-rendering: pixelated; }"  # small images scale up as crisp pixels
COLORMAPS = ["jet", "viridis", "inferno", "magma", "turbo", "gray"]
SCHEDULER_CHOICES = [(display, short) for short, (display, _, _) in SCHEDULERS.items()]

log = logging.getLogger("imagecraft.app")
models = ModelCache(device=os.environ.get("IMAGECRAFT_DEVICE"), dtype=os.environ.get("IMAGECRAFT_DTYPE"))

try:  # on a ZeroGPU Space, `spaces.GPU` attaches a GPU for the duration of each call
    import spaces

    gpu = spaces.GPU
except ImportError:
    def gpu(fn):
        return fn


# --- handlers: turn our errors into sentences in the UI --------------------------------------------------------
def _ui_errors(fn):
    """Our errors (ValueError with a sentence) become a message in the UI and one log line; only bugs log a
    traceback. The message goes through `_as_text`: Gradio renders it as HTML, and it may quote the user's input."""

    @functools.wraps(fn)  # keeps the signature: the API's parameter names and defaults come from it
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            raise _refused(fn, e) from e
        except service.Cancelled as e:
            log.info("%s: %s", fn.__name__, e)
            raise gr.Error(str(e), print_exception=False) from e

    return wrapped


def _refused(fn, error: Exception) -> gr.Error:
    """One log line, and the sentence as the UI's message (through `_as_text`)."""
    log.info("%s refused: %s", fn.__name__, str(error)[:300])
    return gr.Error(_as_text(str(error)), print_exception=False)


def _prune_gradio_cache():
    """Gradio keeps its own copies of served files (expired hourly by `delete_cache`); between those sweeps they are
    held to the same size cap as our outputs. Files under five minutes old may still be downloading, so stay."""
    from gradio.utils import get_upload_folder

    service.prune(Path(get_upload_folder()), keep_younger=300)


def _as_text(message: str) -> str:
    """Gradio shows an error as HTML, and ours may quote the user's input: angle brackets become look-alike
    characters, so nothing in it can become markup, while API clients still read plain text (not &lt;)."""
    return message.replace("<", "\u2039").replace(">", "\u203a")


def _cancelled() -> bool:
    """Whether Gradio has dropped the event this thread runs (its client cancelled it or went away). Gradio cannot
    stop a running thread, so sampling asks this after every step."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return False
    return not any(event._id == event_id for job in queue.active_jobs if job for event in job)


@gpu
@_ui_errors
def on_generate(prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS, guidance: float = 5.0,
                seed: int = -1, scheduler: str = "", width: int = 0, height: int = 0, num_images: int = 1,
                model: str = BUILTIN, lora: str = "none", lora_scale: float = 1.0, cache_interval: int = 1,
                progress=gr.Progress()):
    """Generates images for a prompt; returns the PNGs (with metadata) and the seed of the first one.
    width/height 0 and scheduler "" mean the model's own; lora "none" means none (else a LoRA trained in the
    Fine-tune tab, or any LoRA file on a server without a model allowlist); cache_interval 1 means no DeepCache."""
    progress(0, desc="loading model")
    pipe = models.get(model)
    _prune_gradio_cache()
    progress(0, desc="sampling")
    paths, first_seed, notes = generate(
        pipe, prompt, negative_prompt, steps, guidance, seed, scheduler or None, width, height, num_images,
        progress=lambda step, total: progress((step, total), desc="sampling"), should_stop=_cancelled,
        lora=lora, lora_scale=lora_scale, trusted_paths=models.allowed is None, cache_interval=cache_interval)
    for note in notes:
        gr.Warning(note)
    return paths, first_seed


@_ui_errors
def on_load_model(model: str, progress=gr.Progress()):
    """Loads a model (built-in, folder, .safetensors file or Hub id) once, for everyone; returns its status and
    sizes."""
    progress(0, desc=f"loading {model}")
    pipe = models.get(model)
    size = pipe.default_size
    name = html.escape(pipe.model_id).replace("*", "\\*").replace("_", "\\_")  # shown as Markdown
    return (f"Loaded **{name}** ({pipe.device}, {str(pipe.dtype).replace('torch.', '')}); "
            f"trained at {size}x{size}, sampler {SCHEDULERS[pipe.default_scheduler][0]}."), size, size


@_ui_errors
def on_png(file):
    """Restores each field from one of our PNGs (or an AUTOMATIC1111 one) whose value passes the settings checks;
    the others keep their value and a warning says why. The number of images and the model box are never set:
    a PNG can name any model, and a warning names it for the user to load."""
    if file is None:
        return [gr.update()] * 11
    settings, notes = settings_from_png(file)
    for note in notes:
        gr.Warning(_as_text(note))  # rendered as HTML, and it quotes the PNG's text
    names = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "scheduler", "width",
             "height")
    return ([settings[name] if name in settings else gr.update() for name in names] + [gr.update(), gr.update()]
            + [settings["cache_interval"]])  # always given: 1 for a PNG made without caching (pipeline_settings)


def on_random_seed():
    return pick_seed(-1)


# --- the Attention tab ------------------------------------------------------------------------------------------
@gpu
@_ui_errors
def on_attention(prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS, guidance: float = 5.0,
                 seed: int = -1, scheduler: str = "", width: int = 0, height: int = 0, model: str = BUILTIN,
                 progress=gr.Progress()):
    """Generates the image again with its cross-attention (the same pixels as Generate gives for these settings)
    and shows every word's map. Returns the overlay figure, the image (scaled up for clicking), the maps (.npz),
    the figure (PNG), the controls filled for this prompt and the first step's maps."""
    progress(0, desc="loading model")
    pipe = models.get(model)
    _prune_gradio_cache()
    explained = service.explain(
        pipe, prompt, negative_prompt, steps, guidance, seed, scheduler or None, width, height,
        progress=lambda step, total: progress((step, total), desc="sampling with attention"), should_stop=_cancelled)
    maps = explained.maps
    words = maps.words()
    figure = service.draw_attention(explained, words, {})
    at_first_step = service.draw_step(explained, words, 0, {})
    sizes = sorted({f"{l.size[0]}x{l.size[1]}" for l in maps.layers}, key=lambda s: -int(s.split("x")[0]))
    heads = min(l.heads for l in maps.layers)
    last = maps.num_steps
    return (explained, figure, explained.view_path, str(explained.folder / "attention.npz"), figure,
            gr.update(choices=words, value=words), gr.update(choices=["all", *sizes], value="all"),
            gr.update(choices=["all", *map(str, range(heads))], value="all"),
            # a slider needs its maximum above its minimum: with one step the range sliders stay put
            gr.update(maximum=max(last - 1, 1), value=0, interactive=last > 1),
            gr.update(maximum=max(last, 2), value=last, interactive=last > 1),
            gr.update(maximum=max(last - 1, 1), value=0, interactive=last > 1), None, at_first_step)


def _filters(explained, blocks, resolution, step_from, step_to, heads):
    if explained is None:
        raise ValueError("explain an image first: press \"Explain the last image\"")
    return service.attention_filters(explained.maps, blocks, resolution, step_from, step_to, heads)


@_ui_errors
def on_redraw(explained, words, blocks, resolution, step_from, step_to, heads, alpha, cmap, normalize):
    """Redraws the overlay from the stored maps (no model call)."""
    if explained is None:
        return gr.update(), gr.update()
    figure = service.draw_attention(explained, words,
                                    _filters(explained, blocks, resolution, step_from, step_to, heads),
                                    alpha, cmap, normalize)
    return figure, figure


@_ui_errors
def on_scrub(explained, words, step, blocks, resolution, alpha, cmap, normalize):
    """The time scrubber: the ticked words' maps at one sampling step."""
    if explained is None:
        return gr.update()
    filters = _filters(explained, blocks, resolution, 0, None, "all")
    return service.draw_step(explained, words, step, filters, alpha, cmap, normalize)


@_ui_errors
def on_pixel(explained, blocks, resolution, step_from, step_to, heads, evt: gr.SelectData):
    """Clicking a pixel of the image: how that pixel's attention splits over the prompt's tokens."""
    if explained is None:
        return gr.update()
    x, y = explained.pixel(evt.index[0], evt.index[1])
    return service.draw_pixel(explained, x, y, _filters(explained, blocks, resolution, step_from, step_to, heads))


# --- the Fine-tune tab ------------------------------------------------------------------------------------------
def _ui_errors_stream(fn):
    """`_ui_errors` for a handler that streams (a generator)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            raise _refused(fn, e) from e

    return wrapped


def _data_view(rows, files):
    gallery = [(f, row[1] or "missing caption") for f, row in zip(files, rows)]
    missing = sum(1 for row in rows if not row[1])
    note = (f"{len(files)} images" + (f"; **{missing} without a caption**: write them in the table" if missing
                                      else ", all captioned")) if files else ""
    return rows, gallery, files, note


@_ui_errors
def on_upload(files):
    """Images with same-name .txt captions, or zips of them: the caption table (editable) and the images."""
    rows, images = service.read_upload(files)
    if files and not images:
        raise ValueError("no images in the upload: add .png, .jpg or .webp files (with .txt captions), or a zip")
    return _data_view(rows, images)


@_ui_errors
def on_demo_data():
    """24 images of pink circles and squares: the built-in model does not know the word "pink". Prior preservation
    is left off (its prompts cleared): on the built-in model the plain LoRA keeps the old colours (100% -> 97% right)
    and draws pink triangles, which prior preservation prevents (docs/figures.md, fine-tuning)."""
    return (*_data_view(*service.demo_data()), "")


def _status(job) -> str:
    if job is None:
        return ""
    if job.state == "queued":
        ahead = service.TRAINING.ahead(job)
        return f"**Waiting**: {ahead} training job{'s' if ahead != 1 else ''} ahead of yours (one trains at a time)."
    if job.state == "running":
        return f"**Training** ({job.recipe.method}): {job.message or 'starting'}"
    return {"done": "**Done**: ", "stopped": "**Stopped**: ", "failed": "**Failed**: "}[job.state] + \
        _as_text(job.message)


@_ui_errors_stream
def on_finetune(files, table, method: str = "lora", steps: int = 400, rank: int = 8, lr: float = 0.0,
                validation_prompt: str = "", model: str = BUILTIN, class_prompts: str = "", job=None,
                progress=gr.Progress()):
    """Trains on the uploaded (or demo) images, one job at a time on this server; streams the status, the loss
    curve and the latest previews, then the result files. The job belongs to this browser session."""
    if job is not None and not job.finished:
        raise ValueError("your previous fine-tune is still running: stop it first")
    job = service.start_finetune(models.source(model), files or [], table, method, steps, rank, lr or None,
                                 validation_prompt or "", class_prompts or "")
    log.info("fine-tune job %s queued (%s, %s steps)", job.id[:8], method, steps)
    yield _status(job), None, None, None, job
    while not job.finished:
        if _cancelled():  # the browser went away: stop, keeping the checkpoint
            job.stop()
        if job.state == "running":
            progress((job.step, job.recipe.steps), desc="training")
        else:
            progress(0, desc="waiting for the job ahead")
        yield _status(job), job.loss_plot(), job.latest_preview(), None, job
        time.sleep(1.0)
    yield _status(job), job.loss_plot(), job.latest_preview(), job.files() or None, job


def on_stop(job):
    """Stops this session's fine-tune after the current step; the checkpoint is saved."""
    if job is None or job.finished:
        return _status(job) or "No fine-tune of yours is running."
    job.stop()
    return "**Stopping** after this step; the checkpoint will be kept."


def on_finetune_status(job=None) -> str:
    """This session's fine-tune: waiting, training (step and loss), done, stopped or failed."""
    return _status(job) or "No fine-tune in this session."


@_ui_errors
def on_use(job):
    """Puts a finished fine-tune into the Generate tab: a LoRA into the LoRA box, a full model into the model box."""
    if job is None or job.state != "done":
        raise ValueError("train something first: \"Use in Generate\" takes a finished fine-tune")
    name = f"fine-tune {job.id[:8]}"
    if job.recipe.method == "lora":
        return (gr.update(), gr.update(choices=[("none", "none"), (name, str(job.output))], value=str(job.output)),
                1.0, gr.Tabs(selected="generate"))
    path = models.allow(job.output)
    return (gr.update(choices=[*models.choices, path], value=path), gr.update(), gr.update(),
            gr.Tabs(selected="generate"))


# --- layout ----------------------------------------------------------------------------------------------------
def build_demo() -> gr.Blocks:
    default = models.get(None)  # the built-in model, loaded before the first request
    size = default.default_size
    # Gradio's copies of served files are dropped after an hour, checked every 30 minutes
    with gr.Blocks(title="ImageCraft", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# ImageCraft\nText to image with UNet_SD, a from-scratch Stable Diffusion UNet. "
                    "The built-in model draws circles, squares and triangles in eight colours: try the examples.")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    model = gr.Dropdown(models.choices, value=models.choices[0], scale=4,
                                        allow_custom_value=models.allowed is None,  # a public Space: its list only
                                        label="Model: the built-in one, a diffusers folder, a Hub id, or "
                                              "FILE.safetensors | CONFIG (a folder or Hub id of the same SD version)")
                    load = gr.Button("Load model", scale=1)
                status = gr.Markdown(f"Loaded **{default.model_id}**, trained at {size}x{size}.")
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox("", label="Prompt", placeholder="a red circle on the left", lines=2)
                        negative = gr.Textbox("", label="Negative prompt", lines=1)
                        gr.Examples(EXAMPLES, inputs=[prompt], label="Examples for the built-in model")
                        with gr.Row():
                            steps = gr.Slider(1, 150, value=DEFAULT_STEPS, step=1, label="Sampling steps")
                            guidance = gr.Slider(0, 30, value=5.0, step=0.5, label="CFG scale")
                        with gr.Row():
                            seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", scale=3)
                            dice = gr.Button("Random seed", scale=1)
                            reuse = gr.Button("Reuse last seed", scale=1)
                        with gr.Row():
                            scheduler = gr.Dropdown(SCHEDULER_CHOICES, value=default.default_scheduler,
                                                    label="Sampler")
                            num_images = gr.Slider(1, 16, value=1, step=1, label="Images")
                            cache = gr.Slider(1, 10, value=1, step=1, label="DeepCache interval",
                                              info="the whole UNet every N steps; 1: off, exact; 2-3: faster")
                        with gr.Row():
                            width = gr.Slider(64, 2048, value=size, step=8, label="Width")
                            height = gr.Slider(64, 2048, value=size, step=8, label="Height")
                        with gr.Row():
                            lora = gr.Dropdown([("none", "none")], value="none", scale=3, elem_id="lora",
                                               allow_custom_value=models.allowed is None,
                                               label="LoRA (train one in the Fine-tune tab"
                                                     + (", or give a LoRA file's path)" if models.allowed is None
                                                        else ")"))
                            lora_scale = gr.Slider(-1, 2, value=1.0, step=0.05, label="LoRA scale", scale=2)
                        run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    with gr.Column(scale=2):
                        gallery = gr.Gallery(label="Images (download keeps the PNG metadata)", type="filepath",
                                             format="png", columns=2, height=420, elem_id="gallery")
                        last_seed = gr.Number(label="Seed used", precision=0, interactive=False)
                        png = gr.File(label="Reproduce from PNG: drop one of our PNGs", file_types=[".png"],
                                      type="filepath")
            with gr.Tab("Attention", id="attention"):
                gr.Markdown("Which pixels each word of the prompt attended to (cross-attention, aggregated as "
                            "DAAM does). The settings follow your last generation; press the button to see "
                            "its maps. Click a pixel of the image to see how its attention splits over the words.")
                with gr.Row():
                    with gr.Column(scale=2):
                        att_prompt = gr.Textbox("", label="Prompt to explain", lines=2,
                                                placeholder="a blue square above a green triangle")
                        att_negative = gr.Textbox("", label="Negative prompt", lines=1)
                        with gr.Row():
                            att_seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                            att_steps = gr.Slider(1, 150, value=DEFAULT_STEPS, step=1, label="Sampling steps")
                        with gr.Row():
                            att_guidance = gr.Slider(0, 30, value=5.0, step=0.5, label="CFG scale")
                            att_scheduler = gr.Dropdown(SCHEDULER_CHOICES, value=default.default_scheduler,
                                                        label="Sampler")
                        att_width = gr.Number(value=0, precision=0, visible=False)
                        att_height = gr.Number(value=0, precision=0, visible=False)
                        att_model = gr.Textbox(BUILTIN, visible=False)
                        explain = gr.Button("Explain the last image", variant="primary", elem_id="explain-button")
                        att_words = gr.CheckboxGroup([], label="Words to show", elem_id="attention-words")
                        with gr.Row():
                            att_blocks = gr.CheckboxGroup(["down", "mid", "up"], value=["down", "up"],
                                                          label="UNet blocks")
                            att_resolution = gr.Dropdown(["all"], value="all", label="Resolution")
                            att_heads = gr.Dropdown(["all"], value="all", label="Heads")
                        with gr.Row():
                            att_from = gr.Slider(0, DEFAULT_STEPS - 1, value=0, step=1, label="From step")
                            att_to = gr.Slider(1, DEFAULT_STEPS, value=DEFAULT_STEPS, step=1,
                                               label="To step (exclusive)")
                        with gr.Row():
                            att_alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
                            att_cmap = gr.Dropdown(COLORMAPS, value="jet", label="Colormap")
                            att_normalize = gr.Radio([("per word", "word"), ("absolute", "absolute")],
                                                     value="word", label="Scale")
                    with gr.Column(scale=3):
                        att_figure = gr.Image(label="Attention per word", type="filepath", elem_id="attention-figure")
                        with gr.Row():
                            att_image = gr.Image(label="Image: click a pixel", type="filepath", interactive=False,
                                                 elem_id="attention-image")
                            att_pixel = gr.Image(label="Attention at the clicked pixel", type="filepath",
                                                 elem_id="attention-pixel")
                        att_step = gr.Slider(0, 24, value=0, step=1, label="Time scrubber: one sampling step")
                        att_step_figure = gr.Image(label="At this step", type="filepath")
                        with gr.Row():
                            att_npz = gr.File(label="Maps (.npz, AttentionMaps.load)")
                            att_png = gr.File(label="Figure (PNG)")
                att_state = gr.State(None)
            with gr.Tab("Fine-tune", id="finetune"):
                gr.Markdown("Teach the model new words from your own captioned images: a LoRA (small, fast) or a "
                            "full fine-tune of the UNet. One training job runs at a time on this server; yours "
                            "belongs to this browser tab. \"Use demo data\" teaches the built-in model the colour "
                            "word *pink*, which it has never seen.")
                with gr.Row():
                    with gr.Column(scale=3):
                        ft_upload = gr.File(label="Images with same-name .txt captions, or a .zip of them",
                                            file_count="multiple", file_types=["image", ".txt", ".zip"],
                                            type="filepath", elem_id="finetune-upload")
                        ft_demo = gr.Button("Use demo data: 24 pink circles and squares")
                        ft_note = gr.Markdown("")
                        ft_table = gr.Dataframe(headers=["image", "caption", "note"], datatype=["str", "str", "str"],
                                                column_count=(3, "fixed"), interactive=True, wrap=True,
                                                label="Captions: edit them here", elem_id="finetune-table")
                        ft_gallery = gr.Gallery(label="Training images", columns=8, height=180, elem_id="gallery")
                        with gr.Row():
                            ft_method = gr.Radio([("LoRA", "lora"), ("Full fine-tune", "full")], value="lora",
                                                 label="Method")
                            ft_steps = gr.Slider(1, 2000, value=400, step=1, label="Training steps")
                        with gr.Row():
                            ft_rank = gr.Slider(1, 64, value=8, step=1, label="LoRA rank")
                            ft_lr = gr.Number(value=0, label="Learning rate (0: 1e-4 for LoRA, 5e-5 for full)")
                        ft_prompt = gr.Textbox("", label="Validation prompt for the previews (default: the first "
                                                         "two captions)", placeholder="a pink triangle")
                        ft_class = gr.Textbox("", lines=3, max_lines=8, elem_id="finetune-class",
                                              label="Keep what the base model draws for these prompts (prior "
                                                    "preservation; one per line, empty: off; each step then costs "
                                                    "twice as much)",
                                              placeholder="a red circle\na blue square")
                        with gr.Row():
                            ft_train = gr.Button("Train", variant="primary", elem_id="finetune-button")
                            ft_stop = gr.Button("Stop (keeps a checkpoint)")
                    with gr.Column(scale=3):
                        ft_status = gr.Markdown("", elem_id="finetune-status")
                        ft_loss = gr.Image(label="Loss", type="filepath", elem_id="finetune-loss")
                        ft_preview = gr.Image(label="Previews: base model, LoRA at 0.5, LoRA at 1",
                                              type="filepath", elem_id="finetune-preview")
                        ft_files = gr.File(label="Results (LoRA, kohya copy, model card, loss)", file_count="multiple")
                        ft_use = gr.Button("Use in Generate", elem_id="finetune-use")
                ft_data = gr.State([])  # the uploaded images' paths on the server
                ft_job = gr.State(None)
        wire(dict(model=model, load=load, status=status, prompt=prompt, negative=negative, steps=steps,
                  guidance=guidance, seed=seed, dice=dice, reuse=reuse, scheduler=scheduler, num_images=num_images,
                  cache=cache,
                  width=width, height=height, run=run, gallery=gallery, last_seed=last_seed, png=png,
                  att_prompt=att_prompt, att_negative=att_negative, att_steps=att_steps, att_guidance=att_guidance,
                  att_seed=att_seed, att_scheduler=att_scheduler, att_width=att_width, att_height=att_height,
                  att_model=att_model, explain=explain, att_words=att_words, att_blocks=att_blocks,
                  att_resolution=att_resolution, att_heads=att_heads, att_from=att_from, att_to=att_to,
                  att_alpha=att_alpha, att_cmap=att_cmap, att_normalize=att_normalize, att_figure=att_figure,
                  att_image=att_image, att_pixel=att_pixel, att_step=att_step, att_step_figure=att_step_figure,
                  att_npz=att_npz, att_png=att_png, att_state=att_state, tabs=tabs, lora=lora,
                  lora_scale=lora_scale, ft_upload=ft_upload, ft_demo=ft_demo, ft_note=ft_note, ft_table=ft_table,
                  ft_gallery=ft_gallery, ft_method=ft_method, ft_steps=ft_steps, ft_rank=ft_rank, ft_lr=ft_lr,
                  ft_prompt=ft_prompt, ft_class=ft_class, ft_train=ft_train, ft_stop=ft_stop, ft_status=ft_status,
                  ft_loss=ft_loss, ft_preview=ft_preview, ft_files=ft_files, ft_use=ft_use, ft_data=ft_data,
                  ft_job=ft_job))
    return demo


def wire(ui: dict) -> None:
    """Every event of the app, in one place."""
    inputs = [ui[k] for k in ("prompt", "negative", "steps", "guidance", "seed", "scheduler", "width", "height",
                              "num_images", "model", "lora", "lora_scale", "cache")]
    # after each generation the Attention tab takes its settings (with the seed used), ready to explain it
    last = [ui[k] for k in ("prompt", "negative", "steps", "guidance", "last_seed", "scheduler", "width", "height",
                            "model")]
    explain_inputs = [ui[k] for k in ("att_prompt", "att_negative", "att_steps", "att_guidance", "att_seed",
                                      "att_scheduler", "att_width", "att_height", "att_model")]
    # preprocess=False: the values reach our schema as sent, so a bool, a string or 2.5 for a number gets our
    # sentence instead of being coerced by a component or failing there with a generic error
    ui["run"].click(on_generate, inputs, [ui["gallery"], ui["last_seed"]], api_name="generate",
                    preprocess=False).success(lambda *values: values, last, explain_inputs, api_name=False)
    ui["prompt"].submit(on_generate, inputs, [ui["gallery"], ui["last_seed"]], api_name=False,
                        preprocess=False).success(lambda *values: values, last, explain_inputs, api_name=False)
    ui["load"].click(on_load_model, [ui["model"]], [ui["status"], ui["width"], ui["height"]], api_name="load_model")
    ui["dice"].click(on_random_seed, None, ui["seed"], api_name="random_seed")
    ui["reuse"].click(lambda s: s if s is not None else -1, ui["last_seed"], ui["seed"], api_name=False)
    ui["png"].upload(on_png, ui["png"], inputs[:10] + [ui["cache"]], api_name="read_png")

    # Attention: explain, then redraw from the stored maps on every control (no model call)
    ui["explain"].click(on_attention, explain_inputs,
                        [ui[k] for k in ("att_state", "att_figure", "att_image", "att_npz", "att_png", "att_words",
                                         "att_resolution", "att_heads", "att_from", "att_to", "att_step",
                                         "att_pixel", "att_step_figure")], api_name="attention", preprocess=False)
    filters = [ui[k] for k in ("att_blocks", "att_resolution", "att_from", "att_to", "att_heads")]
    looks = [ui[k] for k in ("att_alpha", "att_cmap", "att_normalize")]
    for control in ("att_words", "att_blocks", "att_resolution", "att_from", "att_to", "att_heads", "att_alpha",
                    "att_cmap", "att_normalize"):
        ui[control].change(on_redraw, [ui["att_state"], ui["att_words"], *filters, *looks],
                           [ui["att_figure"], ui["att_png"]], api_name=False)
    ui["att_step"].change(on_scrub, [ui["att_state"], ui["att_words"], ui["att_step"], ui["att_blocks"],
                                     ui["att_resolution"], *looks], ui["att_step_figure"], api_name=False)
    ui["att_image"].select(on_pixel, [ui["att_state"], *filters], ui["att_pixel"], api_name=False)

    # Fine-tune: data in, one queued job per session, streamed progress, then into the Generate tab
    data_view = [ui[k] for k in ("ft_table", "ft_gallery", "ft_data", "ft_note")]
    ui["ft_upload"].upload(on_upload, ui["ft_upload"], data_view, api_name="finetune_upload")
    ui["ft_demo"].click(on_demo_data, None, data_view + [ui["ft_class"]], api_name="finetune_demo_data")
    # its own concurrency group: jobs waiting for the trainer stream their place without holding up generation
    ui["ft_train"].click(on_finetune, [ui[k] for k in ("ft_data", "ft_table", "ft_method", "ft_steps", "ft_rank",
                                                       "ft_lr", "ft_prompt", "model", "ft_class", "ft_job")],
                         [ui[k] for k in ("ft_status", "ft_loss", "ft_preview", "ft_files", "ft_job")],
                         api_name="finetune", concurrency_id="finetune", concurrency_limit=8)
    ui["ft_stop"].click(on_stop, ui["ft_job"], ui["ft_status"], api_name="finetune_stop", concurrency_limit=None)
    status = gr.Button(visible=False)  # the API's way to ask, without touching the page
    status.click(on_finetune_status, ui["ft_job"], ui["ft_status"], api_name="finetune_status",
                 concurrency_limit=None)
    ui["ft_use"].click(on_use, ui["ft_job"], [ui["model"], ui["lora"], ui["lora_scale"], ui["tabs"]],
                       api_name="finetune_use")


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    concurrency = int(os.environ.get("IMAGECRAFT_CONCURRENCY", "1"))
    build_demo().queue(default_concurrency_limit=concurrency).launch(
        css=CSS, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))


if __name__ == "__main__":
    main()
