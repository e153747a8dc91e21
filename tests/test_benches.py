"""The benchmarks refuse what they cannot measure, in a sentence."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import make_tiny_pipeline_folder

ROOT = Path(__file__).resolve().parents[1]


def run_quality(model) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--model", str(model),
                           "--per-group", "1"], capture_output=True, text=True, timeout=300)


def test_bench_quality_says_when_a_folder_is_not_a_shapes_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_quality(tmp_path / "empty")
    assert result.returncode != 0 and "is not a model ImageCraft can load, so not a shapes model" in result.stderr
    model = make_tiny_pipeline_folder(tmp_path / "big")
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps(dict(config, sample_size=32)))
    result = run_quality(model)
    assert result.returncode != 0
    assert "is not a shapes model: it makes 128 px images, the shapes world is 64x64" in result.stderr
