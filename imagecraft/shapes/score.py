"""The strict scorer of the shapes world: which attributes of a prompt an image gets right.

`score(image, prompt)` reads the image's objects (flat-colour components, each colour matched to the world's
palette) and compares them with the prompt's spec: colour, shape, position, relation, background, count. A shape
counts only if it fits its ideal outline (mask IoU >= FIT_IOU with the template, no dent deeper than MAX_DENT px)
and touches no border (`classify_shape`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .world import COLOURS, GRAY, SHAPES, SIZE, Obj, Spec, parse_prompt

_PALETTE_NAMES = list(COLOURS) + ["gray"]
_PALETTE = np.array(list(COLOURS.values()) + [GRAY], dtype=np.float32)  # (9, 3)
MIN_AREA = 40  # components smaller than this are specks, not objects (a 16 px triangle covers ~128 px)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    return [labels == i for i in range(1, n + 1) if (labels == i).sum() >= MIN_AREA]


# A shape counts only if it fits: the object's pixels against the ideal filled shape in its bounding box.
FIT_IOU = 0.80  # least intersection-over-union with the ideal shape; the world's own renders score >= 0.94
# Deepest concavity allowed, in px of the 64x64 image: every shape of the world is convex, so pixels inside the
# object's convex hull but off the object are a dent. A digitised edge leaves 1 px (and 1.41 on a diagonal); the
# pinched sides, lobes and legs of a deformed shape leave 2 px or more, where IoU alone still passes a pinched
# square (0.86-0.93).
MAX_DENT = 1.5


def _templates(crop: np.ndarray) -> dict[str, np.ndarray]:
    """Ideal circle, square and up-pointing triangle filling the crop's box, drawn as the world draws them; the
    triangle's apex is at the middle of the crop's top row (the world's apex falls between pixels, which moves the
    drawn tip by a pixel: centred on the box, a 16 px triangle of the world would fit only 0.89)."""
    h, w = crop.shape
    apex = np.nonzero(crop[0])[0].mean()
    out = {}
    for name in SHAPES:
        mask = Image.new("1", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        if name == "circle":
            draw.ellipse([0, 0, w - 1, h - 1], fill=1)
        elif name == "square":
            draw.rectangle([0, 0, w - 1, h - 1], fill=1)
        else:
            draw.polygon([(apex, 0), (0, h - 1), (w - 1, h - 1)], fill=1)
        out[name] = np.array(mask, dtype=bool)
    return out


def dent_depth(mask: np.ndarray) -> float:
    """How far, in px, the deepest pixel of the mask's convex hull that is not on the mask lies from the mask."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, Delaunay, QhullError

    ys, xs = np.nonzero(mask)
    points = np.stack([xs, ys], 1).astype(float)
    try:
        hull = Delaunay(points[ConvexHull(points).vertices])
    except QhullError:  # all pixels on one line: nothing can be concave
        return 0.0
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    gy, gx = np.mgrid[y0:y1, x0:x1]
    inside = (hull.find_simplex(np.stack([gx.ravel(), gy.ravel()], 1)) >= 0).reshape(gy.shape)
    crop = mask[y0:y1, x0:x1]
    missing = inside & ~crop
    if not missing.any():
        return 0.0
    return float(ndimage.distance_transform_edt(~np.pad(crop, 1))[1:-1, 1:-1][missing].max())


def shape_fit(mask: np.ndarray) -> dict:
    """The ideal shape that overlaps the mask best in its bounding box: {"best", "iou" (of each shape), "dent"}."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    ious = {name: float((crop & t).sum() / (crop | t).sum()) for name, t in _templates(crop).items()}
    return dict(best=max(ious, key=ious.get), iou=ious, dent=dent_depth(mask))


def read_shape(mask: np.ndarray) -> tuple[str, str | None]:
    """(shape, fault): the shape as classify_shape reads it, and why it is "unknown": "border" (the object touches
    the image border), "fit" (IoU with the best ideal shape under FIT_IOU) or "dent" (a dent deeper than MAX_DENT);
    None when the shape is read."""
    if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
        return "unknown", "border"
    fit = shape_fit(mask)
    if fit["iou"][fit["best"]] < FIT_IOU:
        return "unknown", "fit"
    if fit["dent"] > MAX_DENT:
        return "unknown", "dent"
    return fit["best"], None


def classify_shape(mask: np.ndarray) -> str:
    """"circle", "square" or "triangle" where the mask is that shape as a person would read it: IoU >= FIT_IOU with
    the ideal shape in its bounding box and no dent deeper than MAX_DENT; "unknown" otherwise (a four-lobed
    circle, a pinched square, a Y-shaped triangle, a blob), and for an object cut by the image border, which the
    world never draws."""
    return read_shape(mask)[0]


def _thirds(value: float) -> int:
    return 0 if value < SIZE / 3 else (2 if value >= 2 * SIZE / 3 else 1)


def _position_ok(position: str, cx: float, cy: float) -> bool:
    return {"on the left": _thirds(cx) == 0, "on the right": _thirds(cx) == 2, "at the top": _thirds(cy) == 0,
            "at the bottom": _thirds(cy) == 2, "in the center": _thirds(cx) == 1 and _thirds(cy) == 1}[position]


def _relation_ok(relation: str | None, a: dict, b: dict) -> bool:
    return {"to the left of": a["cx"] < b["cx"], "above": a["cy"] < b["cy"], "and": True, None: False}[relation]


def _distances(pixels: np.ndarray, extra: dict) -> tuple[list[str], np.ndarray]:
    """The names of the world's colours, gray and `extra`'s, in that order, and each pixel's squared distance to
    each of them (64, 64, colours)."""
    names, colours = list(_PALETTE_NAMES), _PALETTE
    if extra:
        names += list(extra)
        colours = np.concatenate([_PALETTE, np.array(list(extra.values()), dtype=np.float32)])
    return names, ((pixels[:, :, None, :] - colours[None, None]) ** 2).sum(-1)


def read_objects(image, palette: dict | None = None, masks: bool = False,
                 decoys: dict | None = None) -> tuple[str, list[dict]]:
    """(background colour name, objects as dicts with colour, shape, fault (read_shape's), cx, cy, area, and with
    `masks` their (64, 64) bool `mask`) found in an image. Each pixel takes the nearest of the world's colours and
    gray, and of `palette` (extra colours by name, e.g. pink). `decoys` (more colours by name) may name an object,
    its pixels' commonest colour among all of them, but do not cut objects out: a blend at an edge that lands
    nearer a decoy (yellow on black read as brown) stays where the palette puts it."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.shape[:2] != (SIZE, SIZE):
        pixels = np.asarray(Image.fromarray(pixels.astype(np.uint8)).resize((SIZE, SIZE), Image.NEAREST),
                            dtype=np.float32)
    extra = dict(palette or {})
    extra |= {name: rgb for name, rgb in (decoys or {}).items() if name not in extra}
    naming_names, distances = _distances(pixels, extra)  # the palette's colours first, the decoys after them
    names = naming_names[:len(_PALETTE_NAMES) + len(palette or {})]
    classes = distances[:, :, :len(names)].argmin(-1)
    # by RGB distance: it reads a light magenta (229, 67, 226) as pink, but CIELAB's plain distance read a sky-blue
    # cyan as teal, and CIEDE2000, made for small differences, a saturated sky blue as gray
    naming = distances.argmin(-1) if decoys else classes
    border = np.concatenate([classes[0], classes[-1], classes[:, 0], classes[:, -1]])
    background = np.bincount(border, minlength=len(names)).argmax()
    objects = []
    for comp in _components(classes != background):
        colour = naming_names[np.bincount(naming[comp], minlength=len(naming_names)).argmax()]
        ys, xs = np.nonzero(comp)
        # the centre of the bounding box, as objects are placed (a triangle's centroid sits lower)
        shape, fault = read_shape(comp)
        objects.append(dict(colour=colour, shape=shape, fault=fault,
                            cx=(xs.min() + xs.max() + 1) / 2, cy=(ys.min() + ys.max() + 1) / 2, area=int(comp.sum()),
                            **({"mask": comp} if masks else {})))
    return names[background], objects


def match(spec: Spec, found: list[dict]) -> list[tuple[Obj, dict]]:
    """The prompt's objects paired with found objects (read_objects'), one to one: the assignment with the most
    colour + shape agreement, and among equals (two objects alike, "a red square to the left of a red square") the
    one that keeps the relation. Fewer pairs than prompt objects when fewer objects were found."""
    import itertools

    def agreement(perm):
        matched = sum((found[j]["colour"] == o.colour) + (found[j]["shape"] == o.shape)
                      for o, j in zip(spec.objects, perm))
        return matched, len(perm) == 2 and _relation_ok(spec.relation, found[perm[0]], found[perm[1]])

    best = max(itertools.permutations(range(len(found)), min(len(found), len(spec.objects))), key=agreement)
    return [(o, found[j]) for o, j in zip(spec.objects, best)]


def score(image, prompt: str | Spec, palette: dict | None = None, decoys: dict | None = None) -> dict:
    """Which attributes of `prompt` the image gets right: background, colour, shape, count, and position or
    relation where the prompt has them (None where it does not). `all` is True when every one is. A colour the
    world lacks (pink, taught by a fine-tune) is read with `palette` ({"pink": (255, 105, 180)}) and a Spec;
    `decoys`, colours an object drawn instead would be (read_objects'), make such an object wrong."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    background, found = read_objects(image, palette, decoys=decoys)
    result = dict(background=background == (spec.background or "gray"), count=len(found) == len(spec.objects),
                  colour=False, shape=False, position=None, relation=None)
    if len(spec.objects) == 1 and spec.objects[0].position:
        result["position"] = False
    if len(spec.objects) == 2:
        result["relation"] = False
    if found:
        pairs = match(spec, found)
        complete = len(pairs) == len(spec.objects)
        result["colour"] = complete and all(f["colour"] == o.colour for o, f in pairs)
        result["shape"] = complete and all(f["shape"] == o.shape for o, f in pairs)
        if result["position"] is not None:
            f = pairs[0][1]
            result["position"] = _position_ok(spec.objects[0].position, f["cx"], f["cy"])
        if result["relation"] is not None and complete:
            (_, a), (_, b) = pairs
            result["relation"] = _relation_ok(spec.relation, a, b)
    result["all"] = all(v for v in result.values() if v is not None)
    return result


