"""The app's cold start and time to first image, measured as a user meets them.

    python bench/bench_app.py          # starts `python app.py`, polls the page, then generates through the API

Cold start: from launching `python app.py` until the page is served. Time to first image: one /generate call
on the built-in model at 25 steps (the default), from request to returned PNG, then the median of 5 more.
"""

import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    from gradio_client import Client

    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("app.py exited before serving the page")
                time.sleep(0.05)
        cold = time.perf_counter() - started
        client = Client(url, verbose=False)
        start = time.perf_counter()
        client.predict("a red circle on the left", seed=1, api_name="/generate")
        first = time.perf_counter() - start
        more = []
        for i in range(5):
            start = time.perf_counter()
            client.predict("a blue square above a green triangle", seed=i, api_name="/generate")
            more.append(time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait()
    print(f"cold start (python app.py until the page is served): {cold:.2f} s")
    print(f"time to first image (25 steps, built-in model, via the API): {first:.2f} s "
          f"({'meets' if first <= 2.0 else 'misses'} the <= 2 s target)")
    print(f"next images: median {statistics.median(more):.2f} s ({', '.join(f'{t:.2f}' for t in more)})")


if __name__ == "__main__":
    main()
