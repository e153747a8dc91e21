"""The fine-tune concept suite: new colour words, new shapes and a new style, each taught to the built-in model from 24
captioned images as a user would bring them, then read by the shapes scorer.

Concepts are split once into tuning concepts (defaults may be chosen on them) and reporting concepts (the figures
come from them); pink stays the app's demo and is in neither. Per concept a recipe is trained with
`train.finetune.finetune` and measured:
  colour  the new colour on objects of the shapes shown (circles, squares) and on a shape never shown in it
          (triangles); read by the strict scorer with the new colour added to its palette and its neighbours
          (`decoys`: the suite's other colours and the demo's pink) as colours an object may be read as instead
  shape   the new shape in the colours shown and in colours never shown with it: right when its mask fits the ideal
          outline with IoU >= 0.80 and better than every other shape (`fit`)
  style   a hollow (outlined) object: the right colour, and the inside of its box the background's
and, for every concept, what the LoRA does to the model's own prompts: the strict scorer's "every attribute" on
one-object prompts before and after (read with the same colours, so an old colour drawn as a taught one or a
neighbour is wrong), and the texture inside objects (the pixels' standard deviation inside each object, less a 1 px
rim) against the base model's. The control (`CONTROL`: 24 scenes of the world itself) has only those two: what a
recipe costs the model when there is nothing new to learn.
"""

from __future__ import annotations

import random
import statistics
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from imagecraft import shapes

KNOWN = ("red", "blue", "green", "yellow")  # the colours a new shape is shown in
UNSHOWN = ("white", "purple", "orange", "black")  # and those it is asked in afterwards
OTHER_KINDS = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross")


@dataclass(frozen=True)
class Concept:
    word: str  # the word taught; the tokenizer splits each into pieces of its own
    kind: str  # "colour", "shape", "style", or "control" (nothing new: `CONTROL`)
    split: str  # "tune" or "report" ("control" for `CONTROL`)
    rgb: tuple | None = None  # a colour concept's colour
    form: str | None = None  # a shape concept's outline (world.outline's kinds)


CONCEPTS = (
    Concept("teal", "colour", "tune", rgb=(0, 128, 128)),
    Concept("magenta", "colour", "tune", rgb=(230, 0, 230)),
    Concept("navy", "colour", "tune", rgb=(20, 30, 110)),  # between two known colours (blue, black)
    Concept("diamond", "shape", "tune", form="diamond"),
    Concept("pentagon", "shape", "tune", form="pentagon"),  # nearly round, as hexagon is; diamond is a turned square
    Concept("hollow", "style", "tune"),
    Concept("cyan", "colour", "report", rgb=(0, 210, 210)),
    Concept("brown", "colour", "report", rgb=(120, 70, 20)),
    Concept("chartreuse", "colour", "report", rgb=(170, 255, 0)),
    Concept("hexagon", "shape", "report", form="hexagon"),
    Concept("cross", "shape", "report", form="cross"),
    Concept("outlined", "style", "report"),
)
# Nothing new: 24 one-object scenes of the world itself, captioned as the world captions them. What a recipe does to
# the model's own prompts and textures here is what fine-tuning itself costs, which no concept can be blamed for.
CONTROL = Concept("known", "control", "control")


def decoys(word: str | None = None) -> dict:
    """Colours an object drawn instead of the one asked for would be, for the scorer's `decoys` (they name objects
    but do not cut them out): every colour the suite teaches but `word`, and the demo's pink; with the world's
    eight and its grey, brown and pink make the eleven basic colour terms. Without them hot pink drawn for magenta
    is read as magenta (nearer it than purple), which no one asking for magenta would accept, and an old colour
    drawn as a taught one's neighbour passes."""
    named = {c.word: c.rgb for c in CONCEPTS if c.kind == "colour"} | shapes.NEW_COLOURS
    return {name: tuple(rgb) for name, rgb in named.items() if name != word}


# --- data ----------------------------------------------------------------------------------------------------
def draw_object(draw: ImageDraw.ImageDraw, form: str, placed, fill, rng: random.Random, hollow: bool = False):
    """One object of `form` in its placed box: filled, or its outline 3 px wide (`hollow`)."""
    kind, points = shapes.outline(form, placed.cx, placed.cy, placed.size, placed.size, rng)
    if form == "triangle":  # the world's own triangle, apex up, as render draws it
        half = placed.size / 2
        kind, points = "polygon", [(placed.cx, placed.cy - half), (placed.cx - half, placed.cy + half - 1),
                                   (placed.cx + half - 1, placed.cy + half - 1)]
    options = dict(outline=fill, width=3) if hollow else dict(fill=fill)
    (draw.ellipse if kind == "ellipse" else draw.polygon)(points, **options)


def scene(spec: shapes.Spec, rng: random.Random, concept: Concept, form: str) -> np.ndarray:
    """A 64x64 scene of one object of `spec`, its shape drawn as `form`, hollow for a style concept."""
    placed = shapes.place(spec, rng)
    colours = {**shapes.COLOURS, **({concept.word: concept.rgb} if concept.kind == "colour" else {})}
    image = Image.new("RGB", (shapes.SIZE, shapes.SIZE), spec.background_rgb)
    draw_object(ImageDraw.Draw(image), form, placed[0], colours[spec.objects[0].colour], rng,
                hollow=concept.kind == "style")
    return np.array(image)


def spec_for(rng: random.Random, colour: str, shape: str) -> shapes.Spec:
    spec = shapes.sample_spec(rng, two_objects=False)
    spec.objects[0].colour, spec.objects[0].shape = colour, shape
    if spec.background == colour:
        spec.background = None
    return spec


def caption(concept: Concept, spec: shapes.Spec) -> str:
    """The world's caption with the concept's word where it belongs: the colour, the shape, or before the colour
    ("a hollow red circle")."""
    text = shapes.prompt_of(spec)
    if concept.kind == "style":
        obj = spec.objects[0]
        text = text.replace(f"{shapes.article(obj.colour)} {obj.colour} ",
                            f"{shapes.article(concept.word)} {concept.word} {obj.colour} ", 1)
    return text


def training_set(concept: Concept, n: int = 24) -> list[tuple[str, np.ndarray]]:
    """n (caption, image) pairs teaching `concept`: a colour on circles and squares, a shape in the KNOWN colours, a
    style on circles and squares in the world's colours, the control the world's own scenes. Each concept's scenes
    are its own (seeded by its word)."""
    rng, out = random.Random(zlib.crc32(concept.word.encode())), []
    for i in range(n):
        if concept.kind == "colour":
            spec, form = spec_for(rng, concept.word, ("circle", "square")[i % 2]), ("circle", "square")[i % 2]
        elif concept.kind == "shape":
            spec, form = spec_for(rng, KNOWN[i % len(KNOWN)], concept.word), concept.form
        elif concept.kind == "style":
            shape = ("circle", "square")[i % 2]
            spec, form = spec_for(rng, rng.choice(list(shapes.COLOURS)), shape), shape
        else:  # the control: the world's own one-object scenes
            spec = shapes.sample_spec(rng, two_objects=False)
            form = spec.objects[0].shape
        out.append((caption(concept, spec), scene(spec, rng, concept, form)))
    return out


def rehearsed(pairs, copies: int = 1, world: int = 0) -> list[tuple[str, np.ndarray]]:
    """The concept's pairs `copies` times, then `world` scenes of the world itself (one or two objects, as the base
    model learnt them): ground-truth rehearsal, which a user does not have, to ask whether the UNet can hold a
    concept and its world at once."""
    rng = random.Random(4242)
    return [p for _ in range(copies) for p in pairs] + [shapes.sample_scene(rng)[1:3] for _ in range(world)]


def write_folder(pairs, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (text, image) in enumerate(pairs):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(text)
    return folder


# --- reading the images --------------------------------------------------------------------------------------
def template(form: str, h: int, w: int) -> np.ndarray:
    """The ideal `form` filling an h x w box (its own bounding box stretched to the box), as the data draws it."""
    if form == "triangle":
        mask = Image.new("1", (w, h), 0)
        ImageDraw.Draw(mask).polygon([(w / 2, 0), (0, h - 1), (w - 1, h - 1)], fill=1)
        return np.array(mask, dtype=bool)
    big = 8 * max(h, w)  # drawn large, cropped to what it covers, then brought down to the box
    mask = Image.new("1", (big, big), 0)
    kind, points = shapes.outline(form, big / 2, big / 2, big - 4, big - 4, random.Random(0))
    (ImageDraw.Draw(mask).ellipse if kind == "ellipse" else ImageDraw.Draw(mask).polygon)(points, fill=1)
    mask = mask.crop(mask.getbbox()).convert("L").resize((w, h), Image.BILINEAR)
    return np.array(mask) >= 128


def fit(mask: np.ndarray, forms=OTHER_KINDS) -> dict[str, float]:
    """IoU of the mask with each ideal form in the mask's bounding box."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return {f: float((crop & (t := template(f, *crop.shape))).sum() / (crop | t).sum()) for f in forms}


def main_object(image: np.ndarray, rgb: tuple) -> np.ndarray | None:
    """The largest connected region of pixels nearer `rgb` than the background (the border's commonest colour)."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    values, counts = np.unique(border.round(), axis=0, return_counts=True)
    background = values[counts.argmax()]
    near = ((pixels - np.array(rgb, np.float32)) ** 2).sum(-1) < ((pixels - background) ** 2).sum(-1)
    labels, n = ndimage.label(near)
    if not n:
        return None
    sizes = ndimage.sum(near, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def shape_right(image: np.ndarray, rgb: tuple, form: str) -> bool:
    mask = main_object(image, rgb)
    if mask is None or mask.sum() < shapes.MIN_AREA:
        return False
    ious = fit(mask, tuple(dict.fromkeys(OTHER_KINDS + (form,))))
    return ious[form] >= shapes.FIT_IOU and ious[form] == max(ious.values())


def hollow_right(image: np.ndarray, rgb: tuple) -> bool:
    """The object's colour forms a ring: at most 60% of its box, and the middle of its box is background."""
    mask = main_object(image, rgb)
    if mask is None or mask.sum() < shapes.MIN_AREA:
        return False
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    middle = box[h // 3:h - h // 3, w // 3:w - w // 3]
    return box.mean() <= 0.6 and middle.size > 0 and middle.mean() < 0.2


def texture(images, prompts) -> float:
    """Mean over the objects the scorer finds of the pixels' standard deviation inside the object (less a 1 px
    rim): a flat fill is 0, a mottled one more."""
    values = []
    for image, prompt in zip(images, prompts):
        pixels = np.asarray(image, np.float32)
        spec = shapes.parse_prompt(prompt)
        rgb = np.array(shapes.COLOURS[spec.objects[0].colour], np.float32)
        mask = main_object(pixels, tuple(rgb))
        if mask is None:
            continue
        inner = ndimage.binary_erosion(mask)
        if inner.sum() >= 10:
            values.append(float(pixels[inner].std(axis=0).mean()))
    return statistics.mean(values) if values else float("nan")


def rate(verdicts) -> float:
    """The share of True among verdicts (Python or numpy bools)."""
    verdicts = [bool(v) for v in verdicts]
    return sum(verdicts) / max(1, len(verdicts))


# --- one recipe over the suite -------------------------------------------------------------------------------
def evaluate(pipe, concept: Concept, seeds: int = 3, steps: int = 25, guidance: float = 5.0) -> dict:
    """The concept's rates with the LoRA loaded in `pipe`: `shown` and `unshown` (the colours or shapes it was shown
    with, and others); none for the control, whose measure is the old prompts."""
    rng = random.Random(7)
    out = {}
    if concept.kind == "control":
        return out
    if concept.kind == "colour":
        palette, others = {concept.word: concept.rgb}, decoys(concept.word)
        for group, shape_list in (("shown", ("circle", "square")), ("unshown", ("triangle",))):
            specs = [spec_for(rng, concept.word, s) for s in shape_list for _ in range(5 * seeds)]
            images = pipe([shapes.prompt_of(s) for s in specs], seed=900, num_inference_steps=steps,
                          guidance_scale=guidance).images
            scores = [shapes.score(im, s, palette, others) for im, s in zip(images, specs)]
            # on the shapes shown, the colour; on a shape never shown in it, the colour and that shape
            out[group] = rate(s["colour"] and (group == "shown" or s["shape"]) for s in scores)
    elif concept.kind == "shape":
        for group, colours in (("shown", KNOWN), ("unshown", UNSHOWN)):
            specs = [spec_for(rng, c, concept.word) for c in colours for _ in range(3 * seeds)]
            images = pipe([shapes.prompt_of(s) for s in specs], seed=900, num_inference_steps=steps,
                          guidance_scale=guidance).images
            out[group] = rate(shape_right(np.asarray(im), shapes.COLOURS[s.objects[0].colour],
                                                     concept.form) for im, s in zip(images, specs))
    else:  # a style
        for group, shape_list in (("shown", ("circle", "square")), ("unshown", ("triangle",))):
            specs = [spec_for(rng, rng.choice(list(shapes.COLOURS)), s) for s in shape_list for _ in range(5 * seeds)]
            images = pipe([caption(concept, s) for s in specs], seed=900, num_inference_steps=steps,
                          guidance_scale=guidance).images
            out[group] = rate(hollow_right(np.asarray(im), shapes.COLOURS[s.objects[0].colour])
                                         for im, s in zip(images, specs))
    return out


def old_images(pipe, prompts, steps: int = 25, guidance: float = 5.0) -> list:
    """The model's images of its own one-object prompts, 50 to a call, each call seeded by its first index."""
    return [im for start in range(0, len(prompts), 50)
            for im in pipe(prompts[start:start + 50], seed=start, num_inference_steps=steps,
                           guidance_scale=guidance).images]


def old_right(images, prompts, palette: dict | None = None, others: dict | None = None) -> float:
    """Every attribute right on the old prompts' images. With a taught colour in `palette` and its neighbours in
    `others` (`decoys`), an old colour drawn as one of them (purple drawn magenta or pink) is wrong, as a person
    would read it."""
    return rate(shapes.score(im, p, palette, others)["all"] for im, p in zip(images, prompts))


def trained(pipe, output: Path, recipe):
    """The fine-tuned model: `pipe` with the LoRA loaded, or the model folder a full fine-tune wrote."""
    if recipe.method == "full":
        from imagecraft.pipeline import ImageCraftPipeline

        return ImageCraftPipeline.from_pretrained(output, dtype=pipe.dtype)
    pipe.load_lora(output)
    return pipe


def run(pipe, recipe, concepts, work: Path, old: list[str], seeds: int = 3, log=print, copies: int = 1,
        world: int = 0, model=None) -> list[dict]:
    """Trains `recipe` on each concept (from `model`, the folder `pipe` was loaded from; None: the built-in model;
    its data `rehearsed(..., copies, world)`) and measures it; one row per concept."""
    from imagecraft.train.finetune import finetune

    pipe.unload_lora()
    base_images = old_images(pipe, old)  # drawn once, read with each concept's colours
    base_texture = texture(base_images, old)
    rows = []
    for concept in concepts:
        colour = concept.kind == "colour"
        palette = {concept.word: concept.rgb} if colour else None
        others = decoys(concept.word if colour else None)
        before = old_right(base_images, old, palette, others)
        data = write_folder(rehearsed(training_set(concept), copies, world), work / concept.word / "data")
        started = time.perf_counter()
        result = finetune(model, data, work / concept.word / "lora", recipe, show_bar=False)
        minutes = (time.perf_counter() - started) / 60
        tuned = trained(pipe, work / concept.word / "lora", recipe)
        rates = evaluate(tuned, concept, seeds)
        images = old_images(tuned, old)
        right, tex = old_right(images, old, palette, others), texture(images, old)
        pipe.unload_lora()
        row = dict(concept=concept.word, kind=concept.kind, split=concept.split, steps=result.step,
                   kept=result.kept_step or result.step, minutes=minutes,
                   **rates, old_before=before, old_after=right, texture_ratio=tex / base_texture)
        log("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        rows.append(row)
    return rows
