"""UNet_SD against diffusers' UNet2DConditionModel on the same random weights."""

import pytest
import torch
from helpers import rel_err
from hypothesis import event, given, settings
from hypothesis import strategies as st

from imagecraft import UNet_SD, UNetConfig, runtime
from imagecraft.testing import DEEP, SD1_STYLE, SD2_STYLE, random_diffusers_unet

pytestmark = pytest.mark.unit


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


@pytest.mark.parametrize("sample_size, channels_last", [(64, True), (32, True), (16, False), (8, False)])
def test_half_precision_layout_follows_the_latent_size(sample_size, channels_last):
    """bf16 runs channels-last on latents of 32x32 and more, in the standard layout below (where PyTorch's
    channels-last GroupNorm is slow on CPU); fp32 always in the standard layout. Both layouts compute the same
    function: bf16 stays within bf16's rounding of diffusers' fp32 output, and the size survives porting."""
    from imagecraft import to_diffusers

    theirs = random_diffusers_unet(**dict(SD1_STYLE, sample_size=sample_size))
    ours = UNet_SD.from_diffusers(theirs).eval()
    assert ours.config.sample_size == sample_size
    assert to_diffusers(ours).config.sample_size == sample_size
    convs = [m.weight for m in ours.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(w.is_contiguous() for w in convs)  # fp32
    ours.to(torch.bfloat16)
    assert all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in convs)
    assert all(w.is_contiguous() != channels_last for w in convs)
    torch.manual_seed(1)
    x, context, t = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32), torch.tensor([17, 901])
    seen = []
    ours.middle_block.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        expected = theirs(x, t, context).sample
        got = ours(x.bfloat16(), t, context.bfloat16())
    assert seen[0].is_contiguous() != channels_last  # the features inside run in that layout too
    assert got.dtype == torch.bfloat16 and got.is_contiguous()
    assert rel_err(got.float(), expected) <= 0.02  # measured 0.011-0.012


def test_bf16_training_attention_without_the_fused_kernel_gives_the_same_gradients(monkeypatch):
    """bf16 training on CPU attends with matmul-softmax-matmul on small score matrices (PyTorch's fused backward
    is slow there): the loss and gradients stay those of the fused kernel, within bf16's rounding."""
    import imagecraft.unet as unet_module

    unet = UNet_SD.from_diffusers(random_diffusers_unet(**SD1_STYLE)).to(torch.bfloat16).train()
    torch.manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16), torch.randn(2, 7, 32, dtype=torch.bfloat16)
    sdpa_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(unet_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))

    def loss_and_grads(small):
        monkeypatch.setattr(runtime, "SMALL_ATTENTION", small)
        sdpa_calls.clear()
        unet.zero_grad()
        loss = unet(x, torch.tensor([17, 901]), context).float().square().mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.float().flatten() for p in unet.parameters()]), len(sdpa_calls)

    fused_loss, fused, fused_calls = loss_and_grads(0)
    plain_loss, plain, plain_calls = loss_and_grads(256 * 256)
    assert fused_calls > 0 and plain_calls == 0  # 16x16 latents: every score matrix is small
    assert abs(plain_loss - fused_loss) <= 0.003 * fused_loss  # measured 3e-4
    assert (plain - fused).norm() <= 0.02 * fused.norm()  # measured 3e-3
    with torch.no_grad():  # inference keeps the fused kernel
        sdpa_calls.clear()
        unet(x, 500, context)
        assert sdpa_calls


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


@pytest.mark.parametrize("fields, message", [
    (dict(model_channels=0), "model_channels must be an int >= 1, got 0"),
    (dict(channel_mult=()), "channel_mult must have at least one level, got ()"),
    (dict(channel_mult=(1, 2.0, 4, 4)), "channel_mult[1] must be an int >= 1, got 2.0"),
    (dict(transformer_depth=-1), "transformer_depth must be an int >= 0, got -1"),
    (dict(transformer_depth=(1, 1, 1, 0)), "transformer_depth at level 3 must be at least 1"),  # the middle block's
    (dict(num_res_blocks=-1), "num_res_blocks must be an int >= 1, got -1"),
    (dict(attention_levels="TF"), "attention_levels must be a tuple with one entry per level, got 'TF'"),
    (dict(attention_levels=(1, 1, 1, 0)), "attention_levels must be True or False per level"),
    (dict(num_heads=0), "num_heads must be an int >= 1, got 0"),
    (dict(num_heads=(8, 8, 8, 7)), "level 3 has 1280 channels, not divisible by 7 heads"),  # the middle block's
    (dict(num_heads=None, head_dim=-64), "head_dim must be an int >= 1, got -64"),
    (dict(num_heads=None, head_dim=48), "level 0 has 320 channels, not divisible by head_dim=48"),
    (dict(norm_groups=0), "norm_groups must be an int >= 1, got 0"),
    (dict(model_channels=330), "model_channels=330 must be divisible by norm_groups=32"),
    (dict(in_channels=0), "in_channels must be an int >= 1, got 0"),
    (dict(out_channels=-4), "out_channels must be an int >= 1, got -4"),
    (dict(context_dim=0), "context_dim must be an int >= 1, got 0"),
    (dict(model_channels=True), "model_channels must be an int >= 1, got True"),
    (dict(use_linear_projection=1), "use_linear_projection must be True or False, got 1"),
    (dict(dropout=1.0), "dropout must be a number in [0, 1), got 1.0"),
    (dict(dropout=float("nan")), "dropout must be a number in [0, 1), got nan"),
    (dict(sample_size=0), "sample_size must be an int >= 1, got 0"),
])
def test_config_fields_are_checked_with_a_sentence(fields, message):
    with pytest.raises(ValueError) as error:
        UNetConfig(**fields)
    assert message in str(error.value)


def test_config_normalises_lists_and_numpy_ints():
    """Configs read back from JSON have lists, and numpy ints come from arrays: both are the same config."""
    import numpy as np

    config = UNetConfig(model_channels=np.int64(32), channel_mult=[1, 2], attention_levels=[True, False],
                        num_res_blocks=1, num_heads=[2, 2], context_dim=32, norm_groups=8)
    assert config == UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(True, False),
                                num_res_blocks=1, num_heads=(2, 2), context_dim=32, norm_groups=8)
    assert type(config.model_channels) is int


# What a spoiled field gets: wrong types, bools, out-of-range numbers, strings where tuples are meant.
JUNK = st.one_of(st.sampled_from([None, True, False, 2.5, float("nan"), "2", "TF", ()]), st.integers(-2, 70),
                 st.floats(-2, 2), st.lists(st.integers(-1, 3), max_size=4).map(tuple))


@st.composite
def unet_fields(draw):
    """Fields of a tiny UNetConfig, mostly valid (some fail divisibility or depth rules), with up to two fields
    spoiled by junk: enough valid configs to build and run, enough bad ones to reach every check."""
    levels = draw(st.integers(1, 3))

    def level_tuple(values):
        return st.lists(values, min_size=levels, max_size=levels).map(tuple)

    def one_or_per_level(values):
        return st.one_of(values, level_tuple(values))

    fields = dict(
        in_channels=draw(st.integers(1, 4)),
        out_channels=draw(st.integers(1, 4)),
        model_channels=draw(st.sampled_from([2, 3, 4, 6, 8, 16, 512])),  # 512: valid, too large to run here
        channel_mult=draw(level_tuple(st.integers(1, 3))),
        num_res_blocks=draw(st.integers(1, 2)),
        attention_levels=draw(level_tuple(st.booleans())),
        transformer_depth=draw(one_or_per_level(st.sampled_from([1, 2, 1, 0]))),  # 0: only without attention
        context_dim=draw(st.integers(1, 6)),
        use_linear_projection=draw(st.booleans()),
        upcast_attention=draw(st.booleans()),
        norm_groups=draw(st.sampled_from([1, 2, 3, 4])),
        dropout=draw(st.floats(0, 0.9)),
    )
    if draw(st.booleans()):
        fields.update(num_heads=draw(one_or_per_level(st.integers(1, 3))), head_dim=None)
    else:
        fields.update(num_heads=None, head_dim=draw(one_or_per_level(st.integers(1, 4))))
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
        fields[name] = draw(JUNK)
    return fields


@settings(max_examples=100, deadline=None)
@given(fields=unet_fields())
def test_random_configs_build_and_run_or_refuse_with_a_sentence(fields):
    """Any field values either make a config whose UNet runs, or a one-line ValueError; never another error."""
    try:
        config = UNetConfig(**fields)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        event("refused")
        return
    if config.model_channels * max(config.channel_mult) > 64:
        return  # valid, but too large to build in a unit test
    event("built and ran")
    unet = UNet_SD(config).eval()
    x = torch.randn(1, config.in_channels, 6, 5)
    with torch.no_grad():
        out = unet(x, 10, torch.randn(1, 3, config.context_dim))
    assert out.shape == (1, config.out_channels, 6, 5) and torch.isfinite(out).all()


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


def test_gradients_match_diffusers():
    """Training goes through the same maths: the in-place residual adds keep autograd exact."""
    theirs = random_diffusers_unet(**SD1_STYLE).train()
    ours = UNet_SD.from_diffusers(theirs).train()
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    theirs(x, 300, context).sample.square().mean().backward()
    ours(x, 300, context).square().mean().backward()
    from imagecraft.port import diffusers_key_map

    names = diffusers_key_map(ours.config, [k for k, _ in ours.named_parameters()])
    our_grads = {names[k]: p.grad for k, p in ours.named_parameters()}
    for name, p in theirs.named_parameters():
        assert rel_err(our_grads[name], p.grad) <= 1e-4, name


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = UNet_SD(UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(True, True), num_heads=2,
                              context_dim=16, norm_groups=8)).train()
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    grads, saved = [], []
    for checkpointing in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = checkpointing
        count = [0]

        def pack(tensor, count=count):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = unet(x, torch.tensor([10, 500]), ctx).square().mean()
        loss.backward()
        saved.append(count[0])
        grads.append([p.grad.clone() for p in unet.parameters()])
    assert saved[1] < saved[0] / 3  # activations are recomputed in the backward pass, not kept
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    with torch.no_grad():  # inference never recomputes
        unet(x, 3, ctx)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_feature_cache_reuses_the_deep_part_exactly(depth):
    """Two calls with the same input: the second, partial one (shallow blocks only, the deep feature from the
    first) must give the full UNet's output, whatever the depth; a middle block that does not run proves it was
    skipped."""
    from imagecraft.unet import FeatureCache

    torch.manual_seed(0)
    unet = UNet_SD.from_diffusers(random_diffusers_unet(**SD1_STYLE)).eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    calls = []
    unet.middle_block.register_forward_hook(lambda *_: calls.append(1))
    cache = FeatureCache(interval=3, depth=depth)
    with torch.no_grad():
        full = unet(x, 500, ctx)
        outs = [unet(x, 500, ctx, cache=cache) for _ in range(4)]
    assert len(calls) == 1 + 2  # without the cache, then calls 0 and 3 of the cache's schedule
    for out in outs:
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    other = torch.randn_like(x)
    with torch.no_grad():  # a partial step on new input differs from the full UNet there, but not by much
        cache = FeatureCache(interval=2, depth=depth)
        unet(x, 500, ctx, cache=cache)
        partial, exact = unet(x + 0.05 * other, 480, ctx, cache=cache), unet(x + 0.05 * other, 480, ctx)
    assert 0 < (partial - exact).abs().max() < 0.5 * exact.abs().max()


def test_feature_cache_settings_are_checked():
    from imagecraft.unet import FeatureCache

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="cache_interval must be a whole number of 1 or more"):
            FeatureCache(bad)
    unet = UNet_SD.from_diffusers(random_diffusers_unet(**SD1_STYLE))
    with pytest.raises(ValueError, match="cache depth must be from 1 to"):
        unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 3, 32), cache=FeatureCache(2, depth=99))
