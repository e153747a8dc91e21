"""Seconds per image at the SD1.5 shape on this machine: diffusers' default pipeline against ImageCraft in fp32,
with dtype="auto" (bf16 where the CPU runs it natively), with auto plus DeepCache, and with fp32 plus DeepCache
(what auto plus DeepCache is on a CPU without native bf16).

    python bench/bench_speed_sd15.py                     # 512x512, 25 steps, CFG 7.5, batch 1, cache interval 3
    python bench/bench_speed_sd15.py --size 256 --steps 10 --reps 3
    python bench/bench_speed_sd15.py --variants diffusers fp32 fp32+cache

Random weights in SD1.5's architecture (UNet 860M, CLIP ViT-L text encoder, SD's VAE; nothing downloaded), saved
once to a temporary folder that both pipelines load. Each variant makes whole images (text encoding, sampling,
VAE decoding) with the same seed; the variants run round-robin, and the median and peak memory (resident set size
above the level before the call) are printed with the speed-up over diffusers.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import interleaved  # noqa: E402


VARIANTS = ("diffusers", "fp32", "auto", "auto+cache", "fp32+cache")


def sd15_folder(folder: Path) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from imagecraft.testing import TINY_TEXTS
    from imagecraft.tokenizer import train_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = train_clip_tokenizer(TINY_TEXTS * 4, vocab_size=560, model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # diffusers' defaults: SD1.5's UNet
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--cache-interval", type=int, default=3)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which to run (diffusers always runs: the speed-ups are over it)")
    args = parser.parse_args()

    from diffusers import StableDiffusionPipeline

    from bench.bench_finetune import cpu_name
    from imagecraft.pipeline import ImageCraftPipeline
    from imagecraft.runtime import native_bf16

    folder = sd15_folder(Path(tempfile.mkdtemp(prefix="sd15-random-")))
    theirs = StableDiffusionPipeline.from_pretrained(folder)  # its defaults: fp32, the folder's PNDM
    theirs.set_progress_bar_config(disable=True)
    wanted = set(args.variants)  # only the pipelines asked for are loaded (each holds SD1.5's weights)
    fp32 = ImageCraftPipeline.from_pretrained(folder, dtype="fp32") if wanted & {"fp32", "fp32+cache"} else None
    auto = ImageCraftPipeline.from_pretrained(folder) if wanted & {"auto", "auto+cache"} else None  # dtype="auto"
    auto_dtype = str(auto.dtype).replace("torch.", "") if auto else "auto"
    prompt, common = "a red circle on the left", dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    size = dict(width=args.size, height=args.size)
    every = {
        "diffusers": ("diffusers", lambda: theirs(prompt, generator=torch.Generator().manual_seed(0),
                                                  height=args.size, width=args.size, **common)),
        "fp32": ("ours fp32", lambda: fp32(prompt, seed=0, **size, **common)),
        "auto": (f"ours {auto_dtype} (auto)",
                 lambda: auto(prompt, seed=0, **size, **common)),
        "auto+cache": (f"ours auto + cache {args.cache_interval}",
                       lambda: auto(prompt, seed=0, cache_interval=args.cache_interval, **size, **common)),
        "fp32+cache": (f"ours fp32 + cache {args.cache_interval}",
                       lambda: fp32(prompt, seed=0, cache_interval=args.cache_interval, **size, **common)),
    }
    fns = {every[v][0]: every[v][1] for v in VARIANTS if v in args.variants or v == "diffusers"}
    print(f"SD1.5 shape (random weights), {args.size}x{args.size}, {args.steps} steps, CFG {args.guidance}, batch 1; "
          f"{cpu_name()}, native bf16 {native_bf16()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = interleaved(fns, reps=args.reps, warmup=0)
    base = results["diffusers"]["median"]
    for name, r in results.items():
        print(f"  {name:<24} {r['median']:8.1f} s per image   peak +{r['peak_gib']:.2f} GiB   "
              f"speed-up over diffusers {base / r['median']:.2f}x")


if __name__ == "__main__":
    main()
