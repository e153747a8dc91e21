"""UNet_SD against diffusers' UNet2DConditionModel at the SD1.5 shape, same weights and inputs, fp32 and bf16.

    python bench/bench_unet.py                   # batch 2, 64x64 latents (512x512 images), 5 interleaved runs
    python bench/bench_unet.py --reps 9 --device cuda

Prints the median time per forward, peak memory, the ratio ours/diffusers, and the fp32 max relative error.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import interleaved, report  # noqa: E402
from imagecraft import UNet_SD  # noqa: E402
from imagecraft.testing import random_diffusers_unet  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (image size / 8)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = args.device

    theirs = random_diffusers_unet(cross_attention_dim=768)  # with diffusers' defaults otherwise: SD1.5
    ours = UNet_SD.from_diffusers(theirs).eval()
    theirs.to(device), ours.to(device)
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device)
    t = torch.tensor([999, 500][: args.batch] + [250] * max(0, args.batch - 2), device=device)
    context = torch.randn(args.batch, 77, 768, device=device)
    print(f"SD1.5 UNet ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters), batch {args.batch}, "
          f"latents {args.latent}x{args.latent}, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for name in args.dtypes.split(","):
        dtype = dtypes[name]
        theirs.to(dtype), ours.to(dtype)
        xd, cd = x.to(dtype), context.to(dtype)
        with torch.inference_mode():
            if name == "fp32":
                a, b = ours(xd, t, cd), theirs(xd, t, cd).sample
                print(f"fp32 max |ours - diffusers| / max |diffusers| = {((a - b).abs().max() / b.abs().max()).item():.2e}")
            results = interleaved({"imagecraft": lambda: ours(xd, t, cd), "diffusers": lambda: theirs(xd, t, cd)},
                                  reps=args.reps, device=device)
        report(f"UNet forward, {name}", results)


if __name__ == "__main__":
    main()
