"""Heavy checks at Stable Diffusion 1.5's real size (random weights, nothing downloaded)."""

import pytest
import torch
from helpers import rel_err

from imagecraft import UNet_SD, UNetConfig
from imagecraft.testing import random_diffusers_unet

pytestmark = pytest.mark.slow


def test_sd15_shape_matches_diffusers():
    theirs = random_diffusers_unet(cross_attention_dim=768)  # with diffusers' defaults otherwise: SD1.5
    ours = UNet_SD.from_diffusers(theirs).eval()
    assert ours.config == UNetConfig.sd15()
    x, context = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768)
    with torch.no_grad():
        assert rel_err(ours(x, 999, context), theirs(x, 999, context).sample) <= 1e-5
