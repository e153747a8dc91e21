"""AUTOMATIC1111's prompt weighting and chunked long prompts (`imagecraft.prompts`): the parser against a
hand-written table and a plain quadratic reference, the emphasis maths, the bytes of unweighted prompts, chunks,
attention maps over every token, the CLI and A1111 PNGs, and on the built-in model what a colour's weight does."""

import re
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from imagecraft.cli import main
from imagecraft.explain import AttentionMaps, ablation
from imagecraft.pipeline import ImageCraftPipeline
from imagecraft.prompts import emphasize, parse, tokenize
from imagecraft.shapes.world import COLOURS, GRAY
from imagecraft.testing import TINY_TEXTS
from imagecraft.tokenizer import train_clip_tokenizer
from test_attention import naive_run

LONG = " ".join(["a red circle on the left"] * 14) + " and a green triangle"  # 90 words: two chunks of 77


@pytest.fixture(scope="module")
def tokenizer():
    return train_clip_tokenizer(TINY_TEXTS * 4, vocab_size=560)  # the tiny pipelines' tokenizer


@pytest.fixture(scope="module")
def pipe(tiny_sd1_pipe):
    return tiny_sd1_pipe


def pixels(result):
    return np.stack([np.asarray(image) for image in result.images])


# --- the syntax -------------------------------------------------------------------------------------------------
# prompt -> (text, weight) pieces, written by hand; each piece is tokenised on its own and all its tokens take its
# weight. The last column is a piece of the note the prompt gets, for unbalanced ones.
TABLE = [
    ("a red circle", [("a red circle", 1)], None),
    ("a (red) circle", [("a", 1), ("red", 1.1), ("circle", 1)], None),
    ("a ((red)) circle", [("a", 1), ("red", 1.21), ("circle", 1)], None),
    ("a (((red))) circle", [("a", 1), ("red", 1.331), ("circle", 1)], None),
    ("a [red] circle", [("a", 1), ("red", 0.9090909), ("circle", 1)], None),
    ("a [[red]] circle", [("a", 1), ("red", 0.8264463), ("circle", 1)], None),
    ("a (red circle:0.8)", [("a", 1), ("red circle", 0.8)], None),
    ("a ( red : 1.5 ) circle", [("a", 1), ("red", 1.5), ("circle", 1)], None),
    ("(red:.5) (circle:2.)", [("red", 0.5), ("circle", 2)], None),
    ("a (red:-1) circle", [("a", 1), ("red", -1), ("circle", 1)], None),
    ("((red:1.5) circle) on the left", [("red", 1.65), ("circle", 1.1), ("on the left", 1)], None),
    ("([red] circle)", [("red", 1.0), ("circle", 1.1)], None),
    ("(a [b) c]", [("a", 1.1), ("b", 1.0), ("c", 0.9090909)], None),  # two stacks: the brackets may cross
    ("a (red:1.0) circle", [("a red circle", 1)], None),
    (r"\(red\) circle", [("(red) circle", 1)], None),
    (r"a \[red\] \\ circle", [("a [red] \\ circle", 1)], None),
    (r"a (\(red\)) circle", [("a", 1), ("(red)", 1.1), ("circle", 1)], None),
    ("a red circle: on the left", [("a red circle: on the left", 1)], None),
    ("a (red:1.2.3) circle", [("a", 1), ("red:1.2.3", 1.1), ("circle", 1)], None),  # not a number: text
    ("a (zebrafish:1.3) circle", [("a", 1), ("zebrafish", 1.3), ("circle", 1)], None),  # a word of many pieces
    ("a (red circle", [("a", 1), ("red circle", 1.1)], "'(' at character 3 is never closed"),
    ("a [red circle", [("a", 1), ("red circle", 0.9090909)], "'[' at character 3 is never closed"),
    ("((red) circle", [("red", 1.21), ("circle", 1.1)], "'(' at character 1 is never closed"),
    ("(red:1.5", [("red:1.5", 1.1)], "'(' at character 1 is never closed"),
    ("a red) circle", [("a red) circle", 1)], "')' at character 6 closes no bracket"),
    ("a red] circle", [("a red] circle", 1)], "']' at character 6 closes no bracket"),
    ("red:1.5) circle", [("red:1.5) circle", 1)], "':1.5)' at character 4 closes no bracket"),
    ("((((a", [("a", 1.4641)], "4 '(' are never closed (at characters 1, 2, 3, 4)"),
    ("a)) (b]", [("a))", 1), ("b]", 1.1)], "'(' at character 5 is never closed"),  # and a second note
    ("", [], None),
    ("()", [], None),
    ("(:1.5) []", [], None),
]


@pytest.mark.unit
@pytest.mark.parametrize("prompt, pieces, note", TABLE, ids=[row[0] or "empty" for row in TABLE])
def test_prompts_give_the_hand_written_token_weights(tokenizer, prompt, pieces, note):
    tokens = tokenize(tokenizer, prompt)
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text, _ in pieces]
    assert tokens.chunks == [[i for piece in ids for i in piece]]
    assert tokens.weights[0] == pytest.approx([w for piece, (_, w) in zip(ids, pieces) for _ in piece], rel=1e-6)
    if note:
        assert note in tokens.notes[0] and prompt[:20] in tokens.notes[0]
        assert len(tokens.notes) == (2 if prompt == "a)) (b]" else 1)
    else:
        assert tokens.notes == []
    if "zebrafish" in prompt:
        assert len(ids[1]) > 1


def naive_weights(prompt: str) -> tuple[str, list[float]]:
    """AUTOMATIC1111's algorithm as plainly as it goes, per character: each closing bracket multiplies every
    character since its opening one (quadratic), the unclosed ones are closed at the end."""
    chars, round_, square = [], [], []

    def multiply(start, by):
        for c in chars[start:]:
            c[1] *= by

    i = 0
    while i < len(prompt):
        c = prompt[i]
        weight = re.match(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)", prompt[i:])
        if c == "\\":
            escaped = prompt[i + 1:i + 2]
            if escaped and escaped in "()[]\\":
                chars.append([escaped, 1.0])
                i += 2
            else:
                i += 1  # a backslash before anything else is dropped
            continue
        if c == "(":
            round_.append(len(chars))
        elif c == "[":
            square.append(len(chars))
        elif weight and round_:
            multiply(round_.pop(), float(weight[1]))
            i += len(weight[0])
            continue
        elif c == ")" and round_:
            multiply(round_.pop(), 1.1)
        elif c == "]" and square:
            multiply(square.pop(), 1 / 1.1)
        else:
            chars.append([c, 1.0])
        i += 1
    for start in round_:
        multiply(start, 1.1)
    for start in square:
        multiply(start, 1 / 1.1)
    return "".join(c for c, _ in chars), [w for _, w in chars]


@pytest.mark.unit
def test_many_unbalanced_brackets_make_one_sentence_each_kind_and_huge_weights_are_refused():
    notes = parse("(" * 4000 + "a" + ")]" * 3).notes
    with pytest.raises(ValueError, match="the weight at character 4 of the prompt is too large a number: 1000"):
        parse("(a:" + "1" + "0" * 400 + ")")
    assert notes == ["3997 '(' are never closed (at characters 1, 2, 3, 4, 5, ...), so everything after each is "
                     "weighted x1.1 more, as AUTOMATIC1111 does (close them with ')', or write \\( for literal ones)",
                     "3 closing brackets close nothing and are read as text (at characters 4003, 4005, 4007; write "
                     "\\] for literal ones)"]


@pytest.mark.unit
@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="()[]\\:ab 1.5-", max_size=40))
def test_parse_agrees_with_the_quadratic_reference(prompt):
    pieces = [piece for part in parse(prompt).parts for piece in part]
    text, weights = naive_weights(prompt)
    assert "".join(t for t, _ in pieces) == text
    assert [w for t, w in pieces for _ in t] == pytest.approx(weights, rel=1e-9)


def cpu_seconds(fn, arg, repeats: int = 5) -> float:
    """The least CPU time of a few calls: on a shared machine, wall time grows with the preemptions a longer call
    suffers, which reads as superlinear."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn(arg)
        times.append(time.process_time() - start)
    return min(times)


@pytest.mark.unit
def test_parsing_takes_linear_time():
    nasty = "(" * 300 + "a" + ")" * 300 + "[b:" + "1" * 300 + " (c:1.5)" * 100 + r" \( BREAK [[" + ":" * 100
    small, large = nasty * 2, nasty * 20  # 2,000 to 20,000 tokens of every kind; quadratic would take 100 times
    assert cpu_seconds(parse, large) < 20 * cpu_seconds(parse, small)


@pytest.mark.unit
def test_break_starts_a_chunk(tokenizer):
    one = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert tokenize(tokenizer, "a red BREAK (circle)").chunks == [one("a red"), one("circle")]
    assert tokenize(tokenizer, "a red BREAK (circle)").weights == [[1.0] * len(one("a red")), [1.1]]
    assert tokenize(tokenizer, "(a red BREAK circle)").weights == [[1.1] * len(one("a red")), [1.1]]
    assert tokenize(tokenizer, "a red BREAK").chunks == [one("a red")]  # a trailing BREAK starts nothing
    assert tokenize(tokenizer, "BREAK a red").chunks == [[], one("a red")]
    assert tokenize(tokenizer, "a BREAKFAST").chunks == [one("a BREAKFAST")]


# --- chunks -------------------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("prompt", [*TINY_TEXTS, "", "  a  red\tcircle ", "a red circle: on the left, 🎨 à la carte",
                                    " ".join(["a"] * 75)])  # 75 tokens and start and end: the window
def test_a_prompt_that_fits_is_tokenised_as_diffusers_does(tokenizer, prompt):
    theirs = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(tokenizer(prompt).input_ids) <= 77
    tokens = tokenize(tokenizer, prompt)
    assert len(tokens.chunks) == 1 and tokens.rows(1) == [theirs]
    assert tokens.positions == list(range(len(tokenizer(prompt).input_ids)))


@pytest.mark.unit
@pytest.mark.parametrize("prompt", ["red " * 1000, "BREAK " * 600, "\U0001f3a8" * 2000])
def test_a_prompt_of_too_many_chunks_is_one_sentence(tokenizer, prompt):
    with pytest.raises(ValueError, match=r"makes \d+ chunks of 75 tokens; at most 16 are read \(1200 tokens\)"):
        tokenize(tokenizer, prompt)


@pytest.mark.unit
def test_the_longest_prompt_of_the_world_is_read(tokenizer):
    from imagecraft.settings import MAX_PROMPT_CHARS

    prompt = ("a red circle on the left " * 200)[:MAX_PROMPT_CHARS]
    assert len(tokenize(tokenizer, prompt).chunks) <= 16


@pytest.mark.unit
def test_long_prompts_are_cut_into_chunks_each_with_its_start_and_end(tokenizer):
    ids = tokenizer(LONG, add_special_tokens=False).input_ids
    assert len(ids) > 75
    tokens = tokenize(tokenizer, LONG)
    assert tokens.chunks == [ids[:75], ids[75:]]
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = tokens.rows(3)  # one more chunk than it needs: an empty one, as the encoding of ""
    assert rows[0] == [start, *ids[:75], end]
    assert rows[1] == [start, *ids[75:], end] + [pad] * (75 - len(ids[75:]))
    assert rows[2] == tokenizer("", padding="max_length", max_length=77).input_ids
    assert tokens.ids == [start, *ids, end]
    assert tokens.positions == [0, *range(1, 76), *range(78, 78 + len(ids) - 75), 78 + len(ids) - 75]


# --- the maths ----------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_emphasis_scales_each_token_and_keeps_the_mean():
    z = torch.randn(2, 3, 77, 32, generator=torch.Generator().manual_seed(0)) + 0.5  # (B, chunks, window, dim)
    weights = torch.ones(2, 3, 77)
    weights[0, 1, 5:9] = 1.5
    weights[0, 2, 3] = 0.5
    out = emphasize(z, weights)
    for b, c in [(0, 1), (0, 2)]:
        expected = z[b, c].double() * weights[b, c, :, None].double()
        expected *= z[b, c].double().mean() / expected.mean()
        torch.testing.assert_close(out[b, c].double(), expected, rtol=1e-5, atol=1e-6)
        assert out[b, c].double().mean().item() == pytest.approx(z[b, c].double().mean().item(), rel=1e-5)
    assert torch.equal(out[0, 0], z[0, 0]) and torch.equal(out[1], z[1])  # weights of 1: the bytes as they were
    assert emphasize(z, torch.ones(2, 3, 77)) is z
    centred = z - z.mean(-1, keepdim=True)  # every token of mean 0, as a final LayerNorm without bias gives
    torch.testing.assert_close(emphasize(centred, weights), centred * weights[..., None])  # no mean to restore
    flipped = weights.clone()
    flipped[0, 1] = -1  # the weighted mean of the other sign: scaling would flip the whole chunk
    torch.testing.assert_close(emphasize(z, flipped)[0, 1], -z[0, 1])
    half = z.to(torch.bfloat16)
    assert emphasize(half, weights).dtype == torch.bfloat16


@pytest.mark.unit
def test_weighted_encoding_is_the_text_encoders_output_weighted(pipe):
    z = pipe.text_encoder(torch.tensor(pipe.tokenizer("a red circle", padding="max_length",
                                                      max_length=77).input_ids)[None])[0]
    ours, notes = pipe.encode_prompt(["a (red:1.5) circle"])
    weights = torch.tensor(tokenize(pipe.tokenizer, "a (red:1.5) circle").row_weights(1))
    # the tiny random encoder's final LayerNorm leaves every token with mean 0: nothing to restore
    assert abs(z.mean()) < 1e-5 * z.abs().mean()
    torch.testing.assert_close(ours, z * weights[..., None], rtol=1e-5, atol=1e-5)
    assert notes == [] and not torch.equal(ours, z)
    plain, _ = pipe.encode_prompt(["a red circle", "a (red:1.0) circle"])
    assert torch.equal(plain[0], z[0]) and torch.equal(plain[1], z[0])  # the bytes of the unweighted encoding


# --- the pipeline -------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_weight_one_gives_the_same_bytes_and_other_weights_change_the_image(pipe):
    args = dict(seed=3, num_inference_steps=3, negative_prompt="a blue square")
    plain = pixels(pipe("a red circle", **args))
    assert np.array_equal(pixels(pipe("a (red:1.0) circle", **args)), plain)
    assert np.array_equal(pixels(pipe("a red circle", **dict(args, negative_prompt="a (blue:1.0) square"))), plain)
    for weighted in ("a (red:1.5) circle", "a [red] circle", "a red BREAK circle"):
        assert not np.array_equal(pixels(pipe(weighted, **args)), plain), weighted
    assert not np.array_equal(pixels(pipe("a red circle", **dict(args, negative_prompt="a (blue:1.5) square"))),
                              plain)


@pytest.mark.unit
def test_unbalanced_prompts_warn_and_close_at_the_end(pipe):
    with pytest.warns(UserWarning, match="'\\(' at character 3 is never closed"):
        result = pipe("a (red circle", seed=1, num_inference_steps=2)
    assert any("never closed" in w for w in result.warnings)
    assert np.array_equal(pixels(result), pixels(pipe("a (red circle)", seed=1, num_inference_steps=2)))
    assert result.records[0]["prompt"] == "a (red circle"


@pytest.mark.unit
def test_long_prompts_are_encoded_whole(pipe):
    context, _ = pipe.encode_prompt([LONG, "a red circle"])
    assert context.shape[:2] == (2, 2 * 77)
    short, _ = pipe.encode_prompt(["a red circle"])
    assert torch.equal(context[1, :77], short[0])  # the first chunk as it was alone
    empty, _ = pipe.encode_prompt([""])
    torch.testing.assert_close(context[1, 77:], empty[0])  # padded with the encoding of ""
    args = dict(seed=2, num_inference_steps=2)
    with_tail = pixels(pipe(LONG, **args))
    assert not np.array_equal(with_tail, pixels(pipe(LONG.replace("green triangle", "blue square"), **args)))
    # a long negative prompt pads the prompt to its chunks, with and without guidance
    for guidance in (1.0, 5.0):
        result = pipe("a red circle", negative_prompt=LONG, guidance_scale=guidance, **args)
        assert result.warnings == []


@pytest.mark.unit
def test_maps_of_a_long_prompt_cover_every_token(pipe):
    args = dict(prompt=LONG, negative_prompt="a " + LONG, seed=4, num_inference_steps=2, guidance_scale=5.0)
    ours = pipe(attention=True, **args)
    reference, calls = naive_run(pipe, **args)
    assert np.array_equal(pixels(ours), pixels(reference))
    maps = ours.attention[0]
    tokens = tokenize(pipe.tokenizer, LONG)
    assert len(maps.tokens) == len(tokens.ids) > 77 and maps.tokens[-1] == "<end>" and maps.truncated == 0
    assert maps.sides[0].positions == tokens.positions
    for index, layer in enumerate(maps.layers):
        h, w = layer.size
        for side, half in ((0, 1), (1, 0)):
            naive = torch.stack([p[half] for p in calls[layer.name]]).sum(0)  # (heads, HW, 2 x 77)
            naive = naive[..., maps.sides[side].positions]  # the kept tokens, at their positions
            naive = naive.permute(0, 2, 1).reshape(naive.shape[0], -1, h, w)
            np.testing.assert_allclose(maps.sides[side].head_sums[index], naive.numpy(), rtol=1e-4, atol=1e-5)
    assert maps.words() == ["a", "red", "circle", "on", "the", "left", "and", "green", "triangle"]
    assert maps.word("triangle").shape == (64, 64)  # a word of the second chunk
    assert maps.token_indices("triangle") == [len(tokens.ids) - 2]
    assert np.isfinite(ablation(pipe, maps, "triangle")["correlation"])


@pytest.mark.unit
def test_maps_name_weighted_words_without_syntax(pipe, tmp_path):
    maps = pipe("a ((red)) [circle] on the (left:1.3)", seed=1, num_inference_steps=2,
                attention=True).attention[0]
    assert maps.words() == ["a", "red", "circle", "on", "the", "left"]
    assert maps.prompt == "a ((red)) [circle] on the (left:1.3)"
    np.testing.assert_array_equal(maps.word("(red:1.2)"), maps.word("red"))
    with pytest.raises(ValueError, match="'blue' is not in the prompt; its words are: a, red, circle"):
        maps.word("blue")
    again = AttentionMaps.load(maps.save(tmp_path / "maps.npz"))
    assert again.sides[0].positions == maps.sides[0].positions
    np.testing.assert_array_equal(again.word("left"), maps.word("left"))


# --- where prompts come in: A1111 PNGs, the CLI -----------------------------------------------------------------
@pytest.mark.unit
def test_an_a1111_png_generates_with_its_weights(pipe, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a (red:1.5) circle on the [left]\nNegative prompt: (blue square:0.7)\n"
                                "Steps: 3, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, Model: sd15")
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    restored = pipe.reproduce(tmp_path / "a1111.png")
    args = dict(seed=7, num_inference_steps=3, scheduler="euler", guidance_scale=5.0, width=64, height=64)
    direct = pipe("a (red:1.5) circle on the [left]", negative_prompt="(blue square:0.7)", **args)
    assert np.array_equal(pixels(restored), pixels(direct))
    assert not np.array_equal(pixels(restored), pixels(pipe("a red circle on the left",
                                                            negative_prompt="blue square", **args)))
    saved = restored.save(tmp_path / "again.png")[0]
    assert Image.open(saved).text["parameters"].startswith("a (red:1.5) circle on the [left]\n"
                                                            "Negative prompt: (blue square:0.7)\n")
    assert np.array_equal(pixels(pipe.reproduce(saved)), pixels(direct))


@pytest.mark.integration
def test_the_cli_reads_weights_and_keeps_the_prompt_as_typed(tiny_sd1, pipe, tmp_path):
    out = tmp_path / "out.png"
    assert main(["generate", "--model", str(tiny_sd1), "--prompt", "a (red:1.5) circle", "--negative-prompt",
                 "[blue]", "--seed", "5", "--steps", "3", "--dtype", "fp32", "--output", str(out)]) == 0
    direct = pipe("a (red:1.5) circle", negative_prompt="[blue]", seed=5, num_inference_steps=3)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), pixels(direct)[0])
    assert Image.open(out).text["parameters"].startswith("a (red:1.5) circle\nNegative prompt: [blue]\n")
    figure = tmp_path / "fig.png"
    assert main(["attention", "--model", str(tiny_sd1), "--prompt", "a (red:1.5) circle", "--words", "red",
                 "--seed", "5", "--steps", "2", "--output", str(figure), "--image", str(tmp_path / "image.png")]) == 0


# --- on the built-in model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin():
    return ImageCraftPipeline.from_pretrained()


def colour_of_object(image, colour: str) -> tuple[float, float, int]:
    """(mean HSV saturation, colour strength, area) of the pixels that differ from the background (the border's
    median): strength is the object's mean colour projected on gray -> the colour, 1 at the world's colour."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    background = np.median(np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]]), 0)
    mask = np.linalg.norm(px - background, axis=-1) > 60
    target, gray = np.array(COLOURS[colour], np.float32), np.array(GRAY, np.float32)
    strength = (px[mask].mean(0) - gray) @ (target - gray) / ((target - gray) @ (target - gray))
    saturation = np.asarray(image.convert("HSV"), dtype=np.float32)[mask][:, 1].mean() / 255
    return float(saturation), float(strength), int(mask.sum())


@pytest.mark.integration
def test_weight_one_is_bit_identical_on_the_built_in_model(builtin):
    assert np.array_equal(pixels(builtin("a (red:1.0) circle", seed=9, num_images=2)),
                          pixels(builtin("a red circle", seed=9, num_images=2)))


@pytest.mark.integration
def test_the_built_in_models_encoding_is_weighted_and_its_mean_restored(builtin):
    tokens = tokenize(builtin.tokenizer, "a (red:1.5) [circle]")
    z = builtin.text_encoder(torch.tensor(tokens.rows(1), device=builtin.device))[0].float()
    assert abs(z.mean()) > 1e-3 * z.abs().mean()  # a real mean, which the emphasis restores
    expected = z * torch.tensor(tokens.row_weights(1), device=z.device)[..., None]
    expected = expected * (z.mean() / expected.mean())
    ours, _ = builtin.encode_prompt(["a (red:1.5) [circle]"])
    torch.testing.assert_close(ours.float(), expected.to(builtin.dtype).float(), rtol=0, atol=0)


@pytest.mark.integration
def test_a_colour_words_weight_changes_its_object(builtin):
    """Up: the object's colour goes past the world's (the emphasis scales the whole context); down: it pales; the
    object grows with the weight on average. Printed per colour (pytest -s) for the README's figures."""
    rows = {}
    for prompt, colour in (("a {} circle", "red"), ("a {} square", "blue"), ("a {} triangle", "green"),
                           ("a {} circle on the left", "yellow")):
        for weight in (0.5, 1.0, 1.5):
            images = builtin(prompt.format(f"({colour}:{weight:g})"), seed=0, num_images=8).images
            rows[colour, weight] = np.mean([colour_of_object(image, colour) for image in images], axis=0)
            print(f"{colour:7s} x{weight:g}: saturation {rows[colour, weight][0]:.3f}, strength "
                  f"{rows[colour, weight][1]:.3f}, area {rows[colour, weight][2]:.0f} px")
    mean = {w: np.mean([v for (_, weight), v in rows.items() if weight == w], axis=0) for w in (0.5, 1.0, 1.5)}
    assert mean[1.5][0] > mean[1.0][0] + 0.02 and mean[1.5][1] > mean[1.0][1] + 0.03  # more colour
    assert mean[0.5][0] < mean[1.0][0] - 0.02 and mean[0.5][1] < mean[1.0][1] - 0.03  # less
    assert mean[0.5][2] < mean[1.0][2] < mean[1.5][2]  # smaller, larger
    for colour in ("red", "blue", "green", "yellow"):
        assert rows[colour, 0.5][1] < rows[colour, 1.0][1] < rows[colour, 1.5][1], colour  # each colour's strength
