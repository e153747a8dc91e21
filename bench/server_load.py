"""What bad input costs a running server: stalls, memory and disk, each against `python app.py` in a subprocess.

    python bench/server_load.py                                # all three, about 10 minutes on 2 cores
    python bench/server_load.py --only stall                   # ping latency while hostile requests are served
    python bench/server_load.py --only memory                  # server RSS over 100 /load_model spellings
    python bench/server_load.py --only disk --disk-requests 1000   # outputs under IMAGECRAFT_OUTPUT_MB=5
    python bench/server_load.py --only disk --disk-mb 1            # a tighter cap, to see it act

Whether each bad input is refused with a sentence is a test: tests/test_bad_input.py.

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

The servers import the checkout as it is when they start: run this on a checkout nobody is editing.
"""

from __future__ import annotations

import argparse
import os
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
from imagecraft.testing import png_chunk, png_with  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=["stall", "memory", "disk"], default=["stall", "memory", "disk"])
    parser.add_argument("--stall-repeats", type=int, default=3, help="times each hostile request is sent")
    parser.add_argument("--disk-requests", type=int, default=1000)
    parser.add_argument("--disk-mb", type=float, default=5, help="IMAGECRAFT_OUTPUT_MB for the disk run")
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
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
