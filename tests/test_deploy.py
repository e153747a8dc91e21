"""Deploying to a Space without the Hub: the dry run on this repository, the upload against a local stand-in of the
Hub's API (HF_ENDPOINT) that records what it receives, and fine-tuning under a stand-in `spaces` whose GPU slots
refuse to run long, finishing across several slots with the weights of one straight run."""

import base64
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imagecraft.serve import deploy

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SPACE", "IMAGECRAFT_"))}


def dry_run(*flags, root=ROOT):
    from imagecraft.cli import build_parser

    args = build_parser().parse_args(["deploy", "--space", "you/imagecraft", "--dry-run", *flags])
    return deploy.plan(args.space, root, args.private, args.hardware,
                       {v.name: getattr(args, v.name) for v in deploy.VARIABLES})


# --- the dry run, on this repository ---------------------------------------------------------------------------
@pytest.mark.unit
def test_dry_run_on_the_repository_passes_with_exactly_the_files_a_space_needs():
    p = dry_run()
    assert p.problems == []
    paths = [f.path for f in p.files]
    assert {"app.py", "requirements.txt", "README.md", ".gitattributes",
            "assets/shapes-sd/unet/diffusion_pytorch_model.safetensors", "imagecraft/serve/handlers.py"} <= set(paths)
    assert not [x for x in paths if x.split("/")[0] in ("tests", "bench", "docs", ".git", ".venv")
                or "__pycache__" in x or x.endswith(".pyc") or ".egg-info" in x]
    # every package module and every file of the built-in model, nothing else
    expected = {q.relative_to(ROOT).as_posix() for folder in ("imagecraft", "assets/shapes-sd")
                for q in (ROOT / folder).rglob("*") if q.is_file() and "__pycache__" not in q.parts}
    assert set(paths) - {"app.py", "requirements.txt", "README.md", ".gitattributes"} == expected
    assert all(f.size == (ROOT / f.path).stat().st_size for f in p.files)
    by_path = {f.path: f for f in p.files}
    assert by_path["assets/shapes-sd/unet/diffusion_pytorch_model.safetensors"].needs_lfs
    assert by_path["assets/shapes-sd/samples.png"].needs_lfs and not by_path["app.py"].needs_lfs
    assert p.front_matter["sdk"] == "gradio" and p.front_matter["app_file"] == "app.py"
    assert p.front_matter["sdk_version"] == deploy.gradio_pin((ROOT / "requirements.txt").read_text())
    assert p.variables == {"IMAGECRAFT_MODELS": "default"}  # public: an allowlist
    report = deploy.describe(p)
    for f in p.files:
        assert f.path in report and f"{f.size:,}" in report
    assert "sdk_version: " in report and "IMAGECRAFT_MODELS=default" in report and "problem" not in report


@pytest.mark.unit
def test_dry_run_flags_become_variables_and_a_private_space_has_no_allowlist():
    p = dry_run("--private", "--hardware", "zero-a10g", "--max-cost", "26214400", "--keep-jobs", "3")
    assert p.variables == {"IMAGECRAFT_KEEP_JOBS": "3", "IMAGECRAFT_MAX_COST": "26214400"} and p.private
    assert dry_run("--models", "default,stable-diffusion-v1-5/stable-diffusion-v1-5").variables == {
        "IMAGECRAFT_MODELS": "default,stable-diffusion-v1-5/stable-diffusion-v1-5"}
    assert any("--max-cost" in x for x in dry_run("--max-cost", "lots").problems)
    assert any("--max-models" in x for x in dry_run("--max-models", "0").problems)
    with pytest.raises(ValueError, match="USER/NAME"):
        deploy.plan("imagecraft", ROOT)


def space_copy(tmp_path: Path, readme: str | None = None, gitattributes: str | None = None) -> Path:
    """A small repository shaped like ours: what a Space needs, plus what must stay behind."""
    root = tmp_path / "repo"
    files = {
        "app.py": "print('app')\n", "requirements.txt": "torch==2.13.0\ngradio==6.31.0\n",
        "README.md": readme or "---\ntitle: T\nsdk: gradio\nsdk_version: 6.31.0\napp_file: app.py\n"
                               "python_version: \"3.11\"\n---\n\n# T\n",
        ".gitattributes": gitattributes if gitattributes is not None else (ROOT / ".gitattributes").read_text(),
        "imagecraft/__init__.py": "", "imagecraft/serve/x.py": "x = 1\n",
        "imagecraft/__pycache__/x.cpython-311.pyc": "compiled", "imagecraft.egg-info/PKG-INFO": "egg",
        "tests/test_x.py": "", "bench/b.py": "", "docs/figure.png": "png", "assets/shapes-sd/model_index.json": "{}",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "assets/shapes-sd/unet/w.safetensors").parent.mkdir(parents=True)
    (root / "assets/shapes-sd/unet/w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(300))
    return root


@pytest.mark.unit
def test_dry_run_refuses_what_the_hub_would(tmp_path):
    readme = "---\ntitle: T\nsdk: gradio\nsdk_version: 5.0.0\napp_file: main.py\npython_version: 3.10\n---\n"
    p = deploy.plan("you/x", space_copy(tmp_path, readme=readme, gitattributes="*.bin filter=lfs -text\n"))
    text = " | ".join(p.problems)
    assert "sdk_version '5.0.0' differs from requirements.txt's gradio==6.31.0" in text
    assert "app_file 'main.py'" in text and "python_version" in text and "3.1" in text
    assert "assets/shapes-sd/unet/w.safetensors is binary and .gitattributes does not store it with LFS" in text
    big = tmp_path / "repo/imagecraft/huge.py"
    big.write_text("#" * (deploy.MAX_REGULAR_BYTES + 1))
    assert any("huge.py is over 10 MB" in x for x in deploy.plan("you/x", tmp_path / "repo").problems)
    big.unlink()
    (tmp_path / "repo/README.md").write_text("# no front matter\n")
    with pytest.raises(ValueError, match="no front matter"):
        deploy.plan("you/x", tmp_path / "repo")


# --- the upload, against a local Hub ---------------------------------------------------------------------------
class FakeHub(BaseHTTPRequestHandler):
    """The Hub API calls a deploy makes, answered as the Hub does (huggingface_hub 2.4's requests), recorded."""
    calls: list  # (method, path, body)

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0]
        self.calls.append(("POST", path, body, self.headers.get("Authorization")))
        endpoint = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            data = json.loads(body)
            answer = {"url": f"{endpoint}/spaces/{data['organization']}/{data['name']}"}
        elif path == "/api/validate-yaml":
            answer = {}
        elif "/preupload/" in path:  # every file as a regular one: the test's files are small
            answer = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                for f in json.loads(body)["files"]]}
        elif "/commit/" in path:
            answer = {"commitUrl": f"{endpoint}/spaces/you/x/commit/{'a' * 40}", "commitOid": "a" * 40}
        elif path.endswith("/variables"):
            data = json.loads(body)
            answer = {data["key"]: {"value": data["value"]}}
        elif path.endswith("/hardware"):
            answer = {"stage": "BUILDING", "hardware": {"current": None, "requested": json.loads(body)["flavor"]}}
        else:
            self.send_response(404)
            self.end_headers()
            return
        raw = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def hub():
    calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Hub", (FakeHub,), {"calls": calls}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", calls
    server.shutdown()


def run_deploy(root: Path, env: dict, *flags):
    # deploy's own flags (the CLI's wiring is the dry run's test): no diffusers to import in each subprocess
    script = ("import argparse, sys; from pathlib import Path; from imagecraft.serve import deploy; "
              "parser = argparse.ArgumentParser(); deploy.add_arguments(parser); "
              "sys.exit(deploy.run(parser.parse_args(sys.argv[2:]), Path(sys.argv[1])))")
    return subprocess.run([sys.executable, "-c", script, str(root), *flags], capture_output=True,
                          text=True, env={**ENV, **env}, timeout=120, cwd=ROOT)


@pytest.mark.integration
def test_deploy_uploads_exactly_the_plan_and_sets_the_variables(hub, tmp_path):
    endpoint, calls = hub
    root = space_copy(tmp_path)
    done = run_deploy(root, {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"},
                      "--space", "you/x", "--hardware", "zero-a10g", "--max-cost", "1000000")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"{endpoint}/spaces/you/x"
    assert all(auth == "Bearer hf_test" for *_, auth in calls)
    create = json.loads(next(b for m, p, b, _ in calls if p == "/api/repos/create"))
    assert create == {"name": "x", "organization": "you", "visibility": "public", "type": "space", "sdk": "gradio",
                      "hardware": "zero-a10g"}
    commit = [json.loads(line) for m, p, b, _ in calls if p == "/api/spaces/you/x/commit/main"
              for line in b.decode().splitlines()]
    received = {c["value"]["path"]: base64.b64decode(c["value"]["content"]) for c in commit if c["key"] == "file"}
    plan = deploy.plan("you/x", root)
    assert {f.path: f.size for f in plan.files} == {path: len(data) for path, data in received.items()}
    assert set(received) == {"app.py", "requirements.txt", "README.md", ".gitattributes", "imagecraft/__init__.py",
                             "imagecraft/serve/x.py", "assets/shapes-sd/model_index.json",
                             "assets/shapes-sd/unet/w.safetensors"}
    assert received["assets/shapes-sd/unet/w.safetensors"] == (root / "assets/shapes-sd/unet/w.safetensors").read_bytes()
    preupload = json.loads(next(b for m, p, b, _ in calls if "/preupload/" in p))
    assert {f["path"]: f["size"] for f in preupload["files"]} == {f.path: f.size for f in plan.files}
    variables = [json.loads(b) for m, p, b, _ in calls if p == "/api/spaces/you/x/variables"]
    assert variables == [{"key": "IMAGECRAFT_MAX_COST", "value": "1000000"}, {"key": "IMAGECRAFT_MODELS",
                                                                               "value": "default"}]
    assert [json.loads(b) for m, p, b, _ in calls if p.endswith("/hardware")] == [{"flavor": "zero-a10g"}]
    order = [p for _, p, _, _ in calls]
    assert order.index("/api/repos/create") < order.index("/api/spaces/you/x/commit/main") < \
        order.index("/api/spaces/you/x/variables")


@pytest.mark.integration
def test_deploy_errors_are_sentences(hub, tmp_path):
    endpoint, calls = hub
    root = space_copy(tmp_path)
    offline = run_deploy(root, {"HF_ENDPOINT": endpoint, "HF_TOKEN": "t", "HF_HUB_OFFLINE": "1"}, "--space", "you/x")
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr and "Traceback" not in offline.stderr
    no_token = run_deploy(root, {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path)},
                          "--space", "you/x")
    assert no_token.returncode == 2 and "set HF_TOKEN or pass --token" in no_token.stderr
    unreachable = run_deploy(root, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "t", "HF_HUB_OFFLINE": "0"},
                             "--space", "you/x")
    assert unreachable.returncode == 2 and "cannot reach http://127.0.0.1:9" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    assert calls == []


# --- ZeroGPU: fine-tuning in slots ------------------------------------------------------------------------------
STAND_IN_SPACES = '''"""A stand-in for Hugging Face's `spaces`: GPU(duration=S) runs the function here, pickles what crosses into and out
of it (ZeroGPU runs it in a worker process), and raises when a call runs longer than its slot."""
import functools, inspect, pickle, time

CALLS = []  # seconds each call took


class SlotExceeded(RuntimeError):
    pass


def GPU(fn=None, duration=60):
    if fn is None:
        return lambda f: GPU(f, duration=duration)

    def check(started):
        took = time.monotonic() - started
        if took > duration:
            raise SlotExceeded(f"{fn.__name__} ran {took:.1f} s in a {duration} s slot")
        return took

    @functools.wraps(fn)
    def generator(*args, **kwargs):
        args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
        started = time.monotonic()
        for item in fn(*args, **kwargs):
            check(started)
            yield pickle.loads(pickle.dumps(item))
        CALLS.append(check(started))

    @functools.wraps(fn)
    def call(*args, **kwargs):
        args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
        started = time.monotonic()
        result = pickle.loads(pickle.dumps(fn(*args, **kwargs)))
        CALLS.append(check(started))
        return result

    return generator if inspect.isgeneratorfunction(fn) else call
'''
SLOTTED = '''import json, logging, sys
import spaces
logging.basicConfig(level=logging.INFO, format="%(message)s")
from imagecraft.serve import jobs, zerogpu
from imagecraft.train.recipe import FinetuneRecipe
assert jobs.TRAINING.trainer is zerogpu.finetune_in_slots and "GPU slots of" in zerogpu.hardware_notes()["finetune"]
steps = []
result = zerogpu.finetune_in_slots(sys.argv[1], sys.argv[2], sys.argv[3], FinetuneRecipe(**json.loads(sys.argv[4])),
                                   progress=lambda step, total, loss: steps.append(step))
print(json.dumps(dict(calls=spaces.CALLS, step=result.step, stopped=result.stopped, steps=steps)))
'''
RECIPE = dict(steps=400, checkpoint_every=1000, eval_every=100, preview_every=0, preview_steps=2, batch_size=1)
# seconds: on a 2-core CPU the tiny model's first chunk sets up in 1 to 6 s (torch's first calls), later ones in
# about 1 s, and a step takes 0.05 to 0.3 s, so that 400 steps need several slots
SLOT = 30


@pytest.mark.integration
def test_a_finetune_finishes_across_gpu_slots_with_the_weights_of_one_straight_run(tiny_sd1, tmp_path):
    from safetensors.torch import load_file
    from test_finetune import write_data

    from imagecraft import lora
    from imagecraft.train.finetune import finetune
    from imagecraft.train.recipe import FinetuneRecipe

    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "spaces.py").write_text(STAND_IN_SPACES)
    data = write_data(tmp_path / "data")
    env = {**ENV, "PYTHONPATH": str(tmp_path / "spaces"), "SPACES_ZERO_GPU": "true", "IMAGECRAFT_GPU_SLOT": str(SLOT),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", SLOTTED, str(tiny_sd1), str(data), str(tmp_path / "slotted"),
                           json.dumps(RECIPE)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["step"] == RECIPE["steps"] and not report["stopped"]
    assert len(report["calls"]) >= 2 and max(report["calls"]) <= SLOT, report["calls"]  # the stand-in checks too
    print(f"{len(report['calls'])} slots: {', '.join(f'{c:.1f}' for c in report['calls'])} s")
    assert report["steps"] == list(range(1, RECIPE["steps"] + 1))  # progress crossed each slot's boundary
    assert not (tmp_path / "slotted" / "checkpoints" / "stop-requested").exists()

    straight = finetune(tiny_sd1, data, tmp_path / "straight", FinetuneRecipe(**RECIPE), show_bar=False)
    assert straight.step == RECIPE["steps"]
    for name in (lora.WEIGHT_NAME, "lora_kohya.safetensors"):
        ours, theirs = load_file(tmp_path / "slotted" / name), load_file(tmp_path / "straight" / name)
        assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours), name


class StandInGPU:
    """`spaces.GPU` in this process, for the tests that need no pickling: records each call's seconds."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn=None, duration=60):
        def decorate(f):
            def generator(*args, **kwargs):
                started = time.monotonic()
                yield from f(*args, **kwargs)
                self.calls.append(time.monotonic() - started)
                assert self.calls[-1] <= duration

            return generator

        return decorate(fn) if fn is not None else decorate


@pytest.mark.integration
def test_stop_reaches_a_running_slot_and_the_checkpoint_is_kept(tiny_sd1, tmp_path):
    from test_finetune import write_data

    from imagecraft.serve import zerogpu
    from imagecraft.train.recipe import FinetuneRecipe

    data, seen, gpu = write_data(tmp_path / "data"), [], StandInGPU()
    result = zerogpu.finetune_in_slots(tiny_sd1, data, tmp_path / "out", FinetuneRecipe(**dict(RECIPE, steps=30)),
                                       progress=lambda *a: seen.append(a), should_stop=lambda: len(seen) >= 3,
                                       slot=120, gpu=gpu)
    # the stop request crosses into the slot as a file: it stops after the step it is in, once
    assert result.stopped and 3 <= result.step < 30 and len(gpu.calls) == 1
    assert (tmp_path / "out/checkpoints/last.pt").is_file()
    assert not zerogpu.stop_file(tmp_path / "out").exists()


@pytest.mark.unit
def test_a_tab_says_what_this_hardware_cannot_do(monkeypatch):
    from imagecraft.serve import zerogpu

    monkeypatch.setitem(sys.modules, "spaces", None)  # ZeroGPU without the spaces package
    notes = zerogpu.hardware_notes(zero_gpu=True)
    assert set(notes) == {"generate", "attention", "finetune"} and all("lacks the `spaces` package" in n
                                                                       for n in notes.values())
    monkeypatch.setitem(sys.modules, "spaces", type(sys)("spaces"))
    notes = zerogpu.hardware_notes(zero_gpu=True)
    assert notes["generate"] == notes["attention"] == "" and "GPU slots of" in notes["finetune"]
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert zerogpu.hardware_notes(zero_gpu=False) == {"generate": "", "attention": "", "finetune": ""}
