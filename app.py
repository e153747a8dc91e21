"""ImageCraft's web app: a Gradio Blocks UI over imagecraft, ready for Hugging Face Spaces.

    python app.py                      # http://127.0.0.1:7860, the built-in model, offline, on the CPU
    IMAGECRAFT_CONCURRENCY=2 python app.py

Layout and wiring only: one `build_<tab>()` per tab (and `build_edit()` for the Attention tab's Edit panel), each
event wired beside its components. What each event does lives in `imagecraft.serve.handlers`; sliders take their
range, step, default and label from `imagecraft.settings`.
Every action has a stable api_name for gradio_client.
"""

from __future__ import annotations

try:  # ZeroGPU: `spaces` patches torch, so it comes before anything that could touch CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

import logging
import os
from dataclasses import dataclass

import gradio as gr

from imagecraft.schedulers import SCHEDULERS
from imagecraft.serve import handlers as h
from imagecraft.serve.handlers import models  # noqa: F401  (app.models: the shared model cache)
from imagecraft.serve.actions import AMPLIFY
from imagecraft.serve.models import BUILTIN
from imagecraft.serve.zerogpu import hardware_notes
from imagecraft.settings import (DEFAULT_STEPS, EDIT, FINETUNE, GENERATION, LORA_SCALE, LR_BY_METHOD, MAX_EDIT_WORDS,
                                 OVERLAY_ALPHA, Field)

EXAMPLES = [
    "a red circle on the left",
    "a blue square above a green triangle",
    "a yellow triangle at the top on a black background",
    "a purple circle to the left of an orange triangle",
    "a white square in the center on a red background",
    "a purple triangle on the right",  # a colour-shape pair the model never saw in training
]
# small images scale up as crisp pixels
CSS = ("#gallery img, #training-gallery img { image-rendering: pixelated; } "
       # the Edit panel's pictures fill their boxes (Gradio's Image never scales a picture up), as crisp pixels
       "#edit-source img, #edit-result img, #edit-difference img "
       "{ width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }")
COLORMAPS = ["jet", "viridis", "inferno", "magma", "turbo", "gray"]
SCHEDULER_CHOICES = [(display, short) for short, (display, _, _) in SCHEDULERS.items()]
METHODS = {"lora": "LoRA", "full": "Full fine-tune"}  # FINETUNE's methods as the app names them
PICTURES = [".png", ".jpg", ".jpeg", ".webp"]  # what the Edit panel takes (others are refused by name)


def hardware_note(tab: str) -> None:
    """What this hardware cannot do in the tab, said at its top (nothing where it can do everything)."""
    note = hardware_notes()[tab]
    if note:
        gr.Markdown(note, elem_id=f"{tab}-hardware-note")


def slider(field: Field, **options) -> gr.Slider:
    """A slider over a settings field: range, step, default and label from its table (`options` add to them)."""
    return gr.Slider(field.low, field.high, **{"value": field.default, "step": field.step, "label": field.ui,
                                               **options})


@dataclass
class GenerateTab:
    """What the other tabs use of the Generate tab."""
    settings: list  # prompt, negative prompt, steps, guidance, seed used, sampler, width, height, model, LoRA, scale
    generated: object  # the generate event, which the Attention tab follows
    model: gr.Dropdown
    lora: gr.Dropdown
    lora_scale: gr.Slider
    gallery: gr.Gallery
    fields: dict  # the fields a PNG's settings fill, by /generate's parameter names


def build_demo() -> gr.Blocks:
    default = h.models.get(None)  # the built-in model, loaded before the first request
    # Gradio's copies of served files are dropped after an hour, checked every 30 minutes
    with gr.Blocks(title="ImageCraft", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# ImageCraft\nText to image with UNet_SD, a from-scratch Stable Diffusion UNet. "
                    "The built-in model draws circles, squares and triangles in eight colours: try the examples.")
        with gr.Tabs() as tabs:
            generate = build_generate(default)
            build_attention(generate, default, tabs)
            build_finetune(generate, tabs)
    return h.quiet_gradio_refusals(demo)


def build_generate(default) -> GenerateTab:
    size = default.default_size
    g = GENERATION
    with gr.Tab("Generate", id="generate"):
        hardware_note("generate")
        with gr.Row():
            model = gr.Dropdown(h.models.choices, value=h.models.choices[0], scale=4, elem_id="model",
                                allow_custom_value=h.models.allowed is None,  # a public Space: its list only
                                label="Model: the built-in one, a diffusers folder, a Hub id, or "
                                      "FILE.safetensors | CONFIG (a folder or Hub id of the same SD version)")
            load = gr.Button("Load model", scale=1)
        status = gr.Markdown(f"Loaded **{default.model_id}**, trained at {size}x{size}.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox("", label="Prompt", placeholder="a red circle on the left", lines=2)
                negative = gr.Textbox(g["negative_prompt"].default, label=g["negative_prompt"].ui, lines=1)
                gr.Examples(EXAMPLES, inputs=[prompt], label="Examples for the built-in model")
                with gr.Row():
                    steps = slider(g["num_inference_steps"])
                    guidance = slider(g["guidance_scale"])
                with gr.Row():
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", scale=3)
                    dice = gr.Button("Random seed", scale=1)
                    reuse = gr.Button("Reuse last seed", scale=1)
                with gr.Row():
                    scheduler = gr.Dropdown(SCHEDULER_CHOICES, value=default.default_scheduler,
                                            label=g["scheduler"].ui)
                    num_images = slider(g["num_images"])
                    cache = slider(g["cache_interval"], info=g["cache_interval"].help)
                with gr.Row():
                    width = slider(g["width"], value=size)
                    height = slider(g["height"], value=size)
                with gr.Row():
                    lora = gr.Dropdown([("none", "none"), *h.jobs.shared_loras()], value="none", scale=3,
                                       elem_id="lora",
                                       allow_custom_value=h.models.allowed is None,
                                       label="LoRA (train one in the Fine-tune tab"
                                             + (", or give a LoRA file's path)" if h.models.allowed is None else ")"))
                    lora_scale = slider(LORA_SCALE, scale=2)
                run = gr.Button("Generate", variant="primary", elem_id="generate-button")
            with gr.Column(scale=2):
                # height "auto": the box grows to its square cells (one image fills the column's width), where a
                # fixed height cut off the bottom rows; "contain": a thumbnail is the whole image, never a crop
                gallery = gr.Gallery(label="Images (download keeps the PNG metadata)", type="filepath",
                                     format="png", columns=2, height="auto", object_fit="contain", elem_id="gallery")
                # the seed as a number for the API and the other tabs; shown as text, since Gradio's Number shows 0
                # for no value, while no seed has been used before the first generation
                last_seed = gr.Number(None, label="Seed used", precision=0, visible=False)
                seed_shown = gr.Textbox("", label="Seed used", interactive=False, placeholder="none yet",
                                        elem_id="seed-used")
                png = gr.File(label="Reproduce from PNG: drop one of our PNGs", file_types=[".png"], type="filepath",
                              elem_id="read-png")

        # progress, and an error, show on the field they concern: a bad model name marks the Model box only
        load.click(h.on_load_model, model, [status, width, height], api_name="load_model", show_progress_on=model)
        dice.click(h.on_random_seed, None, seed, api_name="random_seed")
        reuse.click(lambda s: int(s) if s else -1, seed_shown, seed, api_name=False)  # none yet: random
        # preprocess=False: the values reach our schema as sent, so a bool, a string or 2.5 for a number gets our
        # sentence instead of being coerced by a component or failing there with a generic error
        generated = gr.on([run.click, prompt.submit], h.on_generate,
                          [prompt, negative, steps, guidance, seed, scheduler, width, height, num_images, model, lora,
                           lora_scale, cache], [gallery, last_seed], api_name="generate", preprocess=False,
                          show_progress_on=gallery)
        generated.success(lambda s: "" if s is None else str(int(s)), last_seed, seed_shown, api_name=False,
                          show_progress="hidden")
        # a PNG's settings, keyed by /generate's parameter names (an API client passes them on as they are), and
        # the notes on those left out; then, in the page only, into the fields. A PNG that is not ours gives one
        # message and marks no field (show_progress "hidden" shows neither progress nor an error badge)
        png_settings, png_notes = gr.JSON(visible=False), gr.JSON(visible=False)
        restored = {"prompt": prompt, "negative_prompt": negative, "steps": steps, "guidance": guidance,
                    "seed": seed, "scheduler": scheduler, "width": width, "height": height, "cache_interval": cache}
        png.upload(h.on_png, png, [png_settings, png_notes], api_name="read_png", show_progress="hidden").success(
            h.to_components(h.png_fields, restored), png_settings, list(restored.values()), api_name=False,
            show_progress="hidden")
    return GenerateTab([prompt, negative, steps, guidance, last_seed, scheduler, width, height, model, lora,
                        lora_scale], generated, model, lora, lora_scale, gallery, restored)


def build_attention(generate: GenerateTab, default, tabs: gr.Tabs) -> None:
    g = GENERATION
    with gr.Tab("Attention", id="attention"):
        hardware_note("attention")
        gr.Markdown("Which pixels each word of the prompt attended to (cross-attention, aggregated as DAAM does). "
                    "The settings follow your last generation; press the button to see its maps. Click a pixel of "
                    "the image to see how its attention splits over the words.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox("", label="Prompt to explain", lines=2,
                                    placeholder="a blue square above a green triangle")
                negative = gr.Textbox(g["negative_prompt"].default, label=g["negative_prompt"].ui, lines=1)
                with gr.Row():
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                    steps = slider(g["num_inference_steps"])
                with gr.Row():
                    guidance = slider(g["guidance_scale"])
                    scheduler = gr.Dropdown(SCHEDULER_CHOICES, value=default.default_scheduler,
                                            label=g["scheduler"].ui)
                width = gr.Number(value=0, precision=0, visible=False)
                height = gr.Number(value=0, precision=0, visible=False)
                model = gr.Textbox(BUILTIN, visible=False)
                lora, lora_scale = gr.Textbox("none", visible=False), gr.Number(LORA_SCALE.default, visible=False)
                explain = gr.Button("Explain the last image", variant="primary", elem_id="explain-button")
                words = gr.CheckboxGroup([], label="Words to show", elem_id="attention-words")
                with gr.Row():
                    blocks = gr.CheckboxGroup(["down", "mid", "up"], value=["down", "up"], label="UNet blocks")
                    resolution = gr.Dropdown(["all"], value="all", label="Resolution")
                    heads = gr.Dropdown(["all"], value="all", label="Heads")
                with gr.Row():  # their ranges follow the explained image's steps
                    step_from = gr.Slider(0, DEFAULT_STEPS - 1, value=0, step=1, label="From step")
                    step_to = gr.Slider(1, DEFAULT_STEPS, value=DEFAULT_STEPS, step=1, label="To step (exclusive)")
                with gr.Row():
                    alpha = slider(OVERLAY_ALPHA)
                    cmap = gr.Dropdown(COLORMAPS, value="jet", label="Colormap")
                    normalize = gr.Radio([("per word", "word"), ("absolute", "absolute")], value="word",
                                         label="Scale")
            with gr.Column(scale=3):
                figure = gr.Image(label="Attention per word", type="filepath", elem_id="attention-figure")
                with gr.Row():
                    image = gr.Image(label="Image: click a pixel", type="filepath", interactive=False,
                                     elem_id="attention-image")
                    pixel = gr.Image(label="Attention at the clicked pixel", type="filepath",
                                     elem_id="attention-pixel")
                step = gr.Slider(0, 24, value=0, step=1, label="Time scrubber: one sampling step")
                step_figure = gr.Image(label="At this step", type="filepath", elem_id="attention-step")
                with gr.Row():
                    npz = gr.File(label="Maps (.npz, AttentionMaps.load)")
                    png = gr.File(label="Figure (PNG)")
                with gr.Column(visible=False) as lora_view:  # while the settings followed name a LoRA
                    compare = gr.Button("What the LoRA changed: the ticked words at LoRA scale 0 and 1",
                                        elem_id="attention-lora-button")
                    lora_figure = gr.Image(label="Without the LoRA (scale 0) and with it (scale 1)", type="filepath",
                                           elem_id="attention-lora")
        state = gr.State(None)
        edit_source = gr.State(None)  # what the Edit panel edits: the explained image, until a picture is dropped

        # after each generation this tab takes its settings (with the seed used), ready to explain it
        inputs = [prompt, negative, steps, guidance, seed, scheduler, width, height, model, lora, lora_scale]
        generate.generated.success(lambda *values: values, generate.settings, inputs, api_name=False)
        shown = {"state": state, "figure": figure, "image": image, "npz": npz, "png": png, "words": words,
                 "resolution": resolution, "heads": heads, "step_from": step_from, "step_to": step_to,
                 "step": step, "pixel": pixel, "step_figure": step_figure, "edit_source": edit_source}
        explained = explain.click(h.to_components(h.on_attention, shown), inputs, list(shown.values()),
                                  api_name="attention", preprocess=False, show_progress_on=figure)
        # every control redraws from the stored maps (no model call)
        filters, looks = [blocks, resolution, step_from, step_to, heads], [alpha, cmap, normalize]
        # a redraw takes a moment: its progress shows as the small timer only, the figure stays in view meanwhile
        gr.on([c.change for c in (words, *filters, *looks)], h.on_redraw, [state, words, *filters, *looks],
              [figure, png], api_name=False, show_progress="minimal", show_progress_on=figure)
        # "At this step" follows the scrubber and every control it reads, the word ticks included
        gr.on([c.change for c in (step, words, blocks, resolution, *looks)], h.on_scrub,
              [state, words, step, blocks, resolution, *looks], step_figure, api_name=False, show_progress="minimal")
        # the chart of the clicked pixel, and the image with that pixel marked
        image.select(h.on_pixel, [state, *filters], [pixel, image], api_name=False, show_progress_on=pixel)
        # with a LoRA in the settings followed: the ticked words' maps without it and with it
        lora.change(h.lora_shown, lora, lora_view, api_name=False, show_progress="hidden")
        compare.click(h.on_lora_compare, [*inputs[:-1], words, *looks], lora_figure, api_name="attention_lora",
                      preprocess=False, show_progress_on=lora_figure)
        build_edit(explained, edit_source, model, generate, tabs)


def build_edit(explained, source: gr.State, model: gr.Textbox, generate: GenerateTab, tabs: gr.Tabs) -> None:
    """The Attention tab's Edit panel: the explained image, or a picture dropped here, edited by editing its prompt
    (Prompt-to-Prompt)."""
    e = EDIT
    gr.Markdown("### Edit: change words, keep the picture\nEdit the explained image, or a picture you drop here, by "
                "editing its prompt: swap a word (*red* to *blue*) or add some, and the rest of the picture stays. "
                "A word to blend changes only its own region; reweighting scales a word's attention (0 removes it).")
    status = gr.Markdown("Explain an image above, or drop a picture, to edit it.", elem_id="edit-status")
    with gr.Row():
        upload = gr.File(label="Or edit a picture: a PNG ImageCraft made, or any other (inverted first)",
                         file_types=PICTURES, type="filepath", height=140, scale=2, elem_id="edit-upload")
        with gr.Column(scale=3):
            shows = gr.Textbox("", label="What the picture shows (to invert a picture ImageCraft did not make)",
                               placeholder="a red circle on the left", elem_id="edit-shows")
            invert = gr.Button("Invert", elem_id="invert-button")
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox("", label="Edited prompt", lines=2, elem_id="edit-prompt")
            blend = gr.CheckboxGroup([], label="Words to blend: only their region changes", elem_id="edit-blend")
            reweight_words = gr.CheckboxGroup([], label="Words to reweight", elem_id="edit-reweight-words")
            factors = [slider(e["reweight"], visible=False, elem_id=f"edit-reweight-{i}")
                       for i in range(MAX_EDIT_WORDS)]  # one per ticked word (on_reweight_slots)
            cross = slider(e["cross_steps"], info=e["cross_steps"].help)
            self_steps = slider(e["self_steps"], info=e["self_steps"].help)
            with gr.Row():
                run = gr.Button("Edit", variant="primary", elem_id="edit-button")
                use = gr.Button("Use in Generate", elem_id="edit-use")
        with gr.Column(scale=3):
            with gr.Row():  # the PNGs as served: the edit's holds its settings
                source_image, edit_image, difference = (
                    gr.Image(label=label, type="filepath", interactive=False, height=240, elem_id=f"edit-{name}")
                    for name, label in (("source", "Source"), ("result", "Edit"),
                                        ("difference", f"Difference x{AMPLIFY}")))
            edit_maps = gr.Image(label="Attention of the changed words in the edit", type="filepath",
                                 elem_id="edit-maps")
    result, slots = gr.State(None), gr.State([])
    reweight = gr.JSON({}, visible=False)  # the sliders as {word: factor}, what the "edit" API takes

    view = {"source": source, "source_image": source_image, "status": status, "prompt": prompt, "blend": blend,
            "reweight_words": reweight_words, "edit_image": edit_image, "difference": difference,
            "edit_maps": edit_maps, "result": result}
    explained.success(h.to_components(h.on_edit_explained, view), source, list(view.values()), api_name=False,
                      show_progress="hidden")
    uploaded = dict(view, shows=shows)
    upload.upload(h.to_components(h.on_edit_upload, uploaded), [upload, model], list(uploaded.values()),
                  api_name="edit_upload", show_progress_on=source_image)
    # progress shows where the source appears once it is drawn again (a PNG of ours) or inverted
    invert.click(h.to_components(h.on_invert, view), [upload, shows, model], list(view.values()), api_name="invert",
                 show_progress_on=source_image)
    # the words to tick and the cross-attention share follow the edited prompt as it is typed; the sliders the ticks
    prompt.change(h.on_edit_words, [source, prompt, blend, reweight_words], [blend, reweight_words, cross],
                  api_name=False, show_progress="hidden", trigger_mode="always_last")
    reweight_words.change(h.on_reweight_slots, [reweight_words, slots, *factors], [slots, *factors], api_name=False,
                          show_progress="hidden")
    edited = {"edit_image": edit_image, "difference": difference, "edit_maps": edit_maps, "result": result}
    run.click(h.reweight_of, [slots, *factors], reweight, api_name=False, show_progress="hidden", queue=False).success(
        h.to_components(h.on_edit, edited), [source, prompt, blend, reweight, cross, self_steps],
        list(edited.values()), api_name="edit", preprocess=False, show_progress_on=edit_image)
    into_generate = {**generate.fields, "gallery": generate.gallery, "tabs": tabs}
    use.click(h.to_components(h.on_edit_use, into_generate), result, list(into_generate.values()), api_name=False,
              show_progress_on=edit_image)  # a refusal marks the edit, not the Generate tab


def build_finetune(generate: GenerateTab, tabs: gr.Tabs) -> None:
    f = FINETUNE
    with gr.Tab("Fine-tune", id="finetune"):
        hardware_note("finetune")
        gr.Markdown("Teach the model new words from your own captioned images: a LoRA (small, fast) or a full "
                    "fine-tune of the UNet. The new word is the one in (almost) every caption. A LoRA's defaults "
                    "teach the word and leave the rest of the model as it was: the word gets a token of its own "
                    "whose embedding trains beside a rank-8 LoRA on the cross-attention's keys and values, and those "
                    "are held as they were for every other word, so prompts without the word draw what they drew. "
                    "On the built-in model this teaches a new colour (on 100% of objects, also on shapes never shown "
                    "in it, for colours the defaults were not tuned on) and keeps the model's own prompts and flat "
                    "fills; it does not teach a new shape or style. A full fine-tune trains towards what the base "
                    "model draws under your captions with the new word removed; it taught a diamond, but not a "
                    "nearly round shape without damage (README, fine-tuning). The LoRA's folder holds the word's "
                    "embedding beside the LoRA: ImageCraft and diffusers load both, AUTOMATIC1111 takes the "
                    "embedding from its embeddings folder. One training job runs at a time on this server; yours "
                    "belongs to this browser tab. \"Use demo data\" teaches the built-in model the colour word "
                    "*pink*, which it has never seen.")
        with gr.Row():
            with gr.Column(scale=3):
                upload = gr.File(label="Images with same-name .txt captions, or a .zip of them",
                                 file_count="multiple", file_types=["image", ".txt", ".zip"], type="filepath",
                                 elem_id="finetune-upload")
                demo_data = gr.Button("Use demo data: 24 pink circles and squares")
                note = gr.Markdown("")
                table = gr.Dataframe(headers=["image", "caption", "note"], datatype=["str", "str", "str"],
                                     column_count=(3, "fixed"), interactive=True, wrap=True,
                                     column_widths=["25%", "50%", "25%"],  # the note column readable too
                                     label="Captions: edit them here", elem_id="finetune-table")
                # thumbnails are about 100 px wide: 5 fit the column (8 ran off its right edge), and with no fixed
                # height every row is in view (180 px clipped the third)
                gallery = gr.Gallery(label="Training images", columns=5, height=None, object_fit="contain",
                                     elem_id="training-gallery")
                with gr.Row():
                    method = gr.Radio([(METHODS[m], m) for m in f["method"].choices], value=f["method"].default,
                                      label=f["method"].ui)
                    steps = slider(f["steps"])
                with gr.Row():
                    rank = slider(f["rank"])
                    defaults = ", ".join(f"{rate:.0e} for {'LoRA' if m == 'lora' else m}".replace("e-0", "e-")
                                         for m, rate in LR_BY_METHOD.items())
                    lr = gr.Number(value=0, label=f"{f['lr'].ui} (0: {defaults})")
                validation = gr.Textbox("", label="Validation prompt for the previews (default: the first two "
                                                  "captions)", placeholder="a pink triangle")
                class_prompts = gr.Textbox("", lines=3, max_lines=8, elem_id="finetune-class",
                                           label="Keep what the base model draws for these prompts (prior "
                                                 "preservation; one per line, empty: off; each step then costs "
                                                 "twice as much)",
                                           placeholder="a red circle\na blue square")
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="finetune-button")
                    stop = gr.Button("Stop (keeps a checkpoint)")
                    resume = gr.Button("Resume", elem_id="finetune-resume")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="finetune-status")
                loss = gr.Image(label="Loss", type="filepath", elem_id="finetune-loss")
                preview = gr.Image(label="Previews: base model, LoRA at 0.5, LoRA at 1", type="filepath",
                                   elem_id="finetune-preview")
                files = gr.File(label="Results (LoRA, kohya copy, model card, loss)", file_count="multiple")
                use = gr.Button("Use in Generate", elem_id="finetune-use")
        data = gr.State([])  # the uploaded images' paths on the server
        job = gr.State(None)
        check_status = gr.Button(visible=False)  # the API's way to ask, without touching the page

        data_view = {"table": table, "gallery": gallery, "data": data, "note": note}
        upload.upload(h.to_components(h.on_upload, data_view), upload, list(data_view.values()),
                      api_name="finetune_upload", show_progress_on=upload)
        demo_view = dict(data_view, class_prompts=class_prompts)
        demo_data.click(h.to_components(h.on_demo_data, demo_view), None, list(demo_view.values()),
                        api_name="finetune_demo_data")
        # its own concurrency group: jobs waiting for the trainer stream their place without holding up generation.
        # Progress shows on the status line only, as its small timer: the loss curve, the previews and the results
        # it streams stay in view for the whole run
        train.click(h.on_finetune, [data, table, method, steps, rank, lr, validation, generate.model, class_prompts,
                                    job], [status, loss, preview, files, job], api_name="finetune",
                    preprocess=False,  # as for generate: the values reach FINETUNE's schema as sent
                    concurrency_id="finetune", concurrency_limit=8, show_progress="minimal", show_progress_on=status)
        resume.click(h.on_resume, job, [status, loss, preview, files, job], api_name="finetune_resume",
                     concurrency_id="finetune", show_progress="minimal", show_progress_on=status)
        stop.click(h.on_stop, job, status, api_name="finetune_stop", concurrency_limit=None)
        check_status.click(h.on_finetune_status, job, status, api_name="finetune_status", concurrency_limit=None)
        into_generate = {"model": generate.model, "lora": generate.lora, "lora_scale": generate.lora_scale,
                         "tabs": tabs}
        use.click(h.to_components(h.on_use, into_generate), job, list(into_generate.values()),
                  api_name="finetune_use", show_progress_on=status)  # a refusal marks the status, not the Generate tab


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    concurrency = int(os.environ.get("IMAGECRAFT_CONCURRENCY", "1"))
    build_demo().queue(default_concurrency_limit=concurrency).launch(
        css=CSS, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))


if __name__ == "__main__":
    main()
