"""What bad input and training cost a running server: stalls, memory, disk, generation while a fine-tune trains and
disk under hostile uploads, each against `python app.py` in a subprocess.

    python bench/server_load.py                                # all five, about 20 minutes on 2 cores
    python bench/server_load.py --only stall                   # ping latency while hostile requests are served
    python bench/server_load.py --only memory                  # server RSS over 100 /load_model spellings
    python bench/server_load.py --only disk --disk-requests 1000   # outputs under IMAGECRAFT_OUTPUT_MB=5
    python bench/server_load.py --only disk --disk-mb 1            # a tighter cap, to see it act
    python bench/server_load.py --only training                # generation latency while a fine-tune trains
    python bench/server_load.py --only uploads --uploads 1000  # the fine-tune folders under IMAGECRAFT_UPLOAD_MB=5

Whether each bad input is refused with a sentence is a test: tests/test_bad_input.py (bench/probe_counts.py counts
its outcomes).

Stall. IMAGECRAFT_CONCURRENCY=2; a thread calls /random_seed every 50 ms and records each latency while hostile
requests that cost the server work which is not their own generation go in one at a time (three times each), then
a 1-step generation once 10,000 earlier outputs are kept (what the output pruning scans before each one). Reported:
the worst ping during each against a quiet baseline, and the load average (other work on the machine shows up
here). Target: no request stalls the server by more than 0.5 s beyond the baseline, other than through its own
generation.

Memory. VmRSS from /proc/PID/status before and after 100 /load_model calls with spellings of the built-in folder,
after loading a copy of it (one more model, the yardstick), and over 60 "default | CONFIG" spellings. Target: the
spellings add less than one copy.

Disk. IMAGECRAFT_OUTPUT_MB=5, a private TMPDIR and GRADIO_TEMP_DIR; N /generate requests (1 step, 64x64).
Reported: the size of TMPDIR/imagecraft-outputs and of Gradio's cache, at the end and at most along the way, and
what pruning costs over 10,000 kept outputs. Target: the outputs stay within the cap (plus one request); Gradio's
cache is reported as it is (the app prunes it to the same cap but keeps files under five minutes old; delete_cache
sweeps it hourly).

Training. A server with IMAGECRAFT_SHARE_CORES=1 (the default: the trainer gives way to requests between steps,
serve/jobs.py's CoreShare) and one with 0 (both run side by side), unless --sharing picks one. One-image generations
(the built-in model's defaults, a fixed seed, a pause of 1-1.5 s between them, so that each arrives mid-step) before
a fine-tune, while it trains (LoRA on the demo data) and after it is stopped: the medians and the ratio while
training / without. Target: at most 2x. Then, the fine-tune still training, 16 generations queued at once while
/random_seed is pinged every 50 ms: the worst ping against a quiet baseline, and the training steps taken meanwhile.
Target: the worst stall at most 0.5 s.

Uploads. IMAGECRAFT_UPLOAD_MB=5, a private TMPDIR and GRADIO_TEMP_DIR; N /finetune_upload calls cycling through the
hostile uploads of tests/test_bad_input.py (imagecraft.testing) and uploads that are accepted (zips of noise images,
to fill the cap; one larger than it), plus /finetune_demo_data. Reported per kind: refused with a sentence, accepted,
generic errors; the fine-tune folders' size at most (sampled every 0.2 s) and at the end against the cap; Gradio's
cache, where the uploaded files themselves land, as it is.

The servers import the checkout as it is when they start: run this on a checkout nobody is editing.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from imagecraft.testing import hostile_loose, hostile_zips, png_chunk, png_with, zip_of  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
BUILTIN = "built-in shapes model"  # what the Model box shows for the built-in model
DEFAULT_MODEL = ROOT / "assets" / "shapes-sd"


def short(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load() -> str:
    """The machine's load: on a shared machine, other work shows up in every latency."""
    return ("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
            + f" on {os.cpu_count()} cores")


def hostile_files(work: Path) -> dict[str, Path]:
    """Uploads that cost the server work before it refuses them."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()  # parsed in quadratic time by an old regex
    info.add_text("parameters", "x\nSteps: 1, " + "a " * 30000, zip=True)
    Image.new("RGB", (8, 8)).save(work / "quadratic.png", pnginfo=info)
    files = {"quadratic": work / "quadratic.png"}
    for name, data in {
        "ztxt-bomb": png_with(png_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a" * 50_000_000, 9))),
        "big": png_with(*[png_chunk(b"teSt", bytes(2**20))] * 20),  # 20 MB, no settings
        "many-chunks": png_with(*[png_chunk(b"teSt", b"")] * 100_001),
        "json-deep": png_with(png_chunk(b"tEXt", b"imagecraft\0" + b"[" * 60_000 + b"]" * 60_000)),
    }.items():
        files[name] = work / f"{name}.png"
        files[name].write_bytes(data)
    files["pickle"] = work / "model.ckpt"  # refused by its suffix, never read
    files["pickle"].write_bytes(b"not read")
    return files


# --- a server in a subprocess -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status == 200
    except OSError:
        return False


class Server:
    """`python app.py` on a free port, its output in a log file; `rss_mb()` reads its VmRSS."""

    def __init__(self, work: Path, name: str, **env):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        self.log = work / f"server-{name}.log"
        self.env = dict(os.environ, GRADIO_SERVER_PORT=str(port), PYTHONUNBUFFERED="1", **env)

    def __enter__(self):
        self.out = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while not server_alive(self.url):
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"app.py did not start; see {self.log}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback (most recent call last)")

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False, download_files=False)


def attempt(client, api_name: str, **kwargs) -> str:
    """Calls the API; 'ok' or the refusal's message."""
    try:
        client.predict(api_name=api_name, **kwargs)
        return "ok"
    except Exception as e:  # noqa: BLE001 (a refusal is what is expected here)
        return f"{type(e).__name__}: {e}"


# --- stall ------------------------------------------------------------------------------------------------------------
class Pinger(threading.Thread):
    """Calls /random_seed every `every` seconds and keeps (start, latency) of each call."""

    def __init__(self, server: Server, every: float = 0.05):
        super().__init__(daemon=True)
        self.client, self.every = server.client(), every
        self.pings: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            start = time.perf_counter()
            attempt(self.client, "/random_seed")  # a failed ping counts with its latency
            latency = time.perf_counter() - start
            self.pings.append((start, latency))
            time.sleep(max(0.0, self.every - latency))

    def during(self, start: float, stop: float) -> list[float]:
        """Latencies of the pings that overlapped [start, stop]."""
        return [lat for t, lat in list(self.pings) if t <= stop and t + lat >= start]


def stall(args, work: Path, files: dict[str, Path]):
    from gradio_client import handle_file

    print("\n== stall: worst /random_seed latency (pinged every 50 ms) while one hostile request is served ==")
    print(load())
    outputs = work / "stall-tmp" / "imagecraft-outputs"
    outputs.mkdir(parents=True)
    upload = lambda name: dict(file=handle_file(str(files[name])))  # noqa: E731
    hostile = [
        ("quadratic-parse PNG via /read_png", "/read_png", upload("quadratic")),
        ("zTXt bomb via /read_png", "/read_png", upload("ztxt-bomb")),
        ("1M-character prompt via /generate", "/generate", dict(prompt="a " * 500_000, steps=1)),
        ("2048x2048 x 16 x 150 via /generate", "/generate", dict(prompt="a", width=2048, height=2048, num_images=16,
                                                                 steps=150)),
        ("bad model path via /load_model", "/load_model", dict(model="/no/such/model")),
        ("pickle model via /load_model", "/load_model", dict(model=str(files["pickle"]))),
        ("20 MB PNG without settings via /read_png", "/read_png", upload("big")),
        ("PNG of 100,001 chunks via /read_png", "/read_png", upload("many-chunks")),
        ("JSON chunk nested 60,000 deep via /read_png", "/read_png", upload("json-deep")),
        ("reference, its own work: a valid 25-step generation", "/generate", dict(prompt="a red circle", steps=25)),
        ("1-step /generate with 10,000 earlier outputs kept", "/generate", dict(prompt="a red circle", steps=1)),
    ]
    with Server(work, "stall", IMAGECRAFT_CONCURRENCY="2", TMPDIR=str(outputs.parent),
                GRADIO_TEMP_DIR=str(work / "stall-gradio")) as server:
        client = server.client()
        attempt(client, "/generate", prompt="warm up", steps=1)
        pinger = Pinger(server)
        pinger.start()
        time.sleep(6)
        quiet = [lat for _, lat in pinger.pings[10:]]
        base = statistics.median(quiet)
        print(f"quiet baseline: {len(quiet)} pings, median {base * 1000:.0f} ms, "
              f"p95 {sorted(quiet)[int(0.95 * len(quiet))] * 1000:.0f} ms, max {max(quiet) * 1000:.0f} ms")
        print(f"{'request':52} {'own s':>6} {'pings':>5} {'worst ping':>10} {'stall':>7}  answer")
        worst_stall, worst_name = 0.0, ""
        for name, api_name, kwargs in hostile:
            if "10,000 earlier outputs" in name:  # what pruning scans before every generation
                fill_outputs(outputs, 10_000)
            runs = []
            for _ in range(args.stall_repeats):
                time.sleep(1.0)
                start = time.perf_counter()
                answer = attempt(client, api_name, **kwargs)
                stop = time.perf_counter()
                time.sleep(0.5)  # pings still in flight at `stop` finish
                during = pinger.during(start, stop)
                runs.append((stop - start, len(during), max(during) if during else float("nan"), answer))
            own, count, worst, answer = max(runs, key=lambda r: r[2])
            if not name.startswith("reference") and worst - base > worst_stall:
                worst_stall, worst_name = worst - base, name
            print(f"{name:52} {own:6.2f} {count:5d} {worst * 1000:8.0f} ms {worst - base:6.2f}s  {short(answer)}")
        pinger.done.set()
        pinger.join()
        print(f"worst stall from one request other than its own generation (worst ping minus the quiet median): "
              f"{worst_stall:.2f} s, {worst_name} (target <= 0.5 s: {'met' if worst_stall <= 0.5 else 'MISSED'}); "
              f"server tracebacks logged: {server.tracebacks()}")


# --- memory -----------------------------------------------------------------------------------------------------------
def memory(args, work: Path):
    print("\n== memory: server RSS over 100 /load_model calls with spellings of the built-in folder ==")
    print(load())
    link = work / "link-builtin"
    os.symlink(DEFAULT_MODEL, link)
    builtin = str(DEFAULT_MODEL)
    spellings = [builtin, builtin + "/", builtin + "//", builtin + "/.", "./assets/shapes-sd", "././assets/shapes-sd",
                 "assets/shapes-sd/", "assets//shapes-sd", "assets/../assets/shapes-sd", str(link), str(link) + "/",
                 "default", " default ", BUILTIN, "", "~/" + os.path.relpath(DEFAULT_MODEL, Path.home())]
    copy = work / "shapes-sd-copy"
    shutil.copytree(DEFAULT_MODEL, copy)
    with Server(work, "memory") as server:
        client = server.client()
        attempt(client, "/load_model", model=BUILTIN)
        attempt(client, "/generate", prompt="warm up", steps=1)
        before = server.rss_mb()
        loaded, marks, timings = 0, {}, []
        for i in range(100):
            start = time.perf_counter()
            answer = attempt(client, "/load_model", model=spellings[i % len(spellings)])
            timings.append(time.perf_counter() - start)
            loaded += answer == "ok"
            if answer != "ok":
                print(f"  {spellings[i % len(spellings)]!r} refused: {short(answer, 100)}")
            if i + 1 in (10, 50, 100):
                marks[i + 1] = server.rss_mb()
        print(f"{len(spellings)} spellings, cycled: {loaded} of 100 loaded")
        print(f"RSS before {before:.0f} MB; after 10 calls {marks[10]:.0f} MB, 50 {marks[50]:.0f} MB, "
              f"100 {marks[100]:.0f} MB (growth {marks[100] - before:+.1f} MB)")
        attempt(client, "/load_model", model=str(copy))
        with_copy = server.rss_mb()
        one_copy = with_copy - marks[100]
        print(f"yardstick: loading a copy of the folder (one more model) adds {one_copy:.1f} MB -> "
              f"{'met' if marks[100] - before < one_copy else 'MISSED'} (100 plain spellings grew by less than one "
              f"copy)")
        config_spellings = ["default | default", f"{builtin} | default", "default | ||"] + [
            f"default | x{i}" for i in range(57)]  # "| CONFIG" is ignored for a folder, but keys the cache
        seconds, rss, ok = [], [], 0
        for i, spelling in enumerate(config_spellings, 1):
            start = time.perf_counter()
            ok += attempt(client, "/load_model", model=spelling) == "ok"
            seconds.append(time.perf_counter() - start)
            if i % 20 == 0:
                rss.append(f"after {i}: {server.rss_mb():.0f} MB")
        print(f"then {len(config_spellings)} spellings with a '| CONFIG' suffix ('default | default', "
              f"'default | x0', ...): {ok} loaded, {len(config_spellings) - ok} refused; "
              f"{statistics.median(seconds):.2f} s median per call (a plain spelling: "
              f"{statistics.median(timings):.2f} s, from the cache); RSS {', '.join(rss)} "
              f"({server.rss_mb() - with_copy:+.1f} MB); server tracebacks logged: {server.tracebacks()}")


# --- disk -------------------------------------------------------------------------------------------------------------
def folder_size(folder: Path) -> float:
    """MB of everything under `folder`; files removed meanwhile are skipped."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total / 2**20


def fill_outputs(root: Path, entries: int):
    """`entries` output folders of one 64x64 PNG's size, as generations leave them."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(entries):
        (root / f"old-{i:05d}").mkdir()
        (root / f"old-{i:05d}" / "imagecraft-1.png").write_bytes(bytes(5600))


def disk(args, work: Path):
    n, cap = args.disk_requests, args.disk_mb
    print(f"\n== disk: {n} /generate requests (1 step, 64x64) with IMAGECRAFT_OUTPUT_MB={cap:g} ==")
    print(load())
    tmp, cache = work / "disk-tmp", work / "disk-gradio"
    tmp.mkdir()
    cache.mkdir()
    outputs = tmp / "imagecraft-outputs"
    with Server(work, "disk", TMPDIR=str(tmp), GRADIO_TEMP_DIR=str(cache), IMAGECRAFT_OUTPUT_MB=f"{cap:g}",
                IMAGECRAFT_CONCURRENCY="2") as server:
        peaks = {"outputs": 0.0, "cache": 0.0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                peaks["outputs"] = max(peaks["outputs"], folder_size(outputs))
                peaks["cache"] = max(peaks["cache"], folder_size(cache))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        clients, failures = [server.client(), server.client()], []
        start = time.perf_counter()

        def one(i):
            answer = attempt(clients[i % 2], "/generate", prompt=f"a red circle {i}", steps=1, seed=i)
            if answer != "ok":
                failures.append(answer)
            if (i + 1) % 100 == 0:
                print(f"  {i + 1} requests, {time.perf_counter() - start:.0f} s: outputs {folder_size(outputs):.2f} "
                      f"MB, Gradio cache {folder_size(cache):.2f} MB", flush=True)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, range(n)))
        done.set()
        sampler.join()
        seconds = time.perf_counter() - start
        out_mb, cache_mb = folder_size(outputs), folder_size(cache)
        peaks = {"outputs": max(peaks["outputs"], out_mb), "cache": max(peaks["cache"], cache_mb)}
        print(f"{n} requests in {seconds:.0f} s ({n / seconds:.1f}/s), {len(failures)} failed"
              + (f" (first: {short(failures[0], 100)})" if failures else ""))
        print(f"imagecraft-outputs: {out_mb:.2f} MB at the end, at most {peaks['outputs']:.2f} MB (cap {cap:g} MB, "
              f"plus one request's files: {'met' if peaks['outputs'] <= cap + 0.1 else 'MISSED'})")
        print(f"Gradio cache (GRADIO_TEMP_DIR): {cache_mb:.2f} MB at the end, at most {peaks['cache']:.2f} MB "
              f"({cache_mb / n * 1024:.1f} KB per request); server tracebacks logged: {server.tracebacks()}")
    prune_cost(work / "prune-10k", 10_000)


def prune_cost(root: Path, entries: int):
    """What a sweep of the outputs costs as they fill: it stats every entry, so its time grows with the outputs kept
    (up to IMAGECRAFT_OUTPUT_MB, default 500 MB, and one hour)."""
    from imagecraft.serve import outputs

    fill_outputs(root, entries)
    every, outputs.PRUNE_EVERY = outputs.PRUNE_EVERY, 0.0  # every call sweeps here, to time the sweep itself
    times = []
    for _ in range(3):
        start = time.perf_counter()
        outputs.prune(root)
        times.append(time.perf_counter() - start)
    print(f"a sweep of {entries:,} output folders (nothing to delete): {statistics.median(times):.2f} s median of 3, "
          f"paid by a /generate at most every {every:g} s per folder "
          f"(outputs and Gradio's cache); 500 MB of 64x64 PNGs is ~90,000")


# --- generation while a fine-tune trains -----------------------------------------------------------------------------
def generations(client, n: int, rng: random.Random) -> list[float]:
    """Seconds of each of `n` one-image generations (the built-in defaults, one seed), 1-1.5 s apart."""
    seconds = []
    for _ in range(n):
        time.sleep(1.0 + 0.5 * rng.random())
        start = time.perf_counter()
        answer = attempt(client, "/generate", prompt="a red circle", seed=7)
        seconds.append(time.perf_counter() - start)
        if answer != "ok":
            raise SystemExit(f"a generation failed: {answer}")
    return seconds


def training_step(client) -> tuple[str, int]:
    """The fine-tune's status line and its step (0 before the first)."""
    status = client.predict(api_name="/finetune_status")
    found = re.search(r"step (\d+) of", status)
    return status, int(found.group(1)) if found else 0


def training(args, work: Path, sharing: str):
    print(f"\n== training: one-image generations with and without a fine-tune training, IMAGECRAFT_SHARE_CORES="
          f"{sharing} ==")
    print(load())
    rng, tmp = random.Random(0), work / f"training-{sharing}-tmp"
    tmp.mkdir()
    with Server(work, f"training-{sharing}", IMAGECRAFT_SHARE_CORES=sharing, IMAGECRAFT_MAX_TRAIN_COST="1000000",
                TMPDIR=str(tmp), GRADIO_TEMP_DIR=str(work / f"training-{sharing}-gradio")) as server:
        client, trainer = server.client(), server.client()
        attempt(client, "/generate", prompt="warm up", seed=7)
        pinger = Pinger(server)
        pinger.start()
        time.sleep(6)
        pinger.done.set()
        pinger.join()
        quiet_pings = [lat for _, lat in pinger.pings[10:]]
        ping_base = statistics.median(quiet_pings)
        before = generations(client, args.generations, rng)

        rows = trainer.predict(api_name="/finetune_demo_data")[0]
        job = trainer.submit(rows, "lora", args.train_steps, 4, 0, "", BUILTIN, "", api_name="/finetune")
        deadline = time.time() + 300
        while training_step(trainer)[1] < 2:  # past the setup (model, latents, base previews)
            if job.done() or time.time() > deadline:
                raise SystemExit(f"the fine-tune did not start: {training_step(trainer)[0]}")
            time.sleep(0.5)
        first_step = training_step(trainer)[1]
        start = time.perf_counter()
        during = generations(client, args.generations, rng)
        seconds = time.perf_counter() - start
        status, step = training_step(trainer)
        trained = "Training" in status
        steps_during = step - first_step

        pinger = Pinger(server)
        pinger.start()
        time.sleep(3)
        queued_from = training_step(trainer)[1]
        start = time.perf_counter()
        queued = [client.submit(prompt="a red circle", seed=i, api_name="/generate") for i in range(16)]
        for q in queued:
            q.result()
        stop = time.perf_counter()
        time.sleep(0.5)
        pinger.done.set()
        pinger.join()
        status, queued_to = training_step(trainer)
        trained = trained and "Training" in status
        worst = max(pinger.during(start, stop))

        trainer.predict(api_name="/finetune_stop")
        deadline = time.time() + 120
        while not job.done() and time.time() < deadline:
            time.sleep(0.5)
        after = generations(client, args.generations, rng)
        tracebacks = server.tracebacks()

    without = statistics.median(before + after)
    ratio = statistics.median(during) / without
    print(f"one-image generation (built-in defaults), median of {args.generations} each: before training "
          f"{statistics.median(before):.2f} s, after {statistics.median(after):.2f} s, while training "
          f"{statistics.median(during):.2f} s (max {max(during):.2f} s) -> {ratio:.2f}x the median without "
          f"(target <= 2x: {'met' if ratio <= 2 else 'MISSED'})")
    print(f"the fine-tune took {steps_during} steps in those {seconds:.0f} s ({steps_during / seconds:.2f} steps/s)"
          + ("" if trained else "; it was NOT training throughout (finished or failed): raise --train-steps"))
    print(f"16 generations queued at once: served in {stop - start:.1f} s; /random_seed worst {worst * 1000:.0f} ms "
          f"against a quiet median of {ping_base * 1000:.0f} ms: a stall of {worst - ping_base:.2f} s (target <= "
          f"0.5 s: {'met' if worst - ping_base <= 0.5 else 'MISSED'}); the fine-tune took {queued_to - queued_from} "
          f"steps meanwhile; server tracebacks logged: {tracebacks}")
    return ratio, worst - ping_base


# --- hostile uploads under the disk cap -------------------------------------------------------------------------------
def noise_zip(images: int, side: int, seed: int) -> bytes:
    """A zip of `images` captioned noise PNGs of side x side (noise does not compress: ~3 bytes a pixel)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    members = {}
    for i in range(images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
        members |= {f"noise-{i}.png": buffer.getvalue(), f"noise-{i}.txt": "a noisy square"}
    return zip_of(members)


def upload_kinds(work: Path) -> dict[str, list[Path]]:
    """Each kind of upload, as the files one /finetune_upload sends; "accepted: ..." kinds should be accepted."""
    folder = work / "uploads"
    folder.mkdir()
    kinds = {}
    for name, (data, _) in hostile_zips().items():
        kinds[f"zip: {name}"] = [folder / f"{len(kinds):02d}.zip"]
        kinds[f"zip: {name}"][0].write_bytes(data)
    for name, files in hostile_loose().items():
        (folder / f"{len(kinds):02d}").mkdir()
        kinds[f"loose: {name}"] = [folder / f"{len(kinds):02d}" / file for file in files]
        for path, data in zip(kinds[f"loose: {name}"], files.values()):
            path.write_bytes(data)
    for name, data in {"accepted: 12 noise images of 128x128 (~0.6 MB)": noise_zip(12, 128, 0),
                       "accepted: 4 noise images of 512x512 (~3 MB)": noise_zip(4, 512, 1),
                       "larger than the cap: 8 of 512x512 (~6 MB)": noise_zip(8, 512, 2)}.items():
        kinds[name] = [folder / f"{len(kinds):02d}.zip"]
        kinds[name][0].write_bytes(data)
    kinds["accepted: the demo data (/finetune_demo_data)"] = []
    return kinds


def uploads(args, work: Path):
    from gradio_client import handle_file

    n, cap = args.uploads, args.upload_mb
    print(f"\n== uploads: {n} /finetune_upload calls, hostile and not, with IMAGECRAFT_UPLOAD_MB={cap:g} ==")
    print(load())
    kinds = upload_kinds(work)
    tmp, cache = work / "uploads-tmp", work / "uploads-gradio"
    tmp.mkdir()
    cache.mkdir()
    finetune_root = tmp / "imagecraft-finetune"
    answers: dict[str, list[str]] = {kind: [] for kind in kinds}
    with Server(work, "uploads", TMPDIR=str(tmp), GRADIO_TEMP_DIR=str(cache),
                IMAGECRAFT_UPLOAD_MB=f"{cap:g}") as server:
        peak, done = [0.0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], folder_size(finetune_root))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        client, names, start = server.client(), list(kinds), time.perf_counter()
        for i in range(n):
            kind = names[i % len(names)]
            if kinds[kind]:
                answer = attempt(client, "/finetune_upload", files=[handle_file(str(p)) for p in kinds[kind]])
            else:
                answer = attempt(client, "/finetune_demo_data")
            answers[kind].append(answer)
            if (i + 1) % 100 == 0:
                print(f"  {i + 1} uploads, {time.perf_counter() - start:.0f} s: fine-tune folders "
                      f"{folder_size(finetune_root):.2f} MB, Gradio cache {folder_size(cache):.1f} MB", flush=True)
        done.set()
        sampler.join()
        seconds = time.perf_counter() - start
        end_mb, cache_mb = folder_size(finetune_root), folder_size(cache)
        peak_mb = max(peak[0], end_mb)
        tracebacks = server.tracebacks()
    print(f"{'kind':58} {'sent':>4} {'ok':>4} {'refused':>7} {'generic':>7}  first answer")
    wrong = 0
    for kind, got in answers.items():
        ok = got.count("ok")
        generic = sum("upstream Gradio app has raised an exception" in a for a in got)
        wrong += ok if not kind.startswith("accepted") else len(got) - ok
        print(f"{short(kind, 58):58} {len(got):4d} {ok:4d} {len(got) - ok:7d} {generic:7d}  "
              f"{short(got[0] if got else '', 60)}")
    print(f"{n} calls in {seconds:.0f} s; {wrong} answered other than expected; server tracebacks logged: {tracebacks}")
    print(f"fine-tune folders (uploads and jobs): {end_mb:.2f} MB at the end, at most {peak_mb:.2f} MB (cap {cap:g} "
          f"MB: {'met' if peak_mb <= cap else 'MISSED'})")
    print(f"Gradio cache (GRADIO_TEMP_DIR), where uploaded files land before the app reads them: {cache_mb:.1f} MB "
          f"at the end ({cache_mb / n * 1024:.0f} KB per call)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    scenarios = ["stall", "memory", "disk", "training", "uploads"]
    parser.add_argument("--only", nargs="+", choices=scenarios, default=scenarios)
    parser.add_argument("--stall-repeats", type=int, default=3, help="times each hostile request is sent")
    parser.add_argument("--disk-requests", type=int, default=1000)
    parser.add_argument("--disk-mb", type=float, default=5, help="IMAGECRAFT_OUTPUT_MB for the disk run")
    parser.add_argument("--generations", type=int, default=20, help="one-image generations per training phase")
    parser.add_argument("--train-steps", type=int, default=3000,
                        help="the fine-tune's steps: enough to train throughout (it is stopped at the end)")
    parser.add_argument("--sharing", choices=["both", "1", "0"], default="both",
                        help="IMAGECRAFT_SHARE_CORES of the training servers")
    parser.add_argument("--uploads", type=int, default=1000)
    parser.add_argument("--upload-mb", type=float, default=5, help="IMAGECRAFT_UPLOAD_MB for the uploads run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server logs, files made)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imagecraft-server-load-"))
    try:
        if "stall" in args.only:
            stall(args, work, hostile_files(work))
        if "memory" in args.only:
            memory(args, work)
        if "disk" in args.only:
            disk(args, work)
        if "training" in args.only:
            found = {sharing: training(args, work, sharing) for sharing in
                     (["1", "0"] if args.sharing == "both" else [args.sharing])}
            if len(found) == 2:
                print("\nwhile training, IMAGECRAFT_SHARE_CORES=1 against =0: generation "
                      + " vs ".join(f"{ratio:.2f}x" for ratio, _ in found.values()) + " the quiet median; worst stall "
                      + " vs ".join(f"{stall:.2f} s" for _, stall in found.values()))
        if "uploads" in args.only:
            uploads(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
