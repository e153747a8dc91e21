"""What a fine-tune is asked to do: `FinetuneRecipe`, checked before any work starts, and the command line
that builds one (`imagecraft finetune`, `python -m imagecraft.train.finetune` under accelerate).

Defaults, limits and help all come from `imagecraft.settings.FINETUNE`, the table the app's Fine-tune tab reads too.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ..settings import FINETUNE, LR_BY_METHOD, check_finetune, method_defaults


def _default(name: str):
    return FINETUNE[name].default


@dataclass
class FinetuneRecipe:
    """Everything that decides the result; what each field does, its limits and why are in `settings.FINETUNE`.
    Defaults are measured on the built-in model: see bench_finetune.py."""

    method: str = _default("method")
    steps: int = _default("steps")
    batch_size: int = _default("batch_size")
    grad_accum: int = _default("grad_accum")
    lr: float | None = _default("lr")  # None: LR_BY_METHOD
    lr_schedule: str = _default("lr_schedule")
    warmup: int = _default("warmup")
    rank: int = _default("rank")
    alpha: float | None = _default("alpha")  # None: the rank (LoRA scale 1)
    targets: tuple = _default("targets")
    text_encoder_lora: bool = _default("text_encoder_lora")
    word_token: bool | None = _default("word_token")  # None: settings.BY_METHOD
    embedding_lr: float = _default("embedding_lr")
    word_lock: float | None = _default("word_lock")  # None: settings.BY_METHOD
    snr_gamma: float = _default("snr_gamma")
    noise_offset: float = _default("noise_offset")
    max_grad_norm: float = _default("max_grad_norm")
    weight_decay: float = _default("weight_decay")
    ema_decay: float = _default("ema_decay")
    precision: str = _default("precision")
    gradient_checkpointing: bool = _default("gradient_checkpointing")
    caption_dropout: float = _default("caption_dropout")
    flip: bool = _default("flip")
    seed: int = _default("seed")
    checkpoint_every: int = _default("checkpoint_every")
    eval_every: int = _default("eval_every")
    preview_every: int = _default("preview_every")
    preview_steps: int = _default("preview_steps")
    preview_guidance: float = _default("preview_guidance")
    validation_prompts: tuple = _default("validation_prompts")  # (): the data's first two captions
    fixed_batch_images: int = _default("fixed_batch_images")
    class_prompts: tuple = _default("class_prompts")  # prior preservation; (): off
    class_images: int = _default("class_images")
    prior_weight: float = _default("prior_weight")
    preserve: float | None = _default("preserve")  # None: settings.BY_METHOD
    concept_words: tuple = _default("concept_words")  # (): `data.concept_words` of the captions
    validation_images: int = _default("validation_images")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else LR_BY_METHOD[self.method]

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def check_recipe(recipe: FinetuneRecipe) -> FinetuneRecipe:
    """The recipe with every field checked and normalised by `settings.FINETUNE` (one sentence for the first bad
    one), before any work starts; the settings left to the method (None) are then its (settings.BY_METHOD)."""
    return dataclasses.replace(recipe, **method_defaults(check_finetune(dataclasses.asdict(recipe))))


# --- CLI -----------------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`imagecraft finetune`'s flags: one per FINETUNE field, its type, default, choices and help from the table."""
    parser = parser or argparse.ArgumentParser(prog="imagecraft finetune", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of images with captions (or a .zip of one)")
    parser.add_argument("--output", required=True, help="folder for the LoRA or model, curves, previews, checkpoints")
    parser.add_argument("--model", default=None, help="base model (default: the built-in model)")
    for field in FINETUNE.values():
        if field.kind == "prompts":  # repeated: one prompt per flag
            field.add_flag(parser, action="append", default=None, dest=field.name, metavar="PROMPT")
        elif field.kind == "choices":  # comma-separated
            field.add_flag(parser, default=",".join(field.default))
        else:
            field.add_flag(parser)
    return parser


def recipe_from_args(args) -> FinetuneRecipe:
    values = {name: getattr(args, name) for name in FINETUNE}
    values["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    for name in ("validation_prompts", "class_prompts", "concept_words"):
        values[name] = tuple(values[name] or ())
    return FinetuneRecipe(**values)
