"""Strict porting between UNet_SD, diffusers' layout and the original LDM layout."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from helpers import rel_err

from imagecraft import (PortingError, UNet_SD, UNetConfig, config_from_diffusers, load_ldm_unet,
                        load_pipe_into_our_UNet, to_diffusers, to_diffusers_state_dict)
from imagecraft.port import diffusers_config
from imagecraft.testing import DEEP, SD1_STYLE, SD2_STYLE, random_diffusers_unet

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("config", [SD1_STYLE, SD2_STYLE, DEEP], ids=["sd1", "sd2", "depth2"])
def test_round_trip_through_diffusers_layout_is_exact(config, tmp_path):
    theirs = random_diffusers_unet(**config)
    ours = UNet_SD.from_diffusers(theirs)
    exported = to_diffusers_state_dict(ours)
    assert exported.keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(exported[key], value), key

    # diffusers itself loads what we export, from disk, and computes the same thing.
    to_diffusers(ours).save_pretrained(tmp_path / "unet")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 3, config["cross_attention_dim"])
    with torch.no_grad():
        assert rel_err(ours.eval()(x, 40, context), reloaded(x, 40, context).sample) <= 1e-5

    again = UNet_SD(ours.config)
    load_pipe_into_our_UNet(again, reloaded)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("config", [SD1_STYLE, SD2_STYLE], ids=["sd1", "sd2"])
def test_our_names_are_the_ldm_single_file_names(config):
    """diffusers' own LDM converter turns our state dict (as a single-file checkpoint) into the diffusers one."""
    theirs = random_diffusers_unet(**config)
    ours = UNet_SD.from_diffusers(theirs)
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(theirs.config))
    assert converted.keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(converted[key].reshape(value.shape), value), key

    fresh = load_ldm_unet(UNet_SD(ours.config), checkpoint)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_config_round_trip():
    for config in (UNetConfig.sd15(), UNetConfig.sd21(), UNetConfig.tiny()):
        with torch.device("meta"):
            theirs = UNet2DConditionModel(**diffusers_config(config))
        back = config_from_diffusers(theirs.config)
        assert diffusers_config(back) == diffusers_config(config)


@pytest.mark.parametrize("change, feature", [
    (dict(addition_embed_type="text_time", addition_time_embed_dim=8), "SDXL-style added conditioning"),
    (dict(class_embed_type="timestep"), "class embeddings"),
    (dict(time_cond_proj_dim=16), "time_cond_proj_dim"),
    (dict(resnet_time_scale_shift="scale_shift"), "scale-shift time modulation"),
    (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), "down block types \\['SimpleCrossAttn"),
    (dict(up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), "up blocks that mirror the down blocks"),
    (dict(cross_attention_dim=(32, 64)), "per-level cross_attention_dim"),
])
def test_unsupported_diffusers_features_are_refused_by_name(change, feature):
    with torch.device("meta"):
        full_config = dict(UNet2DConditionModel(**SD1_STYLE).config)  # every field, as a saved config has
    config_from_diffusers(full_config)
    with pytest.raises(PortingError, match=feature):
        config_from_diffusers(dict(full_config, **change))


def test_missing_extra_and_misshaped_keys_are_named():
    theirs = random_diffusers_unet(**SD1_STYLE)
    ours = UNet_SD(config_from_diffusers(theirs.config))
    before = {k: v.clone() for k, v in ours.state_dict().items()}

    source = dict(theirs.state_dict())
    del source["mid_block.attentions.0.proj_in.weight"]
    with pytest.raises(PortingError, match=r"Missing from the source \(1\): \['mid_block.attentions.0.proj_in.weight'\]"):
        load_pipe_into_our_UNet(ours, source)

    source = dict(theirs.state_dict(), **{"add_embedding.linear_1.weight": torch.zeros(2, 2)})
    with pytest.raises(PortingError, match=r"not used by UNet_SD \(1\): \['add_embedding.linear_1.weight'\]"):
        load_pipe_into_our_UNet(ours, source)

    source = dict(theirs.state_dict())
    source["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    with pytest.raises(PortingError, match=r"conv_in.weight \(32, 4, 1, 1\) -> input_blocks.0.0.weight \(32, 4, 3, 3\)"):
        load_pipe_into_our_UNet(ours, source)

    for key, value in ours.state_dict().items():  # a failed port leaves nothing half-copied
        assert torch.equal(value, before[key]), key


def test_architecture_mismatch_is_refused():
    theirs = random_diffusers_unet(**SD1_STYLE)
    other = UNet_SD(config_from_diffusers(dict(theirs.config, attention_head_dim=4)))
    with pytest.raises(PortingError, match="differ in architecture.*attention_head_dim"):
        load_pipe_into_our_UNet(other, theirs)


def test_ldm_checkpoint_without_unet_is_refused():
    with pytest.raises(PortingError, match="no key starts with 'model.diffusion_model.'"):
        load_ldm_unet(UNet_SD(UNetConfig.tiny()), {"first_stage_model.x": torch.zeros(1)})



def test_from_diffusers_works_from_the_model_module_alone():
    """`UNet_SD.from_diffusers` finds its reader when only imagecraft.unet was imported (port registers it)."""
    import subprocess
    import sys

    code = ("from imagecraft.unet import UNet_SD\nfrom imagecraft.testing import SD1_STYLE, random_diffusers_unet\n"
            "theirs = random_diffusers_unet(**SD1_STYLE)\nours = UNet_SD.from_diffusers(theirs)\n"
            "print(sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
