"""Prompt-to-image: ImageCraftPipeline against diffusers' StableDiffusionPipeline on the same model folder.

    python bench/bench_pipeline.py                      # the built-in model, 25 steps
    python bench/bench_pipeline.py --model PATH --steps 25 --reps 5
    python bench/bench_pipeline.py --tiny               # a tiny random SD pipeline (what the tests use)

Same prompt, seed, steps, guidance and scheduler on both sides; interleaved runs; prints medians, peak memory,
the ratio ours/diffusers and the mean absolute pixel difference between the two images.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import interleaved, report  # noqa: E402
from imagecraft.loading import DEFAULT_MODEL  # noqa: E402
from imagecraft.pipeline import ImageCraftPipeline  # noqa: E402
from imagecraft.schedulers import make_scheduler  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--tiny", action="store_true", help="benchmark a tiny random pipeline instead")
    parser.add_argument("--prompt", default="a red circle on the left")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", default=None, help="default: the model's own")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()

    from diffusers import StableDiffusionPipeline

    model = args.model
    if args.tiny:
        from imagecraft.testing import make_tiny_pipeline_folder

        model = make_tiny_pipeline_folder(Path(tempfile.mkdtemp()) / "tiny")
    ours = ImageCraftPipeline.from_pretrained(model, dtype=args.dtype)
    theirs = StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                     torch_dtype=ours.dtype).to(ours.device)
    theirs.set_progress_bar_config(disable=True)
    scheduler = args.scheduler or ours.default_scheduler
    theirs.scheduler = make_scheduler(scheduler, theirs.scheduler.config)
    size = ours.default_size
    settings = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    images = {}

    def run_ours():
        images["imagecraft"] = ours(args.prompt, seed=0, scheduler=scheduler, **settings).images[0]

    def run_theirs():
        generator = torch.Generator("cpu").manual_seed(0)
        images["diffusers"] = theirs(args.prompt, generator=generator, height=size, width=size, **settings).images[0]

    print(f"model {model}, {size}x{size}, {args.steps} steps, guidance {args.guidance}, scheduler {scheduler}, "
          f"dtype {args.dtype}, device {ours.device}, threads {torch.get_num_threads()}")
    results = interleaved({"imagecraft": run_ours, "diffusers": run_theirs}, reps=args.reps, device=ours.device)
    report("prompt to image (one image)", results)
    diff = np.abs(np.asarray(images["imagecraft"], float) - np.asarray(images["diffusers"], float)).mean()
    print(f"  mean |ours - diffusers| = {diff:.4f} / 255 (target <= 1)")


if __name__ == "__main__":
    main()
