"""Cross-attention capture and aggregation against a naive eager computation, on tiny random pipelines.

The reference records softmax(QK^T / sqrt(d)) of every attn2 call from its own einsum, in a test processor, and
aggregates it the way DAAM's `compute_global_heat_map` does; ours must agree with it for every batch layout.
"""

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imagecraft.explain import AttentionMaps, ablation, plots
from imagecraft.explain.capture import block_of, keep_cross_attention
from imagecraft.pipeline import ImageCraftPipeline
from imagecraft.unet import SDPAProcessor, UNet_SD, UNetConfig

pytestmark = pytest.mark.unit

STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_sd1_pipe):  # fp32: the maps are compared with naive fp32 computations
    return tiny_sd1_pipe


@pytest.fixture(scope="module")
def pipe2(tiny_sd2):  # attention at two resolutions, different head counts per level
    return ImageCraftPipeline.from_pretrained(tiny_sd2, dtype="fp32")


class NaiveProbs:
    """A test processor: the probabilities by einsum, per layer and call; the output by the usual maths (so the
    sampling trajectory is the same as in the run being checked)."""

    def __init__(self):
        self.calls = {}

    def __call__(self, name):
        def processor(attn, x, context=None):
            q, k = attn.to_q(x), attn.to_k(context)
            heads = attn.heads
            split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)  # noqa: E731
            qh, kh = split(q).float(), split(k).float()
            probs = torch.einsum("bhnd,bhmd->bhnm", qh, kh).div(math.sqrt(qh.shape[-1])).softmax(-1)
            self.calls.setdefault(name, []).append(probs.clone())  # (B, heads, HW, M)
            return SDPAProcessor.attend(attn, *attn.qkv(x, context))
        return processor


def naive_run(pipe, **kwargs):
    unet = pipe.unet
    naive = NaiveProbs()
    originals = unet.attn_processors
    unet.set_attn_processor({n: naive(n) if n.endswith("attn2") else p for n, p in originals.items()})
    try:
        result = pipe(**kwargs)
    finally:
        unet.set_attn_processor(originals)
    return result, naive.calls


def ours_and_naive(pipe, **kwargs):
    ours = pipe(attention=True, **kwargs)
    reference, calls = naive_run(pipe, **kwargs)
    return ours, reference, calls


def cond_half(probs, batch, guided):
    return probs[batch:] if guided else probs


def daam_word(calls, maps: AttentionMaps, image: int, batch: int, guided: bool, token_indices, *, layers=None,
              heads=None, negative=False):
    """DAAM's recipe, written out: per (layer, head) the sum over steps, bicubic to the latent grid, clamped; the
    mean over (layer, head); the mean over the word's tokens; bicubic to the image size."""
    names = layers or [n for n in calls if block_of(n) != "mid"]
    h_lat, w_lat = maps.latent_size
    merged = []
    for name in names:
        layer = next(l for l in maps.layers if l.name == name)
        h, w = layer.size
        half = [(p[:batch] if negative else cond_half(p, batch, guided))[image] for p in calls[name]]
        summed = torch.stack(half).sum(0)  # (heads, HW, M)
        summed = summed.permute(0, 2, 1).reshape(summed.shape[0], -1, h, w)  # (heads, M, h, w)
        for head in heads or range(summed.shape[0]):
            merged.append(F.interpolate(summed[head][:, None], size=(h_lat, w_lat), mode="bicubic").clamp_(min=0))
    heat = torch.stack(merged).mean(0)[:, 0]  # (M, h, w)
    word = heat[token_indices].mean(0)
    return F.interpolate(word[None, None], size=maps.image_size, mode="bicubic")[0, 0].numpy()


def pearson(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


LAYOUTS = {
    "one image, CFG": dict(prompt="a red circle on the left", guidance_scale=5.0),
    "num_images 2": dict(prompt="a blue square above a green triangle", guidance_scale=5.0, num_images=2),
    "batch of prompts": dict(prompt=["a red circle", "a yellow triangle on a black background"], guidance_scale=4.0),
    "CFG off": dict(prompt=["an orange square", "a purple circle to the left of a white square"],
                    guidance_scale=1.0),
    "negative prompt": dict(prompt="a red circle on the left", negative_prompt="a blue square", guidance_scale=6.0),
    "non-square": dict(prompt="a green triangle", guidance_scale=5.0, width=64, height=96),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_capture_matches_naive_for_every_layout(pipe, layout):
    kwargs = dict(LAYOUTS[layout], seed=5, num_inference_steps=STEPS)
    ours, reference, calls = ours_and_naive(pipe, **kwargs)
    for a, b in zip(ours.images, reference.images):  # capture leaves the images as they are
        assert np.array_equal(np.asarray(a), np.asarray(b))
    guided = kwargs["guidance_scale"] > 1
    batch = len(ours.images)
    assert len(ours.attention) == batch and not ours.attention[0].missing_layers
    for i, maps in enumerate(ours.attention):
        prompt = kwargs["prompt"] if isinstance(kwargs["prompt"], str) else kwargs["prompt"][i]
        assert maps.prompt == prompt and maps.guided == guided
        assert maps.tokens[0] == "<start>" and maps.tokens[-1] == "<end>"
        count = len(maps.tokens)
        assert count == len(pipe.tokenizer(prompt).input_ids)
        assert maps.image_size == (kwargs.get("height", 64), kwargs.get("width", 64))
        assert maps.num_steps == len(calls[maps.layers[0].name])
        for index, layer in enumerate(maps.layers):
            h, w = layer.size
            naive = torch.stack([cond_half(p, batch, guided)[i] for p in calls[layer.name]])  # (S, heads, HW, M)
            naive = naive[..., :count].permute(0, 1, 3, 2).reshape(*naive.shape[:2], count, h, w)
            np.testing.assert_allclose(maps.sides[0].step_maps[index], naive.mean(1).numpy(), atol=2e-3)
            np.testing.assert_allclose(maps.sides[0].head_sums[index], naive.sum(0).numpy(), rtol=1e-4, atol=1e-5)
            if guided:
                neg = torch.stack([p[i] for p in calls[layer.name]])[..., : len(maps.negative_tokens)]
                neg = neg.permute(0, 1, 3, 2).reshape(*neg.shape[:2], -1, h, w)
                np.testing.assert_allclose(maps.sides[1].head_sums[index], neg.sum(0).numpy(), rtol=1e-4, atol=1e-5)
        for word in maps.words():
            theirs = daam_word(calls, maps, i, batch, guided, maps.token_indices(word))
            mine = maps.word(word)
            assert pearson(mine, theirs) >= 0.95
            np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def test_images_are_bit_identical_with_capture(pipe):
    for kwargs in LAYOUTS.values():
        plain = pipe(seed=9, num_inference_steps=STEPS, **kwargs)
        captured = pipe(seed=9, num_inference_steps=STEPS, attention=True, **kwargs)
        for a, b in zip(plain.images, captured.images):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert plain.attention is None
    assert all(type(p) is SDPAProcessor for p in pipe.unet.attn_processors.values())  # put back


@pytest.fixture(scope="module")
def sd2_run(pipe2):
    kwargs = dict(prompt="a red circle and a red square", negative_prompt="blue", guidance_scale=5.0, seed=3,
                  num_inference_steps=STEPS)
    ours, _, calls = ours_and_naive(pipe2, **kwargs)
    return ours.attention[0], calls


def test_filters_match_the_naive_recipe(sd2_run):
    maps, calls = sd2_run
    sizes = {l.size[0] for l in maps.layers if l.block != "mid"}
    assert sizes == {16, 8} and {l.heads for l in maps.layers} == {4, 8}  # the middle block is at 4x4
    red = maps.token_indices("red")
    half = len(red) // 2
    assert len(red) == 2 * half and red[half] > red[half - 1] + 1  # both occurrences, all their pieces
    by_size = {s: [l.name for l in maps.layers if l.size[0] == s and l.block != "mid"] for s in sizes}
    for s, names in by_size.items():  # resolutions
        np.testing.assert_allclose(maps.word("red", resolutions=[s]),
                                   daam_word(calls, maps, 0, 1, True, red, layers=names), rtol=1e-4, atol=1e-5)
    up = [l.name for l in maps.layers if l.block == "up"]  # blocks
    np.testing.assert_allclose(maps.word("circle", blocks="up"),
                               daam_word(calls, maps, 0, 1, True, maps.token_indices("circle"), layers=up),
                               rtol=1e-4, atol=1e-5)
    mid = [l.name for l in maps.layers if l.block == "mid"]  # the middle block, only when asked for
    np.testing.assert_allclose(maps.word("circle", blocks=["mid"]),
                               daam_word(calls, maps, 0, 1, True, maps.token_indices("circle"), layers=mid),
                               rtol=1e-4, atol=1e-5)
    one = maps.layers[0].name  # a single layer by module name, one head
    np.testing.assert_allclose(maps.word("square", layers=[one], heads=1),
                               daam_word(calls, maps, 0, 1, True, maps.token_indices("square"), layers=[one],
                                         heads=[1]), rtol=1e-4, atol=1e-5)
    # start and end tokens, and the negative prompt's maps
    np.testing.assert_allclose(maps.token(0), daam_word(calls, maps, 0, 1, True, [0]), rtol=1e-4, atol=1e-5)
    end = len(maps.tokens) - 1
    np.testing.assert_allclose(maps.word("<end>"), daam_word(calls, maps, 0, 1, True, [end]), rtol=1e-4, atol=1e-5)
    assert maps.words(negative=True) == ["blue"]
    blue = maps.token_indices("blue", negative=True)
    np.testing.assert_allclose(maps.word("blue", negative=True),
                               daam_word(calls, maps, 0, 1, True, blue, negative=True), rtol=1e-4, atol=1e-5)


def test_timestep_range_uses_the_per_step_maps(sd2_run):
    maps, calls = sd2_run
    idx = maps.token_indices("circle")
    assert maps.num_steps == STEPS + 1  # PLMS repeats its first timestep
    for start, stop in ((0, 1), (1, 3), (0, maps.num_steps)):
        # the naive per-step maps, head-averaged per layer, summed over the range, each layer weighted by its heads
        h_lat, w_lat = maps.latent_size
        total, weight = 0, 0
        for layer in maps.layers:
            if layer.block == "mid":
                continue
            p = torch.stack(calls[layer.name][start:stop])[:, 1]  # cond half of a batch of one: (S, heads, HW, M)
            m = p.mean(1).sum(0).T.reshape(-1, *layer.size)[idx]  # (k, h, w)
            up = F.interpolate(m[:, None], size=(h_lat, w_lat), mode="bicubic").clamp_(min=0)[:, 0]
            total, weight = total + layer.heads * up, weight + layer.heads
        expected = F.interpolate((total / weight).mean(0)[None, None], size=maps.image_size, mode="bicubic")[0, 0]
        np.testing.assert_allclose(maps.word("circle", steps=(start, stop)), expected.numpy(), atol=2e-3)
    full = maps.word("circle", steps=(0, maps.num_steps))
    assert pearson(full, maps.word("circle")) > 0.9  # head-averaged before the clamp: close to the default


def test_bad_words_and_filters_say_what_exists(sd2_run):
    maps, _ = sd2_run
    with pytest.raises(ValueError, match="'dog' is not in the prompt; its words are: a, red, circle, and, square"):
        maps.word("dog")
    with pytest.raises(ValueError, match="no captured layer named"):
        maps.word("red", layers=["output_blocks.99.1.transformer_blocks.0.attn2"])
    with pytest.raises(ValueError, match="no captured layer in blocks .* at resolutions \\[32\\]; there are: "):
        maps.word("red", resolutions=[32])
    with pytest.raises(ValueError, match="blocks must be some of down, mid, up"):
        maps.word("red", blocks=["left"])
    with pytest.raises(ValueError, match=f"outside the {maps.num_steps} sampling steps"):
        maps.word("red", steps=(2, 99))
    with pytest.raises(ValueError, match="heads must be indices from 0 to 3"):
        maps.word("red", heads=7)
    with pytest.raises(ValueError, match="heads and steps cannot be combined"):
        maps.word("red", heads=0, steps=(0, 1))
    with pytest.raises(ValueError, match="token index out of range"):
        maps.token(40)
    with pytest.raises(ValueError, match="'green' is not in the negative prompt; its words are: blue"):
        maps.word("green", negative=True)


def test_multi_token_words_merge_their_pieces(pipe):
    result = pipe("a zebrafish circle", seed=1, num_inference_steps=2, guidance_scale=5.0, attention=True)
    maps = result.attention[0]
    pieces = maps.token_indices("zebrafish")
    assert len(pieces) > 1  # the tiny tokenizer never saw it, so it is split
    assert "zebrafish" in maps.words()
    expected = maps.to_image_size(maps.latent_maps(pieces).mean(0))
    np.testing.assert_allclose(maps.word("ZebraFish"), expected)
    np.testing.assert_allclose(maps.word("zebrafish circle"),
                               maps.to_image_size(maps.latent_maps(maps.token_indices("zebrafish circle")).mean(0)))


def test_pipeline_refuses_what_it_cannot_capture(pipe, monkeypatch):
    with pytest.raises(ValueError, match="attention maps need a prompt with words; the prompt is empty"):
        pipe("", attention=True, num_inference_steps=2)
    monkeypatch.setenv("IMAGECRAFT_ATTENTION_MB", "0.01")
    with pytest.raises(ValueError, match=r"would take .* MB, over the limit of 0 MB \(IMAGECRAFT_ATTENTION_MB\)"):
        pipe("a red circle", attention=True, num_inference_steps=20, num_images=16)


def test_replaced_processors_are_named_not_silently_dropped(pipe):
    unet = pipe.unet
    originals = unet.attn_processors
    attn2 = sorted(n for n in originals if n.endswith("attn2"))

    def custom(attn, x, context=None):
        return SDPAProcessor.attend(attn, *attn.qkv(x, context))

    try:
        unet.set_attn_processor({n: custom if n == attn2[0] else p for n, p in originals.items()})
        maps = pipe("a red circle", seed=1, num_inference_steps=2, attention=True).attention[0]
        assert maps.missing_layers == [attn2[0]]
        assert attn2[0] not in [l.name for l in maps.layers] and len(maps.layers) == len(attn2) - 1
        unet.set_attn_processor({n: custom if n.endswith("attn2") else p for n, p in originals.items()})
        with pytest.raises(ValueError, match="no cross-attention layer can be captured"):
            pipe("a red circle", seed=1, num_inference_steps=2, attention=True)
    finally:
        unet.set_attn_processor(originals)


def test_save_and_load_keep_everything(sd2_run, tmp_path):
    maps, _ = sd2_run
    path = maps.save(tmp_path / "maps.npz")
    again = AttentionMaps.load(path)
    assert again.tokens == maps.tokens and again.layers == maps.layers and again.timesteps == maps.timesteps
    for word in maps.words():
        np.testing.assert_array_equal(again.word(word), maps.word(word))
    np.testing.assert_array_equal(again.word("blue", negative=True), maps.word("blue", negative=True))
    np.testing.assert_array_equal(again.cfg_difference(), maps.cfg_difference())
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not an ImageCraft attention file"):
        AttentionMaps.load(tmp_path / "bad.npz")


def test_segment_pixel_distribution_and_layer_stats(sd2_run):
    maps, _ = sd2_run
    labels = maps.segment(["circle", "square"], threshold=0.4)
    assert labels.shape == maps.image_size and set(np.unique(labels)) <= {-1, 0, 1}
    circle, square = maps.word("circle", normalize=True), maps.word("square", normalize=True)
    strong = (labels >= 0)
    assert np.array_equal(labels[strong], np.where(circle >= square, 0, 1)[strong])
    assert np.all(np.maximum(circle, square)[~strong] < 0.4)

    shares = maps.at(3, 5)
    assert list(shares) == [f"{i}:{t}" for i, t in enumerate(maps.tokens)]
    assert abs(sum(shares.values()) - 1) < 1e-6
    all_maps = np.clip(maps.all_tokens()[:, 5, 3], 0, None)
    np.testing.assert_allclose(list(shares.values()), all_maps / all_maps.sum(), rtol=1e-5)

    stats = maps.layer_stats("red")
    heads = sum(l.heads for l in maps.layers if l.block != "mid")
    assert len(stats) == heads and all(0 <= s["entropy"] <= 1 for s in stats)
    single = maps.layer_stats("red", layers=[maps.layers[0].name], heads=2)
    assert len(single) == 1 and single[0]["correlation"] == pytest.approx(1.0)  # its own consensus


def test_cfg_difference_is_where_guidance_acted(pipe):
    outputs = []
    hook = pipe.unet.register_forward_hook(lambda m, a, out: outputs.append(out.float().clone()))
    try:
        result = pipe("a red circle", seed=2, num_inference_steps=STEPS, guidance_scale=5.0, attention=True)
    finally:
        hook.remove()
    maps = result.attention[0]
    expected = torch.stack([(o[1] - o[0]).norm(dim=0) for o in outputs]).mean(0)
    np.testing.assert_allclose(maps.cfg_difference(), maps.to_image_size(expected), rtol=2e-3, atol=2e-3)
    unguided = pipe("a red circle", seed=2, num_inference_steps=2, guidance_scale=1.0, attention=True).attention[0]
    with pytest.raises(ValueError, match="guidance was off"):
        unguided.cfg_difference()
    with pytest.raises(ValueError, match="guidance was off"):
        unguided.word("red", negative=True)


def test_ablation_reruns_one_step_without_the_word(pipe):
    result = pipe("a red circle on the left", seed=4, num_inference_steps=STEPS, guidance_scale=5.0,
                  attention=True)
    maps = result.attention[0]
    out = ablation(pipe, maps, "red", step=1)
    assert out["change"].shape == out["attention"].shape == maps.image_size
    assert out["change"].max() > 0 and -1 <= out["correlation"] <= 1
    # removing a word's keys is the same as a prompt in which the word's scores are -inf: check it by hand
    x = torch.from_numpy(maps.inputs[1][None])
    context, _ = pipe.encode_prompt([maps.prompt])
    drop = maps.token_indices("red")
    unet = pipe.unet
    originals = unet.attn_processors

    def masked(attn, x_, ctx=None):
        q, k, v = attn.qkv(x_, ctx)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores[..., drop] = float("-inf")
        return attn.out(scores.softmax(-1) @ v)

    with torch.no_grad():
        full = unet(x, maps.timesteps[1], context)
        unet.set_attn_processor({n: masked if n.endswith("attn2") else p for n, p in originals.items()})
        try:
            ablated = unet(x, maps.timesteps[1], context)
        finally:
            unet.set_attn_processor(originals)
    expected = maps.to_image_size((full - ablated).norm(dim=1)[0])
    np.testing.assert_allclose(out["change"], expected, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="outside the 5 sampling steps"):
        ablation(pipe, maps, "red", step=9)


def test_other_threads_are_not_recorded_or_changed(pipe):
    """A capture on a shared model records its own request only; a plain request running meanwhile gets its
    usual image."""
    solo_plain = pipe("a blue square", seed=8, num_inference_steps=STEPS).images[0]
    solo_maps = pipe("a red circle", seed=3, num_inference_steps=STEPS, attention=True).attention[0]
    out = {}

    def plain():
        out["plain"] = [pipe("a blue square", seed=8, num_inference_steps=STEPS).images[0] for _ in range(3)]

    thread = threading.Thread(target=plain)
    thread.start()
    captured = [pipe("a red circle", seed=3, num_inference_steps=STEPS, attention=True) for _ in range(3)]
    thread.join()
    assert all(np.array_equal(np.asarray(i), np.asarray(solo_plain)) for i in out["plain"])
    for result in captured:
        maps = result.attention[0]
        assert maps.num_steps == solo_maps.num_steps
        np.testing.assert_array_equal(maps.word("red"), solo_maps.word("red"))


def test_plots_render_headless(sd2_run, tmp_path):
    maps, _ = sd2_run
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    figures = {
        "overlay": plots.plot_overlay(image, maps, ["red", "circle"], cmap="viridis", alpha=0.4),
        "grid": plots.plot_grid(image, maps, normalize="absolute"),
        "time": plots.plot_timesteps(image, maps, ["red"], columns=2),
        "layers": plots.plot_layers(image, maps, "square"),
        "pixel": plots.plot_token_distribution(maps, 10, 20),
        "segment": plots.plot_segmentation(image, maps, ["circle", "square"]),
    }
    assert len(figures["overlay"].axes) == 3  # the image and two words
    assert len([a for a in figures["grid"].axes if a.images]) == len(maps.words()) + 2  # image, words, <end>
    assert len(figures["time"].axes) == 2
    for name, fig in figures.items():
        path = plots.save(fig, tmp_path / f"{name}.png")
        png = Image.open(path)
        assert png.size[0] > 200 and np.asarray(png.convert("L")).std() > 10  # drawn, not blank
    with pytest.raises(ValueError, match="unknown colormap 'nope'"):
        plots.plot_overlay(image, maps, ["red"], cmap="nope")
    with pytest.raises(ValueError, match="normalize must be"):
        plots.plot_overlay(image, maps, ["red"], normalize="max")


def test_odd_filter_values_get_sentences(sd2_run, tmp_path):
    maps, _ = sd2_run
    for call, message in [
        (lambda: maps.word("red", layers=5), "layers must be module names"),
        (lambda: maps.word("red", heads=1.5), "heads must be indices"),
        (lambda: maps.word("red", steps=True), "steps must be a step index"),
        (lambda: maps.word("red", steps=(0.5, 2)), "steps must be a step index"),
        (lambda: maps.word("red", resolutions="16"), "resolutions must be map heights"),
        (lambda: maps.word("red", blocks=5), "blocks must be some of"),
        (lambda: maps.at(1.5, 2), "a pixel must be integers"),
        (lambda: maps.at(True, 0), "a pixel must be integers"),
        (lambda: maps.segment(["red"], threshold="0.4"), "threshold must be a number"),
        (lambda: maps.segment("red"), "segment needs a list of words"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    import json
    import zipfile

    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(maps.save(tmp_path / "good.npz").read_bytes()[:500])
    listed = tmp_path / "listed.npz"
    np.savez(listed, meta=np.array(json.dumps([1, 2])))
    for bad in (empty, truncated, listed):
        with pytest.raises(ValueError, match="is not an ImageCraft attention file"):
            AttentionMaps.load(bad)
    assert zipfile.is_zipfile(tmp_path / "good.npz")


def test_words_read_as_typed_for_any_script(pipe):
    maps = pipe("a 🎨 circle à la carte", seed=1, num_inference_steps=2, attention=True).attention[0]
    assert maps.words() == ["a", "🎨", "circle", "à", "la", "carte"]
    np.testing.assert_array_equal(maps.word("🎨"), maps.to_image_size(
        maps.latent_maps(maps.token_indices("🎨")).mean(0)))
    assert len(maps.token_indices("🎨")) >= 1 and maps.word("À").shape == maps.image_size


def test_keep_cross_attention_keeps_the_maps_with_their_gradients():
    """The trainer's grounding processor against the attention maths written out: per attn2 call the
    head-averaged softmax(QK^T / sqrt(d)) (B, pixels, tokens), gradients flowing back to the weights, and the
    layer's output softmax(QK^T / sqrt(d)) V."""
    torch.manual_seed(0)
    unet = UNet_SD(UNetConfig.tiny())
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    expected_maps, expected_outs = [], []

    def reference(attn, x_, ctx=None):
        split = lambda t_: t_.reshape(*t_.shape[:2], attn.heads, -1).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(attn.to_q(x_)), split(attn.to_k(ctx)), split(attn.to_v(ctx))  # (B, heads, N or M, d)
        probs = torch.einsum("bhnd,bhmd->bhnm", q, k).div(math.sqrt(q.shape[-1])).softmax(-1)
        expected_maps.append(probs.mean(1))
        merged = torch.einsum("bhnm,bhmd->bnhd", probs, v).flatten(2)  # (B, N, heads * d)
        out = attn.to_out[0](merged)
        expected_outs.append(out)
        return out

    originals = unet.attn_processors
    unet.set_attn_processor({n: reference if n.endswith("attn2") else p for n, p in originals.items()})
    expected = unet(x, t, context)
    unet.set_attn_processor(originals)
    outs = []
    hooks = [m.register_forward_hook(lambda m_, a, out: outs.append(out))
             for n, m in unet.named_modules() if n.endswith("attn2")]
    kept = keep_cross_attention(unet)
    got = unet(x, t, context)
    for h in hooks:
        h.remove()
    assert len(kept) == len(expected_maps) == len(outs) == sum(n.endswith("attn2") for n in originals)
    for mine, theirs, out, ref in zip(kept, expected_maps, outs, expected_outs):
        assert mine.shape == theirs.shape and mine.shape[0] == 2 and mine.shape[2] == 5  # (B, pixels, tokens)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    kept[0][:, :, 1].sum().backward()  # a grounding loss reaches the layers that made the maps
    first = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    assert first.to_q.weight.grad is not None and first.to_q.weight.grad.abs().sum() > 0
