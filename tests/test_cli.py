"""The command line, run as a user would: `python -m imagecraft generate ...` and the `imagecraft` script."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_tiny_pipeline_folder
from PIL import Image

from imagecraft.cli import main
from imagecraft.pipeline import ImageCraftPipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny-cli"))


def test_generate_writes_pngs_equal_to_the_pipeline(folder, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(folder), "--prompt", "a red circle", "--seed", "5", "--steps", "4",
                 "--scheduler", "euler", "--num-images", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr()
    assert "img-0.png  seed=5" in printed.out and "img-1.png  seed=6" in printed.out
    assert "sampling" in printed.err  # the tqdm bar
    expected = ImageCraftPipeline.from_pretrained(folder)("a red circle", seed=6, num_inference_steps=4,
                                                          scheduler="euler").images[0]
    # the second image of a batch of two against the same seed alone: fp32 kernels may round differently at another
    # batch size (seen on an AVX2 CPU: one channel of one pixel off by 1/255), so equal up to that rounding
    difference = np.abs(np.asarray(Image.open(tmp_path / "img-1.png").convert("RGB"), float)
                        - np.asarray(expected, float))
    assert difference.max() <= 1 and difference.mean() < 0.01

    # regenerate from the PNG alone; a flag given overrides what the PNG says
    again = tmp_path / "again.png"
    assert main(["generate", "--model", str(folder), "--from-png", str(tmp_path / "img-1.png"),
                 "--output", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(expected))
    assert main(["generate", "--model", str(folder), "--from-png", str(tmp_path / "img-1.png"), "--seed", "7",
                 "--output", str(tmp_path / "other.png")]) == 0
    assert "Seed: 7," in Image.open(tmp_path / "other.png").text["parameters"]


@pytest.mark.parametrize("args, message", [
    (["--width", "100"], "width must be a multiple of 8 between 64 and 2048, got 100"),
    (["--steps", "500"], "steps must be an integer from 1 to 150, got 500"),
    (["--guidance", "nan"], "guidance scale must be a finite number >= 0, got nan"),
])
def test_bad_input_exits_with_a_message(folder, tmp_path, capsys, args, message):
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--output", str(tmp_path / "x.png"),
                 *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_model_and_prompt(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "model_index.json is missing" in capsys.readouterr().err
    assert main(["generate"]) == 2
    assert "give --prompt" in capsys.readouterr().err


def test_help_and_scheduler_choices():
    help_text = subprocess.run([sys.executable, "-m", "imagecraft", "generate", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for flag in ("--model", "--prompt", "--negative-prompt", "--seed", "--steps", "--guidance", "--scheduler",
                 "--width", "--height", "--num-images", "--output", "--from-png"):
        assert flag in help_text
    bad = subprocess.run([sys.executable, "-m", "imagecraft", "generate", "--scheduler", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr


@pytest.mark.skipif(shutil.which("imagecraft") is None, reason="the package is not installed (pip install -e .)")
def test_console_script(folder, tmp_path):
    done = subprocess.run(["imagecraft", "generate", "--model", str(folder), "--prompt", "a blue square",
                           "--seed", "1", "--steps", "2", "--output", str(tmp_path / "s.png")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "s.png").exists()


def test_attention_writes_the_image_the_figure_and_the_maps(folder, tmp_path, capsys):
    from imagecraft.attention import AttentionMaps

    fig, image, npz = tmp_path / "fig.png", tmp_path / "img.png", tmp_path / "maps.npz"
    assert main(["attention", "--model", str(folder), "--prompt", "a red circle on the left", "--seed", "3",
                 "--steps", "3", "--guidance", "5", "--words", "red", "circle", "--output", str(fig),
                 "--image", str(image), "--npz", str(npz)]) == 0
    printed = capsys.readouterr()
    assert "sampling" in printed.err and str(fig) in printed.out
    expected = ImageCraftPipeline.from_pretrained(folder)("a red circle on the left", seed=3, num_inference_steps=3,
                                                          guidance_scale=5.0, attention=True)
    assert np.array_equal(np.asarray(Image.open(image).convert("RGB")), np.asarray(expected.images[0]))
    assert "a red circle on the left" in Image.open(image).text["parameters"]
    maps = AttentionMaps.load(npz)
    np.testing.assert_array_equal(maps.word("red"), expected.attention[0].word("red"))
    assert Image.open(fig).size[0] >= 3 * 200  # the image and two word panels

    time_fig = tmp_path / "time.png"
    assert main(["attention", "--model", str(folder), "--prompt", "a red circle", "--seed", "3", "--steps", "3",
                 "--plot", "time", "--blocks", "up", "--output", str(time_fig),
                 "--image", str(tmp_path / "i2.png")]) == 0
    assert Image.open(time_fig).size[1] > 150


@pytest.mark.parametrize("args, message", [
    (["--words", "dog"], "'dog' is not in the prompt; its words are: a, red, circle"),
    (["--layers", "nowhere.attn2"], "no captured layer named"),
    (["--timesteps", "2:99"], "outside the"),
    (["--timesteps", "two"], "--timesteps must be START:STOP"),
    (["--heads", "9"], "heads must be indices"),
    (["--prompt", ""], "give --prompt with words"),
])
def test_attention_bad_words_and_filters_exit_2(folder, tmp_path, capsys, args, message):
    base = ["attention", "--model", str(folder), "--prompt", "a red circle", "--steps", "2",
            "--output", str(tmp_path / "f.png"), "--image", str(tmp_path / "i.png")]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    if args[0] == "--words":
        assert "sampling" not in err  # refused before any sampling
