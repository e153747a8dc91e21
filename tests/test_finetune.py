"""Fine-tuning on tiny models: LoRA files plain diffusers loads with the same images, kohya copies, resume after
SIGKILL and Ctrl-C, data folders of every kind, bad input named, and DDP equal to one process."""

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagecraft import lora, shapes
from imagecraft.train.core import load_checkpoint
from imagecraft.train.data import CLASS_SEED, extract_zip, find_examples, load_image
from imagecraft.train.finetune import TrainingError, finetune
from imagecraft.train.recipe import FinetuneRecipe as Recipe, check_recipe
from imagecraft.pipeline import ImageCraftPipeline

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(steps=6, checkpoint_every=3, eval_every=3, preview_every=0, preview_steps=2, batch_size=2)


@pytest.fixture(scope="module")
def model(tiny_sd1):
    return tiny_sd1  # the session's tiny pipeline, read and never changed: outputs go to tmp_path


def write_data(folder: Path, n: int = 6, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        _, prompt, image, _ = shapes.sample_scene(rng)
        Image.fromarray(image).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(prompt)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def random_lora(pipe, rank=4, alpha=8.0, seed=0):
    """A LoRA with non-trivial weights on the UNet's attention and the text encoder, as if trained."""
    torch.manual_seed(seed)
    lora.add_lora(pipe.unet, lora.unet_targets(pipe.unet), rank, alpha)
    lora.add_lora(pipe.text_encoder, lora.target_names(pipe.text_encoder, lora.TEXT_TARGETS), rank, alpha)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for layer in lora.lora_layers(model).values():
                for p in (layer.lora_A["lora"].weight, layer.lora_B["lora"].weight):
                    p.copy_(torch.randn_like(p) * 0.3)


def images(pipe, prompt="a red circle on the left"):
    return np.asarray(pipe(prompt, seed=3, num_inference_steps=4, guidance_scale=5.0).images[0], float) / 255


def diffusers_images(pipe, prompt="a red circle on the left"):
    return pipe(prompt, generator=torch.Generator().manual_seed(3), num_inference_steps=4, guidance_scale=5.0,
                height=64, width=64, output_type="np").images[0]


@pytest.mark.integration
def test_our_lora_file_gives_plain_diffusers_the_same_images(model, tmp_path):
    from diffusers import StableDiffusionPipeline

    ours = ImageCraftPipeline.from_pretrained(model, dtype="fp32")
    base = images(ours)
    random_lora(ours, rank=4, alpha=8.0)  # alpha != rank: diffusers must read alpha from the metadata
    with_lora = images(ours)
    files = lora.save(tmp_path, ours.unet, ours.text_encoder)
    assert [f.name for f in files] == [lora.WEIGHT_NAME, lora.KOHYA_NAME]
    theirs = StableDiffusionPipeline.from_pretrained(model)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(tmp_path)
    effect = np.abs(with_lora - base).mean()
    assert effect > 0.02  # the LoRA changes the image a lot
    assert np.abs(diffusers_images(theirs) - with_lora).mean() < effect / 50
    # loading our file, and the kohya copy, into a fresh pipeline gives the same image again; unloading, the base
    fresh = ImageCraftPipeline.from_pretrained(model, dtype="fp32")
    info = fresh.load_lora(tmp_path)
    assert info["scale"] == 1.0 and info["name"] == tmp_path.name and len(info["hash"]) == 10
    assert np.abs(images(fresh) - with_lora).max() < 1e-6
    fresh.load_lora(tmp_path / lora.KOHYA_NAME)
    assert np.abs(images(fresh) - with_lora).max() < 1e-6
    fresh.set_lora_scale(0.0)
    assert np.abs(images(fresh) - base).max() < 1e-6
    fresh.set_lora_scale(0.5)
    half = images(fresh)
    assert np.abs(half - base).mean() > 0.2 * effect and np.abs(half - with_lora).mean() > 0.1 * effect
    fresh.unload_lora()
    assert fresh.lora is None and np.array_equal(images(fresh), base)
    assert not any("lora" in name for name, _ in fresh.unet.named_modules())


@pytest.mark.integration
def test_kohya_file_names_diffusers_modules_and_keeps_alpha(model, tmp_path):
    from safetensors.torch import load_file

    pipe = ImageCraftPipeline.from_pretrained(model)
    random_lora(pipe, rank=4, alpha=2.0)
    lora.save(tmp_path, pipe.unet, pipe.text_encoder)
    kohya = load_file(tmp_path / lora.KOHYA_NAME)
    peft = load_file(tmp_path / lora.WEIGHT_NAME)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert torch.equal(kohya[f"{stem}.lora_down.weight"],
                       peft["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"])
    assert float(kohya[f"{stem}.alpha"]) == 2.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    assert len(kohya) == 3 * len(peft) // 2


@pytest.mark.integration
def test_foreign_lora_files_are_refused_by_name(model, tmp_path):
    from safetensors.torch import save_file

    pipe = ImageCraftPipeline.from_pretrained(model)
    cases = {
        "lycoris.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)},
                                "LyCORIS"),
        "sdxl.safetensors": ({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight":
                              torch.zeros(4, 32),
                              "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight":
                              torch.zeros(32, 4)}, "not in the model"),
        "other.safetensors": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
                               torch.zeros(4, 320),
                               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight":
                               torch.zeros(320, 4)}, "does not fit this model"),
        "junk.safetensors": ({"model.weight": torch.zeros(2)}, "not LoRA weights"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(lora.LoraError, match=message):
            pipe.load_lora(tmp_path / name)
    (tmp_path / "weights.pt").write_bytes(b"pickle")
    with pytest.raises(lora.LoraError, match="safetensors only"):
        pipe.load_lora(tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="scale must be a number from -4 to 4"):
        pipe.load_lora(tmp_path / "junk.safetensors", scale=float("nan"))
    assert pipe.lora is None and not lora.lora_layers(pipe.unet)  # nothing half-applied


@pytest.mark.integration
def test_lora_training_writes_everything_and_resumes(model, data, tmp_path):
    out = tmp_path / "out"
    result = finetune(model, data, out, Recipe(**QUICK), show_bar=False)
    assert result.step == 6 and not result.stopped
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md", "loss.csv", "loss.png",
                 "previews/step-000006.png", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,fixed_batch_loss" and [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, 7))
    assert [bool(r.split(",")[3]) for r in rows[1:]] == [False, False, True, False, False, True]
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "6 training images" in card
    recipe = Recipe(**QUICK)
    assert f"| lr | {recipe.peak_lr} |" in card and f"| alpha | {recipe.lora_alpha} |" in card  # as used, not None
    snippet = card.split("```python\n")[2].split("```")[0].replace("THIS_FOLDER", str(out))
    scope = {}
    exec(snippet, scope)  # the card's ImageCraft snippet, as copied: its base model loads and the LoRA applies
    assert scope["pipe"].lora["name"] == out.name
    preview = Image.open(out / "previews/step-000006.png")
    assert preview.size[0] >= 3 * 192  # base, LoRA 0.5, LoRA 1; the prompts above their rows
    # the same command again: nothing to train, the same result
    from safetensors.torch import load_file

    before = load_file(out / lora.WEIGHT_NAME)
    again = finetune(model, data, out, Recipe(**QUICK), show_bar=False)
    assert again.step == 6 and len(again.history) == 6
    after = load_file(out / lora.WEIGHT_NAME)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # more steps continue from the checkpoint and give what one longer run gives
    longer = finetune(model, data, out, Recipe(**dict(QUICK, steps=9)), show_bar=False)
    straight = finetune(model, data, tmp_path / "straight", Recipe(**dict(QUICK, steps=9)), show_bar=False)
    assert [h[1] for h in longer.history] == pytest.approx([h[1] for h in straight.history], rel=1e-5)


@pytest.mark.integration
def test_held_out_loss_is_deterministic(model, data, tmp_path):
    a = finetune(model, data, tmp_path / "a", Recipe(**QUICK), show_bar=False)
    b = finetune(model, data, tmp_path / "b", Recipe(**QUICK), show_bar=False)
    assert [h[3] for h in a.history] == [h[3] for h in b.history]  # same seed, same everything
    c = finetune(model, data, tmp_path / "c", Recipe(**dict(QUICK, seed=1)), show_bar=False)
    held = [h[3] for h in c.history if h[3] is not None]
    assert held != [h[3] for h in a.history if h[3] is not None]


@pytest.mark.integration
def test_stop_saves_a_checkpoint_and_the_rerun_resumes(model, data, tmp_path):
    calls = []
    result = finetune(model, data, tmp_path, Recipe(**dict(QUICK, steps=8, checkpoint_every=100)),
                      should_stop=lambda: len(calls) >= 3, progress=lambda *a: calls.append(a), show_bar=False)
    assert result.stopped and result.step == 3
    assert not (tmp_path / lora.WEIGHT_NAME).exists()
    rest = finetune(model, data, tmp_path, Recipe(**dict(QUICK, steps=8, checkpoint_every=100)), show_bar=False)
    assert rest.step == 8 and [h[0] for h in rest.history] == list(range(1, 9))


@pytest.mark.integration
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(model, data, tmp_path):
    def poison(step, steps, loss):  # weights turned to NaN after step 4, as a diverging run does
        if step == 4:
            pipe_unet = poison.unet
            for layer in lora.lora_layers(pipe_unet).values():
                layer.lora_B["lora"].weight.data.fill_(float("nan"))

    import imagecraft.train.finetune as ft

    original = ft.lora_lib.add_lora

    def remember(model, *a, **k):  # catches the UNet the run trains, to poison it
        out = original(model, *a, **k)
        if hasattr(model, "input_blocks"):
            poison.unet = model
        return out

    ft.lora_lib.add_lora = remember
    try:
        with pytest.raises(TrainingError, match="loss became nan at step 5.*last good checkpoint \\(step 3\\)"):
            finetune(model, data, tmp_path, Recipe(**dict(QUICK, steps=8)), progress=poison, show_bar=False)
    finally:
        ft.lora_lib.add_lora = original
    state = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert state["step"] == 3 and all(torch.isfinite(b).all() for _, b in state["state"]["lora"]["unet"].values())


@pytest.mark.integration
def test_sigkill_mid_run_then_rerun_continues_the_curve(model, data, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "imagecraft", "finetune", "--model", str(model), "--data", str(data),
               "--output", str(out), "--steps", "400", "--checkpoint-every", "2", "--preview-every", "0",
               "--batch-size", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoint = out / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        state = torch.load(checkpoint, weights_only=True) if checkpoint.exists() else None
        if state and state["step"] >= 6:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # mid-step, maybe mid-save
    process.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["step"]  # a whole checkpoint, never a torn one
    assert 6 <= killed_at < 400
    assert not list(out.glob("*.safetensors"))
    resumed = subprocess.run([str(killed_at + 4) if c == "400" else c for c in command], capture_output=True,
                             text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {killed_at}" in resumed.stderr
    steps = [int(r.split(",")[0]) for r in (out / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, killed_at + 5))


@pytest.mark.integration
def test_full_finetune_writes_a_model_plain_diffusers_loads(model, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = finetune(model, data, tmp_path, Recipe(**dict(QUICK, method="full", steps=3, lr=1e-3)),
                      show_bar=False)
    assert result.step == 3
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path)
    theirs.set_progress_bar_config(disable=True)
    ours = ImageCraftPipeline.from_pretrained(tmp_path, dtype="fp32")
    base = ImageCraftPipeline.from_pretrained(model, dtype="fp32")
    tuned = images(ours)
    assert np.abs(tuned - images(base)).mean() > 1e-4  # the UNet changed
    assert np.abs(diffusers_images(theirs) - tuned).mean() < 2e-3


@pytest.mark.integration
def test_two_processes_train_as_one_with_the_same_global_batch(model, data, tmp_path):
    from safetensors.torch import load_file

    common = ["--model", str(model), "--data", str(data), "--steps", "4", "--precision", "fp32",
              "--preview-every", "0", "--checkpoint-every", "100",  # with prior preservation, its images split
              "--class-prompt", "a blue square", "--class-prompt", "a green triangle", "--class-images", "5"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "imagecraft.train.finetune", *common, "--output", str(tmp_path / "one"),
                          "--batch-size", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "imagecraft.train.finetune",
                          *common, "--output", str(tmp_path / "two"), "--batch-size", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "training on 2 processes" in two.stderr
    for i in range(5):  # process 0 drew images 0-1, process 1 images 2-4: the same as one process drew
        name = f"cache/class-images/{i:04d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / name)),
                              np.asarray(Image.open(tmp_path / "two" / name))), name
    a, b = load_file(tmp_path / "one" / lora.WEIGHT_NAME), load_file(tmp_path / "two" / lora.WEIGHT_NAME)
    moved = max((a[k] - b[k]).abs().max().item() for k in a if "lora_B" in k)
    size = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert moved < 1e-3 * size


# --- data ----------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_captions_from_txt_files_jsonl_and_csv_in_nested_folders(tmp_path):
    write_data(tmp_path / "kohya" / "sub", n=2)
    found = find_examples(tmp_path / "kohya")
    assert [e.path.name for e in found] == ["0.png", "1.png"] and all(e.caption.startswith("a") for e in found)
    folder = write_data(tmp_path / "hf", n=3)
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"caption {i}"})
                                                     for i in range(3)))
    assert [e.caption for e in find_examples(folder)] == ["caption 0", "caption 1", "caption 2"]
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,text\n0.png,\"a, b\"\n")
    assert [e.caption for e in find_examples(folder)] == ["a, b"]


@pytest.mark.unit
@pytest.mark.parametrize("setup, message", [
    (lambda f: None, "no images in"),
    (lambda f: Image.new("RGB", (8, 8)).save(f / "a.png"), "1 of 1 images have no caption \\(a.png\\)"),
    (lambda f: (f / "metadata.jsonl").write_text('{"file_name": "../x.png", "text": "t"}'), "outside the data"),
    (lambda f: (f / "metadata.jsonl").write_text('{"file_name": "x.png"}'), "no caption"),
])
def test_bad_data_folders_are_named(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ValueError, match=message):
        find_examples(tmp_path)


@pytest.mark.integration
def test_broken_and_huge_images_are_named_before_training(model, tmp_path):
    folder = write_data(tmp_path / "data", n=2)
    (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="0.png is not an image that can be read"):  # its header, at once
        finetune(model, folder, tmp_path / "out", Recipe(**QUICK), show_bar=False)
    Image.new("L", (8000, 6000)).save(folder / "0.png")  # 48 MP
    with pytest.raises(ValueError, match="8000 x 6000 px; at most 40 megapixels"):
        load_image(folder / "0.png", 64)


@pytest.mark.unit
def test_image_modes_and_exif_rotation(tmp_path):
    rgba = Image.new("RGBA", (80, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 40, 64))
    rgba.save(tmp_path / "rgba.png")
    out = np.asarray(load_image(tmp_path / "rgba.png", 64))
    assert out.shape == (64, 64, 3)
    assert tuple(out[32, 2]) == (0, 0, 255) and tuple(out[32, 60]) == (255, 255, 255)  # transparent -> white
    Image.fromarray((np.ones((64, 64)) * 65535 * 0.5).astype(np.uint16)).save(tmp_path / "sixteen.png")
    assert abs(int(np.asarray(load_image(tmp_path / "sixteen.png", 64))[0, 0, 0]) - 127) <= 1
    Image.new("P", (64, 64), 3).save(tmp_path / "palette.png")
    assert np.asarray(load_image(tmp_path / "palette.png", 64)).shape == (64, 64, 3)
    stored = Image.new("RGB", (64, 64), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 64, 16))  # white along the top, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(tmp_path / "rotated.jpg", 64)).mean(axis=(0, 2))
    assert upright[-8:].mean() > 200 and upright[:8].mean() < 60  # the white band is on the right once rotated


@pytest.mark.unit
def test_zip_upload_is_unpacked_safely(tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, "PNG")
        z.writestr("pics/a.png", buffer.getvalue())
        z.writestr("pics/a.txt", "a caption")
        z.writestr("run.sh", "rm -rf /")
    extract_zip(good, tmp_path / "x")
    assert sorted(p.name for p in (tmp_path / "x").rglob("*") if p.is_file()) == ["a.png", "a.txt"]
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../escape.txt", "x")
    with pytest.raises(ValueError, match="points outside"):
        extract_zip(evil, tmp_path / "y")
    assert not (tmp_path / "escape.txt").exists()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", b"\0" * (50 << 20))
    with pytest.raises(ValueError, match="zip bomb"):
        extract_zip(bomb, tmp_path / "z")


@pytest.mark.integration
def test_prior_preservation_trains_on_the_base_models_own_images(model, data, tmp_path):
    prior = dict(QUICK, class_prompts=("a blue square", "a green triangle on the left"), class_images=3)
    out = tmp_path / "out"
    result = finetune(model, data, out, Recipe(**prior), show_bar=False)
    folder = out / "cache" / "class-images"
    made = find_examples(folder)
    assert [ex.caption for ex in made] == ["a blue square", "a green triangle on the left", "a blue square"]
    base = ImageCraftPipeline.from_pretrained(model, dtype="fp32")  # image i: the base model with seed CLASS_SEED + i
    for i, ex in enumerate(made):
        expected = base(ex.caption, seed=CLASS_SEED + i, num_inference_steps=QUICK["preview_steps"],
                        guidance_scale=5.0).images[0]
        assert np.array_equal(np.asarray(Image.open(ex.path)), np.asarray(expected)), ex.path
    plain = finetune(model, data, tmp_path / "plain", Recipe(**QUICK), show_bar=False)
    assert [h[1] for h in result.history] != [h[1] for h in plain.history]  # they are trained on
    # a stopped run resumes with the same images (not made again) and ends as the straight run did
    stopped = tmp_path / "stopped"
    calls = []
    finetune(model, data, stopped, Recipe(**dict(prior, checkpoint_every=100)), should_stop=lambda: len(calls) >= 2,
             progress=lambda *a: calls.append(a), show_bar=False)
    made_at = (stopped / "cache" / "class-images" / "0000.png").stat().st_mtime_ns
    rest = finetune(model, data, stopped, Recipe(**dict(prior, checkpoint_every=100)), show_bar=False)
    assert (stopped / "cache" / "class-images" / "0000.png").stat().st_mtime_ns == made_at
    assert [h[1] for h in rest.history] == pytest.approx([h[1] for h in result.history], rel=1e-5)
    # other class prompts are another objective: refused before anything is made, the images kept
    made_at = (folder / "0000.png").stat().st_mtime_ns
    with pytest.raises(ValueError, match="was trained with"):
        finetune(model, data, out, Recipe(**dict(prior, class_prompts=("a red circle",), steps=9)), show_bar=False)
    assert (folder / "0000.png").stat().st_mtime_ns == made_at and (folder / "key.txt").is_file()
    # Stop while the images are being made: nothing trained, and the rerun makes them and trains
    halted = finetune(model, data, tmp_path / "halted", Recipe(**dict(prior, class_images=9)),
                      should_stop=lambda: True, show_bar=False)
    halted_folder = tmp_path / "halted" / "cache" / "class-images"
    assert halted.stopped and halted.step == 0 and not (halted_folder / "key.txt").exists()
    done = finetune(model, data, tmp_path / "halted", Recipe(**dict(prior, class_images=9)), show_bar=False)
    assert done.step == 6 and len(find_examples(halted_folder)) == 9


# --- what a fine-tune teaches, and what it keeps ----------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("captions, words", [
    (["a sks dog on grass", "a photo of sks dog", "sks dog running", "a sks dog", "Sks Dog"], ["sks", "dog"]),
    (["a teal circle on the left", "a teal square", "an teal circle at the top", "a teal square", "a teal circle"],
     ["teal"]),
    (["a red circle", "a blue square", "a green triangle"], []),  # no word is in most captions
    (["a cat", "a cat", "a cat", "a cat", "a dog"], ["cat"]),  # 80% and more
    (["a cat", "a cat", "a cat", "a dog", "a dog"], []),  # 60%: shown sometimes, not taught
    (["the photo of a zorp"], []),  # one caption teaches nothing to tell apart
    (["on the left of it", "on the top of that"], []),  # function words only
])
def test_concept_words_are_the_content_words_in_most_captions(captions, words):
    from imagecraft.train.data import concept_words

    assert concept_words(captions) == words


@pytest.mark.unit
@pytest.mark.parametrize("caption, words, expected", [
    ("a cyan square on the left", ["cyan"], "a square on the left"),
    ("A Cyan circle, cyan-ish", ["cyan"], "A circle, cyan-ish"),  # whole words only, any case
    ("a photo of sks dog", ["sks", "dog"], "a photo of"),
    ("a red circle", [], "a red circle"),
])
def test_without_words_removes_whole_words(caption, words, expected):
    from imagecraft.train.data import without_words

    assert without_words(caption, words) == expected


@pytest.mark.unit
def test_preservation_captions_remove_or_swap_the_taught_words():
    from imagecraft.train.data import known_words
    from imagecraft.train.finetune import KEEP_VARIANTS, keep_captions

    captions = ["a teal circle on the left", "Teal square"]
    out = keep_captions(captions, ["teal"], ["purple", "red"], seed=0)
    assert len(out) == 2 * KEEP_VARIANTS and out[0] == "a circle on the left" and out[KEEP_VARIANTS] == "square"
    swapped = out[1:KEEP_VARIANTS] + out[KEEP_VARIANTS + 1:]
    assert all(c.replace("purple", "red") in ("a red circle on the left", "red square") for c in swapped)
    assert {"purple", "red"} <= {w for c in swapped for w in c.split()}
    assert out == keep_captions(captions, ["teal"], ["purple", "red"], seed=0)
    assert keep_captions(captions, [], ["red"], seed=0) == [""] * (2 * KEEP_VARIANTS)  # nothing taught: ""

    from transformers import CLIPTokenizer

    from imagecraft.loading import DEFAULT_MODEL

    tokenizer = CLIPTokenizer.from_pretrained(DEFAULT_MODEL, subfolder="tokenizer")  # the built-in model's
    known = known_words(tokenizer, exclude=["Purple"])
    assert {"red", "circle", "left", "background"} <= set(known) and not {"purple", "the", "and"} & set(known)
    assert not {"ange", "rple", "rcle"} & set(known)  # BPE's pieces of "orange", "purple", "circle"
    assert all(len(w) >= 3 and w.isalpha() and tokenizer.tokenize(w) == [w + "</w>"] for w in known)


@pytest.mark.unit
def test_held_out_images_are_drawn_by_the_seed_and_only_from_enough():
    from imagecraft.train.finetune import held_out

    a = held_out(24, 4, seed=0)
    assert len(set(a)) == 4 and a == sorted(a) and all(0 <= i < 24 for i in a) and a == held_out(24, 4, seed=0)
    assert held_out(24, 4, seed=1) != a
    assert held_out(11, 4, seed=0) == [] and held_out(12, 4, seed=0) != [] and held_out(24, 0, seed=0) == []


def zorp_data(folder: Path, n: int = 12) -> Path:
    """n scenes of the world whose captions all hold the made-up word "zorp" before the colour."""
    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _, prompt, image, _ = shapes.sample_scene(rng)
        Image.fromarray(image).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(prompt.replace("a ", "a zorp ", 1).replace("an ", "a zorp ", 1))
    return folder


@pytest.mark.integration
def test_preservation_keeps_the_base_model_under_captions_without_the_taught_word(model, tmp_path):
    data = zorp_data(tmp_path / "data")
    captions = [ex.caption.replace("zorp ", "") for ex in find_examples(data)][:4]
    base = ImageCraftPipeline.from_pretrained(model, dtype="fp32")
    before = np.stack([np.asarray(im, float) for im in base(captions, seed=2, num_inference_steps=4).images])
    moved = {}
    for preserve in (0.0, 1.0):
        recipe = Recipe(**dict(QUICK, steps=30, lr=3e-3, preserve=preserve, validation_images=0, precision="fp32",
                               word_token=False, word_lock=0.0, targets=("attn",), rank=4))  # preservation alone
        out = tmp_path / f"preserve-{preserve:g}"
        finetune(model, data, out, recipe, show_bar=False)
        base.load_lora(out)
        after = np.stack([np.asarray(im, float) for im in base(captions, seed=2, num_inference_steps=4).images])
        base.unload_lora()
        moved[preserve] = np.abs(after - before).mean()
    # the LoRA changes the model's images of the captions without "zorp"; preservation halves that at least
    assert moved[0.0] > 1 and moved[1.0] < 0.5 * moved[0.0], moved


@pytest.mark.integration
def test_the_word_lock_keeps_prompts_without_the_taught_word_and_learns_the_word(model, tmp_path):
    data = zorp_data(tmp_path / "data")
    captions = [ex.caption for ex in find_examples(data)][:4]
    plain = [c.replace("zorp ", "") for c in captions]
    pipe = ImageCraftPipeline.from_pretrained(model, dtype="fp32")

    def draw(prompts):
        return np.stack([np.asarray(im, float) for im in pipe(prompts, seed=2, num_inference_steps=4).images])

    before, before_word = draw(plain), draw(captions)
    moved, learnt = {}, {}
    for lock in (0.0, 100.0):
        recipe = Recipe(**dict(QUICK, steps=30, lr=3e-3, word_token=True, targets=("kv",), word_lock=lock,
                               preserve=0.0, validation_images=0, precision="fp32", rank=4))
        out = tmp_path / f"lock-{lock:g}"
        finetune(model, data, out, recipe, show_bar=False)
        pipe.load_lora(out)
        moved[lock], learnt[lock] = np.abs(draw(plain) - before).mean(), np.abs(draw(captions) - before_word).mean()
        pipe.unload_lora()
    # unlocked, the LoRA moves the images of the captions without "zorp"; the lock keeps them within a fifth of
    # that, while the captions with the word move as much as unlocked, within a factor of two
    assert moved[0.0] > 1 and moved[100.0] < 0.2 * moved[0.0], moved
    assert learnt[100.0] > 0.5 * learnt[0.0] and learnt[100.0] > 2, learnt


@pytest.mark.integration
def test_the_taught_word_gets_a_trained_token_that_plain_diffusers_loads(model, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    data = zorp_data(tmp_path / "data")
    out = tmp_path / "out"
    recipe = Recipe(**dict(QUICK, steps=12, lr=3e-3, word_token=True, embedding_lr=0.05, validation_images=0,
                           precision="fp32"))
    finetune(model, data, out, recipe, show_bar=False)
    ours = ImageCraftPipeline.from_pretrained(model, dtype="fp32")
    dim = ours.text_encoder.get_input_embeddings().weight.shape[1]
    state = load_file(out / "embeddings" / "zorp.safetensors")
    assert list(state) == ["zorp"] and state["zorp"].shape == (1, dim)
    # the checkpoint carries the word's embedding, so a resumed run goes on from it
    assert torch.equal(load_checkpoint(out / "checkpoints" / "last.pt")["state"]["lora"]["words"]["zorp"], state["zorp"])
    zorp, plain = "a zorp red circle on the left", "a red circle on the left"
    base_zorp, base_plain = images(ours, zorp), images(ours, plain)
    vocabulary = len(ours.tokenizer)
    context = ours.encode_prompt([plain])[0]
    info = ours.load_lora(out)
    assert info["words"] == ["zorp"] and len(ours.tokenizer) == vocabulary + 1
    assert len(ours.tokenizer("a zorp", add_special_tokens=False).input_ids) == 2  # one token for the word
    assert torch.equal(ours.encode_prompt([plain])[0], context)  # a prompt without it encodes as before
    with_lora = images(ours, zorp)
    assert np.abs(with_lora - base_zorp).mean() > 0.01
    theirs = StableDiffusionPipeline.from_pretrained(model)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(out)
    theirs.load_textual_inversion(out / "embeddings" / "zorp.safetensors")
    assert np.abs(diffusers_images(theirs, zorp) - with_lora).max() <= 1 / 255  # ours is 8-bit: its rounding
    card = (out / "README.md").read_text()
    assert "load_textual_inversion('THIS_FOLDER/embeddings/zorp.safetensors')" in card and "`zorp`" in card
    # at scale 0 the base model, its tokenizer too; back at 1 the LoRA and the word's vector again
    ours.set_lora_scale(0.0)
    assert len(ours.tokenizer) == vocabulary and np.array_equal(images(ours, zorp), base_zorp)
    ours.set_lora_scale(1.0)
    assert np.abs(images(ours, zorp) - with_lora).max() < 1e-6
    # unloading gives the base model back exactly, its tokenizer too
    ours.unload_lora()
    assert len(ours.tokenizer) == vocabulary and ours.lora is None
    assert np.array_equal(images(ours, zorp), base_zorp) and np.array_equal(images(ours, plain), base_plain)
    # without a token of its own (--no-word-token) the word is read as its pieces and nothing is written for it
    finetune(model, data, tmp_path / "plain", Recipe(**dict(QUICK, steps=2, word_token=False)), show_bar=False)
    assert not (tmp_path / "plain" / "embeddings").exists()


@pytest.mark.integration
def test_embedding_files_that_do_not_fit_are_refused_by_name(model, tmp_path):
    from safetensors.torch import save_file

    ours = ImageCraftPipeline.from_pretrained(model, dtype="fp32")
    random_lora(ours)
    lora.save(tmp_path, ours.unet, ours.text_encoder)
    ours.unload_lora()
    dim = ours.text_encoder.get_input_embeddings().weight.shape[1]
    (tmp_path / "embeddings").mkdir()
    bad = tmp_path / "embeddings" / "zorp.safetensors"
    cases = [({"zorp": torch.zeros(1, dim + 1)}, "one vector"), ({"zorp": torch.zeros(3, dim)}, "one vector"),
             ({"a": torch.zeros(1, dim), "b": torch.zeros(1, dim)}, "holds 2 tensors"),
             ({"zorp": torch.full((1, dim), float("nan"))}, "NaN"), ({"a</w>": torch.zeros(1, dim)}, "already has")]
    base = images(ours)
    for state, message in cases:
        save_file(state, str(bad))
        with pytest.raises(ValueError, match=message):
            ours.load_lora(tmp_path)
        assert ours.lora is None or ours.lora.get("words") == []
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ours.load_lora(tmp_path)
    ours.unload_lora()
    assert np.array_equal(images(ours), base)


@pytest.mark.integration
def test_the_step_saved_is_the_one_with_the_lowest_held_out_loss(model, tmp_path):
    from safetensors.torch import load_file

    data = zorp_data(tmp_path / "data")
    recipe = dict(QUICK, steps=12, eval_every=2, lr=3e-2, validation_images=4, precision="fp32")
    result = finetune(model, data, tmp_path / "run", Recipe(**recipe), show_bar=False)
    held = {h[0]: h[3] for h in result.history if h[3] is not None}
    assert sorted(held) == list(range(2, 13, 2)) and result.kept_step == min(held, key=held.get)
    # the saved LoRA is what a run stopped at that step saves: the same training, the same held-out images
    finetune(model, data, tmp_path / "short", Recipe(**dict(recipe, steps=result.kept_step)), show_bar=False)
    a, b = load_file(tmp_path / "run" / lora.WEIGHT_NAME), load_file(tmp_path / "short" / lora.WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the last step's weights stay in the checkpoint, which a longer run resumes from
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    last, best = state["state"]["lora"]["unet"], state["state"]["best"]["saved"]["unet"]
    assert state["state"]["best"]["step"] == result.kept_step and state["step"] == 12
    assert all(torch.equal(last[n][1], best[n][1]) for n in last) == (result.kept_step == 12)


@pytest.mark.integration
def test_bad_settings_and_outputs_are_named(model, data, tmp_path):
    for settings, message in [(dict(method="dreambooth"), "method must be 'lora' or 'full'"),
                              (dict(steps=0), "steps must be a whole number from 1 to 20,000, got 0"),
                              (dict(lr=float("nan")), "lr must be a number in \\(0, 0.1\\], got nan"),
                              (dict(rank=0), "rank must be"), (dict(targets=("mlp",)), "targets must be some of"),
                              (dict(method="full", text_encoder_lora=True), "goes with method 'lora'"),
                              (dict(method="full", word_token=True), "word_token goes with method 'lora'"),
                              (dict(method="full", word_lock=1.0), "word_lock goes with method 'lora'"),
                              (dict(word_lock=1.0, targets=("ff",)), "the targets ff do not adapt: add attn or kv"),
                              (dict(class_images=0), "class_images must be a whole number from 1"),
                              (dict(prior_weight=0), "prior_weight must be a number in \\(0, 100\\]"),
                              (dict(class_prompts=(" ",)), "class_prompts must be a list of prompts .*got ' '"),
                              (dict(class_prompts="a red circle"), "class_prompts must be a list of prompts"),
                              (dict(class_prompts=("a", "b"), class_images=1), "fewer than the class prompts")]:
        with pytest.raises(ValueError, match=message):
            check_recipe(Recipe(**settings))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        finetune(model, data, tmp_path / "file", Recipe(**QUICK), show_bar=False)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root ignores permissions
            with pytest.raises(ValueError, match="not writable"):
                finetune(model, data, tmp_path / "ro", Recipe(**QUICK), show_bar=False)
    finally:
        (tmp_path / "ro").chmod(0o700)


@pytest.mark.integration
def test_cli_generate_with_lora_records_it_in_the_png(model, tmp_path):
    from imagecraft.cli import main
    from imagecraft.png import restore_settings

    pipe = ImageCraftPipeline.from_pretrained(model)
    random_lora(pipe)
    lora.save(tmp_path / "my-style", pipe.unet, pipe.text_encoder)
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(model), "--prompt", "a red circle", "--seed", "1", "--steps", "3",
                 "--lora", f"{tmp_path / 'my-style'}:0.5", "--output", str(out)]) == 0
    text = Image.open(out).text["parameters"]
    assert text.splitlines()[0] == "a red circle <lora:my-style:0.5>" and 'Lora hashes: "my-style: ' in text
    settings, notes = restore_settings(out)
    assert settings["prompt"] == "a red circle" and any("LoRA 'my-style' at scale 0.5" in n for n in notes)
    assert main(["generate", "--model", str(model), "--prompt", "x", "--lora", str(tmp_path / "nope.safetensors"),
                 "--output", str(out)]) == 2


@pytest.mark.unit
def test_preview_grid_is_images_and_readable_text():
    """No column of text beside the images (it was a blank third), and text tall enough to read once the app
    scales the grid to about 530 px: 16 px type, so a capital is over 10 px tall."""
    from imagecraft.train.report import preview_grid

    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    grid = np.asarray(preview_grid([("base", [red, blue]), ("LoRA 1", [blue, red])],
                                   ["a red circle", "a blue square"], "step 400"))
    assert grid.shape[1] == 2 * 192  # the images' columns only
    coloured = (np.abs(grid.astype(int) - grid[..., :1]).max(-1) > 100).mean(0)  # per column: share of red/blue
    assert coloured.min() > 0.6  # every column of pixels is mostly image: no blank band
    dark = (grid.max(-1) < 100)
    rows = np.flatnonzero(dark[:, :192].any(1))
    text_rows = rows[rows < 24 + 26 + 24]  # the labels and the first prompt's line
    assert text_rows.size and text_rows.max() - text_rows.min() > 20  # two lines of text, each ~12 px tall
