"""The speed/quality frontier of the built-in model: seconds per image against strict-scorer accuracy, over
sampler x steps x dtype x DeepCache interval.

    python bench/bench_speed_quality.py                              # the full sweep (long: ~72 points)
    python bench/bench_speed_quality.py --samplers euler_a --steps 10 25 --cache 1 3 --per-group 30
    python bench/bench_speed_quality.py --plot frontier.png

Each point samples bench_quality's prompts (one object, two objects, held-out pairs; `--per-group` each, fixed
seeds, guidance 5) and reads them with the strict shapes scorer (every attribute right). Seconds per image are
the wall time of those batches divided by the images. It prints every point, then the Pareto frontier (no other
point both faster and at least as accurate), and the fastest point within 2 points of the best accuracy, which is
how the app's and the pipeline's defaults are chosen. The plot (matplotlib) shows all points and the frontier.
"""

import argparse
import sys
import time
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_finetune import cpu_name  # noqa: E402
from bench.bench_quality import TARGETS, prompts_for  # noqa: E402
from imagecraft import shapes  # noqa: E402
from imagecraft.loading import DEFAULT_MODEL  # noqa: E402
from imagecraft.pipeline import ImageCraftPipeline  # noqa: E402


def measure(pipe, prompts_by_group, steps, sampler, cache, batch):
    images, right, seconds = 0, {}, 0.0
    for g, (group, prompts) in enumerate(prompts_by_group.items()):
        hits = []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            began = time.perf_counter()
            result = pipe(chunk, seed=start + 100_000 * g, num_inference_steps=steps, guidance_scale=5.0,
                          scheduler=sampler, cache_interval=cache)
            seconds += time.perf_counter() - began
            hits += [shapes.score(im, p)["all"] for im, p in zip(result.images, chunk)]
        right[group] = sum(hits) / len(hits)
        images += len(prompts)
    return seconds / images, right


def pareto(points):
    """The points no other point beats on both speed and accuracy, fastest first."""
    ordered = sorted(points, key=lambda p: (p["seconds"], -p["accuracy"]))
    frontier, best = [], -1.0
    for p in ordered:
        if p["accuracy"] > best:
            frontier.append(p)
            best = p["accuracy"]
    return frontier


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--samplers", nargs="+", default=["euler_a", "dpm++2m", "ddim"])
    parser.add_argument("--steps", nargs="+", type=int, default=[8, 12, 16, 20, 25, 30])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--cache", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--per-group", type=int, default=100)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--plot", default=None, help="write the frontier plot to this PNG")
    parser.add_argument("--baseline-sampler", default=None,
                        help="the sampler of the earlier defaults (fp32, 25 steps, no cache) the choice is compared "
                             "with; default: the model's (the built-in model's defaults before the frontier: euler_a)")
    args = parser.parse_args()

    groups = {g: prompts_for(g, args.per_group, seed=1000 + i) for i, g in enumerate(TARGETS)}
    pipes = {d: ImageCraftPipeline.from_pretrained(args.model, dtype=d) for d in args.dtypes}
    print(f"{args.model}: {args.per_group} prompts per group, guidance 5, {cpu_name()}")
    points = []
    for dtype, sampler, steps, cache in product(args.dtypes, args.samplers, args.steps, args.cache):
        seconds, right = measure(pipes[dtype], groups, steps, sampler, cache, args.batch)
        accuracy = sum(right.values()) / len(right)
        point = dict(dtype=dtype, sampler=sampler, steps=steps, cache=cache, seconds=seconds, accuracy=accuracy,
                     **right)
        points.append(point)
        print(f"  {dtype:<5} {sampler:<15} {steps:>3} steps  cache {cache}  {seconds * 1000:7.1f} ms/image  "
              + "  ".join(f"{g} {v:6.1%}" for g, v in right.items()) + f"  mean {accuracy:6.1%}", flush=True)
    frontier = pareto(points)
    print("\nPareto frontier (fastest first):")
    for p in frontier:
        print(f"  {p['dtype']:<5} {p['sampler']:<15} {p['steps']:>3} steps  cache {p['cache']}  "
              f"{p['seconds'] * 1000:7.1f} ms/image  mean {p['accuracy']:6.1%}")
    best = max(p["accuracy"] for p in points)
    choice = min((p for p in points if p["accuracy"] >= best - 0.02), key=lambda p: p["seconds"])
    n = 3 * args.per_group
    print(f"\nfastest within 2 points of the best ({best:.1%}; one point's standard error is about "
          f"{100 * (best * (1 - best) / n) ** 0.5:.1f} points at {n} images): {choice['dtype']}, {choice['sampler']}, "
          f"{choice['steps']} steps, cache {choice['cache']}: {choice['seconds'] * 1000:.1f} ms/image, "
          f"{choice['accuracy']:.1%}")
    # the defaults before the frontier was measured: a sampler (the model's unless named), 25 steps, fp32, no caching
    sampler = args.baseline_sampler or next(iter(pipes.values())).default_scheduler
    before = next((p for p in points if (p["dtype"], p["sampler"], p["steps"], p["cache"]) == ("fp32", sampler, 25, 1)),
                  None)
    if before is None:
        pipe = pipes.get("fp32") or ImageCraftPipeline.from_pretrained(args.model, dtype="fp32")
        seconds, right = measure(pipe, groups, 25, sampler, 1, args.batch)
        before = dict(seconds=seconds, accuracy=sum(right.values()) / len(right))
    print(f"against the earlier defaults (fp32, {sampler}, 25 steps, no cache: {before['seconds'] * 1000:.1f} ms/image, "
          f"{before['accuracy']:.1%}): {before['seconds'] / choice['seconds']:.2f}x faster, accuracy "
          f"{100 * (choice['accuracy'] - before['accuracy']):+.1f} points (targets: >= 2x, within 2 points)")
    if args.plot:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 4))
        ax = figure.add_subplot()
        ax.scatter([p["seconds"] * 1000 for p in points], [100 * p["accuracy"] for p in points], s=12,
                   color="#999999", label="settings")
        ax.plot([p["seconds"] * 1000 for p in frontier], [100 * p["accuracy"] for p in frontier], "o-",
                color="#d62728", label="Pareto frontier")
        ax.scatter([choice["seconds"] * 1000], [100 * choice["accuracy"]], s=80, facecolors="none",
                   edgecolors="#1f77b4", label="chosen: fastest within 2 points")
        ax.set_xlabel("ms per image")
        ax.set_ylabel("every attribute right, mean of groups (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=100)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
