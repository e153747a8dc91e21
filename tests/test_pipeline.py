"""The text-to-image pipeline against diffusers' StableDiffusionPipeline on the same tiny random folder."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from imagecraft.loading import ModelLoadError
from imagecraft.png import parse_a1111_parameters
from imagecraft.pipeline import ImageCraftPipeline
from imagecraft.settings import DEFAULT_GUIDANCE
from imagecraft.runtime import check_device, default_device, native_bf16, resolve_dtype
from imagecraft.schedulers import SCHEDULERS, make_scheduler


@pytest.fixture(scope="module")
def folder(tiny_sd1):
    return tiny_sd1  # the session's tiny pipeline, read and never changed


@pytest.fixture(scope="module")
def pipe(tiny_sd1_pipe):
    return tiny_sd1_pipe


@pytest.fixture(scope="module")
def reference(folder):
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def pixels(image):
    return np.asarray(image).astype(np.float64)


def diffusers_images(reference, scheduler, prompt, negative, seeds, steps, guidance, size=64):
    reference.scheduler = make_scheduler(scheduler, reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return reference(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                     generator=generators, num_images_per_prompt=len(seeds), height=size, width=size).images


@pytest.mark.unit
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_same_image_as_diffusers(pipe, reference, scheduler):
    ours = pipe("a red circle on the left", negative_prompt="a blue square", seed=11, num_inference_steps=6,
                guidance_scale=6.0, scheduler=scheduler)
    theirs = diffusers_images(reference, scheduler, "a red circle on the left", "a blue square", [11], 6, 6.0)
    assert ours.seeds == [11]
    assert pixels(ours.images[0]).std() > 5  # a real image, not a flat one
    assert np.abs(pixels(ours.images[0]) - pixels(theirs[0])).mean() <= 1.0


@pytest.fixture(scope="module")
def v_folder(tiny_v_zsnr):
    return tiny_v_zsnr


@pytest.fixture(scope="module")
def v_pipe(v_folder):
    return ImageCraftPipeline.from_pretrained(v_folder, dtype="fp32")


@pytest.fixture(scope="module")
def v_reference(v_folder):
    return StableDiffusionPipeline.from_pretrained(v_folder, safety_checker=None)


@pytest.mark.unit
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_v_prediction_zero_snr_model_matches_diffusers(v_pipe, v_reference, scheduler):
    """The built-in model's kind of schedule: v-prediction on betas rescaled to zero terminal SNR, every sampler."""
    ours = v_pipe("a red circle", seed=4, num_inference_steps=6, guidance_scale=5.0, scheduler=scheduler)
    assert np.isfinite(pixels(ours.images[0])).all() and pixels(ours.images[0]).std() > 5
    if scheduler == "dpm++2m_karras":
        # diffusers' pipeline fails here (its Karras timesteps repeat t=999 and its step lookup runs past the end);
        # ours starts at step 0 explicitly. Where diffusers works, the images must agree.
        try:
            theirs = diffusers_images(v_reference, scheduler, "a red circle", "", [4], 6, 5.0)
        except IndexError:
            return
    else:
        theirs = diffusers_images(v_reference, scheduler, "a red circle", "", [4], 6, 5.0)
    assert np.abs(pixels(ours.images[0]) - pixels(theirs[0])).mean() <= 1.0


@pytest.fixture(scope="module")
def builtin_pipe():
    return ImageCraftPipeline.from_pretrained(dtype="fp32")  # an Euler a config: no skip_prk_steps, v-prediction, zero SNR


@pytest.mark.integration
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_works_at_one_to_three_steps(pipe, reference, v_pipe, builtin_pipe, scheduler, steps):
    """PLMS failed below 4 steps wherever the model's config lacked skip_prk_steps=True (the built-in model's):
    PNDM's Runge-Kutta warm-up needs 4. Every sampler runs at 1-3 steps on a PNDM config (as diffusers does),
    a DPM-Solver v/zero-SNR config and the built-in model's Euler a config."""
    ours = pipe("a red circle", seed=3, num_inference_steps=steps, scheduler=scheduler)
    theirs = diffusers_images(reference, scheduler, "a red circle", "", [3], steps, DEFAULT_GUIDANCE)
    assert np.abs(pixels(ours.images[0]) - pixels(theirs[0])).mean() <= 1.0
    for other in (v_pipe, builtin_pipe):
        last = []
        image = other("a red circle", seed=3, num_inference_steps=steps, scheduler=scheduler,
                      callback=lambda step, total, latents: last.append(latents)).images[0]
        assert torch.isfinite(last[-1]).all() and image.size == (other.default_size, other.default_size)


@pytest.mark.unit
def test_zero_snr_betas_reach_schedulers_without_the_option(v_folder):
    """PLMS and LMS cannot rescale betas themselves: they get the rescaled betas diffusers' DPM-Solver computes."""
    config = json.loads((v_folder / "scheduler" / "scheduler_config.json").read_text())
    dpm = make_scheduler("dpm++2m", config)
    for name in ("pndm", "lms"):
        scheduler = make_scheduler(name, config)
        torch.testing.assert_close(scheduler.alphas_cumprod, dpm.alphas_cumprod, rtol=0, atol=1e-6)
        assert scheduler.config.prediction_type == "v_prediction"
    assert dpm.alphas_cumprod[-1] == 2.0**-24  # nearly pure noise at t=999, as diffusers clamps it


@pytest.mark.unit
def test_batch_matches_diffusers_and_single_calls(pipe, reference):
    batch = pipe("a green triangle", seed=100, num_images=3, num_inference_steps=5, scheduler="euler_a")
    assert batch.seeds == [100, 101, 102]
    theirs = diffusers_images(reference, "euler_a", "a green triangle", "", [100, 101, 102], 5, DEFAULT_GUIDANCE)
    for i, seed in enumerate(batch.seeds):
        single = pipe("a green triangle", seed=seed, num_inference_steps=5, scheduler="euler_a")
        assert np.abs(pixels(batch.images[i]) - pixels(single.images[0])).mean() <= 1.0
        assert np.abs(pixels(batch.images[i]) - pixels(theirs[i])).mean() <= 1.0
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).mean() > 1.0  # different seeds differ


@pytest.mark.unit
def test_same_call_twice_is_identical(pipe):
    a = pipe("a purple circle", seed=5, num_inference_steps=4, scheduler="dpm++2m_karras")
    b = pipe("a purple circle", seed=5, num_inference_steps=4, scheduler="dpm++2m_karras")
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


@pytest.mark.unit
def test_empty_prompt_and_no_guidance(pipe, reference):
    ours = pipe("", seed=2, num_inference_steps=4, guidance_scale=1.0, scheduler="ddim")
    theirs = diffusers_images(reference, "ddim", "", "", [2], 4, 1.0)
    assert np.abs(pixels(ours.images[0]) - pixels(theirs[0])).mean() <= 1.0


@pytest.mark.unit
def test_callback_runs_once_per_step(pipe):
    calls = []
    pipe("a red square", seed=1, num_inference_steps=7, scheduler="euler",
         callback=lambda step, total, latents: calls.append((step, total, tuple(latents.shape))))
    assert calls == [(i, 7, (1, 4, 16, 16)) for i in range(7)]


@pytest.mark.unit
@pytest.mark.parametrize("kwargs, match", [
    (dict(width=100), "width must be a multiple of 8 between 64 and 2048, got 100"),
    (dict(height=4096), "height must be a multiple of 8 between 64 and 2048, got 4096"),
    (dict(num_inference_steps=0), "steps must be an integer from 1 to 150, got 0"),
    (dict(num_inference_steps=151), "steps must be an integer from 1 to 150, got 151"),
    (dict(guidance_scale=-1.0), "guidance scale must be a number from 0 to 30, got -1.0"),
    (dict(guidance_scale=float("nan")), "guidance scale must be a number from 0 to 30, got nan"),
    (dict(guidance_scale=35.0), "guidance scale must be a number from 0 to 30, got 35.0"),
    (dict(scheduler="karras_magic"), "unknown scheduler 'karras_magic'; valid names are ddim, euler, euler_a"),
    (dict(seed=-3), "seed must be an integer from 0 to"),
    (dict(num_images=0), "number of images must be from 1 to 16, got 0"),
])
def test_bad_settings_get_clear_messages(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", **kwargs)


@pytest.mark.unit
def test_png_metadata_reproduces_the_image(pipe, tmp_path):
    result = pipe("a white square at the top", negative_prompt="black", seed=9, num_inference_steps=5,
                  guidance_scale=5.0, scheduler="dpm++2m")
    path = result.save(tmp_path / "out.png")[0]
    png = Image.open(path)
    text = png.text["parameters"]
    assert text.startswith("a white square at the top\nNegative prompt: black\n")
    assert "Steps: 5, Sampler: DPM++ 2M, CFG scale: 5, Seed: 9, Size: 64x64, Model hash: " in text
    record = json.loads(png.text["imagecraft"])
    assert record["scheduler_config"]["_class_name"] == "DPMSolverMultistepScheduler"
    assert record["model_hash"] == pipe.model_hash and len(record["model_hash"]) == 10
    assert set(record["versions"]) >= {"torch", "diffusers", "transformers", "imagecraft"}

    again = pipe.reproduce(path)
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[0]))

    a1111 = parse_a1111_parameters(text)  # the text alone, as another tool would write it
    assert a1111 == dict(prompt="a white square at the top", negative_prompt="black", num_inference_steps=5,
                         guidance_scale=5.0, seed=9, width=64, height=64, scheduler="dpm++2m",
                         model=record["model"])


@pytest.mark.unit
def test_bf16_runs_and_stays_close(pipe, folder):
    bf16 = ImageCraftPipeline.from_pretrained(folder, dtype="bf16")
    a = pipe("a red circle", seed=4, num_inference_steps=4)
    b = bf16("a red circle", seed=4, num_inference_steps=4)
    assert bf16.unet.out[2].weight.dtype == torch.bfloat16
    assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).mean() < 8


@pytest.mark.integration
def test_missing_and_corrupt_folders_are_named(folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "vae" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"vae/config.json is missing"):
        ImageCraftPipeline.from_pretrained(broken)

    shutil.copy(folder / "vae" / "config.json", broken / "vae" / "config.json")
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"diffusion_pytorch_model.safetensors is not a readable safetensors"):
        ImageCraftPipeline.from_pretrained(broken)

    weights.unlink()
    torch.save({"x": torch.zeros(1)}, broken / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle file, and unpickling can run arbitrary code"):
        ImageCraftPipeline.from_pretrained(broken)

    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        ImageCraftPipeline.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no model folder or file at './nowhere'"):
        ImageCraftPipeline.from_pretrained("./nowhere")


@pytest.mark.integration
def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no network .* not in the local cache"):
        ImageCraftPipeline.from_pretrained("someone/not-cached-model")


@pytest.mark.integration
def test_single_file_checkpoint_matches_the_folder(folder, pipe, tmp_path):
    from helpers import diffusers_vae_to_ldm
    from safetensors.torch import save_file

    checkpoint = {"model.diffusion_model." + k: v.contiguous() for k, v in pipe.unet.state_dict().items()}
    checkpoint.update(diffusers_vae_to_ldm(pipe.vae.state_dict()))
    checkpoint.update({"cond_stage_model.transformer." + k: v for k, v in pipe.text_encoder.state_dict().items()})
    checkpoint["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    save_file(checkpoint, tmp_path / "tiny.safetensors")

    single = ImageCraftPipeline.from_pretrained(tmp_path / "tiny.safetensors", config=folder, dtype="fp32")
    a = single("a blue circle", seed=3, num_inference_steps=4, scheduler="ddim")
    b = pipe("a blue circle", seed=3, num_inference_steps=4, scheduler="ddim")
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))

    with pytest.raises(ModelLoadError, match="pass config= a diffusers folder"):
        ImageCraftPipeline.from_pretrained(tmp_path / "tiny.safetensors")
    save_file(dict(checkpoint, **{"lora_unet_down.alpha": torch.zeros(1)}), tmp_path / "odd.safetensors")
    with pytest.raises(ModelLoadError, match=r"1 unknown keys, e.g. \['lora_unet_down.alpha'\]"):
        ImageCraftPipeline.from_pretrained(tmp_path / "odd.safetensors", config=folder)
    torch.save(checkpoint, tmp_path / "tiny.ckpt")
    with pytest.raises(ModelLoadError, match="pickle file"):
        ImageCraftPipeline.from_pretrained(tmp_path / "tiny.ckpt", config=folder)


@pytest.mark.unit
def test_dtype_names_and_a_warning_for_emulated_bf16():
    import warnings

    native = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert resolve_dtype(None, "cpu") == resolve_dtype("auto", "cpu") == native  # bf16 only where it is native
    assert resolve_dtype(None, "cuda:0") == torch.float16 and resolve_dtype("auto", "mps") == torch.float32
    with warnings.catch_warnings(record=True) as caught:
        resolve_dtype("auto", "cpu")
        assert not caught  # auto never picks emulated bf16
        warnings.simplefilter("always")
        assert resolve_dtype("bf16", "cpu") == torch.bfloat16
        assert resolve_dtype("fp32", "cpu") == torch.float32
    emulated = [w for w in caught if "bf16 on this CPU is emulated" in str(w.message)]
    assert len(emulated) == (0 if native_bf16() else 1)  # warned exactly when the CPU lacks AMX / AVX-512 bf16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; use one of auto, fp32, bf16, fp16"):
        resolve_dtype("fp8", "cpu")


@pytest.mark.unit
@pytest.mark.parametrize("device, match", [
    ("bogus", r"device must be cpu, cuda, cuda:N or mps, got 'bogus'"),
    ("CPU", r"device must be cpu, cuda, cuda:N or mps, got 'CPU'"),
    ("cuda:-1", r"device must be cpu, cuda, cuda:N or mps, got 'cuda:-1'"),
    (0, r"device must be cpu, cuda, cuda:N or mps, got 0"),
    ("cuda:99", r"device 'cuda:99' (needs CUDA, which is not available|does not exist)"),
])
def test_devices_are_checked_before_loading(tmp_path, device, match):
    """A bad device fails in a sentence before any weights load: the model here does not even exist."""
    assert check_device("cpu") == "cpu" and check_device(torch.device("cpu")) == "cpu"
    assert check_device(None) == default_device()
    with pytest.raises(ValueError, match=match):
        ImageCraftPipeline.from_pretrained(tmp_path / "no-such-model", device=device)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' needs CUDA, which is not available on this machine"):
            check_device("cuda")


@pytest.mark.unit
def test_odd_arguments_get_sentences(pipe, tmp_path):
    from imagecraft.pipeline import output_path

    with pytest.raises(ValueError, match=r"callback must be a function of \(step, total, latents\)"):
        pipe("a red circle", num_inference_steps=1, callback=5)
    with pytest.raises(ValueError, match=r"callback must be a function of \(step, total, latents\)"):
        pipe("a red circle", num_inference_steps=1, callback=lambda: None)
    for source in (5, ["a"], "a" * 999, "~nosuchuser/x"):
        with pytest.raises(ModelLoadError):
            ImageCraftPipeline.from_pretrained(source)
    for dtype in ([1], torch.int8, "fp8"):
        with pytest.raises(ValueError, match="unknown dtype"):
            ImageCraftPipeline.from_pretrained(dtype=dtype)
    for pattern in ("x{foo}.png", "x{0}.png", "x{seed.real}{.png"):
        with pytest.raises(ValueError, match=r"may use \{seed\} and \{i\}"):
            output_path(pattern)
    assert output_path("out-{seed}-{i}.png", 2, 7, 3) == "out-7-2.png" and output_path("a.png", 1, 0, 2) == "a-1.png"
    with pytest.raises(ValueError, match="is a folder, not a PNG file"):
        pipe.reproduce(tmp_path)


@pytest.mark.integration
def test_deepcache_is_exact_when_off_and_keeps_the_layout_when_on(builtin_pipe, tmp_path):
    from imagecraft import shapes

    prompts = ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
               "a yellow circle at the bottom"]
    plain = builtin_pipe(prompts, seed=11, num_inference_steps=20, guidance_scale=5.0)
    for off in (None, 1):
        same = builtin_pipe(prompts, seed=11, num_inference_steps=20, guidance_scale=5.0, cache_interval=off)
        assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(plain.images, same.images))
        assert "cache_interval" not in same.records[0]
    cached = builtin_pipe(prompts, seed=11, num_inference_steps=20, guidance_scale=5.0, cache_interval=2)
    diff = np.mean([np.abs(pixels(a) - pixels(b)).mean() for a, b in zip(plain.images, cached.images)])
    assert 0 < diff < 10  # of 255: the same pictures, not the same pixels
    for image, prompt in zip(cached.images, prompts):
        result = shapes.score(image, prompt)
        assert result["colour"] and result["position"] and result["background"]
    paths = cached.save(tmp_path / "c.png")
    assert json.loads(Image.open(paths[0]).text["imagecraft"])["cache_interval"] == 2
    one = builtin_pipe(prompts[0], seed=11, num_inference_steps=20, guidance_scale=5.0, cache_interval=2)
    again = builtin_pipe.reproduce(one.save(tmp_path / "one.png")[0])  # the PNG restores the caching: exact
    assert np.array_equal(pixels(again.images[0]), pixels(one.images[0]))
    with pytest.raises(ValueError, match="attention maps need every layer at every step"):
        builtin_pipe("a red circle", cache_interval=3, attention=True)
    for bad in (0, 2.5, "3", True, 151):
        with pytest.raises(ValueError, match="cache_interval must be a whole number from 1 \\(no caching\\) to 150"):
            builtin_pipe("a red circle", cache_interval=bad)


@pytest.mark.integration
def test_auto_dtype_is_the_default_with_the_vae_in_fp32(builtin_pipe, tmp_path):
    auto = ImageCraftPipeline.from_pretrained()
    expected = torch.bfloat16 if native_bf16() else torch.float32
    assert auto.dtype == expected and next(auto.unet.parameters()).dtype == expected
    assert next(auto.text_encoder.parameters()).dtype == expected
    assert next(auto.vae.parameters()).dtype == torch.float32
    prompts = ["a red circle on the left", "a blue square above a green triangle"]
    a = auto(prompts, seed=2, num_inference_steps=15, guidance_scale=5.0)
    b = builtin_pipe(prompts, seed=2, num_inference_steps=15, guidance_scale=5.0)  # fp32
    assert np.mean([np.abs(pixels(x) - pixels(y)).mean() for x, y in zip(a.images, b.images)]) < 3  # of 255
    path = a.save(tmp_path / "a.png")[0]
    assert json.loads(Image.open(path).text["imagecraft"])["dtype"] == str(expected).replace("torch.", "")


@pytest.mark.integration
def test_loading_warns_nothing(caplog):
    """diffusers warns "There are modules in AutoencoderKL that should be kept in float32: []" on every dtype cast
    of its models; the pipeline casts its VAE without one."""
    import logging

    with caplog.at_level(logging.WARNING):
        ImageCraftPipeline.from_pretrained(None)
    assert not [r.getMessage() for r in caplog.records if "kept in float32" in r.getMessage()]
