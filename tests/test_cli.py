"""The command line, run as a user would: `python -m imagecraft generate ...` and the `imagecraft` script."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagecraft.cli import main
from imagecraft.pipeline import ImageCraftPipeline
from imagecraft.schedulers import SCHEDULERS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def folder(tiny_sd1):
    return tiny_sd1  # the session's tiny pipeline, read and never changed


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


def test_cache_interval_flag_caches_and_its_png_reproduces(folder, tmp_path):
    cached = tmp_path / "cached.png"
    assert main(["generate", "--model", str(folder), "--prompt", "a red circle", "--seed", "5", "--steps", "6",
                 "--cache-interval", "3", "--output", str(cached)]) == 0
    expected = ImageCraftPipeline.from_pretrained(folder)("a red circle", seed=5, num_inference_steps=6,
                                                          cache_interval=3).images[0]
    assert np.array_equal(np.asarray(Image.open(cached).convert("RGB")), np.asarray(expected))
    assert "Cache interval: 3" in Image.open(cached).text["parameters"]
    again = tmp_path / "again.png"
    assert main(["generate", "--model", str(folder), "--from-png", str(cached), "--output", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("args, message", [
    (["--width", "100"], "width must be a multiple of 8 between 64 and 2048, got 100"),
    (["--steps", "500"], "steps must be an integer from 1 to 150, got 500"),
    (["--guidance", "nan"], "guidance scale must be a number from 0 to 30, got nan"),
    (["--cache-interval", "0"], "cache_interval must be a whole number from 1 (no caching) to 150"),
])
def test_bad_input_exits_with_a_message(folder, tmp_path, capsys, args, message):
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--output", str(tmp_path / "x.png"),
                 *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def run_cli(argv) -> int:
    """main's exit status, also for argparse's own errors (SystemExit(2) with its usage line)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("case", ["folder", "under_a_file", "jpg", "jpeg", "webp", "no_suffix", "device",
                                  "read_only"])
def test_unwritable_output_fails_before_loading(tmp_path, capsys, case):
    """Refused in a sentence before the model loads: the model here does not even exist, so an output checked
    after loading would fail on the model instead."""
    (tmp_path / "a-folder.png").mkdir()
    (tmp_path / "a-file").write_text("x")
    output, message = {
        "folder": (tmp_path / "a-folder.png", "is a folder; give a file name"),
        "under_a_file": (tmp_path / "a-file" / "x.png", f"{str(tmp_path / 'a-file')!r} is a file, not a folder"),
        "jpg": (tmp_path / "x.jpg", "must be a .png name (ImageCraft writes PNG, which keeps the settings)"),
        "jpeg": (tmp_path / "x.JPEG", "must be a .png name"),
        "webp": (tmp_path / "x.webp", "must be a .png name"),
        "no_suffix": (tmp_path / "x", "must be a .png name"),
        "device": (Path("/dev/full"), "is not a regular file (a device or a pipe)"),
        "read_only": (tmp_path / "read-only" / "x.png", "the folder " + repr(str(tmp_path / "read-only"))
                      + " is not writable"),
    }[case]
    if case == "device" and not output.exists():
        pytest.skip("no /dev/full here")
    if case == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "read-only").mkdir(mode=0o555)
    before = files_under(tmp_path)
    assert main(["generate", "--model", str(tmp_path / "no-such-model"), "--prompt", "x",
                 "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output ") and message in err and err.count("\n") == 1  # one line, nothing before

    assert files_under(tmp_path) == before


@pytest.mark.parametrize("flag, value, message", [
    ("--image", "img.jpg", "--image must be a .png name"),
    ("--output", "fig.pdf", "--output must be a .png name (the figure is written as PNG)"),
    ("--output", "a-folder.png", "is a folder"),
    ("--npz", "a-file/maps.npz", "is a file, not a folder"),
])
def test_attention_checks_every_output_before_loading(tmp_path, capsys, flag, value, message):
    (tmp_path / "a-folder.png").mkdir()
    (tmp_path / "a-file").write_text("x")
    outputs = {"--image": "img.png", "--output": "fig.png", "--npz": "maps.npz", flag: value}
    argv = ["attention", "--model", str(tmp_path / "no-such-model"), "--prompt", "a red circle"]
    for name, path in outputs.items():
        argv += [name, str(tmp_path / path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "loading" not in err
    assert files_under(tmp_path) == ["a-file"]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_full_disk_at_save_is_a_sentence_and_leaves_no_file(folder, tmp_path):
    """A real failed write, as on a full disk: the process may write files of at most 2 kB (RLIMIT_FSIZE), and the
    PNG is larger, so the write fails with EFBIG mid-file."""
    import resource
    import signal

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with an error instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = tmp_path / "out" / "img.png"
    done = subprocess.run([sys.executable, "-m", "imagecraft", "generate", "--model", str(folder), "--prompt",
                           "a red circle", "--seed", "1", "--steps", "1", "--output", str(out)],
                          capture_output=True, text=True, preexec_fn=small_files_only)
    assert done.returncode == 2, done.stderr
    assert f"error: cannot write {str(out)!r}: File too large" in done.stderr and "Traceback" not in done.stderr
    assert files_under(tmp_path) == []  # neither the PNG nor its temporary file


def test_save_replaces_an_existing_png_whole(folder, tmp_path):
    pipe = ImageCraftPipeline.from_pretrained(folder)
    out = tmp_path / "same.png"
    for seed in (1, 2):
        pipe("a red circle", seed=seed, num_inference_steps=1).save(out)
        assert "Seed: %d," % seed in Image.open(out).text["parameters"]
    assert files_under(tmp_path) == ["same.png"]
    with pytest.raises(ValueError, match=r"the output must be a \.png name .* got '.*x\.webp'"):
        pipe("a red circle", seed=1, num_inference_steps=1).save(tmp_path / "x.webp")


def test_from_png_names_its_model_but_uses_the_built_in_one(folder, tmp_path, capsys):
    made = tmp_path / "made.png"
    assert main(["generate", "--model", str(folder), "--prompt", "a red circle", "--seed", "2", "--steps", "1",
                 "--output", str(made)]) == 0
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(made), "--output", str(again)]) == 0
    err = capsys.readouterr().err
    assert (f"warning: the PNG was made with the model {folder.name!r}; the built-in model is used unless --model "
            f"is given") in err
    assert json.loads(Image.open(again).text["imagecraft"])["model"] == "shapes-sd"
    assert main(["generate", "--from-png", str(made), "--model", str(folder), "--output", str(again)]) == 0
    assert "was made with the model" not in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [
    ("bogus", "error: device must be cpu, cuda, cuda:N or mps, got 'bogus'"),
    ("cuda:x", "error: device must be cpu, cuda, cuda:N or mps, got 'cuda:x'"),
    ("cuda:99", "error: device 'cuda:99' "),  # not available here, or not that many devices
])
def test_bad_device_is_a_sentence(folder, tmp_path, capsys, device, message):
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--device", device,
                 "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "sampling" not in err
    assert files_under(tmp_path) == []


# Values for the flags as a user might type them: valid ones that run fast on the tiny model, and junk.
FLAG_VALUES = {
    "--steps": st.sampled_from(["1", "2", "0", "151", "-1", "1.5", "x", ""]),
    "--guidance": st.sampled_from(["0", "1", "7.5", "-1", "nan", "inf", "1e400", "x"]),
    "--width": st.sampled_from(["64", "72", "100", "0", "-64", "4096", "64.0", "x"]),
    "--height": st.sampled_from(["64", "56", "63", "2056", "1e2", ""]),
    "--seed": st.one_of(st.integers(-1, 2**32).map(str), st.sampled_from(["x", "1.0", "0x10"])),
    "--num-images": st.sampled_from(["1", "2", "0", "17", "two"]),
    "--scheduler": st.sampled_from(list(SCHEDULERS) + ["Euler a", "nope", ""]),
}


@settings(max_examples=25, deadline=None)
@given(flags=st.fixed_dictionaries({}, optional=FLAG_VALUES))
def test_random_flag_values_work_or_exit_2_with_a_sentence(folder, flags):
    """Any flag values either generate complete PNGs or exit 2 with "error:" and leave no file at all."""
    if flags.get("--steps") not in ("1", "2", "0", "-1"):
        flags["--steps"] = "1"  # one step keeps every valid run fast
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()) as err, \
            contextlib.redirect_stdout(io.StringIO()):
        argv = ["generate", "--model", str(folder), "--prompt", "a red circle", "--output", f"{tmp}/img.png"]
        for flag, value in flags.items():
            argv.append(f"{flag}={value}")  # "=" so that "-1" is a value, not a flag
        code = run_cli(argv)
        written = files_under(Path(tmp))
        for name in written:
            assert "Seed: " in Image.open(Path(tmp) / name).text["parameters"]
    assert "Traceback" not in err.getvalue()
    event(f"exit {code}")
    if code == 0:
        assert len(written) == int(flags.get("--num-images", "1"))
    else:
        assert code == 2 and "error:" in err.getvalue() and written == []


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
    from imagecraft.explain.maps import AttentionMaps

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
    (["--negative", "--guidance", "1"], "exist only with guidance on"),
    (["--negative", "--guidance", "5"], "the negative prompt has no words to show: give --negative-prompt"),
])
def test_attention_bad_words_and_filters_exit_2(folder, tmp_path, capsys, args, message):
    base = ["attention", "--model", str(folder), "--prompt", "a red circle", "--steps", "2",
            "--output", str(tmp_path / "f.png"), "--image", str(tmp_path / "i.png")]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    if args[0] == "--words":
        assert "sampling" not in err  # refused before any sampling


def test_help_loads_neither_torch_nor_diffusers():
    """`imagecraft finetune --help` shows each flag's default, and appears at once: building the parser imports
    neither torch nor diffusers (they took 5-10 s before it printed)."""
    code = ("import sys, contextlib, io\nfrom imagecraft.cli import build_parser\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "    build_parser().parse_args(['finetune', '--help'])\n"
            "print(out.getvalue())\nprint(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.rstrip().endswith("[]"), result.stdout[-300:]
    assert "--steps STEPS" in result.stdout and "default: 600" in result.stdout


def test_the_readmes_attention_example_draws_what_it_says(tmp_path):
    """README.md's `imagecraft attention --prompt "a blue square above a green triangle" --seed 8`: the shapes scorer
    (the reference for images) reads a blue square above a green triangle in the image it makes."""
    import re

    from imagecraft.shapes.score import score

    line = next(l for l in (Path(__file__).parents[1] / "README.md").read_text().splitlines()
                if l.startswith("imagecraft attention --prompt"))
    prompt, seed = re.search(r'--prompt "([^"]+)" --seed (\d+)', line).groups()
    assert main(["attention", "--prompt", prompt, "--seed", seed, "--output", str(tmp_path / "fig.png"),
                 "--image", str(tmp_path / "image.png")]) == 0
    result = score(Image.open(tmp_path / "image.png"), prompt)
    assert result["all"], result
