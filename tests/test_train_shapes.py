"""The training script, in its smoke configuration: it runs end to end, resumes, and refuses bad settings."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from imagecraft.pipeline import ImageCraftPipeline
from imagecraft.train_shapes import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    assert main(["--output", str(root / "model"), "--work", str(root / "work"), "--smoke"]) == 0
    return root


def test_smoke_run_writes_a_plain_diffusers_model(trained):
    model = trained / "model"
    for part in ("tokenizer/tokenizer.json", "tokenizer/vocab.json", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "model_index.json"):
        assert (model / part).exists(), part
    assert not list(model.rglob("*.bin")) and not list(model.rglob("*.pt"))
    theirs = StableDiffusionPipeline.from_pretrained(model)  # no extra arguments
    theirs.set_progress_bar_config(disable=True)
    ours = ImageCraftPipeline.from_pretrained(model)
    a = ours("a red circle", seed=0, num_inference_steps=3, guidance_scale=5.0).images[0]
    b = theirs("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=3,
               guidance_scale=5.0, height=64, width=64).images[0]
    assert np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() <= 1.0
    assert json.loads((model / "vae" / "config.json").read_text())["scaling_factor"] != 0.18215  # measured


def test_rerun_resumes_instead_of_retraining(trained, caplog):
    before = (trained / "work" / "unet.pt").stat().st_mtime_ns
    assert main(["--output", str(trained / "model"), "--work", str(trained / "work"), "--smoke"]) == 0
    assert (trained / "work" / "unet.pt").stat().st_mtime_ns == before  # finished phases are not redone
    state = torch.load(trained / "work" / "unet.pt", weights_only=True)
    assert state["step"] == 6


def test_resume_continues_from_the_checkpoint(tmp_path):
    args = ["--output", str(tmp_path / "m"), "--work", str(tmp_path / "w"), "--smoke"]
    assert main(args + ["--unet-steps", "3"]) == 0
    assert torch.load(tmp_path / "w" / "unet.pt", weights_only=True)["step"] == 3
    assert main(args + ["--unet-steps", "5"]) == 0
    assert torch.load(tmp_path / "w" / "unet.pt", weights_only=True)["step"] == 5


def test_corrupt_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "vae.pt").write_bytes(b"garbage")
    assert main(["--output", str(tmp_path / "m"), "--work", str(tmp_path / "w"), "--smoke"]) == 2
    assert "vae.pt is corrupt or unreadable" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "unet_batch (batch size) must be at least 1, got 0"),
    (["--lr", "-0.001"], "unet_lr (learning rate) must be a positive number, got -0.001"),
    (["--unet-steps", "-5"], "unet_steps must be positive"),
])
def test_nonsensical_settings_are_refused(tmp_path, capsys, args, message):
    assert main(["--output", str(tmp_path / "m"), "--smoke", *args]) == 2
    assert message in capsys.readouterr().err


def test_output_must_be_a_writable_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--output", str(tmp_path / "file"), "--smoke"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    # /proc takes no new folders, even for root
    assert main(["--output", "/proc/imagecraft-model", "--smoke"]) == 2
    assert "output folder /proc/imagecraft-model is not writable" in capsys.readouterr().err
