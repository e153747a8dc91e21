"""Small speed levers beside the sampler, dtype and caching (issue #21's "cheap wins"), each measured here.

    python bench/bench_cheap_wins.py                         # every part
    python bench/bench_cheap_wins.py --only threads text --reps 5

threads  the built-in model, 25 steps, guidance 5, one image and a batch of 8: torch threads 1 against all cores
         (the default); interleaved medians.
text     what encoding the prompt costs against the image: the built-in model's whole call against its two
         text-encoder passes (prompt and negative), and the same at SD1.5's shape (CLIP ViT-L, random weights)
         against one guided UNet step at 512x512. A cache of prompt embeddings can save at most this share.
dtype    the images dtype="auto" makes against fp32's on the built-in model (same prompts and seeds: bench_quality's
         150 one-object prompts): mean |difference| / 255, and the share of images the strict scorer reads alike.
tiling   SD's VAE (random weights) decoding a 1024x1024 image: whole against tiled (diffusers' `enable_tiling`,
         512 px tiles), seconds and peak memory (resident set size above the level before the call).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_finetune import cpu_name  # noqa: E402
from bench.common import interleaved  # noqa: E402
from imagecraft.pipeline import ImageCraftPipeline  # noqa: E402
from imagecraft.runtime import native_bf16  # noqa: E402

PARTS = ("threads", "text", "dtype", "tiling")


def threads(reps: int):
    pipe = ImageCraftPipeline.from_pretrained()
    cores = torch.get_num_threads()
    print(f"\nthreads: built-in model ({str(pipe.dtype).replace('torch.', '')}), 25 steps, guidance 5")
    for batch in (1, 8):
        def call(n):
            def run():
                torch.set_num_threads(n)
                pipe(["a red circle on the left"] * batch, seed=0, num_inference_steps=25, guidance_scale=5.0)
            return run

        fns = {f"{n} thread{'s' * (n > 1)}": call(n) for n in sorted({1, cores})}
        results = interleaved(fns, reps=reps)
        torch.set_num_threads(cores)
        base = results[f"{cores} thread{'s' * (cores > 1)}"]["median"]
        for name, r in results.items():
            print(f"  batch {batch}  {name:<10} {r['median'] / batch * 1000:8.1f} ms per image   "
                  f"{r['median'] / base:.2f}x the default's time")


def text(reps: int):
    pipe = ImageCraftPipeline.from_pretrained()
    prompt = "a red circle to the left of a blue square"
    results = interleaved({"image": lambda: pipe(prompt, seed=0, num_inference_steps=25, guidance_scale=5.0),
                           "text": lambda: (pipe.encode_prompt([prompt]), pipe.encode_prompt([""]))}, reps=reps)
    share = results["text"]["median"] / results["image"]["median"]
    print(f"\ntext: built-in model, 25 steps: image {results['image']['median'] * 1000:.1f} ms, prompt and negative "
          f"encoded {results['text']['median'] * 1000:.2f} ms ({share:.1%} of the image)")

    from bench.bench_speed_sd15 import sd15_folder

    sd = ImageCraftPipeline.from_pretrained(sd15_folder(Path(tempfile.mkdtemp(prefix="sd15-random-"))))
    latents = torch.randn(2, 4, 64, 64, dtype=sd.dtype)
    context = torch.cat([sd.encode_prompt([""])[0], sd.encode_prompt([prompt])[0]])

    def unet_step():
        with torch.inference_mode():
            sd.unet(latents, 500, context)

    def encode():
        with torch.inference_mode():
            sd.encode_prompt([prompt]), sd.encode_prompt([""])

    results = interleaved({"step": unet_step, "text": encode}, reps=reps)
    step, enc = results["step"]["median"], results["text"]["median"]
    print(f"  SD1.5 shape ({str(sd.dtype).replace('torch.', '')}), 512x512: one guided UNet step {step:.2f} s, prompt "
          f"and negative encoded {enc * 1000:.0f} ms: {enc / (25 * step):.2%} of a 25-step image's sampling")


def dtype(reps: int):
    import numpy as np

    from bench.bench_quality import prompts_for
    from imagecraft import shapes

    pipes = {d: ImageCraftPipeline.from_pretrained(dtype=d) for d in ("fp32", "auto")}
    prompts = prompts_for("single", 150, seed=1000)
    images = {d: [im for start in range(0, len(prompts), 50)
                  for im in pipe(prompts[start:start + 50], seed=start, num_inference_steps=25,
                                 guidance_scale=5.0).images] for d, pipe in pipes.items()}
    diff = [np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
            for a, b in zip(images["fp32"], images["auto"])]
    alike = np.mean([shapes.score(a, p)["all"] == shapes.score(b, p)["all"]
                     for a, b, p in zip(images["fp32"], images["auto"], prompts)])
    print(f"\ndtype: built-in model, auto ({str(pipes['auto'].dtype).replace('torch.', '')}) against fp32, "
          f"{len(prompts)} images: mean |difference| {np.mean(diff):.2f}/255 (90th percentile "
          f"{np.percentile(diff, 90):.2f}), scorer verdict the same for {alike:.0%}")


def tiling(reps: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512).eval()
    latents = torch.randn(1, 4, 128, 128)
    out = {}

    def decode(tiled):
        def run():
            (vae.enable_tiling if tiled else vae.disable_tiling)()
            with torch.inference_mode():
                out[tiled] = vae.decode(latents).sample
        return run

    results = interleaved({"whole": decode(False), "tiled": decode(True)}, reps=reps, warmup=0)
    diff = (out[True] - out[False]).abs().mean().item() * 127.5
    print("\ntiling: SD's VAE decoding 1024x1024 (fp32)")
    for name, r in results.items():
        print(f"  {name:<6} {r['median']:6.1f} s   peak +{r['peak_gib']:.2f} GiB")
    print(f"  tiled image differs from whole by {diff:.2f}/255 on average (seams blended)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"{cpu_name()}, native bf16 {native_bf16()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for part in args.only:
        started = time.time()
        {"threads": threads, "text": text, "dtype": dtype, "tiling": tiling}[part](args.reps if part != "tiling" else min(args.reps, 2))
        print(f"  ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
