"""Where a taught colour goes wrong under classifier-free guidance: the model's prediction of the clean image (x0) on
the data's own scenes, noised to a timestep, decoded, and read as the mean colour inside the data's objects:
conditional (the caption), unconditional (the empty prompt) and guided (u + g (c - u)), against the data's.

    python bench/bench_colour_snap.py --work W --concepts teal magenta   # LoRAs a suite run left in W
    python bench/bench_colour_snap.py --known blue red                   # the base model on its own colours

For a colour the model knows, the conditional and unconditional predictions agree at low noise (the image decides
there), so guidance leaves the last steps alone. For a colour a LoRA taught only through the text (the word lock's
keys and values), the unconditional prediction is still the base model's, which pulls the colour toward a
neighbour in its palette at low noise; guidance multiplies the gap, and the image comes out past the taught colour.
"""

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import finetune_suite  # noqa: E402
from imagecraft import shapes  # noqa: E402
from imagecraft.pipeline import ImageCraftPipeline  # noqa: E402
from imagecraft.train.core import clean_prediction, noise_scheduler, noised_and_target  # noqa: E402


@torch.no_grad()
def snap_table(pipe, captions: list[str], images: np.ndarray, rgb: tuple, timesteps, guidance: float,
               noises: int, seed: int = 0) -> tuple[np.ndarray, dict[int, dict[str, np.ndarray]]]:
    """The data's mean object colour, and per timestep the mean object colour of the decoded x0 predictions:
    "cond", "uncond" and "guided", each averaged over `noises` draws. The objects are the suite's reading of the
    data (`main_object`: the largest region nearer `rgb` than the background); scenes where it finds none are
    left out."""
    masks = [finetune_suite.main_object(image, rgb) for image in images]
    seen = [m is not None for m in masks]
    captions, images = [c for c, s in zip(captions, seen) if s], images[np.array(seen)]
    masks = [m for m in masks if m is not None]
    vae, scale = pipe.vae, pipe.vae.config.scaling_factor

    def colour(latents):  # (N, 4, h, w) -> the mean RGB inside the objects, over the scenes
        decoded = vae.decode(latents.to(pipe.vae_dtype) / scale).sample.float().clamp(-1, 1)
        rgb = ((decoded + 1) * 127.5).permute(0, 2, 3, 1).cpu().numpy()
        return np.mean([rgb[k][masks[k]].mean(0) for k in range(len(rgb))], axis=0)

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = vae.encode(x.to(pipe.device, pipe.vae_dtype)).latent_dist.mean.float() * scale
    cond = pipe.encode_prompt(captions)[0].float()
    uncond = pipe.encode_prompt([""] * len(captions))[0].float()
    scheduler = noise_scheduler(config=pipe.scheduler_config)
    alphas, kind = scheduler.alphas_cumprod.to(z.device), scheduler.config.prediction_type
    generator = torch.Generator().manual_seed(seed)
    table = {}
    for t in timesteps:
        a = alphas[t]
        rows = {"cond": [], "uncond": [], "guided": []}
        for _ in range(noises):
            noise = torch.randn(z.shape, generator=generator).to(z.device)
            steps = torch.full((len(z),), t, device=z.device)
            xt, _ = noised_and_target(kind, alphas, z, noise, steps)

            c, u = (clean_prediction(kind, a, xt, pipe.unet(xt.to(pipe.dtype), steps, context.to(pipe.dtype)).float())
                    for context in (cond, uncond))
            for name, latents in (("cond", c), ("uncond", u), ("guided", u + guidance * (c - u))):
                rows[name].append(colour(latents))
        table[t] = {name: np.mean(v, axis=0) for name, v in rows.items()}
    return colour(z), table


def show(title: str, truth: np.ndarray, table: dict, low: int):
    def rgb(v):
        return "(" + ", ".join(f"{c:3.0f}" for c in v) + ")"

    print(f"\n{title}: the data's objects {rgb(truth)}")
    print(f"  {'t':>4}  {'cond':<17} {'uncond':<17} {'guided':<17} |c - u|  |guided - data|")
    for t, row in table.items():
        gap = np.abs(row["cond"] - row["uncond"]).sum()
        miss = np.abs(row["guided"] - truth).sum()
        print(f"  {t:>4}  {rgb(row['cond']):<17} {rgb(row['uncond']):<17} {rgb(row['guided']):<17} {gap:7.0f}  "
              f"{miss:14.0f}")
    low_rows = [row for t, row in table.items() if t <= low]
    if low_rows:
        gap = np.mean([np.abs(r["cond"] - r["uncond"]).sum() for r in low_rows])
        miss = np.mean([np.abs(r["guided"] - truth).sum() for r in low_rows])
        print(f"  at t <= {low}: cond and uncond {gap:.0f} levels apart (summed over R, G, B); guided {miss:.0f} "
              f"from the data")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the base model (default: the built-in one)")
    parser.add_argument("--work", default=None, help="a suite run's work folder: WORD/data and WORD/lora in it")
    parser.add_argument("--concepts", nargs="*", default=[], help="colour words whose LoRAs --work holds")
    parser.add_argument("--known", nargs="*", default=[], choices=list(shapes.COLOURS),
                        help="colours the base model knows, on its own scenes of them")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[950, 800, 600, 400, 200, 50])
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--images", type=int, default=8, help="scenes per concept (grey backgrounds first)")
    parser.add_argument("--noises", type=int, default=3)
    parser.add_argument("--low", type=int, default=200, help="the summary's low-noise timesteps: t <= this")
    args = parser.parse_args()
    if args.concepts and not args.work:
        parser.error("--concepts needs --work, the folder a suite run (bench_finetune.py --part suite) wrote")
    colours = {c.word: c.rgb for c in finetune_suite.CONCEPTS if c.kind == "colour"}
    if set(args.concepts) - set(colours):
        parser.error(f"--concepts takes the suite's colour words ({', '.join(colours)}), "
                     f"got {', '.join(sorted(set(args.concepts) - set(colours)))}")
    torch.manual_seed(0)
    pipe = ImageCraftPipeline.from_pretrained(args.model, dtype="float32")
    print(f"x0 predictions at guidance {args.guidance:g}, {args.images} scenes x {args.noises} noises per timestep")

    def measure(title, pairs, rgb):  # grey backgrounds first, as most of a user's captions name none
        pairs = sorted(pairs, key=lambda p: "background" in p[0])[:args.images]
        truth, table = snap_table(pipe, [c for c, _ in pairs], np.stack([im for _, im in pairs]), rgb,
                                  args.timesteps, args.guidance, args.noises)
        show(title, truth, table, args.low)

    for word in args.known:
        rgb = shapes.COLOURS[word]
        measure(f"{word}, base model", shapes.colour_word_scenes(random.Random(0), 3 * args.images, word, rgb=rgb), rgb)
    for word in args.concepts:
        folder = Path(args.work) / word
        files = sorted((folder / "data").glob("*.png"))
        pipe.load_lora(folder / "lora")
        measure(f"{word}, LoRA {folder / 'lora'}", [(f.with_suffix(".txt").read_text().strip(),
                                                      np.asarray(Image.open(f).convert("RGB"))) for f in files],
                colours[word])
        pipe.unload_lora()


if __name__ == "__main__":
    main()
