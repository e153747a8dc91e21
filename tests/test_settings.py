"""The settings schema: every value either comes back normalised or is refused with one sentence naming the field."""

import math

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from imagecraft.schedulers import SCHEDULERS
from imagecraft.settings import (EDIT, FINETUNE, GENERATION, LORA_SCALE, MAX_PROMPT_CHARS, OVERLAY_ALPHA, check,
                                 check_cost, check_finetune, check_settings)

pytestmark = pytest.mark.unit

ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers()),
    st.builds(np.int64, st.integers(min_value=-2**62, max_value=2**62)),
    st.builds(np.float32, st.floats(width=32, allow_nan=False, allow_infinity=False)),
)


@hsettings(max_examples=300, deadline=None)
@given(name=st.sampled_from([*GENERATION, "prompt"]), value=ANYTHING)
def test_every_value_is_normalised_or_refused_by_name(name, value):
    try:
        clean = check(name, value)
    except ValueError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 400
        label = "prompt" if name == "prompt" else GENERATION[name].label
        assert message.startswith(label) or message.startswith("unknown scheduler")
        return
    if clean is None:
        assert value is None and name in ("seed", "width", "height", "scheduler", "cache_interval")
        return
    assert not isinstance(value, bool)  # True is never a number, a prompt or a name
    assert check(name, clean) == clean  # normalised values pass again, unchanged
    field = GENERATION.get(name)
    if field and field.kind == "int":
        assert type(clean) is int and field.low <= clean <= field.high
        assert float(value) == clean  # 25.0 is 25; 2.5 never becomes 2
    if field and field.kind == "float":
        assert type(clean) is float and math.isfinite(clean) and 0 <= clean <= 30
    if name in ("width", "height"):
        assert clean % 8 == 0


def test_the_sentences_users_see():
    for name, value, message in [
        ("num_inference_steps", 2.5, "steps must be an integer from 1 to 150, got 2.5"),
        ("num_inference_steps", True, "steps must be an integer from 1 to 150, got True"),
        ("num_images", 17, "number of images must be from 1 to 16, got 17"),
        ("guidance_scale", float("nan"), "guidance scale must be a number from 0 to 30, got nan"),
        ("width", 100, "width must be a multiple of 8 between 64 and 2048, got 100"),
        ("seed", -1, "seed must be an integer from 0 to 4294967295, or None for a random one, got -1"),
        ("scheduler", "DPM++ SDE Karras", "unknown scheduler 'DPM++ SDE Karras'"),
        ("scheduler", 3, "scheduler must be"),
        ("prompt", ["a", 1], "prompt must be a string or a list of 1 to 64 strings"),
        ("prompt", "x" * (MAX_PROMPT_CHARS + 1), f"prompt must be at most {MAX_PROMPT_CHARS} characters"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
            check(name, value)
    assert check("num_inference_steps", 25.0) == 25 and check("seed", np.int64(7)) == 7
    assert check("scheduler", "Euler a") == "euler_a" and check("scheduler", "dpm++2m") == "dpm++2m"
    assert set(SCHEDULERS) == {check("scheduler", s) for s in SCHEDULERS}
    with pytest.raises(ValueError, match=r"unknown settings \['steps'\]"):
        check_settings({"steps": 3})


def test_the_cost_cap_names_its_limit(monkeypatch):
    monkeypatch.setenv("IMAGECRAFT_MAX_COST", "1000000")
    check_cost(100, 100, 100, 1, "cpu")
    with pytest.raises(ValueError, match="over the limit of 1,000,000"):
        check_cost(100, 100, 100, 2, "cpu")
    monkeypatch.setenv("IMAGECRAFT_MAX_COST", "lots")
    with pytest.raises(ValueError, match="IMAGECRAFT_MAX_COST must be a number, got 'lots'"):
        check_cost(64, 64, 1, 1, "cpu")


def test_text_that_utf8_cannot_hold_is_refused():
    with pytest.raises(ValueError, match="prompt must be valid Unicode text; it has an unpaired surrogate at "
                                         "character 2"):
        check("prompt", "a \ud800 circle")
    with pytest.raises(ValueError, match="negative_prompt must be valid Unicode text"):
        check("negative_prompt", "\udfff")
    assert check("prompt", "a 🎨 circle") == "a 🎨 circle"


@hsettings(max_examples=300, deadline=None)
@given(name=st.sampled_from(list(FINETUNE)), value=ANYTHING)
def test_every_finetune_value_is_normalised_or_refused_by_name(name, value):
    field = FINETUNE[name]
    try:
        clean = check_finetune({name: value})[name]
    except ValueError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 400 and message.startswith(f"{field.label} must be ")
        return
    assert check_finetune({name: clean})[name] == clean  # normalised values pass again, unchanged
    if clean is None:
        assert value is None and field.optional
    elif field.kind in ("int", "float"):
        assert type(clean) is (int if field.kind == "int" else float) and field.low <= clean <= field.high
        assert not (field.above_low and clean == field.low)
    elif field.kind in ("choice", "choices"):
        assert set(clean if field.kind == "choices" else [clean]) <= set(field.choices)


def test_the_recipe_reads_the_finetune_table():
    import dataclasses
    import inspect

    from imagecraft.pipeline import ImageCraftPipeline
    from imagecraft.settings import DEFAULT_GUIDANCE
    from imagecraft.train.recipe import FinetuneRecipe, check_recipe

    assert {f.name: f.default for f in dataclasses.fields(FinetuneRecipe)} == \
        {name: field.default for name, field in FINETUNE.items()}
    # the defaults pass; those left to the method are its own, and a full fine-tune's do not trip the LoRA-only rules
    assert check_recipe(FinetuneRecipe()) == FinetuneRecipe(word_token=True, word_lock=6.0, preserve=0.0)
    assert check_recipe(FinetuneRecipe(method="full")) == FinetuneRecipe(method="full", word_token=False,
                                                                          word_lock=0.0, preserve=0.3)
    assert check_recipe(FinetuneRecipe(targets=("ff",))).word_lock == 0  # nothing to lock: no cross-attention LoRA
    assert check_recipe(FinetuneRecipe(word_token=False, preserve=1)).preserve == 1  # given values stand
    with pytest.raises(ValueError, match="word_token goes with method 'lora'"):
        check_recipe(FinetuneRecipe(method="full", word_token=True))
    for kwargs, message in [(dict(rank=129), "rank must be a whole number from 1 to 128, got 129"),
                            (dict(steps=20_001), "steps must be a whole number from 1 to 20,000, got 20001"),
                            (dict(lr=0.5), r"lr must be a number in \(0, 0.1\], got 0.5"),
                            (dict(lr=0), r"lr must be a number in \(0, 0.1\], got 0"),
                            (dict(targets=()), "targets must be some of attn, ff, proj"),
                            (dict(class_prompts=("a", " ")), "class_prompts must be a list of prompts .*got ' '")]:
        with pytest.raises(ValueError, match=message):
            check_recipe(FinetuneRecipe(**kwargs))
    assert check_recipe(FinetuneRecipe(steps=30.0, targets=["attn", "ff"])).steps == 30  # normalised like a slider's
    # the defaults written in signatures agree with the tables
    assert inspect.signature(ImageCraftPipeline.__call__).parameters["guidance_scale"].default == DEFAULT_GUIDANCE
    assert FINETUNE["preview_guidance"].default == DEFAULT_GUIDANCE


def _flags(parser) -> dict:
    """{dest: argparse action} of a parser's flags, each help as --help prints it (%% is %)."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    for action in actions.values():
        action.help = (action.help or "").replace("%%", "%")
    return actions


def _says_range(field, help_text: str) -> bool:
    numbers = [f"{field.low:g}", f"{field.high:g}"] if field.kind == "float" else [str(field.low), str(field.high)]
    multiple = field.kind == "int" and field.step != 1  # an int field's values are multiples of its step
    return all(n in help_text for n in numbers) and (not multiple or f"multiple of {field.step}" in help_text)


def test_every_slider_and_flag_agrees_with_the_table():
    """The app's sliders (as its builders make them) and the CLI's flags show each field's range, step and
    default as its table has them; a slider or flag that reads no table fails here."""
    import gradio as gr

    import app
    from imagecraft.cli import build_parser
    from imagecraft.train.recipe import build_parser as finetune_parser

    fields = [*GENERATION.values(), *FINETUNE.values(), *EDIT.values(), LORA_SCALE, OVERLAY_ALPHA]
    by_label = {f.ui: f for f in fields if f.ui}
    assert len(by_label) == len([f for f in fields if f.ui])  # one field per label
    size = app.models.get(None).default_size
    # the attention tab's step sliders follow the explained image's steps, not a table
    follow_maps = {"From step", "To step (exclusive)", "Time scrubber: one sampling step"}
    seen = set()
    for block in app.build_demo().blocks.values():
        if isinstance(block, gr.Slider) and block.label not in follow_maps:
            field = by_label[block.label]
            default = size if field.name in ("width", "height") else field.default
            assert (block.minimum, block.maximum, block.step, block.value) == \
                (field.low, field.high, field.step, default), block.label
            seen.add(block.label)
        if isinstance(block, gr.Radio) and block.label == FINETUNE["method"].ui:
            assert [value for _, value in block.choices] == list(FINETUNE["method"].choices)
    assert {GENERATION[n].ui for n in ("num_inference_steps", "guidance_scale", "num_images", "cache_interval",
                                       "width", "height")} | {FINETUNE["steps"].ui, FINETUNE["rank"].ui} | \
        {field.ui for field in EDIT.values()} <= seen

    import argparse

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    generate, attention = _flags(commands["generate"]), _flags(commands["attention"])
    for name, field in GENERATION.items():  # absent flags leave the value to a PNG or the pipeline
        action = generate[field.dest]
        assert action.default is None and field.help in action.help, name
        assert (f"{field.default:g} when not given" if isinstance(field.default, (int, float))
                else f"{field.unset or 'none'} when not given") in action.help, name
        if field.kind in ("int", "float"):
            assert _says_range(field, action.help) and action.type is (int if field.kind == "int" else float), name
    assert attention["alpha"].default == OVERLAY_ALPHA.default and _says_range(OVERLAY_ALPHA, attention["alpha"].help)
    for parser in (finetune_parser(), commands["finetune"]):
        flags = _flags(parser)
        for name, field in FINETUNE.items():
            action = flags[name]
            assert field.help in action.help and "default: " in action.help, name
            if field.kind == "prompts":
                assert action.default is None and action.option_strings == [field.flag], name  # repeated: a list
            elif field.kind == "choices":
                assert action.default == ",".join(field.default), name
            else:
                assert action.default == field.default, name
            if field.kind == "choice":
                assert tuple(action.choices) == field.choices, name
            if field.kind in ("int", "float"):
                assert _says_range(field, action.help), name
                if field.default is not None:
                    assert f"default: {field.default:g}" in action.help, name
