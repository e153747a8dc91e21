"""UNet_SD against diffusers' UNet2DConditionModel on the same random weights."""

import pytest
import torch
from helpers import DEEP, SD1_STYLE, SD2_STYLE, random_diffusers_unet, rel_err

from imagecraft import UNet_SD, UNetConfig


@pytest.mark.parametrize("config", [SD1_STYLE, SD2_STYLE, DEEP], ids=["sd1", "sd2", "depth2"])
def test_matches_diffusers(config):
    theirs = random_diffusers_unet(**config)
    ours = UNet_SD.from_diffusers(theirs).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 7, config["cross_attention_dim"])
    t = torch.tensor([17, 901])
    with torch.no_grad():
        expected = theirs(x, t, context).sample
        got = ours(x, t, context)
    assert got.shape == x.shape
    assert expected.abs().max() > 0.1  # the output is not trivially zero
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("size", [(13, 21), (9, 8), (1, 1)])
def test_sizes_not_multiple_of_downsampling_match_diffusers(size):
    theirs = random_diffusers_unet(**SD2_STYLE)
    ours = UNet_SD.from_diffusers(theirs).eval()
    x = torch.randn(1, 4, *size)
    context = torch.randn(1, 5, SD2_STYLE["cross_attention_dim"])
    with torch.no_grad():
        assert rel_err(ours(x, 500, context), theirs(x, 500, context).sample) <= 1e-5


def test_timestep_forms_agree():
    ours = UNet_SD(UNetConfig.tiny()).eval()
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 3, 32)
    with torch.no_grad():
        outs = [ours(x, t, context) for t in (250, torch.tensor(250), torch.tensor([250]),
                                              torch.tensor([250, 250]), torch.tensor([250.0, 250.0]))]
        other = ours(x, torch.tensor([250, 10]), context)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(other[0], outs[0][0], rtol=0, atol=1e-6)
    assert not torch.allclose(other[1], outs[0][1])


def test_batch_one_context_is_broadcast():
    ours = UNet_SD(UNetConfig.tiny()).eval()
    x = torch.randn(3, 4, 8, 8)
    context = torch.randn(1, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 5, context), ours(x, 5, context.expand(3, -1, -1)))


@pytest.mark.parametrize("x_shape, context_shape, t, match", [
    ((1, 4, 8, 8), (1, 3, 31), 1, r"context must have shape \(1, tokens, 32\), got \(1, 3, 31\)"),
    ((1, 3, 8, 8), (1, 3, 32), 1, r"x must be latents of shape \(B, 4, H, W\), got \(1, 3, 8, 8\)"),
    ((1, 4, 8), (1, 3, 32), 1, r"x must be latents of shape \(B, 4, H, W\), got \(1, 4, 8\)"),
    ((1, 4, 0, 8), (1, 3, 32), 1, r"got \(1, 4, 0, 8\)"),
    ((2, 4, 8, 8), (3, 3, 32), 1, r"context must have shape \(2, tokens, 32\)"),
    ((2, 4, 8, 8), (2, 3, 32), torch.tensor([1, 2, 3]), r"t must be .* got shape \(3,\)"),
])
def test_bad_input_is_rejected_at_the_entrance(x_shape, context_shape, t, match):
    ours = UNet_SD(UNetConfig.tiny())
    with pytest.raises(ValueError, match=match):
        ours(torch.randn(x_shape), t, torch.randn(context_shape))


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of num_heads and head_dim"):
        UNetConfig(num_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="attention_levels needs one entry per level"):
        UNetConfig(attention_levels=(True, False))
    with pytest.raises(ValueError, match="not divisible by 7 heads"):
        UNetConfig(num_heads=7)


def test_presets_have_the_released_parameter_counts():
    # Counted on the meta device: the released SD1.5 and SD2.1 UNets have 859,520,964 and 865,910,724 parameters.
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet_SD(UNetConfig.sd15()).parameters()) == 859_520_964
        assert sum(p.numel() for p in UNet_SD(UNetConfig.sd21()).parameters()) == 865_910_724


class Recorder:
    """A processor that computes attention explicitly and records its probabilities."""

    def __init__(self):
        self.probs = []

    def __call__(self, attn, x, context=None):
        q, k, v = attn.qkv(x, context)
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # (B, heads, N, M)
        self.probs.append(probs)
        return attn.out(probs @ v)


def test_attention_processor_hook_by_module_name():
    ours = UNet_SD(UNetConfig.tiny()).eval()
    names = list(ours.attn_processors)
    assert "middle_block.1.transformer_blocks.0.attn2" in names
    assert len(names) == 2 * (2 + 1 + 4)  # attn1 and attn2 in 2 down, 1 mid and 2 x 2 up transformers
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 32)
    with torch.no_grad():
        reference = ours(x, 3, context)
        recorder = Recorder()
        processors = ours.attn_processors
        processors["middle_block.1.transformer_blocks.0.attn2"] = recorder
        ours.set_attn_processor(processors)
        out = ours(x, 3, context)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert len(recorder.probs) == 1 and recorder.probs[0].shape == (1, 2, 4 * 4, 6)  # (B, heads, HW, tokens)
    with pytest.raises(ValueError, match="must name every attention layer"):
        ours.set_attn_processor({"input_blocks.1.1.transformer_blocks.0.attn2": recorder})


@pytest.mark.slow
def test_sd15_shape_matches_diffusers():
    theirs = random_diffusers_unet(cross_attention_dim=768)  # with diffusers' defaults otherwise: SD1.5
    ours = UNet_SD.from_diffusers(theirs).eval()
    assert ours.config == UNetConfig.sd15()
    x, context = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768)
    with torch.no_grad():
        assert rel_err(ours(x, 999, context), theirs(x, 999, context).sample) <= 1e-5


def test_gradients_match_diffusers():
    """Training goes through the same maths: the in-place residual adds keep autograd exact."""
    theirs = random_diffusers_unet(**SD1_STYLE).train()
    ours = UNet_SD.from_diffusers(theirs).train()
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    theirs(x, 300, context).sample.square().mean().backward()
    ours(x, 300, context).square().mean().backward()
    from imagecraft.porting import diffusers_key_map

    names = diffusers_key_map(ours.config, [k for k, _ in ours.named_parameters()])
    our_grads = {names[k]: p.grad for k, p in ours.named_parameters()}
    for name, p in theirs.named_parameters():
        assert rel_err(our_grads[name], p.grad) <= 1e-4, name
