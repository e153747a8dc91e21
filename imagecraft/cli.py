"""Command line: `python -m imagecraft generate ...` (also installed as the `imagecraft` command).

    imagecraft generate --prompt "a red circle on the left" --seed 42 --output out.png
    imagecraft generate --model ./my-sd15-folder --prompt "a castle" --scheduler dpm++2m_karras --steps 30
    imagecraft generate --from-png out.png                # regenerate an image from its metadata
    imagecraft generate --prompt "a pink circle" --lora my-lora/:0.8    # with a LoRA at scale 0.8
    imagecraft attention --prompt "a blue square above a green triangle" --seed 8 --output fig.png --npz maps.npz
    imagecraft edit --from-png out.png --prompt "a blue circle on the left" --blend circle --output edit.png
    imagecraft finetune --data my-images/ --output my-lora/              # see `imagecraft finetune --help`
    imagecraft deploy --space you/imagecraft --dry-run                   # see `imagecraft deploy --help`
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager

from .files import check_writable
from .schedulers import SCHEDULERS
from .settings import EDIT, GENERATION, OVERLAY_ALPHA


def _add_model_and_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=None, help="what to draw; empty means unconditional")
    # every flag's default is None: a value not given comes from --from-png, else from the pipeline (the table's)
    for name in ("negative_prompt", "seed", "num_inference_steps", "guidance_scale", "scheduler", "width", "height"):
        GENERATION[name].add_flag(parser, when_absent=True, **({"choices": list(SCHEDULERS)} if name == "scheduler"
                                                               else {}))
    _add_model(parser)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="the built-in model (default), a diffusers folder, a Hub id or a .safetensors single file")
    parser.add_argument("--config", default=None,
                        help="for a single-file model: a diffusers folder or Hub id with its tokenizer and configs")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps; detected when not given")
    parser.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto when not given: fp16 on CUDA, bf16 on a CPU with native bf16 (AMX, AVX-512 bf16), "
                             "else fp32; fp32 matches diffusers' fp32 pipeline exactly")
    parser.add_argument("--lora", default=None, metavar="PATH[:SCALE]",
                        help="a LoRA file or folder (ours, diffusers or kohya), optionally with its scale (1 when "
                             "not given)")


class _DefaultsHelp(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default after its help where the help does not say it."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" in help or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return help
        return help + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagecraft", description="ImageCraft: text-to-image with UNet_SD.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images from a prompt",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_and_sampling(gen)
    GENERATION["num_images"].add_flag(gen, when_absent=True)
    gen.add_argument("--output", default="imagecraft-{seed}.png",
                     help="PNG path; {seed} and {i} are filled in, and -i is added for batches")
    GENERATION["cache_interval"].add_flag(gen, when_absent=True)
    gen.add_argument("--from-png", default=None,
                     help="take every setting from this PNG's metadata (flags given here override)")

    att = commands.add_parser("attention", help="generate an image and show which pixels each word attended to",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_and_sampling(att)
    att.add_argument("--words", nargs="+", default=None, help="words to show; every word of the prompt when not given")
    att.add_argument("--plot", default="overlay", choices=["overlay", "time", "layers", "segment"],
                     help="overlay: one panel per word; time: words by steps; layers: the first word per layer; "
                          "segment: each pixel's strongest word")
    att.add_argument("--output", default="attention-{seed}.png", help="the figure (PNG); {seed} is filled in")
    att.add_argument("--image", default="imagecraft-{seed}.png", help="the generated image (PNG with metadata)")
    att.add_argument("--npz", default=None, help="also save the maps (AttentionMaps.save) to this .npz")
    att.add_argument("--blocks", nargs="+", default=None, choices=["down", "mid", "up"],
                     help="UNet blocks to aggregate (default: down and up, as DAAM)")
    att.add_argument("--resolutions", nargs="+", type=int, default=None,
                     help="map heights in cells to aggregate, e.g. 64 32 16 at 512 px (default: all but 1/64 of the image)")
    att.add_argument("--layers", nargs="+", default=None, help="single layers by module name (overrides --blocks)")
    att.add_argument("--heads", nargs="+", type=int, default=None, help="attention heads to keep (default: all)")
    att.add_argument("--timesteps", default=None, metavar="START:STOP",
                     help="sampling steps to aggregate, as a range over step indices (default: all)")
    att.add_argument("--negative", action="store_true", help="show the negative prompt's words instead")
    att.add_argument("--cmap", default="jet", help="matplotlib colormap")
    OVERLAY_ALPHA.add_flag(att)
    att.add_argument("--normalize", default="word", choices=["word", "absolute"],
                     help="scale each map to its own maximum, or all to one scale")

    edit = commands.add_parser("edit", help="edit an image by editing its prompt (Prompt-to-Prompt)",
                               formatter_class=_DefaultsHelp,
                               description="Draws the PNG's picture again beside the edited prompt's, keeping its "
                                           "layout: swap a word, add words, reweight a word, or change only the "
                                           "blend words' region.")
    edit.add_argument("--from-png", default=None,
                      help="the PNG to edit: one ImageCraft made (drawn again from its settings; of an edit, its "
                           "source, and the edit's settings unless flags are given), or any picture with --invert")
    edit.add_argument("--prompt", default=None, help="the edited prompt (of an edited PNG: its own when not given)")
    edit.add_argument("--blend", nargs="+", default=None, metavar="WORD",
                      help="words of either prompt whose region alone may change; the rest of the picture is kept")
    edit.add_argument("--reweight", nargs="+", default=None, metavar="WORD=FACTOR",
                      help=f"scale a word's attention, e.g. red=0.3 (0 removes it; {EDIT['reweight'].span})")
    for name in ("cross_steps", "self_steps"):
        EDIT[name].add_flag(edit, when_absent=True)
    edit.add_argument("--invert", action="store_true",
                      help="the PNG is a picture ImageCraft did not draw: invert it (DDIM with null-text "
                           "optimisation) under --source-prompt, then edit that")
    edit.add_argument("--source-prompt", default=None, help="with --invert: what the picture shows")
    edit.add_argument("--output", default="edit.png", help="the edited image (PNG with the edit's settings)")
    _add_model(edit)

    # the flags only: training itself (torch, diffusers) loads when a command runs
    from .train import recipe

    recipe.build_parser(commands.add_parser("finetune", help="fine-tune a model (LoRA or full) on your captioned images",
                                            description=recipe.__doc__, formatter_class=_DefaultsHelp))

    from .serve.deploy import __doc__ as deploy_doc, add_arguments as deploy_arguments

    deploy_arguments(commands.add_parser("deploy", help="deploy the app to a Hugging Face Space (or --dry-run)",
                                         description=deploy_doc, formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def parse_lora(text: str) -> tuple[str, float]:
    """"PATH" or "PATH:SCALE" (a PATH may itself hold colons; the part after the last one is the scale if it is a
    number)."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


FLAG_TO_SETTING = {"prompt": "prompt", **{field.dest: name for name, field in GENERATION.items()}}


@contextmanager
def writing(what: str):
    """An OSError while writing `what` (a full disk, a folder removed while sampling) as a sentence; the writes are
    atomic, so no partial file is left."""
    try:
        yield
    except OSError as e:
        raise ValueError(f"cannot write {what!r}: {e.strerror or e}") from e


def generate(args) -> list:
    from .loading import DEFAULT_MODEL
    from .png import check_png_path, pipeline_settings, restore_settings
    from .pipeline import output_path

    settings = {}
    if args.from_png:
        restored, notes = restore_settings(args.from_png)
        settings = pipeline_settings(restored)
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        # The PNG's model is a name (any path or Hub id, possibly from someone else's machine): shown, never loaded
        # unasked.
        named = restored.get("model")
        if args.model is None and named and named != DEFAULT_MODEL.name:
            print(f"warning: the PNG was made with the model {named!r}; the built-in model is used unless --model "
                  f"is given", file=sys.stderr)
    settings.update({FLAG_TO_SETTING[k]: v for k, v in vars(args).items() if k in FLAG_TO_SETTING and v is not None})
    if "prompt" not in settings:
        raise ValueError("give --prompt (an empty one means unconditional) or --from-png")
    output_path(args.output)  # only {seed} and {i} in braces; checked, like the folder, before loading and sampling
    check_png_path(check_writable(args.output, "--output"), "--output")

    result = sample(load(args), **settings)
    with writing(args.output):
        paths = result.save(args.output)
    for path, seed in zip(paths, result.seeds):
        print(f"{path}  seed={seed}")
    return paths


def parse_reweight(items: list[str] | None) -> dict:
    """--reweight's WORD=FACTOR items as a dict (checked by `settings.check_edit`)."""
    out = {}
    for item in items or []:
        word, sep, factor = item.rpartition("=")
        try:
            out[word] = float(factor) if sep and word.strip() else None
        except ValueError:
            out[word] = None
        if out[word] is None:
            raise ValueError(f"--reweight takes WORD=FACTOR, e.g. red=0.3, got {item!r}")
    return out


def edit(args) -> list:
    """Edits a PNG's picture by editing its prompt and writes the edited image."""
    from functools import partial

    from .png import check_png_path, restore_edit, restore_source
    from .settings import check_edit

    if not args.from_png:
        raise ValueError("give --from-png: the PNG to edit")
    if args.invert and not (args.source_prompt and args.source_prompt.strip()):
        raise ValueError("--invert needs --source-prompt: what the picture shows")
    if args.source_prompt and not args.invert:
        raise ValueError("--source-prompt goes with --invert; a PNG ImageCraft made has its own prompt")
    # everything checked before the model loads: the PNG, the edit's settings, the output
    stored = {} if args.invert else (restore_edit(args.from_png) or {})
    if not args.invert:
        restore_source(args.from_png)  # a PNG that cannot be drawn again says so now
    given = dict(prompt=args.prompt, reweight=parse_reweight(args.reweight) if args.reweight else None,
                 blend=args.blend, cross_steps=args.cross_steps, self_steps=args.self_steps)
    merged = {k: given[k] if given[k] is not None else stored.get(k) for k in given}
    if merged["prompt"] is None:
        raise ValueError("give --prompt: the edited prompt")
    settings = check_edit(merged)
    check_png_path(check_writable(args.output, "--output"), "--output")

    pipe = load(args)
    source = pipe.invert(args.from_png, args.source_prompt) if args.invert else args.from_png
    if args.invert:
        print(f"inverted in {source.seconds:.1f} s, drawn again at {source.psnr:.1f} dB PSNR", file=sys.stderr)
    result = sample(partial(pipe.edit, source), **settings)
    with writing(args.output):
        paths = result.save(args.output)
    for path in paths:
        print(path)
    return paths


def load(args):
    """The pipeline the --model, --config, --device and --dtype flags name."""
    from .pipeline import ImageCraftPipeline

    lora = parse_lora(args.lora) if args.lora else None
    if lora:
        from .lora import lora_file
        from .settings import LORA_SCALE

        lora_file(lora[0])  # a missing or non-safetensors file is named before the model loads
        LORA_SCALE.check(lora[1])
    print(f"loading {args.model or 'the built-in model'} ...", file=sys.stderr)
    pipe = ImageCraftPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, config=args.config)
    if lora:
        applied = pipe.load_lora(*lora)
        print(f"LoRA {applied['name']} ({applied['hash']}) at scale {applied['scale']:g}", file=sys.stderr)
    return pipe


def sample(pipe, **settings):
    """`pipe(**settings)` with a tqdm bar on stderr; its warnings printed there too."""
    from tqdm import tqdm

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
    return result


def parse_steps(text: str | None):
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    try:
        return (int(start), int(stop)) if sep else int(start)
    except ValueError:
        raise ValueError(f"--timesteps must be START:STOP step indices (e.g. 0:10) or one index, got {text!r}") from None


def attention(args) -> list:
    """Generates one image with its cross-attention and writes the image, the figure and optionally the maps."""
    from .explain import plots
    from .png import check_png_path
    from .pipeline import output_path

    if not args.prompt or not args.prompt.strip():
        raise ValueError("give --prompt with words: attention maps show where each word of the prompt went")
    # every output checked before loading and sampling, not after
    output_path(args.image)  # only {seed} and {i} in braces, checked before loading
    check_png_path(check_writable(args.image, "--image"), "--image")
    if check_writable(args.output, "--output").suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png name (the figure is written as PNG), got {args.output!r}")
    if args.npz:
        check_writable(args.npz, "--npz")
    settings = {FLAG_TO_SETTING[k]: v for k, v in vars(args).items() if k in FLAG_TO_SETTING and v is not None}
    filters = dict(blocks=args.blocks, resolutions=args.resolutions, layers=args.layers, heads=args.heads,
                   steps=parse_steps(args.timesteps), negative=args.negative or None)
    filters = {k: v for k, v in filters.items() if v is not None}

    pipe = load(args)
    if args.words and not args.negative:  # a word not in the prompt fails before sampling, not after
        from .explain.maps import word_indices

        tokens, dropped = pipe.tokens(args.prompt)
        for word in args.words:
            word_indices(tokens, word, truncated=dropped)
    result = sample(pipe, attention=True, **settings)
    image, maps, seed = result.images[0], result.attention[0], result.seeds[0]
    if args.negative and not maps.guided:
        raise ValueError("--negative shows the negative prompt's maps, which exist only with guidance on "
                         "(--guidance above 1)")
    words = args.words or maps.words(args.negative)
    if not words:
        raise ValueError("the negative prompt has no words to show: give --negative-prompt" if args.negative
                         else "the prompt has no words to show")
    if args.plot == "overlay":
        fig = plots.plot_overlay(image, maps, words, cmap=args.cmap, alpha=args.alpha, normalize=args.normalize,
                                 **filters)
    elif args.plot == "time":
        fig = plots.plot_timesteps(image, maps, words, cmap=args.cmap, alpha=args.alpha, normalize=args.normalize,
                                   **filters)
    elif args.plot == "layers":
        fig = plots.plot_layers(image, maps, words[0], cmap=args.cmap, alpha=args.alpha,
                                negative=args.negative)
    else:
        fig = plots.plot_segmentation(image, maps, words, **filters)
    with writing(args.image):
        paths = [result.save(args.image.replace("{seed}", str(seed)))[0]]
    with writing(args.output):
        paths.append(plots.save(fig, args.output.replace("{seed}", str(seed))))
    if args.npz:
        with writing(args.npz):
            paths.append(maps.save(args.npz))
    for path in paths:
        print(path)
    return paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "finetune":
        from .train.finetune import run

        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        return run(args)
    if args.command == "deploy":
        from .serve.deploy import run as deploy

        return deploy(args)
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "attention":
            attention(args)
        elif args.command == "edit":
            edit(args)
    except (ValueError, FileNotFoundError) as e:  # our errors are ValueErrors with a sentence for the user
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
