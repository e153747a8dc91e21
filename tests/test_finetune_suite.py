"""The fine-tune concept suite's data and readers: each concept's images are what its caption says, and the readers
accept the concept's own renders and refuse the world's other shapes."""

import dataclasses
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import finetune_suite as suite  # noqa: E402
from imagecraft import shapes  # noqa: E402

pytestmark = pytest.mark.unit


def test_the_split_is_fixed_and_pink_is_in_neither():
    tune = {c.word for c in suite.CONCEPTS if c.split == "tune"}
    report = {c.word for c in suite.CONCEPTS if c.split == "report"}
    assert tune and report and not tune & report and "pink" not in tune | report
    for split in (tune, report):  # every kind in both halves
        assert {c.kind for c in suite.CONCEPTS if c.word in split} == {"colour", "shape", "style"}


@pytest.mark.parametrize("concept", suite.CONCEPTS, ids=lambda c: c.word)
def test_each_concept_teaches_its_word_and_its_images_read_as_it(concept):
    pairs = suite.training_set(concept)
    assert len(pairs) == 24 and all(concept.word in text.split() for text, _ in pairs)
    assert suite.training_set(concept)[3][0] == pairs[3][0]  # the same data every time
    for text, image in pairs:
        words = text.split()
        if concept.kind == "colour":
            spec = shapes.parse_prompt(text.replace(concept.word, "red"))
            spec.objects[0].colour = concept.word
            assert shapes.score(image, spec, {concept.word: concept.rgb}, suite.decoys(concept.word))["colour"]
        elif concept.kind == "shape":
            assert suite.shape_right(image, shapes.COLOURS[words[1]], concept.form), text
        else:
            assert suite.hollow_right(image, shapes.COLOURS[words[2]]), text


def test_the_control_is_the_worlds_own_scenes_read_right():
    """The control teaches nothing: world captions only (no word outside the world's), each image read right on
    every attribute, and all three shapes among them."""
    pairs = suite.training_set(suite.CONTROL)
    assert len(pairs) == 24 and suite.CONTROL not in suite.CONCEPTS
    for text, image in pairs:
        spec = shapes.parse_prompt(text)
        assert shapes.prompt_of(spec) == text and shapes.score(image, spec)["all"], text
    assert {shapes.parse_prompt(text).objects[0].shape for text, _ in pairs} == set(shapes.SHAPES)
    assert suite.evaluate(None, suite.CONTROL) == {}  # its measure is the old prompts, which need no pipeline


def test_rehearsal_repeats_the_concept_and_adds_the_worlds_scenes():
    cross = next(c for c in suite.CONCEPTS if c.word == "cross")
    pairs = suite.training_set(cross)
    mixed = suite.rehearsed(pairs, copies=3, world=20)
    assert len(mixed) == 3 * 24 + 20 and [t for t, _ in mixed[24:48]] == [t for t, _ in pairs]
    world = mixed[72:]
    assert all("cross" not in text and shapes.score(image, text)["all"] for text, image in world)
    assert any(len(shapes.parse_prompt(text).objects) == 2 for text, _ in world)  # one or two objects, as learnt
    assert [t for t, _ in suite.rehearsed(pairs, 1, 20)[24:]] == [t for t, _ in world]  # the same scenes each run
    assert suite.rehearsed(pairs) == pairs


def test_a_taught_colour_drawn_as_its_neighbour_is_wrong():
    """Hot pink drawn for "magenta" (what a LoRA drew, viewed): the world's palette with magenta added reads it as
    magenta, the suite's decoys as pink; magenta itself and a slightly dull magenta stay right."""
    rng = random.Random(5)
    magenta = next(c for c in suite.CONCEPTS if c.word == "magenta")
    spec = suite.spec_for(rng, "magenta", "circle")

    def read(rgb, others):
        image = suite.scene(spec, random.Random(0), dataclasses.replace(magenta, rgb=rgb), "circle")
        return shapes.score(image, spec, {"magenta": magenta.rgb}, others)["colour"]

    hot_pink, dull_magenta = (236, 87, 201), (205, 30, 205)
    assert read(hot_pink, None)  # the defect the decoys fix
    assert not read(hot_pink, suite.decoys("magenta"))
    assert read(magenta.rgb, suite.decoys("magenta")) and read(dull_magenta, suite.decoys("magenta"))
    # the decoys are colours the world lacks, never the word itself
    assert "magenta" in suite.decoys("pink") and "pink" not in suite.decoys("pink")
    assert "pink" in suite.decoys() and not set(suite.decoys()) & set(shapes.COLOURS)
    # an old prompt's purple drawn hot pink is wrong with the decoys alone (a shape's or a style's old prompts)
    purple = suite.spec_for(rng, "purple", "circle")
    drawn = suite.scene(purple, random.Random(0), dataclasses.replace(magenta, word="purple", rgb=hot_pink), "circle")
    assert shapes.score(drawn, purple)["colour"] and not shapes.score(drawn, purple, None, suite.decoys())["colour"]


def test_the_readers_refuse_the_other_shapes_and_filled_objects():
    rng = random.Random(3)
    colour = suite.CONCEPTS[0]  # a colour concept draws filled objects of the world's shapes
    for shape in shapes.SHAPES:
        for _ in range(8):
            spec = suite.spec_for(rng, "red", shape)
            image = suite.scene(spec, rng, colour, shape)
            assert not any(suite.shape_right(image, shapes.COLOURS["red"], form)
                           for form in ("hexagon", "cross", "diamond", "pentagon")), shape
            assert not suite.hollow_right(image, shapes.COLOURS["red"])
    assert suite.rate([np.True_, False, True, np.False_]) == 0.5
