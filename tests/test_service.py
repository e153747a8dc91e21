"""What the app's buttons do, hardened: the model cache, the cost cap, cancellation, the output folder, the schema."""

import os
import shutil
import time
from pathlib import Path

import pytest

from imagecraft import settings
from imagecraft.loading import DEFAULT_MODEL
from imagecraft.serve import jobs, models, outputs
from imagecraft.serve.actions import Cancelled, generate, pick_seed
from imagecraft.serve.models import ModelCache
from imagecraft.serve.outputs import new_output_folder


@pytest.fixture(scope="module")
def folders(tiny_sd1, tiny_v_zsnr):
    return [tiny_sd1, tiny_v_zsnr]  # two model folders, read and never changed


@pytest.mark.integration
def test_spellings_of_one_folder_share_one_copy(folders, monkeypatch, tmp_path):
    cache = ModelCache()
    folder = folders[0]
    monkeypatch.chdir(folder.parent)
    spellings = [str(folder), f"{folder}/", f"./{folder.name}", f"././{folder.name}", f"{folder.name}/../{folder.name}",
                 f"  {folder}  "]
    link = tmp_path / "link"
    link.symlink_to(folder)
    spellings.append(str(link))
    pipes = {id(cache.get(s)) for s in spellings * 15}
    assert len(pipes) == 1 and len(cache) == 1
    assert ModelCache.key(str(DEFAULT_MODEL)) == ModelCache.key("././" + os.path.relpath(DEFAULT_MODEL)) == "default"


@pytest.mark.integration
def test_least_recently_used_models_are_dropped(folders):
    cache = ModelCache(max_models=1)
    first = cache.get(str(folders[0]))
    second = cache.get(str(folders[1]))
    assert len(cache) == 1 and cache.get(str(folders[1])) is second
    assert cache.get(str(folders[0])) is not first  # loaded again after it was dropped


@pytest.mark.integration
def test_an_allowlist_loads_only_its_models_and_says_nothing_of_the_disk(folders, tmp_path):
    cache = ModelCache(allowed=["default", str(folders[0])])
    assert cache.choices == [models.BUILTIN, str(folders[0])]
    assert cache.get(f"{folders[0]}/") is cache.get(str(folders[0]))
    messages = []
    for probe in (str(folders[1]), "/etc", "/no/such/folder", str(tmp_path), "nobody/nothing", "../../etc/passwd"):
        with pytest.raises(ValueError) as info:
            cache.get(probe)
        messages.append(str(info.value))
    assert len(set(messages)) == 1  # the same sentence whether the path exists or not
    assert messages[0] == f"this server serves only these models: {models.BUILTIN}, {folders[0]}"


@pytest.mark.unit
def test_bad_values_are_refused_by_the_schema(folders):
    pipe = ModelCache().get(str(folders[0]))
    for kwargs, message in [
        (dict(steps=2.5), "steps must be an integer from 1 to 150, got 2.5"),
        (dict(steps=True), "steps must be an integer from 1 to 150, got True"),
        (dict(num_images=1.5), "number of images must be from 1 to 16, got 1.5"),
        (dict(guidance=float("inf")), "guidance scale must be a number from 0 to 30, got inf"),
        (dict(guidance="7"), "guidance scale must be a number from 0 to 30, got '7'"),
        (dict(width=100.5), "width must be a multiple of 8 between 64 and 2048, got 100.5"),
        (dict(height=True), "height must be a multiple of 8 between 64 and 2048, got True"),
        (dict(seed=2.5), "seed must be an integer from 0 to"),
        (dict(seed=-7), "seed must be an integer from 0 to"),
        (dict(scheduler="karras_magic"), "unknown scheduler 'karras_magic'"),
        (dict(prompt="x" * 5000), "prompt must be at most 4000 characters"),
        (dict(negative_prompt=["a"]), "negative_prompt must be a string, got ['a']"),
    ]:
        args = dict(prompt="a red circle", steps=2) | kwargs
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            generate(pipe, **args)
    import numpy as np

    paths, seed, _ = generate(pipe, "a red circle", steps=np.int64(2), guidance=np.float32(3.0), seed=np.int64(5),
                              width=64.0, num_images=1.0)  # numpy numbers and whole floats from sliders are fine
    assert seed == 5 and len(paths) == 1
    assert pick_seed(-1) >= 0 and pick_seed(None) >= 0 and pick_seed(7) == 7


@pytest.mark.unit
def test_the_cost_cap_refuses_at_once(folders, monkeypatch):
    pipe = ModelCache().get(str(folders[0]))
    ratio = settings.unet_work(pipe.unet.config, 64, 64, pipe.vae_scale_factor) / \
        settings.unet_work(pipe.unet.config, 512, 512, pipe.vae_scale_factor)
    limit = round(512 * 512 * ratio * 10)  # 64x64 at 10 steps, in pixel-steps at 512x512 of this model's work
    monkeypatch.setenv("IMAGECRAFT_MAX_COST", str(limit))
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (pipe.text_encoder, pipe.unet,
                                                                          pipe.vae.decoder)]
    try:
        with pytest.raises(ValueError, match=r"too large for this server: 64x64 x 20 steps x 1 image\(s\) costs the "
                                             r"UNet work of [\d,]+ pixel-steps at 512x512 .*over the limit of "
                                             rf"{limit:,} \(IMAGECRAFT_MAX_COST\)"):
            generate(pipe, "a red circle", steps=20)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []  # refused before any model ran
    generate(pipe, "a red circle", steps=10)  # at the limit
    monkeypatch.delenv("IMAGECRAFT_MAX_COST")
    assert settings.max_cost("cpu") == 512 * 512 * 50 and settings.max_cost("cuda") == 16 * 512 * 512 * 50


@pytest.mark.unit
def test_a_cancelled_request_stops_within_one_step(folders):
    pipe = ModelCache().get(str(folders[0]))
    steps_done = []
    with pytest.raises(Cancelled, match="stopped after step 3 of "):
        generate(pipe, "a red circle", steps=20, progress=lambda step, total: steps_done.append(step),
                 should_stop=lambda: len(steps_done) >= 3)
    assert steps_done == [1, 2, 3]


@pytest.mark.unit
def test_outputs_expire_and_stay_under_the_size_cap(monkeypatch, tmp_path):
    monkeypatch.setattr(outputs, "OUTPUT_ROOT", tmp_path / "outputs")  # a private root for this test
    monkeypatch.setattr(outputs, "PRUNE_EVERY", 0.0)  # sweep at every request here
    old = new_output_folder()
    (old / "a.png").write_bytes(b"x" * 1000)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fresh = new_output_folder()
    assert not old.exists() and fresh.exists()  # older than an hour: gone

    monkeypatch.setenv("IMAGECRAFT_OUTPUT_MB", str(4.5 / 1024))  # 4.5 KiB
    folders = []
    for i in range(10):
        folder = new_output_folder()
        (folder / "img.png").write_bytes(b"x" * 1024)
        os.utime(folder, (time.time() - 100 + i, time.time() - 100 + i))
        folders.append(folder)
    total = sum(f.stat().st_size for f in (tmp_path / "outputs").rglob("*") if f.is_file())
    assert total <= 6 * 1024 and folders[-1].exists() and not folders[0].exists()
    shutil.rmtree(tmp_path / "outputs")
    assert new_output_folder().parent == Path(tmp_path / "outputs")  # the root comes back when removed


@pytest.mark.integration
def test_the_model_box_loads_a_single_file_with_its_config(folders, tmp_path):
    import numpy as np
    from helpers import diffusers_vae_to_ldm
    from safetensors.torch import save_file

    cache = ModelCache()
    pipe = cache.get(str(folders[0]))
    checkpoint = {"model.diffusion_model." + k: v.contiguous() for k, v in pipe.unet.state_dict().items()}
    checkpoint.update(diffusers_vae_to_ldm(pipe.vae.state_dict()))
    checkpoint.update({"cond_stage_model.transformer." + k: v for k, v in pipe.text_encoder.state_dict().items()})
    save_file(checkpoint, tmp_path / "tiny.safetensors")

    single = cache.get(f"{tmp_path / 'tiny.safetensors'} | {folders[0]}")
    assert single is cache.get(f"{tmp_path}/./tiny.safetensors|{folders[0]}/") and single is not pipe
    a = single("a blue circle", seed=3, num_inference_steps=3)
    b = pipe("a blue circle", seed=3, num_inference_steps=3)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    with pytest.raises(ValueError, match="a single-file checkpoint carries weights only"):
        cache.get(str(tmp_path / "tiny.safetensors"))
    allowing = ModelCache(allowed=[f"{tmp_path / 'tiny.safetensors'} | {folders[0]}"])  # an allowlist entry too
    assert allowing.get(f"{tmp_path}/tiny.safetensors|{folders[0]}") is not None
    with pytest.raises(ValueError, match="no model folder or file"):
        cache.get("/no/such/model")
    assert "/no/such/model" not in cache._locks  # a failed name leaves nothing behind


@pytest.mark.unit
def test_prune_keeps_what_may_still_be_served(monkeypatch, tmp_path):
    """Gradio's cache layout (a folder per file): over the cap, the oldest go first, but nothing under
    `keep_younger` seconds old."""
    monkeypatch.setenv("IMAGECRAFT_OUTPUT_MB", str(0.5 / 1024))  # 0.5 KiB: every entry is over it
    monkeypatch.setattr(outputs, "PRUNE_EVERY", 0.0)
    now = time.time()
    for i, age in enumerate((900, 600, 400, 100, 10)):
        entry = tmp_path / f"hash{i}"
        entry.mkdir()
        (entry / "image.png").write_bytes(b"x" * 1024)
        os.utime(entry, (now - age, now - age))
    outputs.prune(tmp_path, keep_younger=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hash3", "hash4"]  # over the cap, but young


@pytest.mark.unit
def test_prune_sweeps_a_folder_at_most_every_few_seconds(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGECRAFT_OUTPUT_TTL", "0")  # everything is expired
    outputs.prune(tmp_path / "other")  # a first sweep of a folder runs at once
    (tmp_path / "a").mkdir()
    outputs.prune(tmp_path)
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    outputs.prune(tmp_path)  # within PRUNE_EVERY of the last sweep: left for the next one
    assert (tmp_path / "b").exists() and outputs.PRUNE_EVERY >= 1


@pytest.mark.unit
def test_model_lock_lets_plain_requests_share_and_a_lora_request_run_alone():
    import threading
    import time

    from imagecraft.serve.models import ModelLock

    lock, events = ModelLock(), []
    with lock.shared():
        with lock.shared():  # two plain requests at once
            events.append("two readers")

        def lora_request():
            with lock.exclusive():
                events.append("writer")

        writer = threading.Thread(target=lora_request)
        writer.start()
        time.sleep(0.2)
        assert events == ["two readers"]  # the LoRA request waits for the plain one
        events.append("reader leaves")
    writer.join(timeout=5)
    assert events == ["two readers", "reader leaves", "writer"]


@pytest.mark.unit
def test_prior_preservation_prompts_are_checked_line_by_line():
    assert jobs.prompts_of("class_prompts", "a red circle\n\n  a blue square  \n") == ("a red circle",
                                                                                        "a blue square")
    assert jobs.prompts_of("class_prompts", "") == ()
    with pytest.raises(ValueError, match=r"class_prompts must be a list of prompts \(at most 100, .*got 101 prompts"):
        jobs.prompts_of("class_prompts", "\n".join(["a red circle"] * 101))
    with pytest.raises(ValueError, match="class_prompts must be text, one prompt per line"):
        jobs.prompts_of("class_prompts", ["a red circle"])
    from imagecraft import shapes

    demo = jobs.demo_class_prompts()  # every colour and shape but the held-out pairs, which it never learnt
    assert len(demo) == len(shapes.COLOURS) * len(shapes.SHAPES) - len(shapes.HELD_OUT) and "an orange circle" in demo


@pytest.mark.unit
def test_a_fine_tune_takes_no_step_while_a_request_runs_a_model(tmp_path, monkeypatch):
    """On a CPU the trainer gives way at the step boundary (jobs.CoreShare): while a request is in flight it waits,
    and its status says so; it goes on once the request ends. The request and the trainer each wait for the other's
    signal, so the order of events is the proof (no clock is read)."""
    import threading
    from types import SimpleNamespace

    from imagecraft.train.recipe import FinetuneRecipe

    monkeypatch.setattr(outputs, "FINETUNE_ROOT", tmp_path)
    cores = jobs.CoreShare(settle=0.0, max_wait=600)
    events, at_step_2, in_request = [], threading.Event(), threading.Event()

    def trainer(model, data, output, recipe, progress, should_stop, show_bar):
        for step in range(1, recipe.steps + 1):
            events.append(f"step {step}")
            progress(step, recipe.steps, 0.1)
            if step == 2:
                at_step_2.set()
                assert in_request.wait(60)  # a request arrived during step 2
            should_stop()
        return SimpleNamespace(stopped=False, step=recipe.steps, kept_step=None, files=[])

    def generation():  # what a handler decorated with `handlers.gpu` runs
        in_request.set()
        events.append("request starts")
        for _ in range(6000):  # until the trainer waits at the step boundary (a minute at most)
            if cores.waits:
                break
            time.sleep(0.01)
        events.append(f"request ends; the job says: {job.message}")

    (tmp_path / "job").mkdir()
    job = jobs.TrainingJob("job", tmp_path / "job", None, FinetuneRecipe(steps=4))
    queue = jobs.TrainingQueue(trainer, cores)
    queue.submit(job)
    assert at_step_2.wait(60)
    cores.serves(generation)()
    for _ in range(6000):
        if job.finished:
            break
        time.sleep(0.01)
    assert job.state == "done", job.message
    assert events == ["step 1", "step 2", "request starts",
                      "request ends; the job says: step 2 of 4, loss 0.1000 (paused while the server generates images)",
                      "step 3", "step 4"]
    assert cores.serving == 0 and cores.waits == 1


@pytest.mark.unit
def test_generation_handlers_count_as_requests_the_trainer_gives_way_to(monkeypatch):
    from imagecraft.serve import handlers

    seen = []
    monkeypatch.setattr(handlers.models, "get", lambda model: None)
    monkeypatch.setattr(handlers, "_prune_gradio_cache", lambda: None)
    monkeypatch.setattr(handlers.actions, "generate",
                        lambda *args, **kwargs: (seen.append(jobs.CORES.serving), ([], 1, []))[1])
    assert handlers.on_generate("a red circle") == ([], 1)
    assert seen == [1] and jobs.CORES.serving == 0
