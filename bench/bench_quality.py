"""Quality of a shapes model: how often every attribute of the prompt is right, read by the strict shapes scorer
(a shape counts only if it fits its ideal outline and touches no border: imagecraft.shapes.classify_shape).

    python bench/bench_quality.py                        # the built-in model, 450 prompts
    python bench/bench_quality.py --model PATH --per-group 100
    python bench/bench_quality.py --diffusers            # the same prompts and seeds through diffusers' pipeline

Three groups of prompts sampled from the grammar with a fixed seed, images with fixed seeds, 25 steps,
guidance 5.0, the model's shipped scheduler:
  single    one object with a position AND a background ("a red circle on the left on a blue background")
  two       two objects with a relation (to the left of / above / and), background as the grammar samples it
  held_out  one object of a held-out colour-shape pair, position and background as the grammar samples them
Prints per-group, per-attribute tables, why shapes were not read (per shape asked for: touching the border, a poor
fit to the outline, a dent, another shape, missing), the fraction with every attribute right, and images per
second.
"""

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from imagecraft import shapes  # noqa: E402
from imagecraft.loading import DEFAULT_MODEL  # noqa: E402
from imagecraft.pipeline import ImageCraftPipeline  # noqa: E402

TARGETS = {"single": 0.95, "two": 0.80, "held_out": 0.90}  # every attribute right
SHAPE_TARGET = 0.97  # the shape alone, in every group
ATTRIBUTES = ("background", "count", "colour", "shape", "position", "relation", "all")


def prompts_for(group: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        if group == "held_out":
            colour, shape = rng.choice(sorted(shapes.HELD_OUT))
            spec = shapes.sample_spec(rng, two_objects=False)
            spec.objects[0].colour, spec.objects[0].shape = colour, shape
            if spec.background == colour:
                continue
        else:
            spec = shapes.sample_spec(rng, two_objects=group == "two")
            if group == "single":
                spec.objects[0].position = rng.choice(shapes.POSITIONS)
                spec.background = rng.choice([c for c in shapes.COLOURS if c != spec.objects[0].colour])
        out.append(shapes.prompt_of(spec))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--per-group", type=int, default=150)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", default=None, help="default: the model's shipped scheduler")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--save", default=None, help="folder to save a grid of the first images of each group")
    parser.add_argument("--diffusers", action="store_true",
                        help="sample with plain diffusers' StableDiffusionPipeline (its shipped scheduler) instead")
    parser.add_argument("--dtype", default=None, help="ImageCraft's dtype (auto, fp32, bf16); default: the pipeline's")
    args = parser.parse_args()

    try:
        pipe = ImageCraftPipeline.from_pretrained(args.model, **({"dtype": args.dtype} if args.dtype else {}))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {args.model} is not a model ImageCraft can load, so not a shapes model: {e}")
    if pipe.default_size != shapes.SIZE:
        sys.exit(f"error: {args.model} is not a shapes model: it makes {pipe.default_size} px images, the shapes world "
                 f"is {shapes.SIZE}x{shapes.SIZE} (bench_quality scores only models trained on imagecraft.shapes)")
    sample = _imagecraft_sampler(pipe, args)
    if args.diffusers:
        sample = _diffusers_sampler(args)
    print(f"model {args.model} through {'diffusers' if args.diffusers else 'ImageCraft'}, {args.per_group} prompts per "
          f"group, {args.steps} steps, guidance {args.guidance}, scheduler {args.scheduler or pipe.default_scheduler}")
    summary, shape_summary = {}, {}
    total_images, started = 0, time.perf_counter()
    for g, group in enumerate(TARGETS):
        prompts = prompts_for(group, args.per_group, seed=1000 + g)
        scores, images = [], []
        for start in range(0, len(prompts), args.batch):
            batch = prompts[start:start + args.batch]
            batch_images = sample(batch, start + 100_000 * g)
            scores += [shapes.score(image, prompt) for image, prompt in zip(batch_images, batch)]
            images += batch_images
        total_images += len(prompts)
        print(f"\n{group} ({len(prompts)} prompts)")
        for attribute in ATTRIBUTES:
            values = [s[attribute] for s in scores if s[attribute] is not None]
            if values:
                print(f"  {attribute:<11} {sum(values) / len(values):6.1%}  ({sum(values)}/{len(values)})")
        print("  shape errors  " + shape_errors(images, prompts))
        summary[group] = sum(s["all"] for s in scores) / len(scores)
        shape_summary[group] = sum(s["shape"] for s in scores) / len(scores)
        if args.save:
            _save_grid(images[:32], prompts[:32], scores[:32], Path(args.save) / f"{group}.png")
    seconds = time.perf_counter() - started
    print("\nevery attribute right:")
    for group, value in summary.items():
        verdict = "meets" if value >= TARGETS[group] else "MISSES"
        print(f"  {group:<9} {value:6.1%}   target >= {TARGETS[group]:.0%}: {verdict}")
    print(f"shape alone (target >= {SHAPE_TARGET:.0%} in every group):")
    for group, value in shape_summary.items():
        print(f"  {group:<9} {value:6.1%}   {'meets' if value >= SHAPE_TARGET else 'MISSES'}")
    print(f"\n{total_images} images in {seconds:.1f} s: {total_images / seconds:.2f} images/s "
          f"(batches of {args.batch}, {args.steps} steps, guidance on)")


def shape_errors(images, prompts) -> str:
    """Why the objects of each shape asked for were not read as that shape, with the scorer's own pairing of asked
    and found objects (so the counts add up to its shape errors): "border" (touching it), "fit" (IoU with the ideal
    outline under 0.80), "dent", "other" (read as another shape) or "missing" (no object left to pair with)."""
    import collections

    asked, errors = collections.Counter(), {shape: collections.Counter() for shape in shapes.SHAPES}
    for image, prompt in zip(images, prompts):
        spec = shapes.parse_prompt(prompt)
        _, found = shapes.read_objects(image)
        pairs = shapes.match(spec, found) if found else []
        for obj in spec.objects:
            asked[obj.shape] += 1
        for obj in spec.objects[len(pairs):]:
            errors[obj.shape]["missing"] += 1
        for obj, drawn in pairs:
            if drawn["shape"] != obj.shape:
                errors[obj.shape][drawn["fault"] or "other"] += 1
    return "; ".join(f"{shape} {sum(why.values())}/{asked[shape]}"
                     + "".join(f", {reason} {n}" for reason, n in why.most_common())
                     for shape, why in errors.items() if asked[shape])


def _imagecraft_sampler(pipe, args):
    def sample(prompts, seed):
        return pipe(prompts, seed=seed, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    scheduler=args.scheduler).images
    return sample


def _diffusers_sampler(args):
    """The same prompts and seeds through diffusers' StableDiffusionPipeline: image i of a batch seeded s starts
    from the noise torch.Generator().manual_seed(s + i) draws, as ImageCraft's pipeline does."""
    import torch
    from diffusers import StableDiffusionPipeline

    from imagecraft.schedulers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)

    def sample(prompts, seed):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        return pipe(prompts, generator=generators, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    height=shapes.SIZE, width=shapes.SIZE).images
    return sample


def _save_grid(images, prompts, scores, path):
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    cols = 8
    grid = Image.new("RGB", (cols * 66, ((len(images) + cols - 1) // cols) * 66), (255, 255, 255))
    for i, (image, score) in enumerate(zip(images, scores)):
        x, y = (i % cols) * 66, (i // cols) * 66
        grid.paste(image.resize((64, 64)), (x + 1, y + 1))
        ImageDraw.Draw(grid).rectangle([x, y, x + 65, y + 65], outline=(0, 160, 0) if score["all"] else (220, 0, 0))
    grid.save(path)
    path.with_suffix(".txt").write_text("\n".join(prompts))


if __name__ == "__main__":
    main()
