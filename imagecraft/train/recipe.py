"""What a fine-tune is asked to do: `FinetuneRecipe`, checked before any work starts, and the command line
that builds one (`imagecraft finetune`, `python -m imagecraft.train.finetune` under accelerate)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .. import lora as lora_lib
from .data import MAX_IMAGES


@dataclass
class FinetuneRecipe:
    """Everything that decides the result. Defaults are measured on the built-in model: see bench_finetune.py."""

    method: str = "lora"  # "lora" (peft, the UNet's attention projections) or "full" (the whole UNet, with EMA)
    steps: int = 400
    batch_size: int = 4  # per process; the global batch is batch_size x processes x grad_accum
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-4 for LoRA, 5e-5 for full (see bench_finetune.py)
    lr_schedule: str = "constant"  # or "cosine" (to 10% of the peak)
    warmup: int = 20
    rank: int = 8
    alpha: float | None = None  # None: the rank (LoRA scale 1)
    targets: tuple = ("attn",)  # UNet module groups for LoRA: attn, ff, proj (lora.UNET_TARGETS)
    text_encoder_lora: bool = False  # LoRA on the text encoder's attention too
    snr_gamma: float = 5.0  # Min-SNR weighting; 0: plain MSE
    noise_offset: float = 0.0  # e.g. 0.05: darker darks and brighter brights (Guttenberg 2023)
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    ema_decay: float = 0.999  # full fine-tune only
    precision: str = "auto"  # "auto": bf16 autocast where the CPU or GPU runs bf16 natively; "bf16"; "fp32"
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.0  # share of captions replaced by "" (keeps classifier-free guidance trained)
    flip: bool = False
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 25  # held-out loss
    preview_every: int = 100  # 0: previews only at the end
    preview_steps: int = 20
    preview_guidance: float = 5.0
    validation_prompts: tuple = ()  # default: the data's first two captions
    heldout_images: int = 4
    # Prior preservation (DreamBooth, Ruiz et al. 2022; kohya's regularisation images): the base model's own images
    # for these prompts, made once before training, are trained on beside the data with weight prior_weight, so
    # what the data does not show stays as the base model drew it. Off when empty; each step then costs twice, and
    # the loss logged is the data's plus prior_weight times the prior images'.
    class_prompts: tuple = ()
    class_images: int = 100  # how many, the prompts taken in turn
    prior_weight: float = 1.0

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.method == "lora" else 5e-5)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def check_recipe(recipe: FinetuneRecipe) -> FinetuneRecipe:
    """Refuses nonsense before any work starts, naming the setting and what is allowed."""
    if recipe.method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {recipe.method!r}")
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "eval_every", "preview_steps"):
        value = getattr(recipe, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    for name in ("warmup", "preview_every", "heldout_images"):
        value = getattr(recipe, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number of 0 or more, got {value!r}")
    if recipe.steps > 1_000_000:
        raise ValueError(f"steps must be at most 1,000,000, got {recipe.steps}")
    if not (isinstance(recipe.peak_lr, (int, float)) and 0 < recipe.peak_lr <= 1 and math.isfinite(recipe.peak_lr)):
        raise ValueError(f"lr must be a number in (0, 1], got {recipe.lr!r}")
    if recipe.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {recipe.lr_schedule!r}")
    if not (isinstance(recipe.rank, int) and 1 <= recipe.rank <= 1024):
        raise ValueError(f"rank must be a whole number from 1 to 1024, got {recipe.rank!r}")
    if not (0 < recipe.lora_alpha <= 4096 and math.isfinite(recipe.lora_alpha)):
        raise ValueError(f"alpha must be a positive number up to 4096, got {recipe.alpha!r}")
    unknown = [t for t in recipe.targets if t not in lora_lib.UNET_TARGETS]
    if unknown or not recipe.targets:
        raise ValueError(f"targets must be some of {', '.join(lora_lib.UNET_TARGETS)}, got {list(recipe.targets)}")
    for name, low, high in (("snr_gamma", 0, 100), ("noise_offset", 0, 1), ("max_grad_norm", 0, 1e6),
                            ("weight_decay", 0, 1), ("caption_dropout", 0, 1), ("preview_guidance", 0, 30)):
        value = getattr(recipe, name)
        if not (isinstance(value, (int, float)) and low <= value <= high and math.isfinite(value)):
            raise ValueError(f"{name} must be a number from {low} to {high}, got {value!r}")
    if not 0 < recipe.ema_decay < 1:
        raise ValueError(f"ema_decay must be in (0, 1), got {recipe.ema_decay!r}")
    if recipe.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {recipe.precision!r}")
    if not (isinstance(recipe.class_images, int) and 1 <= recipe.class_images <= MAX_IMAGES):
        raise ValueError(f"class_images must be a whole number from 1 to {MAX_IMAGES}, got {recipe.class_images!r}")
    if not (isinstance(recipe.prior_weight, (int, float)) and 0 < recipe.prior_weight <= 100
            and math.isfinite(recipe.prior_weight)):
        raise ValueError(f"prior_weight must be a number in (0, 100], got {recipe.prior_weight!r}")
    if not isinstance(recipe.class_prompts, (tuple, list)):
        raise ValueError(f"class_prompts must be a list of prompts, got {recipe.class_prompts!r}")
    empty = [p for p in recipe.class_prompts if not isinstance(p, str) or not p.strip()]
    if empty:
        raise ValueError(f"class prompts must be non-empty text, got {empty[0]!r}")
    if recipe.class_prompts and recipe.class_images < len(recipe.class_prompts):
        raise ValueError(f"class_images ({recipe.class_images}) is fewer than the class prompts "
                         f"({len(recipe.class_prompts)}): each prompt needs at least one image")
    if recipe.method == "full" and recipe.text_encoder_lora:
        raise ValueError("text_encoder_lora goes with method 'lora'; a full fine-tune trains the UNet only")
    return recipe



# --- CLI -----------------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="imagecraft finetune", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    d = FinetuneRecipe()
    parser.add_argument("--data", required=True, help="folder of images with captions (or a .zip of one)")
    parser.add_argument("--output", required=True, help="folder for the LoRA or model, curves, previews, checkpoints")
    parser.add_argument("--model", default=None, help="base model (default: the built-in model)")
    parser.add_argument("--method", choices=("lora", "full"), default=d.method)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (LoRA 1e-4, full 5e-5)")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d.lr_schedule)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--targets", default=",".join(d.targets),
                        help=f"LoRA targets in the UNet, comma-separated: {', '.join(lora_lib.UNET_TARGETS)}")
    parser.add_argument("--text-encoder-lora", action="store_true")
    parser.add_argument("--snr-gamma", type=float, default=d.snr_gamma)
    parser.add_argument("--noise-offset", type=float, default=d.noise_offset)
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=d.precision)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    parser.add_argument("--flip", action="store_true", help="random horizontal flips (they swap left and right)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--preview-every", type=int, default=d.preview_every, help="0: at the end only")
    parser.add_argument("--validation-prompt", action="append", default=None,
                        help="a preview prompt (repeat for more; default: the data's first two captions)")
    parser.add_argument("--class-prompt", action="append", default=None,
                        help="prior preservation: the base model's images for this prompt are trained on beside the "
                             "data, so that what the data does not show stays (repeat for more; default: off)")
    parser.add_argument("--class-images", type=int, default=d.class_images,
                        help="how many prior-preservation images to make, the class prompts in turn")
    parser.add_argument("--prior-weight", type=float, default=d.prior_weight,
                        help="weight of the prior-preservation loss")
    return parser


def recipe_from_args(args) -> FinetuneRecipe:
    return FinetuneRecipe(method=args.method, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                  lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup, rank=args.rank, alpha=args.alpha,
                  targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                  text_encoder_lora=args.text_encoder_lora, snr_gamma=args.snr_gamma, noise_offset=args.noise_offset,
                  max_grad_norm=args.max_grad_norm, precision=args.precision,
                  gradient_checkpointing=args.gradient_checkpointing, caption_dropout=args.caption_dropout,
                  flip=args.flip, seed=args.seed, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                  preview_every=args.preview_every, validation_prompts=tuple(args.validation_prompt or ()),
                  class_prompts=tuple(args.class_prompt or ()), class_images=args.class_images,
                  prior_weight=args.prior_weight)
