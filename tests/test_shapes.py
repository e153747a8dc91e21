"""The shapes world: the generator keeps its contract, and the scorer reads it right and rejects wrong prompts."""

import copy
import random

import numpy as np
import pytest

from imagecraft.shapes import (COLOURS, HELD_OUT, MAX_SIZE, MIN_SIZE, POSITIONS, SHAPES, SIZE, Spec,
                               parse_prompt, prompt_of, sample_scene, sample_spec, score)


def scenes(n, seed=0, allow_held_out=True):
    rng = random.Random(seed)
    return [sample_scene(rng, allow_held_out) for _ in range(n)]


def test_generator_is_seeded_and_keeps_the_contract():
    a, b = scenes(50, seed=3), scenes(50, seed=3)
    assert [s[1] for s in a] == [s[1] for s in b] and all(np.array_equal(x[2], y[2]) for x, y in zip(a, b))
    for spec, prompt, image, masks in scenes(300):
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert parse_prompt(prompt) == spec and prompt == prompt.lower()
        assert len(masks) == len(spec.objects)
        background = np.array(COLOURS[spec.background] if spec.background else (150, 150, 150))
        for obj, mask in zip(spec.objects, masks):
            assert (image[mask] == COLOURS[obj.colour]).all()  # flat fill, no outline
            ys, xs = np.nonzero(mask)
            assert MIN_SIZE - 1 <= xs.max() - xs.min() + 1 <= MAX_SIZE + 1
            assert 0 < xs.min() and xs.max() < SIZE - 1 and 0 < ys.min() and ys.max() < SIZE - 1  # inside
            assert spec.background != obj.colour
        if len(masks) == 2:
            assert not (masks[0] & masks[1]).any()  # no overlap
        everything_else = ~np.any(masks, axis=0)
        assert (image[everything_else] == background).all()


def test_articles_and_held_out_pairs():
    assert prompt_of(parse_prompt("an orange circle on an orange background")).startswith("an orange circle")
    rng = random.Random(0)
    specs = [sample_spec(rng) for _ in range(3000)]
    pairs = {(o.colour, o.shape) for s in specs for o in s.objects}
    assert not pairs & HELD_OUT
    assert len(pairs) == len(COLOURS) * len(SHAPES) - len(HELD_OUT)


def test_scorer_is_right_on_ground_truth():
    results = [score(image, prompt) for _, prompt, image, _ in scenes(600, seed=1)]
    assert np.mean([r["all"] for r in results]) >= 0.99


OPPOSITE = {"on the left": "on the right", "on the right": "on the left", "at the top": "at the bottom",
            "at the bottom": "at the top"}


def perturbed(spec: Spec, rng: random.Random) -> Spec:
    """The same spec with one attribute changed so that the image no longer fits it."""
    s = copy.deepcopy(spec)
    o = s.objects[0]
    used = {x.colour for x in s.objects} | {s.background}
    kind = rng.choice(["colour", "shape", "background", "layout"])
    if kind == "colour":
        o.colour = rng.choice([c for c in COLOURS if c not in used])
    elif kind == "shape":
        o.shape = rng.choice([x for x in SHAPES if x != o.shape])
    elif kind == "background":
        s.background = rng.choice([c for c in COLOURS if c not in used])
    elif len(s.objects) == 1:
        if o.position is None:
            s.objects.append(copy.deepcopy(o))  # a second object that is not there
            s.relation = "and"
        else:
            o.position = OPPOSITE.get(o.position) or rng.choice(POSITIONS[:4])  # a region the object is not in
    elif s.relation != "and" and (s.objects[0].colour, s.objects[0].shape) != (s.objects[1].colour, s.objects[1].shape):
        s.objects.reverse()
    else:
        s.objects.pop()  # one object fewer than the image has
        s.relation = None
    return s


def test_scorer_rejects_wrong_prompts():
    rng = random.Random(7)
    accepted = [score(image, perturbed(spec, rng))["all"] for spec, _, image, _ in scenes(600, seed=2)]
    assert np.mean(accepted) <= 0.01


def test_prompts_outside_the_grammar_are_named():
    with pytest.raises(ValueError, match="not a prompt of the shapes grammar: 'a cat'"):
        parse_prompt("a cat")
