"""Command line: `python -m imagecraft generate ...` (also installed as the `imagecraft` command).

    imagecraft generate --prompt "a red circle on the left" --seed 42 --output out.png
    imagecraft generate --model ./my-sd15-folder --prompt "a castle" --scheduler dpm++2m_karras --steps 30
    imagecraft generate --from-png out.png                # regenerate an image from its metadata
"""

from __future__ import annotations

import argparse
import sys

from .schedulers import SCHEDULERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagecraft", description="ImageCraft: text-to-image with UNet_SD.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images from a prompt",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--model", default=None,
                     help="the built-in model (default), a diffusers folder, a Hub id or a .safetensors single file")
    gen.add_argument("--config", default=None,
                     help="for a single-file model: a diffusers folder or Hub id with its tokenizer and configs")
    gen.add_argument("--prompt", default=None, help="what to draw; empty means unconditional")
    gen.add_argument("--negative-prompt", default=None, help="what to steer away from")
    gen.add_argument("--seed", type=int, default=None, help="image i uses seed + i; random when not given")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps, 1..150 (25 when not given)")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (7.5 when not given)")
    gen.add_argument("--scheduler", default=None, choices=list(SCHEDULERS),
                     help="sampler; the model's own when not given")
    gen.add_argument("--width", type=int, default=None, help="multiple of 8, 64..2048; the model's size when not given")
    gen.add_argument("--height", type=int, default=None, help="multiple of 8, 64..2048; the model's size when not given")
    gen.add_argument("--num-images", type=int, default=None, help="images in the batch, 1..16 (1 when not given)")
    gen.add_argument("--output", default="imagecraft-{seed}.png",
                     help="PNG path; {seed} and {i} are filled in, and -i is added for batches")
    gen.add_argument("--from-png", default=None,
                     help="take every setting from this PNG's metadata (flags given here override)")
    gen.add_argument("--device", default=None, help="cpu, cuda or mps; detected when not given")
    gen.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                     help="fp16 on CUDA, fp32 elsewhere when not given")
    return parser


FLAG_TO_SETTING = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed",
                   "steps": "num_inference_steps", "guidance": "guidance_scale", "scheduler": "scheduler",
                   "width": "width", "height": "height", "num_images": "num_images"}


def generate(args) -> list:
    from tqdm import tqdm

    from .metadata import pipeline_settings, read_png_settings
    from .pipeline import ImageCraftPipeline

    settings = {}
    if args.from_png:
        settings = pipeline_settings(read_png_settings(args.from_png))
    settings.update({FLAG_TO_SETTING[k]: v for k, v in vars(args).items() if k in FLAG_TO_SETTING and v is not None})
    if "prompt" not in settings:
        raise ValueError("give --prompt (an empty one means unconditional) or --from-png")

    print(f"loading {args.model or 'the built-in model'} ...", file=sys.stderr)
    pipe = ImageCraftPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, config=args.config)
    bar = tqdm(desc="sampling", unit="step", file=sys.stderr)

    def progress(step, total, latents):
        bar.total = total
        bar.update(1)

    try:
        result = pipe(callback=progress, **settings)
    finally:
        bar.close()
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    paths = result.save(args.output)
    for path, seed in zip(paths, result.seeds):
        print(f"{path}  seed={seed}")
    return paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
    except (ValueError, FileNotFoundError) as e:  # our errors are ValueErrors with a sentence for the user
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
