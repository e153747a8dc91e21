"""Shared benchmark helpers: interleaved timing with medians, and peak memory per call."""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def measure(fn, device: str = "cpu") -> tuple[float, float]:
    """(seconds, peak extra memory in GiB) of one call. On CUDA the allocator's peak; on CPU the resident set
    size above its level before the call, sampled every millisecond."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**30
    base = peak = _rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, (max(peak, _rss()) - base) / 2**30


def interleaved(fns: dict, reps: int, warmup: int = 1, device: str = "cpu") -> dict:
    """Runs each function of `fns` in turn, `reps` times round-robin after `warmup` rounds; returns per name the
    median seconds and the largest peak memory."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    peaks = {name: 0.0 for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            seconds, peak = measure(fn, device)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
    return {name: dict(median=statistics.median(times[name]), peak_gib=peaks[name], runs=times[name]) for name in fns}


def report(title: str, results: dict, ours: str = "imagecraft", theirs: str = "diffusers") -> float:
    """Prints one line per contender and the ratio ours/theirs of the medians; returns the ratio."""
    print(f"\n{title}")
    for name, r in results.items():
        print(f"  {name:<12} median {r['median']:8.3f} s   peak +{r['peak_gib']:.2f} GiB   "
              f"runs {', '.join(f'{t:.2f}' for t in r['runs'])}")
    ratio = results[ours]["median"] / results[theirs]["median"]
    print(f"  ratio {ours}/{theirs} = {ratio:.3f}  ({'meets' if ratio <= 1.0 else 'misses'} the <= 1.0 target)")
    return ratio
