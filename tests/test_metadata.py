"""PNG metadata read as untrusted input: round trips, AUTOMATIC1111 texts, settings left out with a note, size
limits, corrupt files, and fuzzing with hypothesis (random text, A1111-like lines, random bytes)."""

import functools
import io
import json
import time
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from imagecraft.png import (MAX_TEXT, SETTINGS, a1111_parameters, parse_a1111_parameters, read_png_settings,
                                 restore_settings, save_png)
from imagecraft.settings import check
from imagecraft.testing import png_chunk, png_with

pytestmark = pytest.mark.unit

RECORD = dict(prompt="a red circle", negative_prompt="blue", num_inference_steps=12, guidance_scale=3.5, seed=99,
              width=64, height=72, scheduler="euler_a", cache_interval=3, model="shapes-sd", model_hash="0123456789",
              scheduler_config={"_class_name": "EulerAncestralDiscreteScheduler"}, dtype="float32",
              versions={"torch": "2.0"})
RESTORED = {k: RECORD[k] for k in (*SETTINGS, "model")}
FUZZ = hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def bomb() -> bytes:
    return zlib.compress(b"a" * 50_000_000, 9)  # 50 MB of text in about 50 KB


def a1111_png(tmp_path, text: str, zip: bool = False):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text, zip=zip)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def one_sentence(error) -> str:
    text = str(error.value)
    assert text and "\n" not in text and len(text) < 300, text
    return text


# --- round trips ---------------------------------------------------------------------------------------------------
def test_our_png_round_trips_from_path_file_and_image(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "ours.png", RECORD)
    assert restore_settings(path) == (RESTORED, [])
    assert read_png_settings(str(path)) == RESTORED
    with open(path, "rb") as f:
        assert read_png_settings(f) == RESTORED
    assert read_png_settings(Image.open(path)) == RESTORED


def test_a1111_text_round_trips(tmp_path):
    text = a1111_parameters(RECORD)
    assert parse_a1111_parameters(text) == RESTORED
    assert restore_settings(a1111_png(tmp_path, text, zip=True)) == (RESTORED, [])


def test_long_unicode_prompts_fit_the_limit(tmp_path):
    record = dict(RECORD, prompt="😀" * 4000, negative_prompt="日本" * 2000)  # JSON escapes each as 6-12 characters
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "long.png", record)
    assert read_png_settings(path) == dict(RESTORED, prompt=record["prompt"], negative_prompt=record["negative_prompt"])


def test_a1111_quotes_commas_negative_prompt_and_schedule_type():
    text = ('a "cat", on a mat\nwith two lines\nNegative prompt: ugly, blurry\n'
            'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 512x768, '
            'Lora hashes: "a: 1, b: \\"2\\"", Model hash: abc, Model: "my, model"')
    assert parse_a1111_parameters(text) == dict(
        prompt='a "cat", on a mat\nwith two lines', negative_prompt="ugly, blurry", num_inference_steps=20,
        guidance_scale=7.0, seed=5, width=512, height=768, scheduler="dpm++2m_karras", model="my, model")


# --- settings left out, with a note --------------------------------------------------------------------------------
def test_unknown_sampler_and_no_size_are_left_out_with_notes(tmp_path):
    path = a1111_png(tmp_path, "a castle\nSteps: 30, Sampler: DPM++ SDE Karras, CFG scale: 6.5, Seed: 7")
    settings, notes = restore_settings(path)
    assert settings == dict(prompt="a castle", negative_prompt="", num_inference_steps=30, guidance_scale=6.5,
                            seed=7)
    assert notes == ["left out the PNG's sampler: ImageCraft has no sampler 'DPM++ SDE Karras'",
                     "the PNG gives no size; the current or default value is used"]


def test_a_caption_without_settings_line_is_the_prompt():
    assert parse_a1111_parameters("just a caption, with: a colon") == dict(prompt="just a caption, with: a colon",
                                                                           negative_prompt="")


@pytest.mark.parametrize("field, dropped, note", [
    ("Steps: 9999", "num_inference_steps", "steps must be an integer from 1 to 150, got 9999"),
    ("Steps: 2.5", "num_inference_steps", "steps must be an integer from 1 to 150, got '2.5'"),
    ("CFG scale: -3", "guidance_scale", "guidance scale must be a number from 0 to 30, got -3.0"),
    ("CFG scale: nan", "guidance_scale", "guidance scale must be a number from 0 to 30, got nan"),
    ("Seed: abc", "seed", "seed must be an integer from 0 to 4294967295"),
    ("Seed: " + "9" * 5000, "seed", "seed must be an integer from 0 to 4294967295"),
    ("Size: 0x512", "width", "width must be a multiple of 8 between 64 and 2048, got 0"),
    ("Size: 512x100", "height", "height must be a multiple of 8 between 64 and 2048, got 100"),
    ("Size: 512", "width", "width must be a multiple of 8 between 64 and 2048, got '512'"),
])
def test_bad_values_are_left_out_with_the_check_sentence(tmp_path, field, dropped, note):
    fields = {"Steps": "Steps: 20", "CFG scale": "CFG scale: 7", "Seed": "Seed: 1", "Size": "Size: 64x64"}
    fields[field.split(":")[0]] = field
    settings, notes = restore_settings(a1111_png(tmp_path, "x\n" + ", ".join(fields.values()) + ", Sampler: Euler"))
    assert dropped not in settings and settings["prompt"] == "x" and settings["scheduler"] == "euler"
    if dropped in ("width", "height"):
        assert "width" not in settings and "height" not in settings  # a size is restored whole or not at all
    assert len(notes) == 1 and note in notes[0], notes


def test_json_record_values_are_checked(tmp_path):
    record = dict(RECORD, prompt=["a", "b"], num_inference_steps=9999, width="64", scheduler={"x": 1}, seed=True,
                  cache_interval=0)
    path = tmp_path / "bad.png"
    path.write_bytes(png_with(png_chunk(b"tEXt", b"imagecraft\0" + json.dumps(record).encode())))
    settings, notes = restore_settings(path)
    assert settings == dict(negative_prompt="blue", guidance_scale=3.5, model="shapes-sd")
    assert notes == ["left out the PNG's prompt: prompt must be a single value, got ['a', 'b']",
                     "left out the PNG's steps: steps must be an integer from 1 to 150, got 9999",
                     "left out the PNG's seed: seed must be an integer from 0 to 4294967295, or None for a random "
                     "one, got True",
                     "left out the PNG's size: width must be a multiple of 8 between 64 and 2048, got '64'",
                     "left out the PNG's sampler: scheduler must be a single value, got {'x': 1}",
                     "left out the PNG's cache interval: cache_interval must be a whole number from 1 (no caching) to "
                     "150 (DeepCache: the whole UNet every that many steps), got 0"]


@pytest.mark.parametrize("text, match", [
    (b"[1, 2]", "the PNG's 'imagecraft' text must be a JSON object of settings, got list"),
    (b"{not json", "the PNG's 'imagecraft' text is not valid JSON"),
    (b"[" * 100_000, "the PNG's 'imagecraft' text is not valid JSON"),  # nested too deep for json
])
def test_json_chunk_that_is_not_an_object_is_refused(tmp_path, text, match):
    path = tmp_path / "bad.png"
    path.write_bytes(png_with(png_chunk(b"tEXt", b"imagecraft\0" + text)))
    with pytest.raises(ValueError, match=match) as error:
        read_png_settings(path)
    one_sentence(error)


# --- time and memory limits ----------------------------------------------------------------------------------------
def best_seconds(fn, arg, repeats: int = 5) -> float:
    """The shortest of a few timings of fn(arg): the one least disturbed by other work on a shared machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return min(times)


def assert_linear(fn, make):
    """fn(make(10)) takes under 20 times as long as fn(make(1)): linear time with room for noise, where quadratic
    time would take 100 times. A ratio, not a limit in seconds, which a busy machine would break."""
    small, large = make(1), make(10)
    assert best_seconds(fn, large) < 20 * best_seconds(fn, small)


class CountingFile(io.BytesIO):
    """A file that counts the bytes read from it, to show what a reader skipped."""

    bytes_read = 0

    def read(self, size=-1):
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_the_quadratic_text_parses_in_linear_time(tmp_path):
    def png(scale):  # at scale 10, 60,000 characters: 26 s with the old regex
        (tmp_path / str(scale)).mkdir(exist_ok=True)
        return a1111_png(tmp_path / str(scale), "x\nSteps: 1, " + "a " * 3000 * scale, zip=True)

    assert read_png_settings(png(10))["num_inference_steps"] == 1
    assert_linear(read_png_settings, png)


@pytest.mark.parametrize("head, unit, count", [
    ("", "a ", 30000), ("", ":", 60000), ("", '"', 60000), ("", ", ", 30000), ("", "\\", 60000),
    ('k: "', "a, ", 20000), ("", "Steps: ", 8000), ("Size: ", "x", 60000),
], ids=["words", "colons", "quotes", "commas", "backslashes", "an open quote", "Steps keys", "a long Size"])
def test_adversarial_lines_parse_in_linear_time(head, unit, count):
    assert_linear(parse_a1111_parameters, lambda scale: "x\nSteps: 1, " + head + unit * (count // 10 * scale))


def test_over_long_texts_are_refused_before_they_are_parsed():
    def refuse(text):
        with pytest.raises(ValueError, match="the 'parameters' text is over the limit of 131,072 characters") as e:
            parse_a1111_parameters(text)
        one_sentence(e)

    assert_linear(refuse, lambda scale: "x\nSteps: 1, " + "a " * 100_000 * scale)
    file = CountingFile(png_with(png_chunk(b"tEXt", b"parameters\0" + b"a" * 1_000_000)))
    with pytest.raises(ValueError, match="the PNG's 'parameters' text is over the limit of 131,072 bytes"):
        read_png_settings(file)
    assert file.bytes_read < 200  # the chunk's length and keyword: the megabyte after them is never read


@pytest.mark.parametrize("kind, header", [(b"zTXt", b"parameters\0\0"), (b"iTXt", b"imagecraft\0\1\0en\0\0")])
def test_a_compressed_text_bomb_is_refused_without_inflating_it(tmp_path, kind, header):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with(png_chunk(kind, header + bomb())))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="text is over the limit of 131,072 bytes") as error:
            read_png_settings(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_TEXT + 1_000_000  # at most MAX_TEXT inflated, not 50 MB
    one_sentence(error)


def test_other_chunks_are_skipped_unread(tmp_path):
    text = a1111_parameters(RECORD).encode()
    path = tmp_path / "skip.png"
    path.write_bytes(png_with(png_chunk(b"zTXt", b"Comment\0\0" + bomb()), png_chunk(b"tEXt", b"parameters\0" + text),
                              png_chunk(b"tEXt", b"parameters\0other"), png_chunk(b"prVt", b"\xff" * 1000)))
    assert read_png_settings(path) == RESTORED  # the first 'parameters' chunk counts


# --- files that are not readable PNGs ------------------------------------------------------------------------------
def corrupt_files() -> dict[str, bytes]:
    good = png_with(png_chunk(b"tEXt", b"parameters\0" + a1111_parameters(RECORD).encode()))
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    bad_crc = bytearray(good)
    bad_crc[60] ^= 1  # a byte of the parameters text (its data starts at 33 + 8 + 11)
    return {"jpeg": jpeg.getvalue(), "empty": b"", "text": b"Steps: 20, Sampler: Euler", "truncated": good[:60],
            "no IEND": good[:-12], "bad crc": bytes(bad_crc), "bad chunk type": good[:33] + b"\0\0\0\0\0\0\0\0",
            "bad zlib": png_with(png_chunk(b"zTXt", b"parameters\0\0not zlib at all")),
            "short zlib": png_with(png_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(bytes(range(256)) * 4)[:40])),
            "bad utf-8": png_with(png_chunk(b"iTXt", b"parameters\0\0\0\0\0\xff\xfe")),
            "no settings": png_with()}


@pytest.mark.parametrize("name, match", [
    ("jpeg", "this file is not a PNG; generation settings are read only from PNG files"),
    ("empty", "this file is not a PNG"), ("text", "this file is not a PNG"),
    ("truncated", "this PNG is truncated or corrupt: it ends before its IEND chunk"),
    ("no IEND", "this PNG is truncated or corrupt"),
    ("bad crc", "this PNG is corrupt: its 'parameters' chunk fails its checksum"),
    ("bad chunk type", "this PNG is corrupt: it has a chunk of type"),
    ("bad zlib", "this PNG is corrupt: its 'parameters' text does not inflate"),
    ("short zlib", "this PNG is corrupt: its 'parameters' text ends early"),
    ("bad utf-8", "this PNG is corrupt: its 'parameters' text is not valid UTF-8"),
    ("no settings", "this PNG carries no generation settings"),
])
def test_unreadable_files_get_one_sentence(tmp_path, name, match):
    path = tmp_path / "file.png"
    path.write_bytes(corrupt_files()[name])
    with pytest.raises(ValueError, match=match) as error:
        read_png_settings(path)
    one_sentence(error)


# --- fuzzing -------------------------------------------------------------------------------------------------------
def assert_valid(settings: dict):
    """Every restored setting is what the settings schema makes of it; the model is a name."""
    assert set(settings) <= {*SETTINGS, "model"}
    for name, value in settings.items():
        if name == "model":
            assert isinstance(value, str) and value.strip()
        else:
            assert check(name, value) == value and not isinstance(value, (list, dict))


def parses_or_refuses(text: str):
    try:
        assert_valid(parse_a1111_parameters(text))
    except ValueError:
        pass


@FUZZ
@given(st.text(max_size=3000))
def test_random_text_parses_or_is_refused(text):
    parses_or_refuses(text)


KEYS = st.sampled_from(["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Model hash",
                        "Lora hashes", "Steps ", " Size"])
VALUES = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["Euler a", "DPM++ 2M", "Karras", "DPM++ SDE Karras", "Automatic", "512x512", "64X48", "x",
                     "1e9", "0x0", "", '"', '\\"', "nan", "-0"]),
    st.text(alphabet=st.sampled_from('a1x:," \\\n'), max_size=40),
    st.text(max_size=20).map(lambda t: '"' + t.replace('"', '\\"') + '"'))
FIELD = st.tuples(KEYS, VALUES).map(lambda kv: f"{kv[0]}: {kv[1]}")


@FUZZ
@given(st.text(max_size=200), st.one_of(st.just(""), st.text(max_size=100)),
       st.lists(FIELD, max_size=12), st.sampled_from([", ", ",", " , "]))
def test_a1111_like_lines_parse_or_are_refused(prompt, negative, fields, separator):
    text = prompt + (f"\nNegative prompt: {negative}" if negative else "") + "\nSteps: " + separator.join(fields)
    parses_or_refuses(text)


MUTATED = png_with(png_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(a1111_parameters(RECORD).encode())))


@FUZZ
@given(st.one_of(st.binary(max_size=2000),
                 st.binary(max_size=2000).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
                 st.tuples(st.integers(0, 400), st.integers(0, 255)).map(
                     lambda at: bytes(b ^ at[1] if i == at[0] else b for i, b in enumerate(MUTATED)))))
def test_random_bytes_as_a_png_only_raise_value_error(data):
    try:
        settings, notes = restore_settings(io.BytesIO(data))
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert_valid(settings)
        assert all(isinstance(note, str) for note in notes)



def test_a_png_without_a_cache_interval_is_made_again_without_caching(tmp_path):
    from imagecraft.png import pipeline_settings

    record = {k: v for k, v in RECORD.items() if k != "cache_interval"}  # ours records it only when caching was on
    ours = save_png(Image.new("RGB", (8, 8)), tmp_path / "ours.png", record)
    theirs = a1111_png(tmp_path, "a castle\nSteps: 30, Sampler: Euler, CFG scale: 6.5, Seed: 7, Size: 64x64")
    for path in (ours, theirs):
        settings, _ = restore_settings(path)
        assert "cache_interval" not in settings and pipeline_settings(settings)["cache_interval"] == 1
    assert "Cache interval: 3" in a1111_parameters(RECORD)
    assert pipeline_settings(restore_settings(a1111_png(tmp_path, a1111_parameters(RECORD)))[0])["cache_interval"] == 3
