"""Where a shapes model loses its shapes: the world's own scenes, encoded to their latents, noised to a strength and
denoised by the model (diffusers' StableDiffusionImg2ImgPipeline: the last `strength` of the sampling steps), read by
the strict scorer. A shape the VAE returns right but the model bows at a low strength is lost in the last,
low-noise steps; at strength 1 the model draws it from pure noise.

    python bench/bench_shape_loss.py                      # the built-in model, 24 scenes per shape
    python bench/bench_shape_loss.py --model PATH --per-shape 48 --strengths 0.2 0.6 1.0
    python bench/bench_shape_loss.py --new-shape pentagon hexagon diamond cross   # shapes the world lacks

With --new-shape, the scenes are the fine-tune suite's (bench/finetune_suite.py): one object of that shape in the
colours a fine-tune shows it in, named by its word ("a red hexagon on the left"), read by the suite's shape test
(mask IoU >= 0.80 with the ideal and better than every other shape). A fine-tuned model folder (`--method full`)
shows how much of the low-noise drawing a fine-tune relearnt.
"""

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from imagecraft import shapes  # noqa: E402
from imagecraft.loading import DEFAULT_MODEL  # noqa: E402
from imagecraft.shapes.diagnostics import round_trip  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--per-shape", type=int, default=24)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--new-shape", nargs="+", default=None, metavar="FORM",
                        help="the suite's scenes of these shapes instead of the world's")
    args = parser.parse_args()
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(args.model, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if args.new_shape:
        return new_shapes(pipe, args)
    rng, scenes = random.Random(7), []
    for shape in shapes.SHAPES:
        for _ in range(args.per_shape):
            spec = shapes.sample_spec(rng, two_objects=False)
            spec.objects[0].shape = shape
            if (spec.objects[0].colour, shape) in shapes.HELD_OUT:
                spec.objects[0].colour = "red"
            _, prompt, image, _ = shapes.sample_scene(rng, spec=spec)
            scenes.append((shape, prompt, image))
    images = np.stack([image for _, _, image in scenes])
    latents = encode(pipe, images)
    round_trips = round_trip(pipe.vae, images)
    print(f"{args.model}: {args.per_shape} one-object scenes per shape, {args.steps} steps, guidance {args.guidance}, "
          f"{type(pipe.scheduler).__name__}; shapes read right (circle / square / triangle)")
    rows = {"VAE round trip": [shapes.score(im, p)["shape"] for (_, p, _), im in zip(scenes, round_trips)]}
    for strength in args.strengths:
        right = []
        for start in range(0, len(scenes), 24):
            chunk = scenes[start:start + 24]
            generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
            images = pipe([p for _, p, _ in chunk], image=latents[start:start + len(chunk)], strength=strength,
                          num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators).images
            right += [shapes.score(im, p)["shape"] for (_, p, _), im in zip(chunk, images)]
        rows[f"strength {strength:g}"] = right
    for name, right in rows.items():
        counts = [sum(r for (s, _, _), r in zip(scenes, right) if s == shape) for shape in shapes.SHAPES]
        print(f"  {name:<15} " + " / ".join(f"{n}/{args.per_shape}" for n in counts))


@torch.no_grad()
def encode(pipe, images: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 scenes as scaled latents: the posterior means, as the model was trained on."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def new_shapes(pipe, args):
    from bench import finetune_suite as suite

    print(f"{args.model}: {args.per_shape} one-object scenes per new shape (the suite's), {args.steps} steps, guidance "
          f"{args.guidance}; right: the suite's shape test")
    for form in args.new_shape:
        concept = suite.Concept(form, "shape", "-", form=form)
        rng = random.Random(7)
        specs = [suite.spec_for(rng, suite.KNOWN[i % len(suite.KNOWN)], form) for i in range(args.per_shape)]
        images = np.stack([suite.scene(spec, random.Random(i), concept, form) for i, spec in enumerate(specs)])
        prompts = [shapes.prompt_of(spec) for spec in specs]
        latents = encode(pipe, images)

        def right(drawn):
            return sum(suite.shape_right(np.asarray(im), shapes.COLOURS[spec.objects[0].colour], form)
                       for im, spec in zip(drawn, specs))

        cells = [f"VAE round trip {right(round_trip(pipe.vae, images))}/{len(specs)}"]
        for strength in args.strengths:
            generators = [torch.Generator().manual_seed(i) for i in range(len(specs))]
            drawn = pipe(prompts, image=latents, strength=strength, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, generator=generators).images
            cells.append(f"strength {strength:g} {right(drawn)}/{len(specs)}")
        print(f"  {form:<9} " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
