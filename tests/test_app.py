"""The Gradio app, launched on localhost: through gradio_client, and in a real browser (Debian's Chromium)."""

import io
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import iou, serve_app
from PIL import Image, PngImagePlugin

import app
from imagecraft.serve.models import BUILTIN
from imagecraft.settings import DEFAULT_STEPS, EDIT

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def url():
    with serve_app(concurrency=2) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def image_path(gallery_item):
    item = gallery_item["image"] if isinstance(gallery_item, dict) else gallery_item
    return item["path"] if isinstance(item, dict) else item


@pytest.mark.integration
def test_generate_api_with_defaults(client):
    gallery, seed = client.predict("a red circle on the left", seed=1234, api_name="/generate")
    assert seed == 1234 and len(gallery) == 1
    png = Image.open(image_path(gallery[0]))
    assert png.size == (64, 64)
    assert png.text["parameters"].startswith("a red circle on the left\n")  # served with its metadata
    record = json.loads(png.text["imagecraft"])
    assert record["seed"] == 1234 and record["num_inference_steps"] == DEFAULT_STEPS

    direct = app.models.get(None)("a red circle on the left", seed=1234, guidance_scale=5.0,
                                  num_inference_steps=DEFAULT_STEPS).images[0]
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(direct))


@pytest.mark.integration
def test_batch_and_random_seed(client):
    gallery, seed = client.predict("a blue square", num_images=3, api_name="/generate")
    assert len(gallery) == 3 and 0 <= seed < 2**32
    seeds = [json.loads(Image.open(image_path(g)).text["imagecraft"])["seed"] for g in gallery]
    assert seeds == [seed, seed + 1, seed + 2]
    assert isinstance(client.predict(api_name="/random_seed"), (int, float))


@pytest.mark.integration
def test_concurrent_requests_do_not_mix(client):
    prompts = ["a green triangle", "a white square", "a green triangle", "a black circle"] * 2
    jobs = [client.submit(p, seed=77, steps=10, api_name="/generate") for p in prompts]
    results = [job.result(timeout=300) for job in jobs]
    by_prompt = {}
    for prompt, (gallery, seed) in zip(prompts, results):
        png = Image.open(image_path(gallery[0]))
        assert json.loads(png.text["imagecraft"])["prompt"] == prompt and seed == 77
        by_prompt.setdefault(prompt, []).append(np.asarray(png.convert("RGB")))
    for images in by_prompt.values():  # the same seed gives the same image under concurrent load
        assert all(np.array_equal(images[0], other) for other in images[1:])
    assert not np.array_equal(by_prompt["a green triangle"][0], by_prompt["a white square"][0])


@pytest.mark.integration
@pytest.mark.parametrize("kwargs, message", [
    (dict(scheduler="karras_magic"), "unknown scheduler 'karras_magic'"),
    (dict(steps=100000), "steps must be an integer from 1 to 150, got 100000"),
    (dict(steps=2.5), "steps must be an integer from 1 to 150, got 2.5"),
    (dict(steps=True), "steps must be an integer from 1 to 150, got True"),
    (dict(steps="25"), "steps must be an integer from 1 to 150, got '25'"),
    (dict(width=100000), "width must be a multiple of 8 between 64 and 2048, got 100000"),
    (dict(width=100), "width must be a multiple of 8"),
    (dict(guidance=-2), "guidance scale must be a number from 0 to 30, got -2"),
    (dict(seed=1.5), "seed must be an integer from 0 to"),
    (dict(seed=True), "seed must be an integer from 0 to"),
    (dict(prompt=["a", "b"]), "prompt must be a string, got \\['a', 'b'\\]"),
    (dict(prompt=True), "prompt must be a string, got True"),
    (dict(negative_prompt=7), "negative_prompt must be a string, got 7"),
    (dict(num_images="2"), "number of images must be from 1 to 16, got '2'"),
    (dict(width=2048, height=2048, num_images=16, steps=150), "too large for this server"),
    (dict(model="x | y"), "'FILE \\| CONFIG' names a single .safetensors file"),
    (dict(model="/no/such/model"), "no model folder or file at '/no/such/model'"),
])
def test_bad_input_gets_a_message_and_the_app_keeps_serving(client, kwargs, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(**{"prompt": "a red circle", "api_name": "/generate", **kwargs})
    gallery, _ = client.predict("", seed=3, steps=5, api_name="/generate")  # empty prompt: unconditional
    assert len(gallery) == 1


@pytest.mark.integration
def test_read_png_restores_every_field(client):
    """/read_png gives plain values, keyed by /generate's parameters: passed back, they make the same image."""
    gallery, seed = client.predict("a yellow square at the top", negative_prompt="red", steps=12, guidance=3.5,
                                   seed=99, scheduler="euler_a", cache_interval=2, api_name="/generate")
    from gradio_client import handle_file

    settings, notes = client.predict(handle_file(image_path(gallery[0])), api_name="/read_png")
    assert settings == {"prompt": "a yellow square at the top", "negative_prompt": "red", "steps": 12,
                        "guidance": 3.5, "seed": 99, "scheduler": "euler_a", "width": 64, "height": 64,
                        "cache_interval": 2} and notes == []
    again, _ = client.predict(**settings, api_name="/generate")
    assert np.array_equal(np.asarray(Image.open(image_path(again[0]))), np.asarray(Image.open(image_path(gallery[0]))))


@pytest.mark.integration
def test_read_png_leaves_bad_fields_and_the_model_unchanged(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    info = PngImagePlugin.PngInfo()  # AUTOMATIC1111's, with no Size, a sampler we lack and steps out of range
    info.add_text("parameters", "a castle\nNegative prompt: fog\nSteps: 9999, Sampler: DPM++ SDE Karras, "
                                "CFG scale: 7, Seed: 3, Model: ../../somewhere/else")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    settings, notes = client.predict(handle_file(str(path)), api_name="/read_png")
    assert settings == {"prompt": "a castle", "negative_prompt": "fog", "guidance": 7, "seed": 3, "cache_interval": 1}
    assert notes == ["left out the PNG's steps: steps must be an integer from 1 to 150, got 9999",
                     "left out the PNG's sampler: ImageCraft has no sampler 'DPM++ SDE Karras'",
                     "the PNG gives no size; the current or default value is used",
                     "this image was made with the model '../../somewhere/else'; load it in the Model box to use it"]
    gallery, _ = client.predict(**settings, steps=2, api_name="/generate")  # plain values /generate takes
    assert len(gallery) == 1
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(AppError, match="this PNG carries no generation settings"):
        client.predict(handle_file(str(tmp_path / "plain.png")), api_name="/read_png")


@pytest.mark.integration
def test_load_model_reports_and_errors(client):
    from gradio_client.exceptions import AppError

    status, width, height = client.predict(BUILTIN, api_name="/load_model")
    assert "shapes-sd" in status and width == height == 64
    with pytest.raises(AppError, match="cannot download 'nobody/nothing'"):
        client.predict("nobody/nothing", api_name="/load_model")


@contextmanager
def browser_page(failure_png: str, **page_options):
    """A page in Debian's Chromium; on failure a full-page screenshot goes to tests/artifacts/`failure_png`."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(**page_options)
        try:
            yield page
        except Exception:
            page.screenshot(path=str(ARTIFACTS / failure_png), full_page=True)
            raise
        finally:
            browser.close()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_types_a_prompt_and_gets_an_image(url):
    with browser_page("browser-failure.png") as page:
        page.goto(url, wait_until="load")  # no networkidle: session state keeps a heartbeat open
        page.locator("#generate-button").wait_for(state="visible", timeout=60_000)
        page.get_by_label("Prompt", exact=True).fill("a blue circle on the right")
        page.locator("#generate-button").click()
        page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)
        src = page.locator("#gallery img").first.get_attribute("src")
        assert src and ".png" in src

        # bad input in the UI: a visible sentence, and the app keeps serving
        page.get_by_label("Model", exact=False).first.fill("/no/model")
        page.get_by_role("button", name="Load model").click()
        page.get_by_text("no model folder or file at '/no/model'").first.wait_for(timeout=60_000)
        page.locator("#generate-button").click()
        page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)


# the error badges Gradio's status trackers show (a tracker that is hidden has opacity 0), each as its block's id
ERROR_BADGES = """() => [...document.querySelectorAll('[data-testid=status-tracker] .error')]
    .filter(e => { for (let n = e; n; n = n.parentElement) if (getComputedStyle(n).opacity === '0') return false;
                   return e.getClientRects().length > 0; })
    .map(e => (e.closest('.block') || {}).id || '?')"""
# how much of an <img> a person sees: the drawn image's size (object-fit applied) and the part of it inside the
# element and every clipping ancestor
SHOWN = """img => {
    const r = img.getBoundingClientRect(), fit = getComputedStyle(img).objectFit;
    const nw = img.naturalWidth, nh = img.naturalHeight, sx = r.width / nw, sy = r.height / nh;
    const s = fit === 'cover' ? Math.max(sx, sy) : fit === 'none' ? 1 : fit === 'scale-down' ? Math.min(sx, sy, 1)
        : Math.min(sx, sy);
    const w = fit === 'fill' ? r.width : nw * s, h = fit === 'fill' ? r.height : nh * s;
    let box = {l: r.left + (r.width - w) / 2, t: r.top + (r.height - h) / 2};
    box = {l: box.l, t: box.t, r: box.l + w, b: box.t + h};
    let seen = {l: Math.max(box.l, r.left), t: Math.max(box.t, r.top), r: Math.min(box.r, r.right),
                b: Math.min(box.b, r.bottom)};
    for (let n = img.parentElement; n; n = n.parentElement) {
        if (getComputedStyle(n).overflow === 'visible') continue;
        const p = n.getBoundingClientRect();
        seen = {l: Math.max(seen.l, p.left), t: Math.max(seen.t, p.top), r: Math.min(seen.r, p.right),
                b: Math.min(seen.b, p.bottom)};
    }
    return {natural: [nw, nh], drawn: [w, h], seen: [seen.r - seen.l, seen.b - seen.t]};
}"""
# whether a person sees the element: the one at its centre is inside it (no overlay covers it)
ON_TOP = """sel => { const e = document.querySelector(sel); if (!e) return false; e.scrollIntoView({block: 'center'});
    const r = e.getBoundingClientRect();
    if (!r.width || !r.height) return false;
    const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    return !!top && (e === top || e.contains(top)); }"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_generate_shows_the_image_whole_and_errors_mark_only_their_field(url, tmp_path):
    """No seed before a generation; a PNG that is not ours gives one message and badges no field; the image is
    shown whole (no crop); a missing model marks the Model box only; our PNG fills the fields."""
    Image.new("RGB", (16, 16), (40, 40, 40)).save(tmp_path / "plain.png")
    with browser_page("generate-failure.png", viewport={"width": 1400, "height": 1100}) as page:
        page.goto(url, wait_until="load")
        page.locator("#generate-button").wait_for(state="visible", timeout=60_000)
        assert page.locator("#seed-used :is(input, textarea)").input_value() == ""  # nothing generated yet

        page.locator("#read-png input[type=file]").set_input_files(str(tmp_path / "plain.png"))
        page.get_by_text("this PNG carries no generation settings").first.wait_for(timeout=30_000)
        time.sleep(1.0)  # the event has ended: whatever it marks is marked now
        page.screenshot(path=str(ARTIFACTS / "generate-bad-png.png"))
        assert page.evaluate(ERROR_BADGES) == []
        assert page.get_by_label("Prompt", exact=True).input_value() == ""  # the fields keep their values

        page.get_by_label("Prompt", exact=True).fill("a red square at the bottom")
        page.get_by_label("Seed (-1: random)").first.fill("11")
        page.locator("#generate-button").click()
        image = page.locator("#gallery img").first
        image.wait_for(state="visible", timeout=120_000)
        page.wait_for_function("() => { const i = document.querySelector('#gallery img'); "
                               "return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
        shown = image.evaluate(SHOWN)
        page.locator("#gallery").screenshot(path=str(ARTIFACTS / "generate-gallery.png"))
        (nw, nh), (w, h), (seen_w, seen_h) = shown["natural"], shown["drawn"], shown["seen"]
        assert abs(w / h - nw / nh) < 0.01, shown  # not stretched
        assert seen_w >= w - 1 and seen_h >= h - 1, shown  # not cropped by object-fit or a clipping box
        assert page.locator("#seed-used :is(input, textarea)").input_value() == "11"

        page.get_by_label("Model", exact=False).first.fill("/no/model")
        page.get_by_role("button", name="Load model").click()
        page.get_by_text("no model folder or file at '/no/model'").first.wait_for(timeout=60_000)
        time.sleep(1.0)
        page.screenshot(path=str(ARTIFACTS / "generate-missing-model.png"))
        assert set(page.evaluate(ERROR_BADGES)) <= {"model"}  # width, height and the status did nothing wrong

        page.get_by_label("Prompt", exact=True).fill("")
        src = image.get_attribute("src")
        png = tmp_path / "ours.png"
        png.write_bytes(page.request.get(src).body())  # the served PNG, with its settings
        page.locator("#read-png").get_by_role("button", name="Clear").click()  # the plain PNG dropped before
        page.locator("#read-png input[type=file]").set_input_files(str(png))
        page.wait_for_function("p => [...document.querySelectorAll('textarea')].some(t => t.value === p)",
                               arg="a red square at the bottom", timeout=30_000)
        assert set(page.evaluate(ERROR_BADGES)) <= {"model"}  # reading a PNG marks nothing


@pytest.mark.integration
def test_attention_api_explains_the_generated_image(client):
    from gradio_client.exceptions import AppError

    from imagecraft.explain.maps import AttentionMaps

    prompt = "a blue square above a green triangle"
    gallery, _ = client.predict(prompt, seed=4321, steps=10, api_name="/generate")
    figure, image, npz, figure_file, words = client.predict(prompt, seed=4321, steps=10, api_name="/attention")[:5]
    generated = Image.open(image_path(gallery[0])).convert("RGB")
    view = Image.open(image).convert("RGB")  # scaled up with nearest neighbour, to click a pixel
    assert view.size == (512, 512)
    assert np.array_equal(np.asarray(view.resize(generated.size, Image.NEAREST)), np.asarray(generated))
    maps = AttentionMaps.load(npz)
    assert maps.words() == ["a", "blue", "square", "above", "green", "triangle"] and maps.num_steps == 10
    assert [c[0] for c in words["choices"]] == maps.words()
    assert Image.open(figure).size[0] > 4 * generated.size[0]  # the image and a panel per word
    with pytest.raises(AppError, match="type a prompt first"):
        client.predict("", api_name="/attention")
    assert len(client.predict("a red circle", steps=3, api_name="/attention")) == 12  # still serving
    assert len(client.predict("a red circle", steps=1, api_name="/attention")) == 12  # one step: sliders stay put


def assert_bars_cover_blank(page, elem_id: str):
    """What Gradio draws over an image component (its label at the top left, its buttons at the top right) covers
    only blank (white) pixels of the figure it shows: no title sits under them."""
    img = page.locator(f"#{elem_id} img").first
    box = img.bounding_box()
    png = np.asarray(Image.open(io.BytesIO(page.request.get(img.get_attribute("src")).body())).convert("L"))
    sx, sy = png.shape[1] / box["width"], png.shape[0] / box["height"]  # the figure's pixels per page pixel
    bars = page.locator(f"#{elem_id} [data-testid=block-label], #{elem_id} .icon-button-wrapper, "
                        f"#{elem_id} .icon-buttons")
    assert bars.count() >= 2, f"#{elem_id}: Gradio's label and buttons not found"
    for i in range(bars.count()):
        bar = bars.nth(i).bounding_box()
        if not bar:
            continue
        x0, x1 = max(0, bar["x"] - box["x"]) * sx, min(box["width"], bar["x"] + bar["width"] - box["x"]) * sx
        y0, y1 = max(0, bar["y"] - box["y"]) * sy, min(box["height"], bar["y"] + bar["height"] - box["y"]) * sy
        under = png[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        assert under.size == 0 or under.min() > 200, f"#{elem_id}: something is drawn under a bar at {bar}"


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_generates_then_explains_a_word(url):
    prompt = "a blue square above a green triangle"
    with browser_page("attention-failure.png", viewport={"width": 1400, "height": 1300}) as page:
        page.goto(url, wait_until="load")  # no networkidle: session state keeps a heartbeat open
        page.locator("#generate-button").wait_for(state="visible", timeout=60_000)
        page.get_by_label("Prompt", exact=True).fill(prompt)
        page.locator("#generate-button").click()
        page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)

        page.get_by_role("tab", name="Attention").click()
        assert page.get_by_label("Prompt to explain").input_value() == prompt  # follows the last generation
        page.locator("#explain-button").click()
        figure = page.locator("#attention-figure img")
        figure.wait_for(state="visible", timeout=120_000)
        words = page.locator("#attention-words")
        words.get_by_label("green").wait_for(timeout=30_000)
        page.wait_for_function("() => [...document.querySelectorAll('#attention-figure img, #attention-step img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
        for elem_id in ("attention-figure", "attention-step"):  # no title under Gradio's label or buttons
            assert_bars_cover_blank(page, elem_id)
        first, first_step = figure.get_attribute("src"), page.locator("#attention-step img").get_attribute("src")
        for word in ("a", "blue", "square", "above", "triangle"):  # leave only "green" ticked
            words.get_by_label(word, exact=True).uncheck()
        for elem_id, src in (("attention-figure", first), ("attention-step", first_step)):  # both follow the ticks
            page.wait_for_function(
                "([id, src]) => { const i = document.querySelector(`#${id} img`); return i && i.src !== src; }",
                arg=[elem_id, src], timeout=60_000)
        view = page.locator("#attention-image img")
        before = view.get_attribute("src")
        box = view.bounding_box()
        view.click(position={"x": box["width"] / 2, "y": box["height"] * 0.8})  # near the triangle
        page.locator("#attention-pixel img").wait_for(state="visible", timeout=60_000)
        page.wait_for_function("src => { const i = document.querySelector('#attention-image img'); "
                               "return i && i.src !== src && i.complete && i.naturalWidth > 0; }", arg=before,
                               timeout=30_000)
        page.wait_for_function("() => { const i = document.querySelector('#attention-pixel img'); "
                               "return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
        assert_bars_cover_blank(page, "attention-pixel")
        marked = np.asarray(Image.open(io.BytesIO(page.request.get(view.get_attribute("src")).body())).convert("L"))
        plain = np.asarray(Image.open(io.BytesIO(page.request.get(before).body())).convert("L"))
        changed = np.argwhere(marked != plain)  # the mark: around the clicked pixel, nowhere else
        assert len(changed) > 20
        cy, cx = changed.mean(0)
        assert abs(cx - marked.shape[1] / 2) < 0.05 * marked.shape[1] and abs(cy - marked.shape[0] * 0.8) < \
            0.05 * marked.shape[0], (cx, cy)
        time.sleep(2.0)  # the redraws queued by the unticks end
        page.locator("#attention-figure").screenshot(path=str(ARTIFACTS / "attention-figure.png"))
        page.locator("#attention-image").screenshot(path=str(ARTIFACTS / "attention-clicked.png"))
        page.screenshot(path=str(ARTIFACTS / "attention-tab.png"), full_page=True)


# --- the Edit panel (Prompt-to-Prompt) and the LoRA comparison in the Attention tab ---------------------------------
def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def object_mask(picture: np.ndarray, grow: int = 0) -> np.ndarray:
    """The shapes world's objects: pixels away from the background colour (the picture's most common one), grown by
    `grow` pixels."""
    from scipy import ndimage

    background = np.median(picture.reshape(-1, 3), axis=0)
    mask = np.abs(picture - background).max(-1) > 40
    return ndimage.binary_dilation(mask, iterations=grow) if grow else mask


def assert_only_the_object_changed(source: np.ndarray, edited: np.ndarray, most: int = 6, grows: bool = False):
    """A colour swap with blend: the object turned from red to blue, and every pixel more than 3 px from it is the
    source's within `most` levels, 99% of them within 3 (measured on the built-in model: at most 5, 99% within 2).
    `grows`: the edited object may be larger than the source's (an inverted picture's: IoU 0.63-0.80 on five
    pictures), so the pixels kept are those more than 3 px from either (at most 7)."""
    obj, near = object_mask(source), object_mask(source, grow=3)
    if grows:
        near |= object_mask(edited, grow=3)
        assert iou(obj, object_mask(edited)) >= 0.6, "the edit did not keep the object's place"
    assert obj.sum() > 100, "no object in the source"
    red, blue = source[obj].mean(0), edited[obj].mean(0)
    assert red[0] > red[2] + 100 and blue[2] > blue[0] + 100, (red, blue)
    outside = np.abs(edited - source).max(-1)[~near]
    assert outside.max() <= most and np.percentile(outside, 99) <= 3, (outside.max(), np.percentile(outside, 99))


@pytest.mark.integration
def test_edit_api_edits_the_explained_image(client):
    """After /attention the explained image is the Edit panel's source: /edit swaps the colour inside the object's
    region only, its difference image is taken against the explained image, and the changed word's map comes with
    it. The same prompt gives the source back bit for bit; an ImageCraft PNG dropped in is edited the same way."""
    prompt = "a red circle on the left"
    gallery, _ = client.predict(prompt, seed=3, api_name="/generate")
    generated = rgb(image_path(gallery[0]))
    client.predict(prompt, seed=3, api_name="/attention")
    edit, difference, maps = client.predict("a blue circle on the left", ["circle"], {}, api_name="/edit")
    edited = rgb(edit)
    assert_only_the_object_changed(generated, edited)
    assert np.array_equal(rgb(difference), np.clip(np.abs(edited - generated) * 4, 0, 255))  # against the source
    record = json.loads(Image.open(edit).text["imagecraft"])
    assert record["prompt"] == "a blue circle on the left" and record["seed"] == 3
    assert record["edit"] == {"source_prompt": prompt, "cross_steps": EDIT["cross_steps"].default,
                              "self_steps": EDIT["self_steps"].default, "reweight": {},
                              "blend": ["circle"]}
    assert Image.open(maps).size[0] > 2 * 64 * 2  # the edit and the map of "blue", the word it changed

    same, difference, _ = client.predict(prompt, [], {}, api_name="/edit")
    assert np.array_equal(rgb(same), generated) and rgb(difference).max() == 0  # the identity edit
    faded = rgb(client.predict(prompt, [], {"red": 0.0}, api_name="/edit")[0])  # "red" reweighted to 0
    obj = object_mask(generated)
    # the object lost colour (measured: its mean colour's channel spread 188 -> 159)
    assert np.ptp(faded[obj].mean(0)) < np.ptp(generated[obj].mean(0)) - 15

    from gradio_client import handle_file

    source, status, prefilled = client.predict(handle_file(image_path(gallery[0])), api_name="/edit_upload")[:3]
    assert np.array_equal(rgb(source), generated) and "drawn again from its settings" in status and prefilled == prompt
    again = client.predict("a blue circle on the left", ["circle"], {}, EDIT["cross_steps"].default,
                           EDIT["self_steps"].default, api_name="/edit")[0]
    assert np.array_equal(rgb(again), edited)


@pytest.mark.integration
def test_invert_api_makes_any_picture_editable(client, tmp_path):
    """A picture ImageCraft did not make (here one of its pictures without metadata, at twice the size) waits for
    /invert under what it shows; then /edit swaps the colour of the object only."""
    from gradio_client import handle_file

    gallery, _ = client.predict("a red circle on the left", seed=11, api_name="/generate")
    picture = Image.open(image_path(gallery[0])).convert("RGB")
    picture.resize((128, 128), Image.NEAREST).save(tmp_path / "drawn-elsewhere.png")  # no metadata
    shown, status = client.predict(handle_file(str(tmp_path / "drawn-elsewhere.png")), api_name="/edit_upload")[:2]
    assert "ImageCraft did not make this picture" in status and Image.open(shown).size == (128, 128)

    source, status, prefilled = client.predict(handle_file(str(tmp_path / "drawn-elsewhere.png")),
                                               "a red circle on the left", api_name="/invert")[:3]
    assert status.startswith("**Inverted**") and prefilled == "a red circle on the left"
    psnr = float(status.split(" dB PSNR")[0].rsplit(" ", 1)[1])
    assert psnr > 30, status  # measured 36 dB on such pictures
    inverted = rgb(source)
    assert inverted.shape == (64, 64, 3)  # inverted at the size the model draws
    edit = client.predict("a blue circle on the left", ["circle"], {}, api_name="/edit")[0]
    assert_only_the_object_changed(inverted, rgb(edit), most=16, grows=True)
    assert json.loads(Image.open(edit).text["imagecraft"])["edit"]["inverted"] is True


@pytest.mark.integration
def test_edit_bad_input_gets_one_sentence(url, tmp_path, capfd):
    """Every bad value gets one sentence naming it, never a traceback, and the panel keeps working."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(url, verbose=False)  # a session of its own: nothing explained yet
    with pytest.raises(AppError, match="nothing to edit yet: press \"Explain the last image\""):
        client.predict("a blue circle", api_name="/edit")
    client.predict("a red circle on the left", seed=5, steps=8, api_name="/attention")
    for args, message in [
        (("",), "type the edited prompt"),
        (("   ",), "type the edited prompt"),
        (("a blue circle on the left", ["dog"]), "the blend word 'dog' is in neither the source prompt nor the "
                                                 "edited prompt; their words are: a, red, circle, on, the, left, blue"),
        (("a blue circle on the left", [], {"blue": 9}), "the reweight factor of 'blue' must be a number from -5 to "
                                                         "5, got 9"),
        (("a blue circle on the left", [], {"red": 0.5}), "'red' is not in the edited prompt; its words are: a, "
                                                          "blue, circle, on, the, left"),
        (("a blue circle on the left", [], {}, 2), "cross_steps must be"),
        (("a blue circle on the left", "circle"), "blend must be a list"),
    ]:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/edit")
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "fake.png").write_text("not a picture either")
    with pytest.raises(AppError, match="Invalid file type"):
        client.predict(handle_file(str(tmp_path / "notes.txt")), api_name="/edit_upload")
    for endpoint, args in (("/edit_upload", ()), ("/invert", ("a red circle",))):
        with pytest.raises(AppError, match="this file is not a picture ImageCraft can read: drop a PNG, JPEG or WebP"):
            client.predict(handle_file(str(tmp_path / "fake.png")), *args, api_name=endpoint)
    Image.new("RGB", (64, 64), (149, 149, 149)).save(tmp_path / "grey.png")
    with pytest.raises(AppError, match="say what the picture shows first"):
        client.predict(handle_file(str(tmp_path / "grey.png")), "", api_name="/invert")
    assert len(client.predict("a blue circle on the left", api_name="/edit")) == 3  # still editing
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.integration
def test_an_edit_stops_when_its_request_is_cancelled():
    """The edit's step callback asks `should_stop` after every step, as generation does; the model is left as it
    was (the next generation is unchanged)."""
    from imagecraft.serve import actions

    pipe = app.models.get(None)
    source = actions.source_of(actions.explain(pipe, "a red circle on the left", seed=3, steps=6), BUILTIN)
    before = pipe("a green square", seed=1, num_inference_steps=4).images[0]
    steps = []
    with pytest.raises(actions.Cancelled, match="stopped after step 2 of 6"):
        actions.edit(pipe, source, "a blue circle on the left", progress=lambda step, total: steps.append(step),
                     should_stop=lambda: len(steps) >= 2)
    assert steps == [1, 2]
    after = pipe("a green square", seed=1, num_inference_steps=4).images[0]
    assert np.array_equal(np.asarray(before), np.asarray(after))


@pytest.mark.unit
def test_the_changed_words_and_the_reweight_sliders():
    """The maps shown are the words an edit swaps, adds or reweights (else its blend words, else all); the reweight
    sliders follow the ticked words, each keeping its factor while its word stays ticked."""
    from imagecraft.serve.actions import changed_words
    from imagecraft.serve.handlers import on_reweight_slots, reweight_of

    words = "a red circle on the left".split()
    assert changed_words(words, "a blue circle on the left".split(), {}, []) == ["blue"]
    assert changed_words(words, "a red circle on the left on a black background".split(), {}, []) == [
        "on", "a", "black", "background"]
    assert changed_words(words, words, {"(red:1.2)": 0.3}, []) == ["red"]
    assert changed_words(words, words, {}, ["circle"]) == ["circle"]
    assert changed_words(words, words, {}, []) == words

    from imagecraft.serve.actions import edit_cross_steps_for

    # the cross-attention share follows the edit's kind, as pipe.edit chooses it: a swap 1.0, added words 0.8
    assert edit_cross_steps_for(words, "a blue circle on the left".split()) == 1.0
    assert edit_cross_steps_for(words, words) == 1.0
    assert edit_cross_steps_for(words, "a red circle on the left on a black background".split()) == 0.8

    # the panel reads every occurrence of a word, as pipe.edit aligns them: words added that the prompt already has
    # are still added, while the checkboxes list each word once
    from imagecraft.serve.actions import EditSource
    from imagecraft.serve.handlers import on_edit_words
    from imagecraft.serve.models import BUILTIN

    source = EditSource("unused.png", "a red circle on the left", BUILTIN, {}, "unused.png")
    blend, reweight, cross = on_edit_words(source, "a red circle on the left on the left", [], [])
    assert cross["value"] == 0.8 and reweight["choices"] == ["a", "red", "circle", "on", "the", "left"]
    assert blend["choices"] == reweight["choices"]
    assert on_edit_words(source, "a blue circle on the left", [], [])[2]["value"] == 1.0

    slots, *sliders = on_reweight_slots(["red", "left"], [], *[1.0] * 4)
    assert slots == ["red", "left"] and [s["visible"] for s in sliders] == [True, True, False, False]
    assert sliders[0]["label"] == "Reweight 'red'" and sliders[0]["value"] == 1.0
    slots, *sliders = on_reweight_slots(["left"], ["red", "left"], 0.3, 2.5, 1.0, 1.0)  # "red" unticked
    assert slots == ["left"] and sliders[0]["value"] == 2.5 and not sliders[1]["visible"]
    assert reweight_of(["red", "left"], 0.3, 2.5, 1.0, 1.0) == {"red": 0.3, "left": 2.5}


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_edits_a_colour_only_where_it_should(url):
    """Generate, explain, then in the Edit panel: "a red circle on the left" -> "a blue circle on the left" with the
    circle blended. The circle turns blue and the background stays within a few levels; while the edit runs the
    source stays in view; the result, its difference and the changed word's map are shown whole; "Use in Generate"
    takes the edit there."""
    with browser_page("edit-failure.png", viewport={"width": 1400, "height": 1500}) as page:
        page.goto(url, wait_until="load")
        page.locator("#generate-button").wait_for(state="visible", timeout=60_000)
        page.get_by_label("Prompt", exact=True).fill("a red circle on the left")
        page.get_by_label("Seed (-1: random)").first.fill("3")
        steps = page.get_by_label("number input for Sampling steps").first
        steps.fill("60")  # an edit of a few seconds, long enough to see it running
        steps.press("Enter")
        page.locator("#generate-button").click()
        page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)

        page.get_by_role("tab", name="Attention").click()
        page.locator("#explain-button").click()
        page.locator("#attention-figure img").wait_for(state="visible", timeout=120_000)
        edit_prompt = page.locator("#edit-prompt textarea")
        page.wait_for_function("() => document.querySelector('#edit-prompt textarea').value === "
                               "'a red circle on the left'", timeout=60_000)  # prefilled with the explained prompt
        page.locator("#edit-source img").wait_for(state="visible", timeout=30_000)
        edit_prompt.fill("a blue circle on the left")
        blend = page.locator("#edit-blend")
        blend.get_by_label("blue", exact=True).wait_for(timeout=30_000)  # the words follow the edited prompt
        blend.get_by_label("circle", exact=True).check()
        page.locator("#edit-button").scroll_into_view_if_needed()
        page.locator("#edit-button").click()

        page.locator("#edit-result").get_by_text("editing").wait_for(timeout=60_000)
        page.locator("#edit-result").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "edit-running.png"))
        assert page.evaluate(ON_TOP, "#edit-source img")  # the source stays in view while the edit runs

        for elem_id in ("edit-result", "edit-difference", "edit-maps"):
            page.locator(f"#{elem_id} img").wait_for(state="visible", timeout=120_000)
        page.wait_for_function("() => ['edit-source', 'edit-result', 'edit-difference', 'edit-maps'].every(id => {"
                               "const i = document.querySelector(`#${id} img`); "
                               "return i && i.complete && i.naturalWidth > 0; })", timeout=30_000)
        time.sleep(1.0)  # the event has ended: whatever it marks is marked now
        assert page.evaluate(ERROR_BADGES) == []
        for elem_id in ("edit-source", "edit-result", "edit-difference", "edit-maps"):
            assert page.evaluate(ON_TOP, f"#{elem_id} img"), elem_id
            shown = page.locator(f"#{elem_id} img").evaluate(SHOWN)
            assert shown["seen"][0] >= shown["drawn"][0] - 1 and shown["seen"][1] >= shown["drawn"][1] - 1, \
                (elem_id, shown)
        assert_bars_cover_blank(page, "edit-maps")
        page.locator("#edit-result").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "edit-panel.png"))
        page.screenshot(path=str(ARTIFACTS / "edit-tab.png"), full_page=True)

        def served(elem_id):
            body = page.request.get(page.locator(f"#{elem_id} img").get_attribute("src")).body()
            return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)

        assert_only_the_object_changed(served("edit-source"), served("edit-result"))

        page.locator("#edit-use").click()
        page.locator("#generate-button").wait_for(state="visible", timeout=30_000)
        page.wait_for_function("p => [...document.querySelectorAll('textarea')].some(t => t.value === p)",
                               arg="a blue circle on the left", timeout=30_000)
        assert page.get_by_label("Prompt", exact=True).input_value() == "a blue circle on the left"
        src = page.locator("#gallery img").first.get_attribute("src")
        record = json.loads(Image.open(io.BytesIO(page.request.get(src).body())).text["imagecraft"])
        assert record["edit"]["blend"] == ["circle"]  # the gallery holds the edit's PNG


@pytest.fixture(scope="module")
def random_lora(tmp_path_factory) -> str:
    """A LoRA for the built-in model on every attention projection, random, strong enough to move where words look."""
    import copy

    import torch

    from imagecraft import lora

    unet = copy.deepcopy(app.models.get(None).unet)
    lora.add_lora(unet, lora.unet_targets(unet), rank=4, alpha=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(unet).values():
            b = layer.lora_B[lora.ADAPTER].weight
            b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
    folder = tmp_path_factory.mktemp("random-lora")
    lora.save(folder, unet)
    return str(folder / lora.WEIGHT_NAME)


@pytest.mark.integration
def test_attention_follows_the_lora_and_compares_it_at_0_and_1(client, random_lora):
    """/attention draws the image with the LoRA of the settings it follows; /attention_lora shows the ticked words'
    maps at LoRA scale 0 and 1 side by side (two panels a word, two words a row)."""
    from gradio_client.exceptions import AppError

    prompt = "a blue square above a green triangle"
    base = client.predict(prompt, seed=8, steps=10, api_name="/attention")[1]
    tuned = client.predict(prompt, seed=8, steps=10, lora=random_lora, lora_scale=1.0, api_name="/attention")[1]
    assert not np.array_equal(rgb(base), rgb(tuned))
    figure = client.predict(prompt, seed=8, steps=10, lora=random_lora, words=["square", "green"],
                            api_name="/attention_lora")
    width, height = Image.open(figure).size
    assert width > 800 and 400 < height < width  # the images, then "square" and "green": two pairs a row
    with pytest.raises(AppError, match="pick a LoRA in the Generate tab first"):
        client.predict(prompt, seed=8, steps=10, api_name="/attention_lora")


@pytest.mark.unit
def test_every_elem_id_is_unique_and_every_api_name_is_kept():
    demo = app.build_demo()
    ids = [block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)]
    assert len(ids) == len(set(ids)) and {"gallery", "training-gallery"} <= set(ids)
    named = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert named == {"generate", "attention", "load_model", "read_png", "random_seed", "finetune", "finetune_status",
                     "finetune_stop", "finetune_use", "finetune_upload", "finetune_demo_data", "finetune_resume",
                     "attention_lora", "edit_upload", "invert", "edit"}
    unprocessed = {fn.api_name for fn in demo.fns.values() if not fn.preprocess}  # our schemas read them as sent
    assert unprocessed == {"generate", "attention", "finetune", "attention_lora", "edit"}


@pytest.mark.unit
def test_event_cancelled_reads_what_gradio_has():
    """`handlers.event_cancelled` reads Gradio's private queue (no public API says whether an event is still
    wanted): an event of a queued Blocks is wanted while it sits in `_queue.active_jobs` and dropped once it has
    left. This fails when Gradio renames or reshapes what it reads."""
    import contextvars

    import gradio as gr
    from gradio.context import LocalContext
    from gradio.queueing import Event

    from imagecraft.serve.handlers import event_cancelled

    with gr.Blocks() as demo:
        gr.Button().click(lambda: None)
    demo.queue()
    event = Event(None, next(iter(demo.fns.values())), None, None)

    def in_event():
        LocalContext.blocks.set(demo)
        LocalContext.event_id.set(event._id)
        demo._queue.active_jobs = [None, [event]]
        running = event_cancelled()
        demo._queue.active_jobs = [None, None]  # cancelled, or its client went away
        return running, event_cancelled()

    assert contextvars.copy_context().run(in_event) == (False, True)
    assert event_cancelled() is False  # outside an event: nothing to cancel


@pytest.mark.integration
def test_a_cancelled_request_stops_and_frees_the_server(capfd):
    """A long request (16 images x 150 steps, ~30 s here) cancelled after 2 s stops sampling within a step, where
    Gradio alone would let its thread run to the end. Expected user errors log one line, never a traceback."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    with serve_app(concurrency=1) as url:
        client = Client(url, verbose=False)
        client.predict("a red circle", steps=2, api_name="/generate")  # warm
        calls = []  # UNet forwards of 16-image batches: the long request's steps
        hook = app.models.get(None).unet.register_forward_hook(
            lambda m, args, out: calls.append(1) if args[0].shape[0] >= 16 else None)
        try:
            long = client.submit("a red circle", steps=150, num_images=16, api_name="/generate")
            time.sleep(2.0)
            long.cancel()
            gallery, _ = client.predict("a blue square", steps=5, seed=1, api_name="/generate")
            assert len(gallery) == 1
            stopped_at = len(calls)
            time.sleep(1.5)
            assert 0 < stopped_at < 150 and len(calls) == stopped_at  # sampling stopped, not run to the end
        finally:
            hook.remove()

        with pytest.raises(AppError, match="width must be a multiple of 8"):
            client.predict("a red circle", width=100, api_name="/generate")
        with pytest.raises(AppError, match="steps must be an integer from 1 to 150, got 2.5"):
            client.predict("a red circle", steps=2.5, api_name="/generate")
    err = capfd.readouterr().err
    assert "Traceback" not in err


@pytest.mark.integration
def test_error_messages_reach_api_clients_as_plain_text(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict("<b>x</b>", api_name="/load_model")
    message = str(info.value)
    assert "&lt;" not in message and "<b>" not in message and "\u2039b\u203ax\u2039/b\u203a" in message


@pytest.mark.integration
def test_finetune_api_trains_streams_and_the_lora_generates(client, tmp_path):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="no training images"):
        client.predict({"headers": ["image", "caption", "note"], "data": []}, api_name="/finetune")
    rows, gallery, note, class_prompts = client.predict(api_name="/finetune_demo_data")
    assert len(rows["data"]) == 24 and "all captioned" in note
    assert all(r[1].startswith("a pink ") for r in rows["data"])
    assert class_prompts == ""  # the demo leaves prior preservation off (it stops pink reaching triangles)
    job = client.submit(rows, "lora", 8, 4, 0.01, "a pink triangle", BUILTIN, "a red circle\na blue square",
                        api_name="/finetune")
    updates = list(job)
    status, loss, preview, files = job.outputs()[-1][:4]
    assert status.startswith("**Done**") and len(updates) >= 2
    card = Path(next(f for f in files if f.endswith("README.md"))).read_text()
    assert "| class_prompts | ('a red circle', 'a blue square') |" in card
    assert Image.open(loss).size[0] > 300 and Image.open(preview).size[0] > 300  # the curve and the previews
    names = sorted(Path(f).name for f in files)
    # the word's own token's embedding comes with the LoRA (embeddings/pink.safetensors)
    assert names == ["README.md", "lora_kohya.safetensors", "loss.csv", "loss.png", "pink.safetensors",
                     "pytorch_lora_weights.safetensors"]
    assert client.predict(api_name="/finetune_status").startswith("**Done**")
    _, lora, scale = client.predict(api_name="/finetune_use")
    path = lora["value"]
    base, _ = client.predict("a pink circle", seed=5, steps=10, api_name="/generate")
    tuned, _ = client.predict("a pink circle", seed=5, steps=10, lora=path, lora_scale=1.0, api_name="/generate")
    png = Image.open(image_path(tuned[0]))
    assert f"<lora:{Path(path).name}:1>" in png.text["parameters"] and Path(path).name.startswith("finetune-")
    assert not np.array_equal(np.asarray(png.convert("RGB")), np.asarray(Image.open(image_path(base[0])).convert("RGB")))
    again, _ = client.predict("a pink circle", seed=5, steps=10, api_name="/generate")  # the shared model is clean
    assert np.array_equal(np.asarray(Image.open(image_path(again[0]))), np.asarray(Image.open(image_path(base[0]))))


@pytest.mark.integration
def test_finetune_captions_missing_are_named(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    for i in range(2):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / f"img{i}.png")
    (tmp_path / "img0.txt").write_text("a red square")
    rows, gallery, note = client.predict([handle_file(tmp_path / "img0.png"), handle_file(tmp_path / "img0.txt"),
                                          handle_file(tmp_path / "img1.png")], api_name="/finetune_upload")
    assert [r[1:] for r in rows["data"]] == [["a red square", ""], ["", "missing caption"]]
    assert "1 without a caption" in note
    with pytest.raises(AppError, match="1 of 2 images have no caption \\(img1.png\\)"):
        client.predict(rows, "lora", 5, api_name="/finetune")
    rows["data"][1][1] = "a red square too"
    job = client.submit(rows, "lora", 2, 2, 0, "", BUILTIN, api_name="/finetune")
    list(job)
    assert job.outputs()[-1][0].startswith("**Done**")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_uploads_trains_sees_the_loss_and_generates_with_the_lora(url, tmp_path):
    rng = __import__("random").Random(3)
    from imagecraft import shapes

    paths = []
    for i, (caption, image) in enumerate(shapes.colour_word_scenes(rng, 4, "pink")):
        Image.fromarray(image).save(tmp_path / f"pink{i}.png")
        (tmp_path / f"pink{i}.txt").write_text(caption)
        paths += [str(tmp_path / f"pink{i}.png"), str(tmp_path / f"pink{i}.txt")]
    with browser_page("finetune-failure.png", viewport={"width": 1400, "height": 1400}) as page:
        page.goto(url, wait_until="load")
        page.get_by_role("tab", name="Fine-tune").click()
        page.get_by_role("button", name="Use demo data: 24 pink circles and squares").click()
        page.get_by_text("24 images, all captioned").wait_for(timeout=60_000)
        table = page.locator("#finetune-table")
        note = table.get_by_role("columnheader", name="note").bounding_box()
        assert note["width"] >= 0.2 * table.bounding_box()["width"], note  # the note column is readable
        strip = page.locator("#training-gallery img")
        strip.nth(23).wait_for(state="attached", timeout=30_000)
        time.sleep(0.5)
        page.locator("#training-gallery").screenshot(path=str(ARTIFACTS / "finetune-training-images.png"))
        for i in range(strip.count()):  # every training image whole, none clipped by the strip
            shown = strip.nth(i).evaluate(SHOWN)
            assert shown["seen"][0] >= shown["drawn"][0] - 1 and shown["seen"][1] >= shown["drawn"][1] - 1, (i, shown)

        page.locator("#finetune-upload input[type=file]").set_input_files(paths)  # these replace the demo data
        page.get_by_text("4 images, all captioned").wait_for(timeout=60_000)
        page.locator("#finetune-use").click()  # nothing trained yet: refused, and only the status is marked
        page.get_by_text("train something first").first.wait_for(timeout=30_000)
        time.sleep(1.0)
        assert set(page.evaluate(ERROR_BADGES)) <= {"finetune-status"}
        steps = page.get_by_label("number input for Training steps")
        steps.fill("40")  # previews every 10 steps
        steps.press("Enter")
        page.locator("#finetune-button").click()

        # during the run: the loss curve and a preview are in view (nothing covers their centre) and change
        seen, shots = {"loss": set(), "preview": set()}, 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = page.locator("#finetune-status").inner_text()
            if "Done" in status:
                break
            for name in seen:
                if page.evaluate(ON_TOP, f"#finetune-{name} img"):
                    seen[name].add(page.locator(f"#finetune-{name} img").get_attribute("src"))
            if seen["preview"] and shots < 2:  # one early, one later in the run
                page.screenshot(path=str(ARTIFACTS / f"finetune-running-{shots}.png"))
                shots += 1
            time.sleep(0.5)
        assert len(seen["loss"]) >= 2 and len(seen["preview"]) >= 1, seen  # seen updating before the end
        page.get_by_text("Done").first.wait_for(timeout=240_000)
        page.screenshot(path=str(ARTIFACTS / "finetune-tab.png"), full_page=True)
        page.locator("#finetune-use").click()
        page.locator("#generate-button").wait_for(state="visible", timeout=30_000)
        page.get_by_label("Prompt", exact=True).fill("a pink circle")
        page.locator("#generate-button").click()
        page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)


@pytest.mark.integration
def test_finetune_second_run_stop_use_and_resume(client):
    """A second run keeps the first's results in view until it has its own; after a Stop, "Use in Generate" takes
    the last run that finished, and Resume continues the stopped one from its checkpoint to the end."""
    rows = client.predict(api_name="/finetune_demo_data")[0]
    first = client.submit(rows, "lora", 4, 4, 0.01, "", BUILTIN, "", api_name="/finetune")
    list(first)
    assert first.outputs()[-1][0].startswith("**Done**")
    _, done, _ = client.predict(api_name="/finetune_use")

    second = client.submit(rows, "lora", 40, 4, 0.01, "", BUILTIN, "", api_name="/finetune")
    deadline = time.monotonic() + 120
    # the first run's "Done: 4 steps" also says "step": wait for this run's own training line
    while "of 40" not in client.predict(api_name="/finetune_status") and time.monotonic() < deadline:
        time.sleep(0.2)
    client.predict(api_name="/finetune_stop")
    list(second)
    status = second.outputs()[-1][0]
    assert status.startswith("**Stopped**") and "Resume" in status
    assert all(update[1] is not None and update[3] is not None for update in second.outputs())  # never blanked
    _, lora, _ = client.predict(api_name="/finetune_use")
    assert lora["value"] == done["value"]  # the first run: the stopped one did not finish its steps

    resumed = client.submit(api_name="/finetune_resume")
    list(resumed)
    status, loss, _, files = resumed.outputs()[-1][:4]
    assert status.startswith("**Done**") and "40 steps" in status, status
    steps = [int(line.split(",")[0]) for line in Path(next(f for f in files if f.endswith("loss.csv")))
             .read_text().splitlines()[1:]]
    assert steps == list(range(1, 41))  # one curve: the resumed run continued the stopped one
    _, lora, _ = client.predict(api_name="/finetune_use")
    assert lora["value"] != done["value"] and Path(lora["value"]).name.startswith("finetune-")


@pytest.mark.unit
def test_ticked_words_keep_the_prompts_order():
    """A CheckboxGroup appends a re-ticked word to the end of its value; the figures keep the prompt's order."""
    from types import SimpleNamespace

    from imagecraft.serve.actions import in_prompt_order

    maps = SimpleNamespace(words=lambda: ["a", "blue", "square", "above", "green", "triangle"])
    assert in_prompt_order(maps, ["a", "square", "green", "blue"]) == ["a", "blue", "square", "green"]
    assert in_prompt_order(maps, []) == [] and in_prompt_order(maps, None) == []
