"""The settings schema: every value either comes back normalised or is refused with one sentence naming the field."""

import math

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from imagecraft.schedulers import SCHEDULERS
from imagecraft.settings import FIELDS, MAX_PROMPT_CHARS, check, check_cost, check_settings

ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers()),
    st.builds(np.int64, st.integers(min_value=-2**62, max_value=2**62)),
    st.builds(np.float32, st.floats(width=32, allow_nan=False, allow_infinity=False)),
)


@hsettings(max_examples=300, deadline=None)
@given(name=st.sampled_from([*FIELDS, "prompt"]), value=ANYTHING)
def test_every_value_is_normalised_or_refused_by_name(name, value):
    try:
        clean = check(name, value)
    except ValueError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 400
        label = "prompt" if name == "prompt" else FIELDS[name].label
        assert message.startswith(label) or message.startswith("unknown scheduler")
        return
    if clean is None:
        assert value is None and name in ("seed", "width", "height", "scheduler", "cache_interval")
        return
    assert not isinstance(value, bool)  # True is never a number, a prompt or a name
    assert check(name, clean) == clean  # normalised values pass again, unchanged
    field = FIELDS.get(name)
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
