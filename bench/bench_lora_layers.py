"""Which of a LoRA's layers carry what it learnt, and which the damage: a suite LoRA (bench/finetune_suite.py) with
groups of its layers at scale 0, each read as the suite reads it: the taught colour on the shapes shown and on a
shape never shown, the model's own one-object prompts (every attribute, the taught colour and its neighbours in
the scorer's palette) and the texture inside their objects against the base model's.

    python bench/bench_lora_layers.py --work W --concepts teal magenta   # LoRAs a suite run left in W

Groups: every layer on; the self-attention (attn1) off; the cross-attention (attn2) off; each of the
cross-attention's projections off (to_q, to_k, to_v, to_out); the UNet's down, middle and up blocks off; and only
the cross-attention's keys and values on.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import finetune_suite  # noqa: E402
from bench.bench_quality import prompts_for  # noqa: E402
from imagecraft import lora  # noqa: E402
from imagecraft.loading import DEFAULT_MODEL  # noqa: E402
from imagecraft.pipeline import ImageCraftPipeline  # noqa: E402


def groups(names: list[str]) -> dict[str, list[str]]:
    """Layer groups by name, each the layers it switches off."""
    out = {"none off": [], "attn1 off": [n for n in names if ".attn1." in n],
           "attn2 off": [n for n in names if ".attn2." in n]}
    out |= {f"attn2.{p} off": [n for n in names if f".attn2.{p}" in n] for p in ("to_q", "to_k", "to_v", "to_out")}
    out |= {f"{block} off": [n for n in names if n.startswith(block)]
            for block in ("input_blocks", "middle_block", "output_blocks")}
    out["only attn2 keys, values on"] = [n for n in names if not n.endswith(("attn2.to_k", "attn2.to_v"))]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--work", required=True, help="a suite run's --work folder (its LoRAs are WORK/WORD/lora)")
    parser.add_argument("--concepts", nargs="+", required=True, help="colour words of the suite")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--old-prompts", type=int, default=60)
    args = parser.parse_args()
    colours = {c.word: c for c in finetune_suite.CONCEPTS if c.kind == "colour"}
    for word in args.concepts:
        if word not in colours:
            parser.error(f"{word!r} is not a colour of the suite; its colours: {', '.join(colours)}")
    torch.manual_seed(0)
    pipe = ImageCraftPipeline.from_pretrained(args.model)
    old = prompts_for("single", args.old_prompts, seed=1000)
    base = finetune_suite.old_images(pipe, old)
    base_texture = finetune_suite.texture(base, old)
    for word in args.concepts:
        concept = colours[word]
        palette, others = {word: concept.rgb}, finetune_suite.decoys(word)
        pipe.load_lora(Path(args.work) / word / "lora")
        layers = lora.lora_layers(pipe.unet)
        print(f"{word}: {len(layers)} LoRA layers")
        for label, off in groups(list(layers)).items():
            for name, layer in layers.items():
                layer.set_scale(lora.ADAPTER, 0.0 if name in off else 1.0)
            rates = finetune_suite.evaluate(pipe, concept, args.seeds)
            images = finetune_suite.old_images(pipe, old)
            print(f"  {label:28s} ({len(off):2d} off)  shown {rates['shown']:.0%}  never shown {rates['unshown']:.0%}  "
                  f"old prompts {finetune_suite.old_right(images, old, palette, others):.1%}  "
                  f"texture {finetune_suite.texture(images, old) / base_texture:.2f}x", flush=True)
        pipe.unload_lora()


if __name__ == "__main__":
    main()
