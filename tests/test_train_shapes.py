"""The built-in model's trainer (`imagecraft.shapes`), on its smoke preset: it runs end to end, resumes, refuses
bad recipes, and `override` (the CLI's `--set`) changes one field of a recipe."""

import json
import logging
import random
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from imagecraft import shapes
from imagecraft.explain.capture import keep_cross_attention
from imagecraft.loading import DEFAULT_MODEL
from imagecraft.pipeline import ImageCraftPipeline
from imagecraft.runtime import autocast, native_bf16, training_bf16, unfused_library_attention
from imagecraft.shapes.data import (batch_indices, caption_corpus, draw_timesteps, group_means, outline_pixels,
                                    position_of, scene_batch, scene_pools)
from imagecraft.shapes.diagnostics import position_separation, stage_scheduler
from imagecraft.shapes.grounding import GRAMMAR_WORDS, inside_share, made_up_colour, object_masks, word_objects
from imagecraft.shapes.recipe import (FAST, LARGE, PRESETS, SMOKE, DecoderSpec, LexiconSpec, ScenesSpec, UNetStage,
                                      check_recipe, override)
from imagecraft.shapes.train import encode_scenes, main, make_text_encoder, make_vae, train, train_vae
from imagecraft.train.core import clean_prediction, loss_weights, noised_and_target
from imagecraft.unet import UNet_SD, UNetConfig

V = "v_prediction"
# a shape stage after the smoke preset's three, as the fast preset has one after its two-object stage
SHAPE = UNetStage("unet-shape", 2, 1e-4, 2, V, True, max_t=700)


def run_args(root, *assignments, recipe="smoke"):
    """main's arguments for a run in `root` (the model in m/, the work folder w/), one `--set` per assignment."""
    return ["--output", str(root / "m"), "--work", str(root / "w"), "--recipe", recipe,
            *(arg for assignment in assignments for arg in ("--set", assignment))]


def with_stages(recipe, *stages):
    """The recipe with `stages` trained after its own (`--set` changes or drops stages; it adds none)."""
    return replace(recipe, stages=recipe.stages + stages)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    assert main(["--output", str(root / "model"), "--work", str(root / "work"), "--recipe", "smoke"]) == 0
    return root


@pytest.mark.integration
def test_smoke_run_writes_a_plain_diffusers_model(trained):
    model = trained / "model"
    for part in ("tokenizer/tokenizer.json", "tokenizer/vocab.json", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "model_index.json"):
        assert (model / part).exists(), part
    assert not list(model.rglob("*.bin")) and not list(model.rglob("*.pt"))
    theirs = StableDiffusionPipeline.from_pretrained(model)  # no extra arguments
    theirs.set_progress_bar_config(disable=True)
    ours = ImageCraftPipeline.from_pretrained(model, dtype="fp32")
    a = ours("a red circle", seed=0, num_inference_steps=3, guidance_scale=5.0).images[0]
    b = theirs("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=3,
               guidance_scale=5.0, height=64, width=64).images[0]
    assert np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() <= 1.0
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured
    # the posterior is pinned to its mean, which is the trained VAE's: sampling it (img2img does) adds no noise
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    trained_vae = make_vae(PRESETS["smoke"])
    trained_vae.load_state_dict(torch.load(trained / "work" / "vae.pt", weights_only=True)["state"]["model"])
    with torch.no_grad():
        posterior = theirs.vae.encode(x).latent_dist
        torch.testing.assert_close(posterior.mean, trained_vae.encode(x).latent_dist.mean, rtol=1e-4, atol=1e-5)
    assert posterior.std.max() < 1e-6 and trained_vae.encode(x).latent_dist.std.min() > 0.5
    # three VAE levels: 16x16 latents, which the UNet's config states, so pipelines default to 64x64 images
    assert json.loads((model / "unet" / "config.json").read_text())["sample_size"] == 16
    assert len(vae_config["block_out_channels"]) == 3 and a.size == (64, 64)
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["rescale_betas_zero_snr"], scheduler["timestep_spacing"]) == \
        ("v_prediction", True, "trailing")  # sampling matches the training objective


@pytest.mark.unit
@pytest.mark.parametrize("prediction_type, zero_snr", [("v_prediction", True), ("epsilon", False)])
def test_noising_and_target_match_diffusers(prediction_type, zero_snr):
    scheduler = stage_scheduler(UNetStage("unet", 10, 1e-4, 1, prediction_type, zero_snr))
    assert (scheduler.alphas_cumprod[-1] == 0) == zero_snr  # t=999 is pure noise only on the rescaled schedule
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 333, 998, 999])
    xt, target = noised_and_target(prediction_type, scheduler.alphas_cumprod, x0, noise, t)
    torch.testing.assert_close(xt, scheduler.add_noise(x0, noise, t))
    expected = scheduler.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
    torch.testing.assert_close(target, expected)


@pytest.mark.unit
@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_the_clean_image_a_prediction_implies_is_diffusers_pred_original_sample(prediction_type):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False)
    xt, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (999, 500, 50):
        expected = scheduler.step(out, t, xt, generator=torch.Generator().manual_seed(0)).pred_original_sample
        torch.testing.assert_close(clean_prediction(prediction_type, scheduler.alphas_cumprod[t], xt, out), expected)


@pytest.mark.unit
def test_loss_weights_are_min_snr_with_a_floor_for_v():
    snr = torch.tensor([0.0, 0.5, 1.0, 5.0, 100.0])
    v = loss_weights("v_prediction", snr, 5.0) * (snr + 1)  # weights on the x0 error
    torch.testing.assert_close(v, torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0]))  # min(snr, 5), never below 1
    eps = loss_weights("epsilon", snr[1:], 5.0) * snr[1:]
    torch.testing.assert_close(eps, torch.tensor([0.5, 1.0, 5.0, 5.0]))  # Min-SNR-5: min(snr, 5) on x0
    assert torch.equal(loss_weights("v_prediction", snr, 0), torch.ones(5))


@pytest.mark.integration
def test_position_separation_reads_where_the_words_put_the_object():
    # the shipped model places "on the left" left of "on the right" and "at the top" above "at the bottom" from
    # pure noise (sampling scores its positions 97-100% right); its UNet fed a text encoder that never learnt
    # the words does not
    pipe = ImageCraftPipeline.from_pretrained(device="cpu", dtype="fp32")
    recipe = FAST
    final = recipe.stages[-1]
    size = pipe.default_size // pipe.vae_scale_factor
    max_tokens = recipe.text.max_tokens
    assert position_separation(pipe.unet, pipe.text_encoder, pipe.tokenizer, final, size, max_tokens) > 5
    torch.manual_seed(0)
    untrained = make_text_encoder(recipe, pipe.tokenizer).eval()
    assert abs(position_separation(pipe.unet, untrained, pipe.tokenizer, final, size, max_tokens)) < 2


@pytest.mark.unit
def test_epsilon_with_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="stage unet: zero_terminal_snr needs prediction_type 'v_prediction'"):
        check_recipe(override(LARGE, "stages.unet.zero_terminal_snr=true"))
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction', got 'sample'"):
        check_recipe(override(LARGE, "stages.unet.prediction_type=sample"))


@pytest.mark.integration
def test_rerun_resumes_instead_of_retraining(trained, caplog):
    before = (trained / "work" / "unet.pt").stat().st_mtime_ns
    # --smoke is --recipe smoke: the same recipe, so nothing is retrained
    assert main(["--output", str(trained / "model"), "--work", str(trained / "work"), "--smoke"]) == 0
    assert (trained / "work" / "unet.pt").stat().st_mtime_ns == before  # finished phases are not redone
    assert torch.load(trained / "work" / "unet.pt", weights_only=True)["step"] == 6
    second = torch.load(trained / "work" / "unet-zsnr.pt", weights_only=True)
    assert second["step"] == 4 and second["objective"]["init"] == "unet@6"
    assert second["objective"]["prediction_type"] == "v_prediction"
    third = torch.load(trained / "work" / "unet-two.pt", weights_only=True)
    assert third["step"] == 3 and third["objective"]["init"] == "unet-zsnr@4"
    assert (third["objective"]["prediction_type"], third["objective"]["zero_terminal_snr"]) == ("v_prediction", True)
    assert third["objective"]["two_share"] == 0.8


@pytest.mark.unit
def test_stage_three_batches_are_mostly_two_object_scenes():
    captions = caption_corpus(seed=0, n=4000)
    ones, twos = scene_pools(captions)
    assert len(ones) + len(twos) == 4000 and 0.45 < len(twos) / 4000 < 0.55  # the training set's own mix
    assert all(len(shapes.parse_prompt(captions[i]).objects) == 2 for i in twos[:200])
    assert all(len(shapes.parse_prompt(captions[i]).objects) == 1 for i in ones[:200])
    generator = torch.Generator().manual_seed(0)
    two = torch.zeros(4000, dtype=torch.bool)
    two[twos] = True
    assert two[batch_indices((ones, twos), 1.0, 500, generator)].all()
    assert 0.76 < two[batch_indices((ones, twos), 0.8, 4000, generator)].float().mean() < 0.84
    assert 0.45 < two[batch_indices((ones, twos), None, 4000, generator)].float().mean() < 0.55  # uniform


@pytest.mark.unit
def test_precision_follows_the_cpu_unless_asked():
    for precision, bf16 in (("fp32", False), ("bf16", True), ("auto", native_bf16())):
        with autocast(training_bf16(override(SMOKE, f"precision={precision}").precision)):
            assert torch.is_autocast_enabled("cpu") == bf16, precision
    with pytest.raises(ValueError, match="precision must be 'auto', 'bf16' or 'fp32', got 'fp16'"):
        check_recipe(override(SMOKE, "precision=fp16"))


@pytest.mark.integration
def test_resume_continues_from_the_checkpoint(tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="imagecraft.shapes.train"):
        assert main(run_args(tmp_path, "stages.unet.steps=3")) == 0
    # each checkpoint says whether position words are being learnt yet
    assert re.search(r"unet step 3: position separation at t=999 -?\d+\.\d px", caplog.text)
    assert torch.load(tmp_path / "w" / "unet.pt", weights_only=True)["step"] == 3
    assert main(run_args(tmp_path, "stages.unet.steps=5", "stages.unet-zsnr.steps=0", "stages.unet-two.steps=0")) == 0
    assert torch.load(tmp_path / "w" / "unet.pt", weights_only=True)["step"] == 5
    # the second stage was fine-tuned from the 3-step first stage: it is not silently reused on top of the 5-step one
    assert main(run_args(tmp_path, "stages.unet.steps=5")) == 2
    assert "unet-zsnr.pt was trained with" in capsys.readouterr().err


@pytest.mark.integration
def test_checkpoint_of_another_objective_is_not_resumed(tmp_path, capsys):
    assert main(run_args(tmp_path, "stages.unet.steps=2")) == 0
    state = torch.load(tmp_path / "w" / "unet.pt", weights_only=True)
    state["objective"]["prediction_type"] = "v_prediction"  # as if written by another recipe
    torch.save(state, tmp_path / "w" / "unet.pt")
    assert main(run_args(tmp_path, "stages.unet.steps=4")) == 2
    assert "unet.pt was trained with {'prediction_type': 'v_prediction'" in capsys.readouterr().err
    # nor one trained on other scenes: another margin re-encodes the latents, and the UNet is not resumed on them
    state["objective"]["prediction_type"] = "epsilon"
    torch.save(state, tmp_path / "w" / "unet.pt")
    assert main(run_args(tmp_path, "stages.unet.steps=4", "scenes.margin=3")) == 2
    assert "'scenes': {'gap': 2.0, 'margin': 3}" in capsys.readouterr().err


@pytest.mark.integration
def test_corrupt_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "vae.pt").write_bytes(b"garbage")
    assert main(run_args(tmp_path)) == 2
    assert "vae.pt is corrupt or unreadable" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize("recipe, assignment, message", [
    ("smoke", "batch=0", "batch must be a whole number above 0, got 0"),
    ("smoke", "stages.unet.lr=-0.001", "stage unet: lr (learning rate) must be a number above 0, got -0.001"),
    ("smoke", "stages.unet.steps=-5", "stage unet: steps must be a whole number above 0, got -5"),
    ("smoke", "stages.unet-zsnr.steps=-1", "stage unet-zsnr: steps must be a whole number above 0, got -1"),
    ("smoke", "stages.unet-two.steps=-2", "stage unet-two: steps must be a whole number above 0, got -2"),
    ("smoke", "sampler=karras_magic", "unknown scheduler 'karras_magic'; valid names are ddim, euler, euler_a"),
    ("fast", "stages.unet-detail.steps=-1", "stage unet-detail: steps must be a whole number above 0, got -1"),
    ("fast", "stages.unet-detail.max_t=5", "stage unet-detail: max_t must be a timestep from 20 to 1000, got 5"),
    ("fast", "stages.unet-detail.snr_gamma=-1", "stage unet-detail: snr_gamma must be 0 (plain MSE) to 10000, got -1"),
    ("smoke", "scenes.gap=0", "scenes.gap must be from 2 px (the world's least gap) to 8 px"),
    ("smoke", "scenes.margin=6", "scenes.margin must be a whole number of px from 1 (the world's) to 4"),
    ("smoke", "scenes.margin=2.5", "scenes.margin must be a whole number of px from 1 (the world's) to 4"),
    ("smoke", "scenes.margin=0", "scenes.margin must be a whole number of px from 1 (the world's) to 4"),
    ("smoke", "vae.general=1.5", "vae.general (share of broader-world images in a VAE batch) must be in [0, 1]"),
    ("smoke", "vae.latent_channels=3", "vae.latent_channels must be from 4"),
    ("smoke", "vae.edge=-1", "vae.edge (an auxiliary loss weight) must be 0 or a positive number, got -1"),
    ("smoke", "vae.edge=Infinity", "vae.edge (an auxiliary loss weight) must be 0 or a positive number, got inf"),
    ("smoke", "stages.unet-two.lexicon=0.5", "stage unet-two draws a share of its batches from the lexicon's scenes, "
                                             "but lexicon.scenes is 0"),
    ("lexicon", "stages.unet-lexicon.lexicon=2", "stage unet-lexicon: lexicon (share of each batch from the lexicon's "
                                              "scenes) must be in [0, 1], got 2"),
    ("fast", "stages.unet.lexicon=0.5", "stage unet: a stage with lexicon scenes cannot use layout or mean_target_t"),
    ("fast", "lexicon.scenes=-3", "lexicon.scenes must be a whole number of 0 or more, got -3"),
])
def test_nonsensical_settings_are_refused(tmp_path, capsys, recipe, assignment, message):
    assert main(["--output", str(tmp_path / "m"), "--recipe", recipe, "--set", assignment]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # refused before any work


@pytest.mark.unit
@pytest.mark.parametrize("crop", [30, 0, 68])
def test_vae_crops_must_sit_on_the_latent_grid(crop):
    check_recipe(override(LARGE, "vae.crop=32"))  # a 32x32 crop is on the grid
    message = f"vae.crop must be a multiple of 4 \\(the latent factor\\) from 4 to 64, got {crop}"
    with pytest.raises(ValueError, match=message):
        check_recipe(override(LARGE, f"vae.crop={crop}"))


@pytest.mark.integration
def test_output_must_be_a_writable_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--output", str(tmp_path / "file"), "--recipe", "smoke"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    # /proc takes no new folders, even for root
    assert main(["--output", "/proc/imagecraft-model", "--recipe", "smoke"]) == 2
    assert "output folder /proc/imagecraft-model is not writable" in capsys.readouterr().err


@pytest.mark.unit
def test_scene_gap_is_checked_and_keys_the_cached_latents(tmp_path, caplog):
    for gap in (1, 9):
        with pytest.raises(ValueError, match=f"scenes.gap must be from 2 px .* to 8 px .*, got {gap}"):
            check_recipe(override(LARGE, f"scenes.gap={gap}"))
    recipe = override(SMOKE, "scenes.count=40")
    vae = make_vae(recipe).eval()
    encode_scenes(recipe, vae, tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imagecraft.shapes.train"):
        encode_scenes(override(recipe, "scenes.gap=8"), vae, tmp_path)
    assert "encoded 40 scenes" in caplog.text  # another gap is another training set: encoded again
    assert torch.load(tmp_path / "latents.pt", weights_only=True)["scene_gap"] == 8
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imagecraft.shapes.train"):
        encode_scenes(override(override(recipe, "scenes.gap=8"), "scenes.margin=4"), vae, tmp_path)
    assert "encoded 40 scenes" in caplog.text  # so is another margin
    assert torch.load(tmp_path / "latents.pt", weights_only=True)["scene_margin"] == 4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imagecraft.shapes.train"):
        encode_scenes(override(override(recipe, "scenes.gap=8"), "scenes.margin=4"), vae, tmp_path)
    assert "encoded" not in caplog.text  # the same scenes: the cache is read


@pytest.mark.unit
def test_scene_coverage_is_where_the_objects_are():
    x, captions, coverage = scene_batch(random.Random(5), 6)
    again = random.Random(5)
    for image, caption, cover in zip(x, captions, coverage):
        spec, prompt, _, _ = shapes.sample_scene(again)
        assert prompt == caption
        background = torch.tensor(spec.background_rgb, dtype=torch.float32) / 127.5 - 1
        on_background = (image - background.view(3, 1, 1)).abs().amax(dim=0) < 1e-6
        assert torch.equal(cover[0] == -1, on_background)  # no object is the background's colour
        assert 0.03 < (cover == 1).float().mean() < 0.4  # one or two shapes of 16-24 px


@pytest.mark.integration
def test_coverage_loss_ties_latent_channel_3_to_the_objects(tmp_path):
    recipe = replace(SMOKE, vae=replace(SMOKE.vae, steps=60, coverage=1.0), checkpoint_every=60)
    torch.manual_seed(0)
    vae = train_vae(recipe, tmp_path)
    x, _, coverage = scene_batch(random.Random(9), 16)
    with torch.no_grad():
        channel = vae.encode(x).latent_dist.mean[:, 3]
    target = torch.nn.functional.avg_pool2d(coverage, recipe.vae.latent_factor)[:, 0]
    assert torch.corrcoef(torch.stack([channel.flatten(), target.flatten()]))[0, 1] > 0.8
    # the checkpoint remembers the objective: another coverage weight does not resume it
    with pytest.raises(ValueError, match="vae.pt was trained with .*'coverage': 1.0.*'coverage': 0.0"):
        train_vae(override(recipe, "vae.coverage=0.0"), tmp_path)


@pytest.mark.unit
def test_outline_pixels_are_the_ring_either_side_of_each_outline():
    coverage = -torch.ones(1, 1, 20, 20)
    coverage[..., 5:15, 5:15] = 1  # a 10x10 square
    ring = outline_pixels(coverage)[0, 0]
    expected = torch.zeros(20, 20)
    expected[4:16, 4:16] = 1
    expected[6:14, 6:14] = 0  # one pixel in, one pixel out
    assert torch.equal(ring, expected)
    assert outline_pixels(-torch.ones(1, 1, 8, 8)).sum() == 0  # no object, no outline


@pytest.mark.integration
def test_edge_loss_trains_and_is_part_of_the_objective(tmp_path):
    recipe = replace(SMOKE, vae=replace(SMOKE.vae, steps=3, edge=1.0), checkpoint_every=3)
    train_vae(recipe, tmp_path)
    assert torch.load(tmp_path / "vae.pt", weights_only=True)["objective"]["edge"] == 1.0
    with pytest.raises(ValueError, match="vae.pt was trained with .*'edge': 1.0"):
        train_vae(override(recipe, "vae.edge=0.0"), tmp_path)


@pytest.mark.unit
def test_layout_and_mean_targets_are_the_group_means():
    captions = ["a red circle on the left", "a red circle", "a red circle on the left", "a blue square above a "
                "red circle", "a green triangle at the top"]
    assert [position_of(c) for c in captions] == ["on the left", None, "on the left", None, "at the top"]
    latents = torch.randn(5, 4, 2, 2)
    means, index = group_means(latents, [position_of(c) for c in captions])
    assert index.tolist() == [0, 1, 0, 1, 2]
    torch.testing.assert_close(means[index[0]], latents[[0, 2]].mean(0))
    torch.testing.assert_close(means[index[1]], latents[[1, 3]].mean(0))
    torch.testing.assert_close(means[index[4]], latents[4])


def layout_recipe(base=SMOKE):
    """`base` with a 2-step layout stage first and every stage on zero-terminal-SNR v-prediction with caption-mean
    targets from t=900, as the fast preset (the smoke preset's second stage, already so, dropped)."""
    stages = [replace(s, prediction_type=V, zero_terminal_snr=True, mean_target_t=900)
              for s in base.stages if s.name != "unet-zsnr"]
    layout = UNetStage("unet-layout", 2, 4e-4, 2, V, True, layout=True, mean_target_t=980)
    return replace(base, vae=replace(base.vae, coverage=1.0), stages=(layout, *stages))


@pytest.mark.integration
def test_layout_recipe_runs_its_stages_in_order(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="imagecraft.shapes.train"):
        train(layout_recipe(), tmp_path / "m", tmp_path / "w")
    layout = torch.load(tmp_path / "w" / "unet-layout.pt", weights_only=True)
    assert layout["step"] == 2 and layout["objective"]["layout"] and layout["objective"]["init"] is None
    first = torch.load(tmp_path / "w" / "unet.pt", weights_only=True)["objective"]
    assert (first["init"], first["prediction_type"], first["mean_target_t"]) == ("unet-layout@2", "v_prediction", 900)
    assert torch.load(tmp_path / "w" / "unet-two.pt", weights_only=True)["objective"]["mean_target_t"] == 900
    assert torch.load(tmp_path / "w" / "vae.pt", weights_only=True)["objective"]["coverage"] == 1.0
    assert "unet-layout step 2: position separation" in caplog.text


@pytest.mark.unit
@pytest.mark.parametrize("recipe, message", [
    (replace(LARGE, stages=(UNetStage("unet-layout", 100, 4e-4, 100, layout=True, mean_target_t=980),
                            *LARGE.stages)),
     "a layout stage needs v_prediction with zero_terminal_snr"),
    (override(LARGE, "stages.unet.mean_target_t=200"),
     "stage unet: mean_target_t must be 0 \\(off\\) or a timestep from 500 to 990, got 200"),
    (override(LARGE, "vae.coverage=-1.0"),
     "vae.coverage \\(an auxiliary loss weight\\) must be 0 or a positive number, got -1.0"),
    (override(layout_recipe(LARGE), "stages.unet-layout.steps=-3"),
     "stage unet-layout: steps must be a whole number above 0, got -3"),
    pytest.param(
        # the layout stage is on v-prediction, the stage trained from it on epsilon, which loses what it learnt
        replace(LARGE, stages=(UNetStage("unet-layout", 100, 4e-4, 100, V, True, layout=True, mean_target_t=980),
                               *LARGE.stages)),
        "a layout stage needs v_prediction with zero_terminal_snr"),
])
def test_layout_settings_are_checked(recipe, message):
    with pytest.raises(ValueError, match=message):
        check_recipe(recipe)


@pytest.mark.unit
def test_fast_recipe_is_the_layout_recipe_at_full_size():
    recipe = PRESETS["fast"]
    check_recipe(recipe)
    stages = recipe.stages
    assert [s.name for s in stages] == ["unet-layout", "unet", "unet-two", "unet-shape", "unet-detail"]
    assert all(s.prediction_type == "v_prediction" and s.zero_terminal_snr for s in stages)
    assert [s.mean_target_t for s in stages] == [980, 900, 900, 0, 0] and stages[0].layout
    assert stages[2].two_share == 0.8
    assert [s.max_t for s in stages] == [1000, 1000, 1000, 700, 400]
    assert [s.snr_gamma for s in stages] == [None, None, None, None, recipe.snr_gamma]
    assert recipe.vae.coverage > 0 and recipe.vae.crop % (2 * recipe.vae.latent_factor) == 0
    assert recipe.ground_weight > 0 and recipe.vae.edge > 0 and recipe.decoder.steps == 0


@pytest.mark.integration
def test_shape_stage_runs_last_from_the_previous_stage(tmp_path):
    train(override(with_stages(SMOKE, SHAPE), "sampler=Euler a"), tmp_path / "m", tmp_path / "w")
    shape = torch.load(tmp_path / "w" / "unet-shape.pt", weights_only=True)
    assert shape["step"] == 2 and shape["objective"]["max_t"] == 700 and shape["objective"]["init"] == "unet-two@3"
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "m").unet.state_dict()["conv_in.weight"]
    before = torch.load(tmp_path / "w" / "unet-two.pt", weights_only=True)["ema"]["unet"]["input_blocks.0.0.weight"]
    after = shape["ema"]["unet"]["input_blocks.0.0.weight"]
    torch.testing.assert_close(exported, after.half().float())  # the model written is the shape stage's
    assert not torch.equal(after, before)
    # the sampler asked for (an AUTOMATIC1111 name here) ships as the model's scheduler, on the training betas
    scheduler = json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerAncestralDiscreteScheduler" and scheduler["rescale_betas_zero_snr"]
    assert ImageCraftPipeline.from_pretrained(tmp_path / "m").default_scheduler == "euler_a"


@pytest.mark.integration
def test_detail_stage_runs_after_the_shape_stage_on_low_timesteps_with_its_own_weighting(tmp_path):
    detail_stage = UNetStage("unet-detail", 2, 1e-4, 2, V, True, max_t=200, snr_gamma=50)
    recipe = with_stages(SMOKE, SHAPE, detail_stage)
    train(recipe, tmp_path / "m", tmp_path / "w")
    detail = torch.load(tmp_path / "w" / "unet-detail.pt", weights_only=True)
    assert detail["step"] == 2 and detail["objective"]["init"] == "unet-shape@2"
    assert detail["objective"]["max_t"] == 200 and detail["objective"]["snr_gamma"] == 50
    before = torch.load(tmp_path / "w" / "unet-shape.pt", weights_only=True)["ema"]["unet"]["input_blocks.0.0.weight"]
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "m").unet.state_dict()["conv_in.weight"]
    torch.testing.assert_close(exported, detail["ema"]["unet"]["input_blocks.0.0.weight"].half().float())
    assert not torch.equal(detail["ema"]["unet"]["input_blocks.0.0.weight"], before)
    # the same stage with another weighting is a different objective: its checkpoint is not resumed
    with pytest.raises(ValueError, match="unet-detail.pt was trained with"):
        train(override(recipe, "stages.unet-detail.snr_gamma=5"), tmp_path / "m", tmp_path / "w")
    t = draw_timesteps(recipe.stage("unet-detail"), 2000, torch.Generator().manual_seed(0))
    assert t.max() < 200 and t.min() == 0


@pytest.mark.unit
def test_timesteps_stay_where_each_stage_draws_them():
    rng = torch.Generator().manual_seed(0)
    shape = draw_timesteps(UNetStage("s", 1, 1e-4, 1, max_t=700), 3000, rng)
    assert shape.max() < 700 and shape.min() == 0 and shape.float().mean().sub(349.5).abs() < 15
    layout = draw_timesteps(UNetStage("l", 1, 1e-4, 1, layout=True, mean_target_t=980), 300, rng)
    assert layout.min() >= 980
    main_t = draw_timesteps(UNetStage("m", 1, 1e-4, 1, mean_target_t=900), 3000, rng)
    assert (main_t[::3] >= 900).all() and (main_t >= 900).float().mean().sub(1 / 3 + 2 / 3 * 0.1).abs() < 0.03


@pytest.mark.integration
def test_a_broader_vae_with_more_latent_channels_runs_end_to_end(tmp_path):
    assert main(run_args(tmp_path, "vae.general=0.5", "vae.latent_channels=8")) == 0
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert theirs.vae.config.latent_channels == 8 and theirs.unet.config.in_channels == 8
    ours = ImageCraftPipeline.from_pretrained(tmp_path / "m")
    assert ours("a red circle", seed=0, num_inference_steps=2).images[0].size == (64, 64)
    state = torch.load(tmp_path / "w" / "vae.pt", weights_only=True)
    assert state["objective"]["general"] == 0.5 and state["objective"]["latent_channels"] == 8


@pytest.mark.unit
def test_grounded_tokens_are_each_objects_colour_and_shape_words():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")
    captions = ["a red circle on the left", "an orange square above a blue triangle",
                "a purple triangle and a green circle on a red background", "a red circle on the left"]
    rows = word_objects(tokenizer, captions, 32)
    assert rows.shape == (4, 32) and torch.equal(rows[0], rows[3])
    for row, caption in zip(rows, captions):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
        named = {k: "".join(tokens[j] for j in range(len(tokens)) if row[j] == k).replace("</w>", " ").strip()
                 for k in (0, 1)}
        spec = shapes.parse_prompt(caption)
        assert [named[k] for k in range(len(spec.objects))] == [f"{o.colour} {o.shape}" for o in spec.objects]
        assert (row[len(tokens):] == -1).all()  # padding is never grounded
    assert (rows[2] >= 0).sum() == 4  # "red background" is not grounded


@pytest.mark.unit
@pytest.mark.parametrize("margin", [1, 4])
def test_object_masks_are_the_encoded_scenes_objects(tmp_path, margin):
    recipe = replace(SMOKE, scenes=ScenesSpec(count=40, gap=8, margin=margin))
    _, captions, _ = encode_scenes(recipe, make_vae(recipe).eval(), tmp_path)
    masks = object_masks(recipe, 40, 16, tmp_path)
    assert masks.shape == (40, 2, 16, 16) and masks.dtype == torch.bool
    _, again, coverage = scene_batch(random.Random(recipe.seed + 2), 40, recipe.scenes.gap, margin)
    assert again == captions
    union = torch.nn.functional.max_pool2d((coverage == 1).float(), 4)[:, 0] > 0
    assert torch.equal(masks.any(dim=1), union)
    two = torch.tensor([len(shapes.parse_prompt(c).objects) == 2 for c in captions])
    assert masks[:, 1].flatten(1).any(1).eq(two).all() and masks[:, 0].flatten(1).any(1).all()
    assert not (masks[:, 0] & masks[:, 1]).any()  # 8 px apart: no cell holds both
    assert torch.equal(object_masks(recipe, 40, 16, tmp_path), masks)  # cached


@pytest.mark.unit
def test_inside_share_reads_where_each_token_looks():
    masks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :2] = True  # object 0: top-left quarter
    masks[0, 1, 2:, 2:] = True
    probs = torch.full((1, 16, 3), 1 / 3)  # every pixel spreads over 3 tokens
    probs[0, :, 1] = masks[0, 1].flatten().float() * 2 / 3  # token 1: object 1's cells only
    probs[0, :, 0] = 2 / 3 - probs[0, :, 1]  # token 0: the 12 other cells alike, 4 of them object 0's
    share = inside_share([probs], torch.tensor([[0, 1, -1]]), masks)
    torch.testing.assert_close(share, torch.tensor([1 / 3, 1.0]))  # token 2 is not grounded
    assert inside_share([probs], torch.tensor([[-1, -1, -1]]), masks) is None


@pytest.mark.unit
def test_grounding_loss_moves_the_words_attention_onto_their_object():
    torch.manual_seed(0)
    unet = UNet_SD(UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                              attention_levels=(False, True), num_res_blocks=1, num_heads=2, norm_groups=8,
                              context_dim=16))
    x, context = torch.randn(4, 4, 16, 16), torch.randn(4, 6, 16)
    masks = torch.zeros(4, 2, 16, 16, dtype=torch.bool)
    for b in range(4):
        masks[b, 0, 2 * b:2 * b + 5, 1:6] = True
        masks[b, 1, 9:14, 3 * b:3 * b + 5] = True
    words = torch.tensor([[-1, 0, 0, -1, 1, 1]] * 4)
    plain = unet(x, 10, context)
    kept = keep_cross_attention(unet)
    torch.testing.assert_close(unet(x, 10, context), plain)  # the same maths, probabilities kept
    assert len(kept) == 4 and all(p.shape == (4, 64, 6) for p in kept)  # down, mid, up x2; 8x8 pixels
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    shares = []
    for _ in range(30):
        kept.clear()
        unet(x, 10, context)
        share = inside_share(kept, words, masks)
        shares.append(share.mean().item())
        opt.zero_grad()
        ((1 - share) ** 2).mean().backward()
        opt.step()
    assert shares[-1] > shares[0] + 0.3, shares


@pytest.mark.integration
def test_grounded_training_runs_and_is_part_of_the_objective(tmp_path):
    assert main(run_args(tmp_path, "ground_weight=0.01")) == 0
    state = torch.load(tmp_path / "w" / "unet-two.pt", weights_only=True)
    assert state["objective"]["ground_weight"] == 0.01
    assert ImageCraftPipeline.from_pretrained(tmp_path / "m")("a red circle", seed=0,
                                                               num_inference_steps=2).images[0].size == (64, 64)


@pytest.mark.integration
def test_decoder_stage_trains_the_decoder_alone_and_resumes(tmp_path):
    assert main(run_args(tmp_path, "decoder.steps=3")) == 0
    state = torch.load(tmp_path / "w" / "vae-decoder.pt", weights_only=True)
    assert state["step"] == 3 and state["objective"]["noise"] == DecoderSpec.noise
    before = torch.load(tmp_path / "w" / "vae.pt", weights_only=True)["state"]["model"]
    after = StableDiffusionPipeline.from_pretrained(tmp_path / "m").vae.state_dict()
    for name, weights in before.items():
        if name.startswith("quant_conv."):  # the mean's rows kept (the log-variance's are pinned at export)
            assert torch.equal(after[name][:4], weights[:4]) and not torch.equal(after[name][4:], weights[4:]), name
            continue
        same = torch.equal(after[name], weights)
        assert same == (not name.startswith(("decoder.", "post_quant_conv."))), name  # the UNet's latents stay
    with pytest.raises(ValueError, match="decoder.noise must be from 0 to 2"):
        check_recipe(override(SMOKE, "decoder.noise=3"))
    assert main(run_args(tmp_path, "decoder.steps=5")) == 0  # more steps asked: resumed from step 3
    assert torch.load(tmp_path / "w" / "vae-decoder.pt", weights_only=True)["step"] == 5


@pytest.mark.unit
def test_bf16_training_switches_attention_kernels_and_back():
    """bf16 training runs the VAE's and text encoder's attention without the fused kernel (its CPU backward is slow
    at these sizes), with the same outputs; the models go back to the fused one for export. fp32: untouched."""
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTokenizer

    recipe = SMOKE
    vae = make_vae(recipe).eval()
    text_encoder = make_text_encoder(recipe, CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")).eval()
    fused = {name: type(p) for name, p in vae.attn_processors.items()}
    x, ids = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randint(0, 300, (2, recipe.text.max_tokens))
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mode()).sample, text_encoder(ids)[0]
    assert unfused_library_attention(training_bf16("fp32"), vae, text_encoder)() is None
    assert {name: type(p) for name, p in vae.attn_processors.items()} == fused
    restore = unfused_library_attention(training_bf16("bf16"), vae, text_encoder)
    assert all(isinstance(p, AttnProcessor) for p in vae.attn_processors.values())
    assert text_encoder.config._attn_implementation == "eager"
    with torch.no_grad():
        during = vae.decode(vae.encode(x).latent_dist.mode()).sample, text_encoder(ids)[0]
    restore()
    assert {name: type(p) for name, p in vae.attn_processors.items()} == fused
    assert text_encoder.config._attn_implementation == "sdpa"
    for a, b in zip(before, during):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_made_up_colour_words_move_the_shape_word_and_keep_the_objects_apart():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")
    generator = torch.Generator().manual_seed(0)
    caption = "a red circle above a blue square"
    seen = set()
    for _ in range(20):
        changed = made_up_colour(caption, generator)
        words, before = changed.split(), caption.split()
        differs = [i for i, (a, b) in enumerate(zip(words, before)) if a != b]
        assert len(words) == len(before) and len(differs) == 1 and before[differs[0]] in ("red", "blue")
        assert words[differs[0]] not in GRAMMAR_WORDS and 3 <= len(words[differs[0]]) <= 6
        seen.add(differs[0])
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(changed).input_ids)
        row = word_objects(tokenizer, [changed], 32)[0]
        named = {k: [tokens[j] for j in range(len(tokens)) if row[j] == k] for k in (0, 1)}
        # the shape words are still grounded, each on its own object; the made-up word is not grounded
        assert named[0][-1] == "circle</w>" and named[1][-1] == "square</w>"
        assert sum(len(v) for v in named.values()) == 3
        assert tokens.index("circle</w>") > 3 or differs[0] == 5  # "circle" moved: the made-up word is in pieces
    assert seen == {1, 5}  # either object's colour


@pytest.mark.integration
def test_made_up_words_train_and_are_part_of_the_objective(tmp_path):
    assert main(run_args(tmp_path, "ground_weight=0.01", "made_up_words=0.5")) == 0
    assert torch.load(tmp_path / "w" / "unet-two.pt", weights_only=True)["objective"]["made_up_words"] == 0.5
    with pytest.raises(ValueError, match=r"made_up_words must be a share in \[0, 1\), got 1"):
        check_recipe(override(SMOKE, "made_up_words=1"))


# --- override and --set ----------------------------------------------------------------------------------------
@pytest.mark.unit
def test_override_sets_one_field_of_a_part_or_of_the_recipe():
    recipe = override(SMOKE, "vae.steps=100")
    assert recipe.vae == replace(SMOKE.vae, steps=100) and SMOKE.vae.steps == 4  # the preset stays as it is
    assert replace(recipe, vae=SMOKE.vae) == SMOKE  # nothing else changed
    assert override(SMOKE, "vae.channels=[8, 16]").vae.channels == (8, 16)  # JSON lists become tuples
    assert override(SMOKE, "scenes.gap=8").scenes == replace(SMOKE.scenes, gap=8)
    assert override(SMOKE, "batch=8").batch == 8
    assert override(SMOKE, "sampler=Euler a").sampler == "Euler a"  # not JSON: read as text
    assert override(SMOKE, "unet.model_channels=16").unet == {**SMOKE.unet, "model_channels": 16}


@pytest.mark.unit
def test_override_sets_one_field_of_a_stage_and_drops_a_stage_at_0_steps():
    recipe = override(SMOKE, "stages.unet-two.two_share=0.5")
    assert [s.name for s in recipe.stages] == ["unet", "unet-zsnr", "unet-two"]
    assert recipe.stage("unet-two") == replace(SMOKE.stage("unet-two"), two_share=0.5)
    assert recipe.stages[:2] == SMOKE.stages[:2]
    assert override(SMOKE, "stages.unet-two.snr_gamma=null").stage("unet-two").snr_gamma is None
    dropped = override(SMOKE, "stages.unet-zsnr.steps=0")
    assert dropped.stages == (SMOKE.stage("unet"), SMOKE.stage("unet-two"))
    with pytest.raises(ValueError, match="the recipe has no UNet stage"):
        check_recipe(override(override(override(SMOKE, "stages.unet.steps=0"), "stages.unet-zsnr.steps=0"),
                              "stages.unet-two.steps=0"))


@pytest.mark.unit
@pytest.mark.parametrize("assignment, message", [
    ("stages.unet-shape.steps=10", "no stage named 'unet-shape' in this recipe; its stages: unet, unet-zsnr, unet-two"),
    ("stages.unet.depth=2", "stages.unet has no field 'depth'; its fields: name, steps, lr, warmup, prediction_type"),
    ("vae.size=32", "vae has no field 'size'; its fields: channels, groups, crop, steps, batch, lr"),
    ("scenes.count_=10", "scenes has no field 'count_'; its fields: count, gap, margin"),
    ("vea.steps=10", "'vea' is not a part of the recipe; parts: text, vae, decoder, scenes, lexicon, unet, stages"),
    ("unet_steps=10", "the recipe has no field 'unet_steps'; its fields: stages, seed, threads, precision"),
    ("vae.steps", "--set takes FIELD=VALUE (e.g. vae.steps=100), got 'vae.steps'"),
    ("=3", "--set takes FIELD=VALUE"),
    # a field of the UNet's architecture, or a value of the wrong kind
    ("unet.model_channel=16", "the UNet has no field 'model_channel'; its fields: in_channels, "),
    ("vae.edge=inf", "vae.edge must be a number, got 'inf'"),
    ("scenes.gap=wide", "scenes.gap must be a number, got 'wide'"),
    ("text=5", "'text' is a part of the recipe: set one of its fields"),
    ("stages.unet=3", "a stage's field is set as stages.NAME.FIELD"),
    ("stages.unet.steps=null", "stages.unet.steps must be a number, got None"),
])
def test_override_refuses_what_the_recipe_does_not_have_naming_what_it_has(assignment, message):
    with pytest.raises(ValueError) as refused:
        override(SMOKE, assignment)
    assert message in str(refused.value)


@pytest.mark.unit
def test_override_sets_null_where_a_field_may_be_none():
    assert override(SMOKE, "stages.unet-two.two_share=null").stage("unet-two").two_share is None


@pytest.mark.integration
def test_set_through_main_changes_the_recipe_it_trains(tmp_path, capsys):
    # an unknown stage is refused by main as a sentence, before any work
    assert main(run_args(tmp_path, "stages.unet-shape.steps=10")) == 2
    assert "no stage named 'unet-shape' in this recipe; its stages: unet, unet-zsnr, unet-two" in \
        capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    # assignments apply in order, the last one of a field winning; the work folder keeps the recipe trained
    assert main(run_args(tmp_path, "stages.unet.steps=4", "stages.unet.steps=2", "stages.unet-zsnr.steps=0",
                         "stages.unet-two.two_share=0.5", "seed=1")) == 0
    written = json.loads((tmp_path / "w" / "recipe.json").read_text())
    assert [s["name"] for s in written["stages"]] == ["unet", "unet-two"] and written["seed"] == 1
    assert not (tmp_path / "w" / "unet-zsnr.pt").exists()
    assert torch.load(tmp_path / "w" / "unet.pt", weights_only=True)["step"] == 2
    two = torch.load(tmp_path / "w" / "unet-two.pt", weights_only=True)
    assert (two["objective"]["init"], two["objective"]["two_share"]) == ("unet@2", 0.5)


@pytest.mark.unit
def test_lexicon_scenes_name_their_colour_or_shape_by_a_made_up_word():
    lexicon = shapes.make_lexicon(random.Random(0), 20, 8)
    made_up = [*lexicon.colours, *lexicon.shapes]
    assert len(set(made_up)) == 28 and not set(made_up) & (GRAMMAR_WORDS | shapes.NOT_MADE_UP)
    assert {kind for kind, _, _ in lexicon.shapes.values()} <= set(shapes.LEXICON_SHAPES)
    rng, modes = random.Random(1), set()
    for _ in range(90):
        caption, image = shapes.lexicon_scene(rng, lexicon, 8, 4)
        words = caption.split()
        colour, shape = words[1], words[2]
        assert words[0] == shapes.article(colour)
        assert colour in lexicon.colours or colour in shapes.COLOURS
        assert shape in lexicon.shapes or shape in shapes.SHAPES
        modes.add((colour in lexicon.colours, shape in lexicon.shapes))
        # the rest is the grammar's: with the world's words put back, the caption parses
        shapes.parse_prompt(" ".join(["a", "red", "circle", *words[3:]]))
        rgb = lexicon.colours.get(colour) or shapes.COLOURS[colour]
        drawn = (image.astype(int) == rgb).all(-1)
        assert drawn.sum() >= 10, caption  # the object is drawn in the colour its word is bound to
        background = shapes.COLOURS.get(words[-2], shapes.GRAY) if words[-1] == "background" else shapes.GRAY
        assert (image.astype(int) == background).all(-1).sum() + drawn.sum() > 0.9 * image.shape[0] * image.shape[1]
        if colour in lexicon.colours:
            assert np.linalg.norm(np.subtract(rgb, background)) >= 60
    assert modes == {(True, False), (False, True), (True, True)}  # its colour, its shape, or both made up


@pytest.mark.unit
def test_a_lexicon_without_shape_words_names_only_colours_on_the_worlds_shapes():
    lexicon = shapes.make_lexicon(random.Random(0), 20, 0)
    assert len(lexicon.colours) == 20 and not lexicon.shapes
    rng, shapes_drawn = random.Random(2), set()
    for _ in range(60):
        caption, image = shapes.lexicon_scene(rng, lexicon, 8, 4)
        colour, shape = caption.split()[1:3]
        assert colour in lexicon.colours and shape in shapes.SHAPES, caption
        assert ((image.astype(int) == lexicon.colours[colour]).all(-1)).sum() >= 10, caption
        shapes_drawn.add(shape)
    assert shapes_drawn == set(shapes.SHAPES)  # triangles among them, in made-up colours
    check_recipe(PRESETS["lexicon"])  # a recipe may ask for no shape words, not for fewer
    with pytest.raises(ValueError, match=r"lexicon.shape_words must be a whole number of 0 or more, got -1"):
        check_recipe(override(PRESETS["lexicon"], "lexicon.shape_words=-1"))


@pytest.mark.integration
def test_a_finished_model_continues_with_its_recipes_lexicon_stage(trained, tmp_path, caplog):
    stage = UNetStage("unet-lexicon", 2, 1e-4, 1, V, True, lexicon=0.5)
    recipe = replace(with_stages(SMOKE, stage), lexicon=LexiconSpec(scenes=12, colour_words=3, shape_words=2))
    with caplog.at_level(logging.INFO, logger="imagecraft"):
        train(recipe, tmp_path / "m", tmp_path / "w", start=trained / "model", start_at="unet-lexicon")
    assert "encoded 12 lexicon scenes (3 made-up colour words, 2 shape words)" in caplog.text
    assert sorted(p.name for p in (tmp_path / "w").glob("unet*.pt")) == ["unet-lexicon.pt"]  # no earlier stage rerun
    before = StableDiffusionPipeline.from_pretrained(trained / "model")
    after = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert after.tokenizer.get_vocab() == before.tokenizer.get_vocab()
    for name in ("unet", "text_encoder", "vae"):
        old, new = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        gap = max((new[k].float() - old[k].float()).abs().max().item() for k in old)
        if name == "vae":
            assert gap == 0, "the VAE is the folder's"
        else:  # two small steps from the folder's weights, not from a fresh initialisation
            assert 0 < gap < 0.05, (name, gap)


@pytest.mark.integration
@pytest.mark.parametrize("args, message", [
    (["--start-at", "unet-two"], "--from and --start-at go together"),
    (["--from", "{model}", "--start-at", "unet-shape"], "no stage named 'unet-shape' to start at; this recipe's "
                                                        "stages: unet, unet-zsnr, unet-two"),
    (["--from", "{tmp}", "--start-at", "unet-two"], "not a model folder (no model_index.json)"),
])
def test_continuing_a_model_names_what_is_missing(trained, tmp_path, capsys, args, message):
    args = [a.format(model=trained / "model", tmp=tmp_path) for a in args]
    assert main(["--output", str(tmp_path / "m"), "--work", str(tmp_path / "w"), "--recipe", "smoke", *args]) == 2
    assert message in capsys.readouterr().err
