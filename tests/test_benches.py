"""The benchmarks refuse what they cannot measure, in a sentence."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quality(model) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--model", str(model),
                           "--per-group", "1"], capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_bench_quality_says_when_a_folder_is_not_a_shapes_model(tiny_sd1, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_quality(tmp_path / "empty")
    assert result.returncode != 0 and "is not a model ImageCraft can load, so not a shapes model" in result.stderr
    model = shutil.copytree(tiny_sd1, tmp_path / "big")  # a copy: its config is changed below
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps(dict(config, sample_size=32)))
    result = run_quality(model)
    assert result.returncode != 0
    assert "is not a shapes model: it makes 128 px images, the shapes world is 64x64" in result.stderr


@pytest.mark.unit
def test_bench_quality_says_why_shapes_were_not_read():
    """The breakdown pairs asked and found objects as the scorer does: one square cannot stand for two, a circle of
    the wrong colour is still a circle, and an object's own fault is named, not its neighbour's."""
    import numpy as np

    from imagecraft.shapes import COLOURS, SIZE
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_quality import shape_errors

    def image(*objects):
        pixels = np.full((SIZE, SIZE, 3), 150, np.uint8)
        for colour, (y0, y1, x0, x1) in objects:
            pixels[y0:y1, x0:x1] = COLOURS[colour]
        return pixels

    square = (20, 40, 8, 28)
    assert shape_errors([image(("red", square))], ["a red square and a red square"]) == "square 1/2, missing 1"
    assert shape_errors([image(("blue", square))], ["a blue square"]) == "square 0/1"
    assert shape_errors([image(("red", (0, 20, 8, 28)))], ["a red square"]) == "square 1/1, border 1"
    # a good red square, and a red plus sign where a circle was asked for: a poor fit; a bar reads as a square
    plus = image(("red", square), ("red", (44, 50, 38, 56)), ("red", (38, 56, 44, 50)))
    assert shape_errors([plus], ["a red square and a red circle"]) == "circle 1/1, fit 1; square 0/1"
    bar = image(("red", square), ("red", (44, 52, 34, 58)))
    assert shape_errors([bar], ["a red square and a red circle"]) == "circle 1/1, other 1; square 0/1"


def run_edit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "bench_edit.py"), *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.integration
@pytest.mark.parametrize("args, message", [
    (["--colour", "0"], "--colour must be 1 or more, got 0"),
    (["--grid", "grid.jpg"], "--grid must be a .png name, got 'grid.jpg'"),
    (["--only"], "nothing to do: name sections with --only, or give --grid"),
])
def test_bench_edit_refuses_what_it_cannot_measure(args, message):
    result = run_edit(*args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.integration
def test_bench_edit_prints_its_table_with_targets_and_verdicts():
    """One colour swap and one timed round on the built-in model: the table names each target and says pass or
    FAIL beside it."""
    result = run_edit("--split", "tune", "--only", "colour", "time", "--colour", "1", "--reps", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "colour swap: " in out and "sources right of 1" in out
    assert "split tune: built-in model" in out and "cross_steps by the edit, self_steps 0.4" in out
    row = next(line for line in out.splitlines() if "time: edit / generation" in line)
    assert "<= 2.2x" in row and row.rstrip().endswith(("pass", "FAIL"))


@pytest.mark.integration
def test_bench_shape_loss_reads_new_shapes_through_the_vae_and_the_model():
    """--new-shape: the suite's scenes of a shape the world lacks come back through the VAE alone (the built-in
    VAE returns diamonds) and are counted after the model finishes them from a strength."""
    import re

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_shape_loss.py"), "--new-shape", "diamond",
                             "--per-shape", "4", "--strengths", "0.2", "--steps", "5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    row = re.search(r"diamond +VAE round trip (\d)/4, strength 0.2 (\d)/4", result.stdout)
    assert row and row[1] == "4", result.stdout


@pytest.mark.integration
def test_bench_lora_layers_groups_a_loras_layers_by_where_they_sit(tmp_path):
    """The groups switch off what they name in a LoRA on the built-in UNet's attention (the defaults' targets): the
    self- and cross-attention halves, seven layers per cross-attention projection, the blocks covering every layer,
    and only the cross-attention's keys and values left on; a word that is no colour of the suite is refused."""
    sys.path.insert(0, str(ROOT))
    from bench.bench_lora_layers import groups
    from imagecraft import lora
    from imagecraft.pipeline import ImageCraftPipeline

    unet = ImageCraftPipeline.from_pretrained().unet
    lora.add_lora(unet, lora.unet_targets(unet, ("attn",)), 4, 4)
    names = list(lora.lora_layers(unet))
    found = groups(names)
    assert found["none off"] == [] and len(found["attn1 off"]) == len(found["attn2 off"]) == len(names) // 2
    assert all(len(found[f"attn2.{p} off"]) == 7 for p in ("to_q", "to_k", "to_v", "to_out"))
    blocks = [found[f"{b} off"] for b in ("input_blocks", "middle_block", "output_blocks")]
    assert sorted(n for b in blocks for n in b) == sorted(names) and all(blocks)
    on = set(names) - set(found["only attn2 keys, values on"])
    assert on == set(found["attn2.to_k off"]) | set(found["attn2.to_v off"])
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_lora_layers.py"), "--work", str(tmp_path),
                             "--concepts", "hexagon"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "'hexagon' is not a colour of the suite" in result.stderr
