"""Fine-tuning, measured: teaching the built-in model a colour word it never saw, and time per training step
against diffusers + peft.

    python bench/bench_finetune.py                  # both parts
    python bench/bench_finetune.py --part teach     # the colour word only
    python bench/bench_finetune.py --part speed     # the step time only

teach: a LoRA with the default recipe (what `imagecraft finetune --data D --output O` does) on 24 generated images
  of pink (255, 105, 180) circles and squares, in the world's grammar. Then, with the LoRA at scale 1, single objects
  "a pink {circle, square, triangle} {position}" at every position, 4 seeds each (--seeds), read by the strict
  shapes scorer with pink added to its palette and its neighbours (magenta and the suite's other colours) as
  decoys: pink on circles and squares, and on triangles, never seen in pink. Targets: the colour right >= 80%, pink
  triangles fully right >= 60%. The old colours: bench_quality's one-object prompts with and without the LoRA, read
  with the same colours (an old colour drawn pink is wrong); they may drop by 5 points at most. --prior N adds prior
  preservation (finetune's class_prompts) on N base-model images of the app demo's prompts (every old colour and
  shape).
speed: one LoRA training step (forward, backward, AdamW) on the built-in model's UNet, batch 4, LoRA rank 8 on
  to_q/to_k/to_v/to_out.0, in UNet_SD and in diffusers' UNet2DConditionModel with the same weights and peft's
  LoRA, same dtype (bf16 autocast where the CPU runs bf16 natively, else fp32): interleaved medians. Target <= 1.0.
"""

import argparse
import dataclasses
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.bench_quality import prompts_for  # noqa: E402
from imagecraft import lora, shapes  # noqa: E402
from imagecraft.serve import jobs  # noqa: E402
from imagecraft.runtime import training_bf16  # noqa: E402
from imagecraft.train.finetune import finetune  # noqa: E402
from imagecraft.train.recipe import FinetuneRecipe as Recipe  # noqa: E402
from imagecraft.loading import DEFAULT_MODEL  # noqa: E402
from imagecraft.pipeline import ImageCraftPipeline  # noqa: E402

PINK = shapes.NEW_COLOURS["pink"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def flags_recipe(args) -> Recipe:
    """The recipe as `imagecraft finetune` builds it from its flags: the defaults, or those of --recipe (after an
    anchor's)."""
    from imagecraft.train.recipe import build_parser, check_recipe, recipe_from_args

    return check_recipe(recipe_from_args(build_parser().parse_args(
        ["--data", "-", "--output", "-", *shlex.split(ANCHORS.get(args.anchor, "")), *shlex.split(args.recipe)])))


def teach(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-finetune-"))
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i, (caption, image) in enumerate(shapes.colour_word_scenes(random.Random(0), 24, "pink")):
        Image.fromarray(image).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(caption)
    recipe = dataclasses.replace(flags_recipe(args), seed=0, **{
        k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("rank", args.rank),
                          ("targets", args.targets and tuple(args.targets.split(","))),
                          ("text_encoder_lora", args.text_encoder_lora or None)) if v is not None})
    if args.prior:  # prior preservation on the app demo's prompts: every old colour and shape, one object each
        recipe.class_prompts, recipe.class_images = tuple(jobs.demo_class_prompts()), args.prior
    started = time.perf_counter()
    result = finetune(args.model, data, work / "lora", recipe)
    minutes = (time.perf_counter() - started) / 60
    print(f"trained {result.step} steps (rank {recipe.rank}, lr {recipe.peak_lr:g}, batch {recipe.batch_size}"
          + (f", prior preservation on {recipe.class_images} images" if recipe.class_prompts else "")
          + f") in {minutes:.1f} min on {cpu_name()}; final loss {result.history[-1][1]:.4f}")

    pipe = ImageCraftPipeline.from_pretrained(args.model)
    pipe.load_lora(work / "lora")
    from bench import finetune_suite

    palette, others = {"pink": PINK}, finetune_suite.decoys("pink")  # pink read against magenta and the rest
    by_shape = {}
    for shape in shapes.SHAPES:
        specs = [shapes.Spec([shapes.Obj("pink", shape, position)]) for position in shapes.POSITIONS] * args.seeds
        images = pipe([shapes.prompt_of(s) for s in specs], seed=500, num_inference_steps=25,
                      guidance_scale=5.0).images
        by_shape[shape] = [shapes.score(im, s, palette, others) for im, s in zip(images, specs)]
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            grid = Image.new("RGB", (64 * 10, 64 * 2))
            for i, im in enumerate(images[:20]):
                grid.paste(im, ((i % 10) * 64, (i // 10) * 64))
            grid.save(Path(args.save) / f"pink-{shape}.png")
    colour = [s["colour"] for scores in by_shape.values() for s in scores]
    print(f"\npink, LoRA at scale 1 ({5 * args.seeds} images per shape: 5 positions x {args.seeds} seeds):")
    for shape, scores in by_shape.items():
        rate = {k: sum(bool(s[k]) for s in scores) / len(scores) for k in ("colour", "shape", "background",
                                                                            "position", "all")}
        print(f"  {shape:<9} " + "  ".join(f"{k} {v:6.1%}" for k, v in rate.items()))
    colour_rate = sum(colour) / len(colour)
    triangles = sum(s["all"] for s in by_shape["triangle"]) / len(by_shape["triangle"])
    print(f"  colour right {colour_rate:.1%} (target >= 80%), pink triangles fully right {triangles:.1%} "
          f"(target >= 60%)")

    prompts = prompts_for("single", args.old_prompts, seed=1000)
    rates = []
    for with_lora in (False, True):
        if with_lora:
            pipe.load_lora(work / "lora")
        else:
            pipe.unload_lora()
        images = finetune_suite.old_images(pipe, prompts)
        scores = [shapes.score(im, p, palette, others) for im, p in zip(images, prompts)]  # an old colour drawn pink
        by = {shape: [s["all"] for s, p in zip(scores, prompts) if shapes.parse_prompt(p).objects[0].shape == shape]
              for shape in shapes.SHAPES}
        rates.append((sum(s["colour"] for s in scores) / len(scores), sum(s["all"] for s in scores) / len(scores),
                      {shape: sum(v) / len(v) for shape, v in by.items() if v}))
    (c0, a0, s0), (c1, a1, s1) = rates
    print(f"\nold colours ({len(prompts)} one-object prompts): colour right {c0:.1%} -> {c1:.1%} with the LoRA "
          f"({(c1 - c0) * 100:+.1f} points; target >= -5), every attribute {a0:.1%} -> {a1:.1%}")
    # the base model's own rate per shape is what a taught colour can reach on that shape
    print("  every attribute by shape, without -> with the LoRA: "
          + ", ".join(f"{shape} {s0[shape]:.0%} -> {s1[shape]:.0%}" for shape in s0))
    print(f"\nwork folder: {work}")


def speed(args):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from imagecraft.port import load_pipe_into_our_UNet

    threads = torch.get_num_threads()
    bf16 = training_bf16("auto", "cpu")
    theirs = UNet2DConditionModel.from_pretrained(Path(args.model) / "unet", torch_dtype=torch.float32)
    pipe = ImageCraftPipeline.from_pretrained(args.model, dtype="fp32")
    ours = pipe.unet
    load_pipe_into_our_UNet(ours, theirs)  # the same weights, exactly
    targets = list(lora.UNET_TARGETS["attn"])
    torch.manual_seed(0)
    lora.add_lora(ours, lora.unet_targets(ours), 8, 8)
    theirs.requires_grad_(False)
    theirs.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights=True))
    batch, size = 4, ours.config.in_channels
    latent = pipe.default_size // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, size, latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, pipe.tokenizer.model_max_length, ours.config.context_dim, generator=g)
    target = torch.randn(x.shape, generator=g)

    def stepper(model, call):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = call(model)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, sum(p.numel() for p in params)

    ours_step, n_ours = stepper(ours, lambda m: m(x, t, ctx))
    theirs_step, n_theirs = stepper(theirs, lambda m: m(x, t, ctx).sample)
    assert n_ours == n_theirs, (n_ours, n_theirs)
    for _ in range(3):
        ours_step(), theirs_step()
    times = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours_step), ("diffusers", theirs_step)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    a, b = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(f"\nLoRA training step, built-in model, batch {batch}, rank 8 on {', '.join(targets)} ({n_ours:,} trainable), "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {threads} threads, {cpu_name()} "
          f"(native bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}):")
    print(f"  UNet_SD + peft {a * 1000:.1f} ms, diffusers UNet2DConditionModel + peft {b * 1000:.1f} ms "
          f"(medians of {args.repeats}, interleaved): ratio {a / b:.2f} (target <= 1.0)")


# The anchors' defaults as `imagecraft finetune` flags, on our UNet (ported exactly from diffusers', so the same
# training as their UNet2DConditionModel + peft):
ANCHORS = {
    # diffusers' examples/text_to_image/train_text_to_image_lora.py: rank 4 (alpha = rank) on to_q/k/v/out, lr 1e-4
    # constant (get_scheduler's "constant" ignores --lr_warmup_steps), batch 16, 100 epochs (150 steps of 16 for 24
    # images), AdamW weight decay 1e-2, gradient clipping 1, no SNR weighting, no flips, no prior preservation
    "diffusers": "--rank 4 --lr 1e-4 --batch-size 16 --steps 150 --warmup 0 --snr-gamma 0 --targets attn "
                 "--preserve 0 --validation-images 0 --no-word-token --word-lock 0",
    # kohya's sd-scripts train_network.py with networks.lora and no options: dim 4, alpha 1, learning rate 2e-6,
    # constant, batch 1, 1600 steps, AdamW, clipping 1, LoRA on every linear layer of the UNet's transformers and on
    # the text encoder (kohya also adapts its MLPs; ours, its attention)
    "kohya": "--rank 4 --alpha 1 --lr 2e-6 --batch-size 1 --steps 1600 --warmup 0 --snr-gamma 0 "
             "--targets attn,ff,proj --text-encoder-lora --preserve 0 --validation-images 0 --no-word-token "
             "--word-lock 0",
}


def suite(args):
    """Every concept of the chosen split (bench/finetune_suite.py) with the default recipe (or the overrides)."""
    from bench import finetune_suite

    concepts = [c for c in finetune_suite.CONCEPTS if args.split in ("all", c.split)
                and (not args.concepts or c.word in args.concepts)]
    if not args.no_control:  # first: what the recipe costs with nothing to learn
        concepts.insert(0, finetune_suite.CONTROL)
    recipe = flags_recipe(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-suite-"))
    pipe = ImageCraftPipeline.from_pretrained(args.model)
    print(f"suite ({args.split}: {', '.join(c.word for c in concepts)}) on {cpu_name()}, recipe {recipe}")
    rows = finetune_suite.run(pipe, recipe, concepts, work, prompts_for("single", args.old_prompts, seed=1000),
                              seeds=args.seeds, copies=args.copies, world=args.rehearse, model=args.model)
    for kind in ("colour", "shape", "style"):
        mine = [r for r in rows if r["kind"] == kind]
        if mine:
            print(f"{kind}: shown {statistics.mean(r['shown'] for r in mine):.1%}, "
                  f"never shown {statistics.mean(r['unshown'] for r in mine):.1%}")
    for r in [r for r in rows if r["kind"] == "control"]:
        print(f"control (24 scenes of the world itself, nothing new): old prompts {r['old_before']:.1%} -> "
              f"{r['old_after']:.1%}, texture {r['texture_ratio']:.2f}x: what fine-tuning itself costs")
    rows = [r for r in rows if r["kind"] != "control"]
    if not rows:
        return
    print(f"old prompts, every attribute (the taught colour in the scorer's palette, its neighbours as decoys): "
          f"{statistics.mean(r['old_before'] for r in rows):.1%} before, "
          f"{statistics.mean(r['old_after'] for r in rows):.1%} after (means over concepts); texture "
          f"{statistics.mean(r['texture_ratio'] for r in rows):.2f}x the base model's; "
          f"{statistics.mean(r['minutes'] for r in rows):.1f} min per fine-tune")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--part", choices=("teach", "speed", "both", "suite"), default="both",
                        help="suite: the concept suite (bench/finetune_suite.py), not part of both")
    parser.add_argument("--split", choices=("tune", "report", "all"), default="report",
                        help="the suite's concepts: those defaults are tuned on, or those figures are reported on")
    parser.add_argument("--concepts", nargs="+", default=None, help="only these words of the suite")
    parser.add_argument("--rehearse", type=int, default=0, metavar="N",
                        help="suite: N scenes of the world itself beside each concept's images (ground-truth "
                             "rehearsal, which a user lacks: can the UNet hold the concept and its world at once?)")
    parser.add_argument("--copies", type=int, default=1, help="suite: each concept's images this many times")
    parser.add_argument("--no-control", action="store_true",
                        help="leave out the control (the world's own scenes: what fine-tuning itself costs)")
    parser.add_argument("--anchor", choices=tuple(ANCHORS), default=None,
                        help="suite: another tool's default recipe instead of ours (see ANCHORS)")
    parser.add_argument("--recipe", default="", help="`imagecraft finetune` flags for the recipe, in one string "
                                                     "(e.g. \"--steps 200 --preserve 0\"); default: its defaults")
    parser.add_argument("--work", default=None, help="folder for the data and the LoRA (default: a temporary one)")
    parser.add_argument("--save", default=None, help="folder for grids of the pink samples")
    parser.add_argument("--old-prompts", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="override the default recipe's steps")
    parser.add_argument("--lr", type=float, default=None, help="override the default recipe's learning rate")
    parser.add_argument("--rank", type=int, default=None, help="override the default recipe's LoRA rank")
    parser.add_argument("--targets", default=None, help="override the default recipe's LoRA targets (attn, ff, proj)")
    parser.add_argument("--text-encoder-lora", action="store_true", help="a LoRA on the text encoder too")
    parser.add_argument("--prior", type=int, default=0,
                        help="prior preservation: this many base-model images of the old colours and shapes "
                             "trained on beside the pink data, as the app's demo (default: off, as the CLI)")
    parser.add_argument("--seeds", type=int, default=4, help="pink images per shape and position")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.part in ("speed", "both"):
        speed(args)
    if args.part in ("teach", "both"):
        teach(args)
    if args.part == "suite":
        suite(args)


if __name__ == "__main__":
    main()
