"""Prompt-to-Prompt editing and inversion on the built-in model, read by the strict shapes scorer (issue 36, part 5).

    python bench/bench_edit.py --split report                  # every section, the figures to quote
    python bench/bench_edit.py --split tune --cross-steps 0.6  # try another default on the tuning cases
    python bench/bench_edit.py --only colour time --colour 10 --reps 3
    python bench/bench_edit.py --grid docs/edit-grid.png --only  # the README's grid of edits, nothing measured

The cases are split once. Defaults (settings.EDIT's cross/self step shares, settings.INVERT_GUIDANCE) may be chosen on
`--split tune`; `--split report` has other colours, shape swaps, positions, relations and seeds, and its figures are
the ones to quote. Sources are generated at the pipeline's defaults (DPM++ 2M, 20 steps, guidance 5, dtype auto);
only sources in which the scorer finds every attribute right count, and each section says how many it dropped.

colour    "a red circle on the left" -> "a blue circle on the left": the new colour right (target >= 95%); the IoU of
          the object's mask with the source's (>= 0.90), and what lowers it (area, centroid, shape); with
          blend=[shape word], the share of pixels outside the object (outside both the source's and the edit's object, grown by 2 px for the decoder's soft rim) within
          4/255 of the source's (>= 99%), and their largest difference. Beside it the baseline: the same seed with
          the edited prompt and no editing, and how often its layout moves (mask IoU < 0.5 or centroid > 4 px).
shape     "a green circle ..." -> "a green square ...": the new shape right (>= 85%), how far the object's centroid
          (centre of mass) moves (<= 2 px), and beside it its bounding box's centre, which the world places and
          the scorer reads: a triangle's centroid sits a sixth of its height below its box's centre, so a swap to
          or from a triangle that keeps one cannot keep the other.
two       two objects, one recoloured: is the other unchanged (>= 90% of scenes), in two senses: "mask + colour"
          (the scorer reads it in its colour and shape, its mask IoU with the source's >= 0.90) and "pixels" (99%
          of its pixels within 4/255, its source mask less the 1 px rim where the decoder mixes object and
          background); plain and with blend=[the edited object's colour word].
reweight  a colour word's attention from 1 down to 0: the mean HSV saturation of the source object's pixels (the
          curve must fall monotonically; the share of scenes whose own curve does, within 0.005). White and black
          have no saturation to lose, so their scenes are left out.
time      one generation, one edit, one edit with blend, interleaved medians (target edit <= 2.2x a generation).
invert    pictures drawn by the world's renderer (not by the model): reconstruction PSNR and seconds of
          `pipe.invert` (a first call in a process is slower and is left out), then a colour swap of each.
"""

import argparse
import itertools
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_attention import environment
from bench.common import interleaved
from imagecraft import shapes
from imagecraft.pipeline import ImageCraftPipeline
from imagecraft.settings import EDIT, INVERT_GUIDANCE, SWAP_CROSS_STEPS

SECTIONS = ("colour", "shape", "two", "refine", "reweight", "time", "invert")
WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)  # the reweight curve
NEAR = 4  # /255: a pixel counts as unchanged within this
RIM = 2  # px an object's mask grows by before "outside the object" starts


@dataclass(frozen=True)
class Split:
    colours: tuple[str, ...]  # object colours, sources' and edits'
    positions: tuple[str | None, ...]  # one-object positions (None: no position word)
    relations: tuple[str, ...]  # two-object relations
    shape_swaps: tuple[tuple[str, str], ...]  # (source shape, edited shape)
    seed: int  # the first image seed; the case generator's seed too


# Disjoint colours, positions, relations, ordered shape swaps and seeds. Every shape is in both (the world has three).
SPLITS = {
    "tune": Split(("red", "green", "blue", "white"), ("on the left", "at the top", "in the center"), ("to the left of",),
                  (("circle", "square"), ("square", "triangle"), ("triangle", "circle")), 0),
    "report": Split(("yellow", "purple", "orange", "black"), ("on the right", "at the bottom", None), ("above", "and"),
                    (("square", "circle"), ("triangle", "square"), ("circle", "triangle")), 10_000),
}


# --- reading the pictures ---------------------------------------------------------------------------------------------
def objects_with_masks(image) -> list[dict]:
    """`shapes.read_objects`' objects, each with its (64, 64) bool `mask`."""
    return shapes.read_objects(image, masks=True)[1]


def object_mask(image) -> np.ndarray:
    """(64, 64) bool: every object the scorer finds (components of a non-background colour, specks left out)."""
    found = objects_with_masks(image)
    return np.any([o["mask"] for o in found], axis=0) if found else np.zeros((shapes.SIZE,) * 2, bool)


def only_object(image) -> dict | None:
    """The scorer's one object (colour, shape, cx, cy, mask), or None when it finds none or several."""
    found = objects_with_masks(image)
    return found[0] if len(found) == 1 else None


def moved(a: dict, b: dict | None, box: bool = False) -> float:
    """How far, in px, object b's centroid (its box's centre with `box`) lies from a's; inf when b is missing (the
    scorer found none or several objects)."""
    if b is None:
        return np.inf
    if box:
        return float(np.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"]))
    (ya, xa), (yb, xb) = (np.argwhere(o["mask"]).mean(0) for o in (a, b))
    return float(np.hypot(xa - xb, ya - yb))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def difference(a: Image.Image, b: Image.Image) -> np.ndarray:
    """(64, 64) the largest channel difference, 0..255."""
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max(-1)


def saturation(image: Image.Image, mask: np.ndarray) -> float:
    """Mean HSV saturation of the masked pixels."""
    px = np.asarray(image, np.float64)[mask] / 255
    return float(((px.max(1) - px.min(1)) / np.maximum(px.max(1), 1e-6)).mean())


def right(image, prompt: str) -> bool:
    return shapes.score(image, prompt)["all"]


def one_prompt(colour: str, shape: str, position: str | None) -> str:
    return shapes.prompt_of(shapes.Spec([shapes.Obj(colour, shape, position)]))


# --- the sections ------------------------------------------------------------------------------------------------------
class Bench:
    """The sections on one split; each adds rows to the table printed at the end."""

    def __init__(self, pipe: ImageCraftPipeline, split: Split, args):
        self.pipe, self.split, self.args = pipe, split, args
        self.steps = {"cross_steps": args.cross_steps, "self_steps": args.self_steps}
        self.rows = []  # (measurement, n, value text, target text, verdict)

    def row(self, what: str, n: int, value: str, target: str = "report", ok: bool | None = None):
        self.rows.append((what, n, value, target, "" if ok is None else ("pass" if ok else "FAIL")))

    def edit(self, src, prompt, **kwargs):
        return self.pipe.edit(src, prompt, **self.steps, **kwargs).images[0]

    def sources(self, n: int, salt: int, make):
        """([(source result, prompt, case)] of the right ones, how many were dropped) for n cases `make(rng)` ->
        (prompt, case), the seeds from the split's."""
        rng = random.Random(self.split.seed + salt)
        kept, dropped = [], 0
        for i in range(n):
            prompt, case = make(rng)
            src = self.pipe(prompt, seed=self.split.seed + salt + i)
            if right(src.images[0], prompt):
                kept.append((src, prompt, case))
            else:
                dropped += 1
        return kept, dropped

    def colour(self):
        s = self.split

        def make(rng):
            old, shape, position = rng.choice(s.colours), rng.choice(shapes.SHAPES), rng.choice(s.positions)
            new = rng.choice([c for c in s.colours if c != old])
            return one_prompt(old, shape, position), (one_prompt(new, shape, position), shape)

        kept, dropped = self.sources(self.args.colour, 0, make)
        m = {k: [] for k in ("right", "all", "iou", "area", "shift", "blend_right", "blend_iou", "inside", "max",
                             "plain_inside", "plain_max", "base_iou", "moved")}
        for src, _, (target, shape) in kept:
            source = src.images[0]
            mask, a = object_mask(source), only_object(source)
            edited = self.edit(src, target)
            m["right"].append(shapes.score(edited, target)["colour"])
            m["all"].append(right(edited, target))
            m["iou"].append(iou(mask, object_mask(edited)))
            m["area"].append(object_mask(edited).sum() / mask.sum())
            m["shift"].append(moved(a, only_object(edited)))
            blended = self.edit(src, target, blend=[shape])
            m["blend_right"].append(shapes.score(blended, target)["colour"])
            m["blend_iou"].append(iou(mask, object_mask(blended)))
            for key, image in (("", blended), ("plain_", edited)):
                outside = ~ndimage.binary_dilation(mask | object_mask(image), iterations=RIM)
                d = difference(image, source)[outside]
                m[key + "inside"].append(float((d <= NEAR).mean()))
                m[key + "max"].append(int(d.max()))
            plain = self.pipe(target, seed=src.seeds[0]).images[0]
            m["base_iou"].append(iou(mask, object_mask(plain)))
            m["moved"].append(m["base_iou"][-1] < 0.5 or moved(a, only_object(plain)) > 4)
        n = len(kept)
        print(f"\ncolour swap: {n} sources right of {self.args.colour} ({dropped} dropped)")
        if not n:
            return
        self.row("colour swap: new colour right", n, f"{np.mean(m['right']):.1%} (every attribute "
                 f"{np.mean(m['all']):.1%})", ">= 95%", np.mean(m["right"]) >= 0.95)
        self.row("colour swap: object mask IoU with the source's", n, f"{np.mean(m['iou']):.3f} (median "
                 f"{np.median(m['iou']):.2f}, min {min(m['iou']):.2f})", ">= 0.90", np.mean(m["iou"]) >= 0.90)
        shifts = np.array(m["shift"])
        by_shape = ", ".join(f"{k} {np.mean([v for v, (_, _, (_, sh)) in zip(m['iou'], kept) if sh == k]):.2f}"
                             for k in shapes.SHAPES if any(sh == k for _, _, (_, sh) in kept))
        self.row("  by shape", n, by_shape)
        self.row("  why: area edit/source; centroid moved", n, f"median {np.median(m['area']):.2f} (10-90% "
                 f"{np.percentile(m['area'], 10):.2f}-{np.percentile(m['area'], 90):.2f}); median "
                 f"{np.median(shifts):.1f} px, > 2 px in {np.mean(shifts > 2):.0%}")
        self.row("colour swap + blend: new colour right; IoU", n, f"{np.mean(m['blend_right']):.1%}; "
                 f"{np.mean(m['blend_iou']):.3f}")
        self.row(f"colour swap + blend: outside pixels within {NEAR}/255", n, f"{np.mean(m['inside']):.2%} (max "
                 f"{max(m['max'])}/255; worst image {min(m['inside']):.1%})", ">= 99%", np.mean(m["inside"]) >= 0.99)
        self.row("  the same without blend", n, f"{np.mean(m['plain_inside']):.2%} (max {max(m['plain_max'])}/255)")
        self.row("baseline (same seed, new prompt): layout moved", n, f"{np.mean(m['moved']):.1%} (IoU < 0.5 or "
                 f"centroid > 4 px); mean IoU {np.mean(m['base_iou']):.3f}")
        order = np.argsort(m["iou"])[:5]
        print("  lowest IoU: " + "; ".join(f"{kept[i][1]!r} -> {kept[i][2][0].split()[1]} {m['iou'][i]:.2f} (area x"
                                           f"{m['area'][i]:.2f}, moved {m['shift'][i]:.1f} px)" for i in order))

    def shape(self):
        s = self.split

        def make(rng):
            (old, new), colour, position = rng.choice(s.shape_swaps), rng.choice(s.colours), rng.choice(s.positions)
            return one_prompt(colour, old, position), one_prompt(colour, new, position)

        kept, dropped = self.sources(self.args.shape, 1000, make)
        m = {k: [] for k in ("right", "all", "shift", "box", "base", "swap")}
        wrong = []
        for src, prompt, target in kept:
            a = only_object(src.images[0])
            edited = self.edit(src, target)
            m["right"].append(shapes.score(edited, target)["shape"])
            m["all"].append(right(edited, target))
            b = only_object(edited)
            m["shift"].append(moved(a, b))
            m["box"].append(moved(a, b, box=True))
            m["base"].append(moved(a, only_object(self.pipe(target, seed=src.seeds[0]).images[0])))
            m["swap"].append(f"{prompt.split()[2]}->{target.split()[2]}")
            if not m["right"][-1]:
                found = shapes.read_objects(edited)[1]
                wrong.append(f"{prompt!r} -> {target.split()[2]}: " + (", ".join(
                    f"{o['shape']}{' (' + o['fault'] + ')' if o['fault'] else ''}" for o in found) or "nothing"))
        n = len(kept)
        print(f"\nshape swap: {n} sources right of {self.args.shape} ({dropped} dropped)")
        if not n:
            return
        shift, box, base = (np.array(m[k]) for k in ("shift", "box", "base"))
        one = np.isfinite(shift)
        self.row("shape swap: new shape right", n, f"{np.mean(m['right']):.1%} (every attribute {np.mean(m['all']):.1%})",
                 ">= 85%", np.mean(m["right"]) >= 0.85)
        self.row("shape swap: centroid moved", n, f"mean {shift[one].mean():.2f} px, median {np.median(shift[one]):.1f},"
                 f" within 2 px {np.mean(shift <= 2):.0%} ({n - one.sum()} not one object)", "<= 2 px (mean)",
                 shift[one].mean() <= 2)
        per_swap = ", ".join(f"{k} {shift[one & (np.array(m['swap']) == k)].mean():.1f}" for k in dict.fromkeys(m["swap"]))
        self.row("  per swap (mean px)", n, per_swap)
        self.row("  box centre moved", n, f"mean {box[one].mean():.2f} px, median {np.median(box[one]):.1f}")
        self.row("baseline (same seed, new prompt): centroid moved", n, f"> 4 px in {np.mean(base > 4):.1%}, median "
                 f"{np.median(base):.1f} px")
        for line in wrong:
            print(f"  shape not read: {line}")

    def two(self):
        s = self.split

        def make(rng):
            c1, c2 = rng.sample(s.colours, 2)
            spec = shapes.Spec([shapes.Obj(c1, rng.choice(shapes.SHAPES)), shapes.Obj(c2, rng.choice(shapes.SHAPES))],
                               rng.choice(s.relations))
            k = rng.randrange(2)
            old = spec.objects[k].colour
            new = rng.choice([c for c in s.colours if c not in (c1, c2)])
            edited = shapes.Spec([shapes.Obj(new if i == k else o.colour, o.shape) for i, o in enumerate(spec.objects)],
                                 spec.relation)
            return shapes.prompt_of(spec), (shapes.prompt_of(edited), k, old)

        kept, dropped = self.sources(self.args.two, 2000, make)
        m = {f"{side}{k}": [] for side in ("", "blend_") for k in ("right", "mask", "pixels", "interior", "share")}
        for src, prompt, (target, k, old) in kept:
            source, other = src.images[0], 1 - k
            spec, spec_t = shapes.parse_prompt(prompt), shapes.parse_prompt(target)
            before = shapes.match(spec, objects_with_masks(source))[other][1]
            interior = ndimage.binary_erosion(before["mask"])  # less its 1 px rim, where object and background mix
            for key, image in (("", self.edit(src, target)), ("blend_", self.edit(src, target, blend=[old]))):
                m[key + "right"].append(right(image, target))
                pairs = shapes.match(spec_t, objects_with_masks(image))
                after = pairs[other][1] if len(pairs) == 2 else None
                m[key + "mask"].append(after is not None and after["colour"] == before["colour"]
                                       and after["shape"] == before["shape"]
                                       and iou(before["mask"], after["mask"]) >= 0.90)
                d = difference(image, source)
                m[key + "interior"].append(float((d[interior] <= NEAR).mean()))
                m[key + "pixels"].append(m[key + "interior"][-1] >= 0.99)
                m[key + "share"].append(float((d[before["mask"]] <= NEAR).mean()))
        n = len(kept)
        print(f"\ntwo objects, one recoloured: {n} sources right of {self.args.two} ({dropped} dropped)")
        if not n:
            return
        for key, label in (("", "two objects"), ("blend_", "two objects + blend")):
            self.row(f"{label}: edit right (every attribute)", n, f"{np.mean(m[key + 'right']):.1%}")
            self.row(f"{label}: other unchanged, mask + colour", n, f"{np.mean(m[key + 'mask']):.1%}", ">= 90%",
                     np.mean(m[key + "mask"]) >= 0.90)
            self.row(f"{label}: other unchanged, pixels", n, f"{np.mean(m[key + 'pixels']):.1%} (worst scene "
                     f"{min(m[key + 'interior']):.1%}; with the rim {np.mean(m[key + 'share']):.1%} within {NEAR}/255)",
                     ">= 90%", np.mean(m[key + "pixels"]) >= 0.90)

    def refine(self):
        """Words added: "a C S P" -> "a C S P on a B background", B one of the split's colours other than C."""
        s = self.split

        def make(rng):
            colour = rng.choice(s.colours)
            prompt = one_prompt(colour, rng.choice(shapes.SHAPES), rng.choice(s.positions))
            background = rng.choice([c for c in s.colours if c != colour])
            article = "an" if background[0] in "aeiou" else "a"
            return prompt, f"{prompt} on {article} {background} background"

        kept, dropped = self.sources(self.args.refine, 4000, make)
        m = {"all": [], "iou": [], "cross": []}
        for src, _, target in kept:
            out = self.pipe.edit(src, target, **self.steps)
            m["all"].append(right(out.images[0], target))
            m["iou"].append(iou(object_mask(src.images[0]), object_mask(out.images[0])))
            m["cross"].append(out.records[0]["edit"]["cross_steps"])
        n = len(kept)
        print(f"\nrefinement: {n} sources right of {self.args.refine} ({dropped} dropped)")
        if not n:
            return
        self.row(f"refinement (a background added; cross_steps {sorted(set(m['cross']))}): edit right", n,
                 f"{np.mean(m['all']):.1%}")
        self.row("refinement: object mask IoU with the source's", n, f"{np.mean(m['iou']):.3f} (median "
                 f"{np.median(m['iou']):.2f})")

    def reweight(self):
        s = self.split
        chromatic = [c for c in s.colours if c not in ("white", "black")]

        def make(rng):
            colour = rng.choice(chromatic)
            return one_prompt(colour, rng.choice(shapes.SHAPES), rng.choice(s.positions)), colour

        kept, dropped = self.sources(self.args.reweight, 3000, make)
        curves = []
        for src, prompt, colour in kept:
            mask = object_mask(src.images[0])
            curves.append([saturation(self.edit(src, prompt, reweight={colour: w}), mask) for w in WEIGHTS])
        n = len(kept)
        print(f"\nreweight: {n} sources right of {self.args.reweight} ({dropped} dropped)")
        if not n:
            return
        mean = np.mean(curves, axis=0)
        monotone = [all(b <= a + 0.005 for a, b in itertools.pairwise(c)) for c in curves]
        falls = bool(np.all(np.diff(mean) < 0))
        self.row(f"reweight colour word {' / '.join(f'{w:g}' for w in WEIGHTS)}: saturation", n,
                 " / ".join(f"{v:.3f}" for v in mean), "monotone", falls)
        self.row("reweight: scenes whose own curve is monotone", n, f"{np.mean(monotone):.0%}")

    def time(self):
        prompt, target = "a red circle on the left", "a blue circle on the left"
        src = self.pipe(prompt, seed=3)
        results = interleaved({
            "generate": lambda: self.pipe(prompt, seed=3),
            "edit": lambda: self.edit(src, target),
            "edit+blend": lambda: self.edit(src, target, blend=["circle"]),
        }, reps=self.args.reps)
        print(f"\ntime: built-in model, {src.records[0]['num_inference_steps']} steps, {src.records[0]['dtype']}")
        for name, r in results.items():
            print(f"  {name:<11} median {r['median'] * 1000:7.1f} ms   runs "
                  f"{', '.join(f'{t * 1000:.0f}' for t in r['runs'])}")
        base = results["generate"]["median"]
        for name in ("edit", "edit+blend"):
            # per round of the interleaving: a shared machine's load drifts less within a round than across rounds
            paired = float(np.median(np.divide(results[name]["runs"], results["generate"]["runs"])))
            self.row(f"time: {name} / generation", self.args.reps, f"{paired:.2f}x median of the rounds' ratios; "
                     f"{results[name]['median'] / base:.2f}x of the medians ({results[name]['median'] * 1000:.0f} vs "
                     f"{base * 1000:.0f} ms)", "<= 2.2x", paired <= 2.2)

    def invert(self):
        s = self.split
        rng = random.Random(s.seed + 4000)
        guidance = self.args.invert_guidance
        warm = shapes.Spec([shapes.Obj("red", "circle")])
        self.pipe.invert(picture(warm, random.Random(0))[0], "a red circle", guidance_scale=guidance)  # left out
        psnrs, seconds, redrawn, swapped, ious = [], [], [], [], []
        for _ in range(self.args.invert):
            colour, shape, position = rng.choice(s.colours), rng.choice(shapes.SHAPES), rng.choice(s.positions)
            spec = shapes.Spec([shapes.Obj(colour, shape, position)])
            image, mask = picture(spec, rng)
            inv = self.pipe.invert(image, shapes.prompt_of(spec), guidance_scale=guidance)
            psnrs.append(inv.psnr)
            seconds.append(inv.seconds)
            redrawn.append(right(inv.images[0], shapes.prompt_of(spec)))
            if not redrawn[-1]:
                continue
            target = one_prompt(rng.choice([c for c in s.colours if c != colour]), shape, position)
            edited = self.edit(inv, target)
            swapped.append(right(edited, target))
            ious.append(iou(mask, object_mask(edited)))
        n = len(psnrs)
        g = INVERT_GUIDANCE if guidance is None else guidance
        print(f"\ninversion: {n} pictures of the world's renderer, guidance {g}; {sum(redrawn)} drawn again right "
              f"({n - sum(redrawn)} dropped from the swaps)")
        self.row("inversion: reconstruction PSNR", n, f"{np.mean(psnrs):.1f} dB (min {min(psnrs):.1f})")
        self.row("inversion: seconds per picture", n, f"{statistics.median(seconds):.2f} s median")
        if swapped:
            self.row("inverted, colour swap: every attribute right; IoU", len(swapped),
                     f"{np.mean(swapped):.1%}; {np.mean(ious):.3f} with the picture's object")

    def table(self, title: str):
        print(f"\n{title}")
        print(f"  {'measurement':<58}{'n':>4}  {'value':<76}{'target':<16}")
        for what, n, value, target, verdict in self.rows:
            print(f"  {what:<58}{n:>4}  {value:<76}{target:<16}{verdict}")


def picture(spec: shapes.Spec, rng: random.Random, palette: dict | None = None) -> tuple[Image.Image, np.ndarray]:
    """A picture of the world drawn by its renderer, and its object's mask."""
    placed = shapes.place(spec, rng)
    image = Image.fromarray(shapes.render(spec, placed, palette))
    return image, np.any([p.mask for p in placed], axis=0)


# --- the grid ----------------------------------------------------------------------------------------------------------
GRID = [  # (caption, source prompt, seed, edited prompt, edit keywords); seed None: a picture of the renderer, inverted
    ("colour swap", "a red circle on the left", 3, "a blue circle on the left", {}),
    ("shape swap", "a green square at the top", 7, "a green triangle at the top", {}),
    ("refinement", "a yellow triangle in the center", 2, "a yellow triangle in the center on a black background", {}),
    ("reweight purple x0", "a purple circle on the right", 5, "a purple circle on the right", {"reweight": {"purple": 0.0}}),
    ("blend: the circle only", "a red circle to the left of a blue square", 4,
     "a green circle to the left of a blue square", {"blend": ["circle"]}),
    ("inverted picture", "an orange square at the bottom", None, "a white square at the bottom", {}),
]
SCALE, PAD, CAPTION = 3, 8, 52  # upscaling, px between pictures, px of captions


def grid(pipe: ImageCraftPipeline, path: str):
    """Source beside edit for each of GRID, upscaled with NEAREST, captions above; three pairs a row."""
    font = ImageFont.load_default(size=13)
    cell = shapes.SIZE * SCALE
    pairs = []
    for caption, prompt, seed, target, kwargs in GRID:
        if seed is None:
            spec = shapes.parse_prompt(prompt)
            source = picture(spec, random.Random(1))[0]
            src = pipe.invert(source, prompt)
            caption = f"{caption} ({src.psnr:.0f} dB)"
        else:
            src = pipe(prompt, seed=seed)
            source = src.images[0]
        edited = pipe.edit(src, target, **kwargs).images[0]
        print(f"  {caption}: source right {right(source, prompt)}, edit right {right(edited, target)}")
        how = ", ".join(f"{k} " + (" ".join(v) if k == "blend" else " ".join(f"{w}={f:g}" for w, f in v.items()))
                        for k, v in kwargs.items())  # as the CLI's flags: reweight purple=0
        pairs.append(([caption, prompt, f"-> {target}" if target != prompt else f"-> {how}"], source, edited))
    columns = 3
    width = columns * (2 * cell + 3 * PAD)
    height = -(-len(pairs) // columns) * (cell + CAPTION + 2 * PAD)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (lines, source, edited) in enumerate(pairs):
        x0 = (i % columns) * (2 * cell + 3 * PAD) + PAD
        y0 = (i // columns) * (cell + CAPTION + 2 * PAD) + PAD
        for k, line in enumerate(lines):
            draw.text((x0, y0 + 16 * k), line, fill="black" if k == 0 else (80, 80, 80), font=font)
        for j, image in enumerate((source, edited)):
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (x0 + j * (cell + PAD), y0 + CAPTION))
    sheet.save(path)
    print(f"wrote {path} ({width}x{height})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=tuple(SPLITS), default="report")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=SECTIONS, help="sections to run (none: only "
                        "--grid)")
    parser.add_argument("--colour", type=int, default=60, help="colour-swap cases")
    parser.add_argument("--shape", type=int, default=40, help="shape-swap cases")
    parser.add_argument("--two", type=int, default=40, help="two-object cases")
    parser.add_argument("--refine", type=int, default=24, help="refinement cases (a background added)")
    parser.add_argument("--reweight", type=int, default=16, help="reweight scenes")
    parser.add_argument("--invert", type=int, default=8, help="pictures to invert")
    parser.add_argument("--reps", type=int, default=7, help="timed calls of each kind")
    parser.add_argument("--cross-steps", type=float, default=None,
                        help="every edit's cross_steps (default: as pipe.edit chooses, settings.edit_cross_steps: "
                             f"{SWAP_CROSS_STEPS} for a swap or reweight, {EDIT['cross_steps'].default} when words "
                             "are added)")
    parser.add_argument("--self-steps", type=float, default=None,
                        help=f"every edit's self_steps (default: settings', {EDIT['self_steps'].default})")
    parser.add_argument("--invert-guidance", type=float, default=None,
                        help=f"inversion's guidance (default: settings.INVERT_GUIDANCE, {INVERT_GUIDANCE})")
    parser.add_argument("--grid", default=None, metavar="PATH", help="also write the grid of edits to PATH (a .png)")
    args = parser.parse_args()
    for name in ("colour", "shape", "two", "reweight", "invert", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be 1 or more, got {getattr(args, name)}")
    if args.grid is not None and not args.grid.endswith(".png"):
        parser.error(f"--grid must be a .png name, got {args.grid!r}")
    if not args.only and args.grid is None:
        parser.error("nothing to do: name sections with --only, or give --grid")

    print(environment())
    pipe = ImageCraftPipeline.from_pretrained()
    bench = Bench(pipe, SPLITS[args.split], args)
    for section in SECTIONS:
        if section in args.only:
            getattr(bench, section)()
    if bench.rows:
        cross = ("by the edit" if args.cross_steps is None else args.cross_steps)
        self_ = EDIT["self_steps"].default if args.self_steps is None else args.self_steps
        bench.table(f"split {args.split}: built-in model, {pipe.dtype}, cross_steps {cross}, self_steps {self_}")
    if args.grid:
        grid(pipe, args.grid)


if __name__ == "__main__":
    main()
