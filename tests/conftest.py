"""Tiers and the shared tiny pipelines.

Every test has exactly one tier marker (a module's `pytestmark` or its own); `python -m pytest -q` runs them all.
    python -m pytest -q -m unit          # pure functions and tiny models (the session's tiny pipelines too): the
                                         # fast default while developing
    python -m pytest -q -m integration   # the built-in model, model files and folders as a user gives them,
                                         # training runs, the app server, the CLI end to end, subprocesses, DDP,
                                         # SIGKILL, bad input at every entrance
    python -m pytest -q -m browser       # the app in Debian's Chromium
    python -m pytest -q -m slow          # full-size Stable Diffusion checks
    python -m pytest -q -m "not slow and not browser"
"""

import os

import pytest
import torch

from imagecraft.pipeline import ImageCraftPipeline
from imagecraft.testing import SD2_STYLE, make_tiny_pipeline_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TIERS = ("unit", "integration", "browser", "slow")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    wrong = [f"{item.nodeid} ({', '.join(tiers) or 'none'})" for item in items
             if len(tiers := [m.name for m in item.iter_markers() if m.name in TIERS]) != 1]
    if wrong:
        raise pytest.UsageError("each test needs exactly one tier marker of " + ", ".join(TIERS) + ": "
                                + "; ".join(wrong))


# The tiny pipelines, built once per session. Tests only read them: one that changes files copies the folder first.
@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """SD1-style UNet, PNDM scheduler, seed 0."""
    return make_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """SD2-style UNet: linear projections, attention at two resolutions, head counts per level."""
    return make_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny-sd2"), unet=SD2_STYLE)


@pytest.fixture(scope="session")
def tiny_v_zsnr(tmp_path_factory):
    """SD1-style UNet with the built-in model's kind of schedule: v-prediction on zero-terminal-SNR betas."""
    return make_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny-v-zsnr"), scheduler="v-zsnr")


@pytest.fixture(scope="session")
def tiny_sd1_pipe(tiny_sd1):
    """`tiny_sd1` loaded in fp32 (the references are fp32), shared by the tests that only call it."""
    return ImageCraftPipeline.from_pretrained(tiny_sd1, dtype="fp32")
