"""The settings tables, one per schema, read at every entrance.

`GENERATION` holds what `ImageCraftPipeline.__call__` takes: the Python API, the CLI's `generate` and `attention`
flags, the app's Generate and Attention tabs and restore-from-PNG all read it. `FINETUNE` holds what a fine-tune
takes: `FinetuneRecipe`'s defaults, `check_recipe`, the CLI's `finetune` flags and the app's Fine-tune tab. Each
`Field` carries its type, its limits, its default, its label in the app, its help for the CLI and the app, its slider
step, and one sentence for a bad value that names the field, the value and what is allowed. Sliders, flags and checks
take their numbers from here; a limit is written once, with the reason for it.

Written by hand rather than with pydantic: the checks are a few dozen lines, and the errors must read as sentences a
user can act on, which pydantic's multi-line reports do not.

Numbers: an integer field takes ints and numpy ints, and a float only when it is whole (25.0 from a slider is 25,
2.5 is refused); True and False are never numbers. A float field takes any finite int or float.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from dataclasses import dataclass

from .schedulers import check_scheduler_name

# the UNet modules a LoRA trains, by group: attention projections (the default, as diffusers' and kohya's
# scripts), the feed-forward, and the transformers' input and output projections. Here rather than in lora.py,
# which needs torch: the settings tables (and with them the CLI's --help) load without it
UNET_TARGETS = {"attn": ("to_q", "to_k", "to_v", "to_out.0"), "ff": ("ff.net.0.proj", "ff.net.2"),
                "proj": ("proj_in", "proj_out"),
                "conv": ("in_layers.2", "out_layers.3"),  # the ResBlocks' 3x3 convolutions (LoCon's "conv")
                "kv": ("attn2.to_k", "attn2.to_v")}  # the cross-attention's keys and values (Custom Diffusion's)

MAX_SEED = 2**32 - 1
MAX_PROMPTS = 64  # prompts in one list-of-prompts call
MAX_PROMPT_CHARS = 4000  # about 1,000 tokens of English; prompts.MAX_TOKENS caps the tokens
MAX_IMAGES = 16
# Sampling steps when none are given (pipeline, CLI, app). The fastest setting within 2 points of the best accuracy
# on the built-in model's speed/quality frontier (bench/bench_speed_quality.py, docs/figures.md); also
# AUTOMATIC1111's default.
DEFAULT_STEPS = 20
# Guidance when none is given (pipeline, CLI, app, fine-tune previews), measured on the built-in model with
# `python bench/bench_quality.py --per-group 100 --steps 20 --guidance G` (300 prompts, the strict scorer): every
# attribute right in 98/95/97% of the single/two/held-out groups at 5.0 and 98/95/98% at 3.0, against 90/77/77% at
# 7.5, where colours and shapes break (7.5 suits SD 1.5's photographs, not this model). 3.0 and 5.0 differ by less
# than the noise of 100 prompts (about 2 points); 5.0 is what the app and the fine-tune previews always used.
DEFAULT_GUIDANCE = 5.0
# An inverted picture is edited at low guidance: the edit's object then keeps the picture's size. Measured on six
# pictures of the built-in model's world, colour swaps after inversion (object IoU with the picture, right by the
# strict scorer): guidance 7.5 0.49 and 5/6, 3.0 0.67 and 5/6, 2.0 0.79 and 6/6, 1.5 0.85 and 6/6, 1.0 (plain DDIM,
# no null-text) 0.87 and 5/6. At 5.0 the edited object came out about twice the picture's area.
INVERT_GUIDANCE = 1.5
MAX_TRAINING_STEPS = 20_000  # see FINETUNE's steps
MAX_TRAINING_IMAGES = 5000  # images in a fine-tune's data folder
# The peak learning rate when none is given: measured on the built-in model (bench/bench_finetune.py)
LR_BY_METHOD = {"lora": 1e-4, "full": 5e-5}
# Fine-tune settings whose default depends on the method (None in FINETUNE): a LoRA's are the locked recipe's (word
# tokens, the word lock at 6, no preservation; see FINETUNE), which a full fine-tune cannot take (it has no word
# tokens and no cross-attention LoRA to lock), so it keeps preservation. The word lock is off for a LoRA whose
# targets leave out the cross-attention's keys and values.
BY_METHOD = {"lora": dict(word_token=True, word_lock=6.0, preserve=0.0),
             "full": dict(word_token=False, word_lock=0.0, preserve=0.3)}

# How an error says what is allowed, per kind; a Field's own `allowed` replaces it. {low}, {high}, {step} and
# {choices} are filled in from the Field, so no limit is written twice.
ALLOWED = {
    "int": "a whole number from {low} to {high:,}",
    "float": "a number from {low:g} to {high:g}",
    "float above low": "a number in ({low:g}, {high:g}]",
    "text": "a string of at most {high} characters",
    "choice": "{choices}",
    "choices": "some of {choices} (at least one)",
    "bool": "True or False",
    "prompts": "a list of prompts (at most {high}, each non-empty text of at most {chars} characters)",
    "scheduler": "a sampler's name (a string)",
}


@dataclass(frozen=True)
class Field:
    name: str  # the keyword: the pipeline's or FinetuneRecipe's
    label: str  # how errors name it
    kind: str  # "int", "float", "text", "scheduler", "choice", "choices" (some of), "bool" or "prompts" (a list)
    low: float | None = None
    high: float | None = None  # "text": the most characters; "prompts": the most prompts
    default: object = None  # None with `optional`: decided later (`unset` says by what)
    step: float = 1  # the slider's step; an "int" field's values are multiples of it
    ui: str = ""  # the app's label
    help: str = ""  # what it does: the CLI's --help, the app's info line
    allowed: str = ""  # what is allowed, as the error says it (default: ALLOWED for the kind)
    choices: tuple = ()
    optional: bool = False  # None passes
    unset: str = ""  # what None means, as the CLI's help says it ("the model's size")
    above_low: bool = False  # the low end itself is refused: (low, high]
    cli: str = ""  # the flag, when not --name with dashes

    def check(self, value):
        """The value, normalised (whole floats to int); ValueError with one sentence otherwise."""
        if value is None and self.optional:
            return None
        if self.kind == "int":
            whole = _whole(value)
            ok = whole is not None and self.low <= whole <= self.high
            value = whole if ok else value
            ok = ok and whole % self.step == 0
        elif self.kind == "float":
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
                and (value > self.low if self.above_low else value >= self.low) and value <= self.high
            value = float(value) if ok else value
        elif self.kind == "text":
            ok = isinstance(value, str) and len(value) <= self.high
            if ok:
                _check_unicode(self.label, value)
        elif self.kind == "choice":
            ok = isinstance(value, str) and value in self.choices
        elif self.kind == "choices":
            ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(v in self.choices for v in value)
            value = tuple(value) if ok else value
        elif self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "prompts":
            return self._check_prompts(value)
        else:  # scheduler: our short names or A1111's display names
            if not isinstance(value, str):
                ok = False
            else:
                return check_scheduler_name(value)
        if not ok:
            raise self.refuse(value)
        return value

    def _check_prompts(self, value) -> tuple[str, ...]:
        if not isinstance(value, (tuple, list)):
            raise self.refuse(value)
        if len(value) > self.high:
            raise self.refuse(f"{len(value)} prompts", quoted=False)
        for prompt in value:
            if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
                raise self.refuse(prompt)
            _check_unicode(self.label, prompt)
        return tuple(value)

    def refuse(self, value, quoted: bool = True) -> ValueError:
        """The sentence for a bad value: "<label> must be <what is allowed>, got <value>"."""
        return ValueError(f"{self.label} must be {self.allows}, got {shown(value) if quoted else value}")

    @property
    def allows(self) -> str:
        """What is allowed, in words (the error's middle)."""
        kind = "float above low" if self.kind == "float" and self.above_low else self.kind
        return (self.allowed or ALLOWED[kind]).format(
            low=self.low, high=self.high, step=self.step, chars=MAX_PROMPT_CHARS,
            choices=(" or " if self.kind == "choice" else ", ").join(
                repr(c) if self.kind == "choice" else str(c) for c in self.choices))

    @property
    def span(self) -> str:
        """The range in a few characters, for --help: "1..150", "(0, 0.1]", "a multiple of 8 in 64..2048"."""
        if self.kind == "text":
            return f"at most {self.high} characters"
        if self.kind == "choices":
            return "some of " + ", ".join(self.choices)
        if self.kind == "float":
            return f"({self.low:g}, {self.high:g}]" if self.above_low else f"{self.low:g}..{self.high:g}"
        if self.kind == "int":
            span = f"{self.low}..{self.high}"
            return f"a multiple of {self.step} in {span}" if self.step != 1 else span
        return ""

    @property
    def flag(self) -> str:
        return self.cli or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        """Where argparse puts the flag's value."""
        return self.flag[2:].replace("-", "_")

    def flag_help(self, when_absent: bool = False) -> str:
        """The flag's help: what it does, its range, its default ("... when not given" for a flag whose absence
        leaves the value to something else: a PNG, the model)."""
        if self.default is None or self.default in ((), ""):
            default = self.unset or "none"
        elif isinstance(self.default, bool):
            default = "on" if self.default else "off"
        elif isinstance(self.default, tuple):
            default = ",".join(self.default)
        else:
            default = f"{self.default:g}" if _is_number(self.default) else str(self.default)
        parts = [self.help, self.span, f"{default} when not given" if when_absent else f"default: {default}"]
        return "; ".join(p for p in parts if p)

    def add_flag(self, parser, when_absent: bool = False, **overrides):
        """This field as a flag of `parser`: type, choices, default and help from the table. `when_absent`: the
        flag's default is None, the value then comes from elsewhere (a PNG's, the pipeline's own)."""
        options = dict(default=None if when_absent else self.default,
                       help=self.flag_help(when_absent).replace("%", "%%"))  # argparse formats help with %
        if self.kind == "bool":  # an optional one (on or off by something else) may be turned either way
            options["action"] = argparse.BooleanOptionalAction if self.optional else "store_true"
        elif self.kind in ("int", "float"):
            options["type"] = int if self.kind == "int" else float
        elif self.kind == "choice":
            options["choices"] = self.choices
        return parser.add_argument(self.flag, **{**options, **overrides})


def _table(*fields: Field) -> dict[str, Field]:
    return {f.name: f for f in fields}


GENERATION = _table(
    Field("negative_prompt", "negative_prompt", "text", high=MAX_PROMPT_CHARS, default="", ui="Negative prompt",
          help="what to steer away from", unset="none"),
    Field("num_inference_steps", "steps", "int", 1, 150, DEFAULT_STEPS, ui="Sampling steps", help="sampling steps",
          allowed="an integer from {low} to {high}", cli="--steps"),
    Field("guidance_scale", "guidance scale", "float", 0, 30, DEFAULT_GUIDANCE, step=0.5, ui="CFG scale",
          help="classifier-free guidance scale (1 or less: off)", cli="--guidance"),
    Field("width", "width", "int", 64, 2048, step=8, ui="Width", help="the image's width", optional=True,
          unset="the model's size", allowed="a multiple of {step} between {low} and {high}"),
    Field("height", "height", "int", 64, 2048, step=8, ui="Height", help="the image's height", optional=True,
          unset="the model's size", allowed="a multiple of {step} between {low} and {high}"),
    Field("num_images", "number of images", "int", 1, MAX_IMAGES, 1, ui="Images", help="images in the batch",
          allowed="from {low} to {high}"),
    Field("seed", "seed", "int", 0, MAX_SEED, help="image i uses seed + i", optional=True, unset="random",
          allowed="an integer from {low} to {high}, or None for a random one"),
    Field("scheduler", "scheduler", "scheduler", ui="Sampler", help="sampler", optional=True, unset="the model's own"),
    Field("cache_interval", "cache_interval", "int", 1, 150, 1, ui="DeepCache interval", optional=True,
          help="DeepCache: the whole UNet every N steps, the steps between reuse its deep features; 1: off, exact; "
               "2-3: faster",
          allowed="a whole number from {low} (no caching) to {high} (DeepCache: the whole UNet every that many "
                  "steps)"),
)

# Two settings of a request that are not the pipeline's keywords: the LoRA's scale and the attention overlay's
# opacity.
LORA_SCALE = Field("lora_scale", "LoRA scale", "float", -4, 4, 1.0, step=0.05, ui="LoRA scale",
                   help="the LoRA's weight: 0 is the base model, 1 the LoRA as trained, below 0 its opposite")
OVERLAY_ALPHA = Field("alpha", "overlay opacity", "float", 0, 1, 0.5, step=0.05, ui="Overlay opacity",
                      help="how opaque the attention map is over the image")

# Prompt-to-Prompt editing (`ImageCraftPipeline.edit`, the CLI's `edit`, the app's Edit panel). The step shares are
# measured on the built-in model (README, "Editing"); the paper's are 0.8 and 0.4, with DDIM at 50 steps.
EDIT = _table(
    # cross_steps, when none is given, depends on the edit (`edit_cross_steps`): 1.0 for an edit that only swaps or
    # reweights words, 0.8 (the paper's, this field's default) for one that adds words. Measured with
    # bench/bench_edit.py on its tuning cases: 1.0 keeps a swapped object closer (mask IoU 0.851 against 0.804), but
    # an edit that adds words then cannot draw them (a background added: 8% of refinements right at 1.0, 100% at
    # 0.8). self_steps 0.4, the paper's: 0.6 and 0.8 changed the swaps' IoU by < 0.01.
    Field("cross_steps", "cross_steps", "float", 0, 1, 0.8, step=0.05, ui="Cross-attention steps",
          help="share of the steps that take the source's cross-attention: more keeps where each word is drawn; "
               "the default follows the edit: 1.0 when it only swaps or reweights words, 0.8 when it adds words"),
    Field("self_steps", "self_steps", "float", 0, 1, 0.4, step=0.05, ui="Self-attention steps",
          help="share of the steps that take the source's self-attention: more keeps the shapes and the layout"),
    # -5..5: the paper's reweighting examples go from -2 to 5; past that the word's attention drowns the others
    Field("reweight", "reweight factor", "float", -5, 5, 1.0, step=0.05, ui="Reweight",
          help="a word's attention times this: 0 removes the word, 2 doubles it"),
)
SWAP_CROSS_STEPS = 1.0  # cross_steps of an edit that adds no words, when none is given (see EDIT)


def edit_cross_steps(adds_words: bool) -> float:
    """An edit's cross_steps when none is given: EDIT's default for one that adds words, else SWAP_CROSS_STEPS."""
    return EDIT["cross_steps"].default if adds_words else SWAP_CROSS_STEPS


MAX_EDIT_WORDS = 16  # blend or reweight words in one edit: a prompt of the shapes world has at most 14 words

# The limits of a fine-tune. One per field, for the CLI, the Python API and the app alike; what each one is for:
FINETUNE = _table(
    Field("method", "method", "choice", default="lora", choices=("lora", "full"), ui="Method",
          help="lora: low-rank adapters (peft) on the UNet's attention projections; full: the whole UNet, with EMA"),
    # 20,000: above the longest published SD fine-tunes (DreamBooth and LoRA recipes run 500-3,000 steps, diffusers'
    # full text-to-image example 15,000); longer is pretraining, and on a server one job already holds the
    # one-at-a-time training queue for hours
    # 600: chosen with the earlier defaults (rank 4 on every attention projection, preservation) on the suite's tuning
    # concepts (bench/finetune_suite.py; teal, magenta), and kept by the locked recipe: at 400 with
    # preserve 1 the new colour was right on 65-85% of objects, at 600 with preserve 0.3 on 100%; 1,000 (rank 4)
    # damaged magenta's old prompts (81.7%)
    Field("steps", "steps", "int", 1, MAX_TRAINING_STEPS, 600, ui="Training steps", help="optimizer steps"),
    # batch_size and grad_accum up to 256: far above what a fine-tune uses (the built-in model trains at 4), so
    # they only catch a typo before the data is encoded
    Field("batch_size", "batch_size", "int", 1, 256, 4,
          help="images per step and process; the global batch is batch_size x processes x grad_accum"),
    Field("grad_accum", "grad_accum", "int", 1, 256, 1,
          help="steps whose gradients are summed before one optimizer step"),
    # (0, 0.1]: 100x the highest rate LoRA recipes use (1e-3); AdamW diverges at once above it
    Field("lr", "lr", "float", 0, 0.1, optional=True, above_low=True, ui="Learning rate",
          help="peak learning rate", unset=" for LoRA, ".join(f"{v:g}" for v in LR_BY_METHOD.values()) + " for full"),
    # constant: on the suite's tuning colours cosine (rank 8) kept the old prompts better (98.3-100%) and the fills
    # flatter (1.5x the base's texture against 1.8-2.1x) but learnt teal on 75% of the shapes shown against 100%
    Field("lr_schedule", "lr_schedule", "choice", default="constant", choices=("constant", "cosine"),
          help="the learning rate after warm-up: constant, or cosine down to 10% of the peak"),
    Field("warmup", "warmup", "int", 0, MAX_TRAINING_STEPS, 20, help="steps of linear learning-rate warm-up"),
    # 1..128: above half a projection's width a LoRA holds more weights than the layer it adapts (2 x rank x 320
    # against 320 x 320 for SD 1.5's narrowest attention), so a larger rank is a full fine-tune done badly.
    # 8: the locked recipe's (see word_token). In the earlier defaults (every attention projection, preservation
    # 0.3), on the fast preset's model, rank 4 (diffusers' and kohya's default) kept the model's own prompts better
    # than 8 on the tuning colours (teal / magenta / navy: 98.3 / 95.0 / 98.3% against 95.0 / 83.3 / 95.0%) but drew
    # the reporting colours on 68.3% of the shapes shown against 90.0%; rank 2 learnt teal on 45% (docs/figures.md)
    Field("rank", "rank", "int", 1, 128, 8, ui="LoRA rank", help="LoRA rank"),
    # (0, 256]: the LoRA's scale is alpha / rank, and recipes set alpha to the rank (scale 1), half of it, or 1;
    # twice the largest rank covers them all
    Field("alpha", "alpha", "float", 0, 256, optional=True, above_low=True, help="LoRA alpha (scale alpha / rank)",
          unset="the rank"),
    # The cross-attention's keys and values alone (Custom Diffusion's), the locked recipe's (see word_token): what
    # the text says reaches the image there and nowhere else. Every attention projection (`attn`, the earlier
    # default, with preservation 0.3 and rank 4) learnt the reporting colours on 98.3% of the shapes shown and 83.3% of
    # the triangles and mottled the model's objects (1.55x the base's texture); kv without word tokens, at lr 5e-4,
    # kept less of the model (magenta's old prompts 56.7%, on the fast preset's model)
    Field("targets", "targets", "choices", default=("kv",), choices=tuple(UNET_TARGETS),
          help="LoRA targets in the UNet, comma-separated"),
    # off: on the suite's tuning colours, words the built-in tokenizer splits into 4-6 pieces, a text-encoder LoRA
    # beside the UNet's learnt them as well as without it and kept the model's own prompts no better (docs/figures.md)
    Field("text_encoder_lora", "text_encoder_lora", "bool", default=False,
          help="LoRA on the text encoder's attention too"),
    # Pivotal tuning (cloneofsimo's lora, diffusers' advanced DreamBooth LoRA script: textual inversion beside a
    # LoRA): the taught words read as new vectors, so prompts without them encode exactly as before. On for a LoRA
    # (BY_METHOD), in the locked recipe: word tokens, a rank-8 LoRA on the cross-attention's keys and values at lr
    # 1e-4, the word lock at 6, no preservation, no held-out images. Chosen on the suite's tuning colours (teal and
    # navy 100% of the shapes shown and 100% of the triangles never shown; magenta 30 / 50%, a light magenta the
    # reader takes for pink), it drew the reporting colours (cyan, brown, chartreuse) on 100 / 100%, kept the
    # model's own prompts (100 -> 98.3%) and their texture (0.99x the base's), and the demo's pink on 99.4%. On the
    # fast preset's model, which drew its shapes only in its eight colours, it did not reach a colour the UNet never
    # drew (teal 50%, magenta 0%): what a LoRA must then teach is how to draw the colour, not the word.
    # Tried and not kept: without the lock the same LoRA mottles the model (2.4x); at lr 5e-5 without the lock (the
    # flat recipe) magenta came out on 25, 100 and 30% with seeds 0-2; the embedding alone (no LoRA) drew teal and
    # navy but not magenta; beside a LoRA on every attention projection with preservation 0.3 it cost magenta's old
    # prompts (83.3 -> 68.3%)
    Field("word_token", "word_token", "bool", optional=True,
          help="the taught words get tokens of their own whose embeddings train (LoRA only)",
          unset="on for LoRA, off for full"),
    # (0, 1]: textual inversion's recipes use 5e-4 to 5e-3 at batch 1-4
    Field("embedding_lr", "embedding_lr", "float", 0, 1, 5e-3, above_low=True,
          help="learning rate of the taught words' embeddings"),
    # The lock (as Custom Diffusion's closed-form update and Perfusion's key locking hold other words' keys): the
    # LoRA of the cross-attention's keys and values is penalised for any change it makes to them on the text
    # encoder's output for other words: the data's captions with the taught words removed or swapped for known ones,
    # and the empty prompt (half the draws from the words' positions, half from the padding's: drawn from every
    # position alike, the padding outweighs the words, and magenta's texture was 1.34x against 1.09x). The penalty is
    # the change's energy over the layer's own output's, averaged over the layers; the taught words' own tokens stay
    # free. 0..100 as preserve; at 3 magenta's texture was 1.27x, at 6 1.08x. 6 for a LoRA that adapts the keys and
    # values (BY_METHOD; the locked recipe, see word_token); beside a LoRA on every attention projection with
    # preservation it did not help (cyan 55%)
    Field("word_lock", "word_lock", "float", 0, 100, optional=True,
          help="weight that holds the cross-attention LoRA's keys and values of every other word as they were "
               "(layers other than the cross-attention's keys and values are not held); 0: off",
          unset="6 for LoRA on attn or kv, 0 otherwise"),
    # 0..100: Min-SNR (Hang et al. 2023) uses 5; at 100 only the least noisy timesteps (SNR over 100) are weighted
    # down, so more is plain MSE
    Field("snr_gamma", "snr_gamma", "float", 0, 100, 5.0, help="Min-SNR weighting's gamma; 0: plain MSE"),
    # 0..1: offset noise (Guttenberg 2023) uses 0.05-0.1; 1 is as strong as the noise itself
    Field("noise_offset", "noise_offset", "float", 0, 1, 0.0,
          help="e.g. 0.05: darker darks and brighter brights (Guttenberg 2023)"),
    # 0..100: recipes clip at 0.5-1 (diffusers: 1); 100 is a hundred times that
    Field("max_grad_norm", "max_grad_norm", "float", 0, 100, 1.0,
          help="clip the gradient's norm to this; 0: no clipping"),
    # 0..1: recipes use 0-0.1 (diffusers: 0.01); 1 is ten times the largest
    Field("weight_decay", "weight_decay", "float", 0, 1, 1e-2, help="AdamW's weight decay"),
    # 0.9..0.9999: an average over the last 10 to 10,000 steps (1 / (1 - decay)); diffusers' default is 0.9999
    Field("ema_decay", "ema_decay", "float", 0.9, 0.9999, 0.999,
          help="full fine-tune only: the decay of the weights' moving average, which is what is saved"),
    Field("precision", "precision", "choice", default="auto", choices=("auto", "bf16", "fp32"),
          help="auto: bf16 autocast where the CPU or GPU runs bf16 natively"),
    Field("gradient_checkpointing", "gradient_checkpointing", "bool", default=False,
          help="recompute activations in the backward pass: less memory, more time"),
    # 0..1: a share
    Field("caption_dropout", "caption_dropout", "float", 0, 1, 0.0,
          help="share of captions replaced by \"\" (keeps classifier-free guidance trained)"),
    Field("flip", "flip", "bool", default=False, help="random horizontal flips (they swap left and right)"),
    Field("seed", "seed", "int", 0, MAX_SEED, 0, help="data order, noise and LoRA's initial weights"),
    # the *_every up to the longest run
    Field("checkpoint_every", "checkpoint_every", "int", 1, MAX_TRAINING_STEPS, 100,
          help="steps between checkpoints (rerunning the same command resumes from the last)"),
    Field("eval_every", "eval_every", "int", 1, MAX_TRAINING_STEPS, 25,
          help="steps between two evaluations of the fixed-batch loss"),
    Field("preview_every", "preview_every", "int", 0, MAX_TRAINING_STEPS, 100,
          help="steps between previews; 0: at the end only"),
    # previews and prior-preservation images are sampled as generation is: its limits and defaults
    Field("preview_steps", "preview_steps", "int", GENERATION["num_inference_steps"].low,
          GENERATION["num_inference_steps"].high, DEFAULT_STEPS,
          help="sampling steps of the previews and the prior-preservation images"),
    Field("preview_guidance", "preview_guidance", "float", GENERATION["guidance_scale"].low,
          GENERATION["guidance_scale"].high, DEFAULT_GUIDANCE,
          help="guidance of the previews and the prior-preservation images"),
    # up to one list-of-prompts call
    Field("validation_prompts", "validation_prompts", "prompts", high=MAX_PROMPTS, default=(),
          cli="--validation-prompt", help="a preview prompt (repeat for more)",
          unset="the data's first two captions"),
    # 0..64: each image is evaluated at five timesteps, so 64 cost 320 UNet passes every eval_every steps
    Field("fixed_batch_images", "fixed_batch_images", "int", 0, 64, 4,
          help="training images in the fixed batch whose loss is logged every eval_every steps"),
    # Prior preservation (DreamBooth, Ruiz et al. 2022; kohya's regularisation images): the base model's own images
    # for these prompts, made once before training, are trained on beside the data with weight prior_weight, so what
    # the data does not show stays as the base model drew it. Off when empty; each step then costs twice. At most 100
    # prompts: the demo's whole vocabulary of colours and shapes is 21.
    Field("class_prompts", "class_prompts", "prompts", high=100, default=(), cli="--class-prompt",
          help="prior preservation: the base model's images for this prompt are trained on beside the data, so that "
               "what the data does not show stays (repeat for more)", unset="off"),
    # as many as a data folder may hold
    Field("class_images", "class_images", "int", 1, MAX_TRAINING_IMAGES, 100,
          help="how many prior-preservation images to make, the class prompts in turn"),
    # (0, 100]: DreamBooth uses 1
    Field("prior_weight", "prior_weight", "float", 0, 100, 1.0, above_low=True,
          help="weight of the prior-preservation loss"),
    # Preservation without class prompts: every step also trains the model to predict what the base model predicts
    # on the same noisy images under the captions with the taught words removed or swapped for known ones ("a cyan
    # square" -> "a square", "a purple square"), so the words the data shares with the model keep their meaning.
    # 0..100 as prior_weight. 0.3, measured on the suite's tuning concepts at rank 8: at 1 the old prompts held
    # (98.3% before, 98.3 and 95.0% after) but the new colour was learnt on 65-85% of objects; at 0.3 (600 steps) on
    # 100%, the old prompts 96.7 and 83.3%; at 0, 96.7 and 88.3%
    # Tried on the tuning concepts and not kept, none better on both the new word and the old prompts: the base
    # model's own images (drawn from these captions) in place of half the data's; the empty caption among the
    # captions; half the preservation's timesteps below 250. Off for a LoRA (BY_METHOD), whose word tokens and lock
    # keep the other words: beside word tokens it cost learning (teal 55% at 1 or 0.3, 90% off; also with removal
    # captions only, or 300 steps of the embedding alone first). 0.3 for a full fine-tune (3 taught a diamond)
    Field("preserve", "preserve", "float", 0, 100, optional=True,
          help="weight of keeping the base model's predictions under the captions without the taught words; 0: off",
          unset="0 for LoRA, 0.3 for full"),
    # at most 16 words: a concept is one to three
    Field("concept_words", "concept_words", "prompts", high=16, default=(), cli="--concept-word",
          help="a word the data teaches (repeat for more)", unset="the content words in 80% of the captions"),
    # 0..64 as fixed_batch_images; held out only where at least 8 images stay to train on. 0 by default: beside word
    # tokens holding 4 of 24 out cost more than the step choice gave (teal 50-60% against 90%), and a full
    # fine-tune's held-out loss rises while it learns a shape (on diamond it chose step 50 of 600, almost the base)
    Field("validation_images", "validation_images", "int", 0, 64, 0,
          help="images held out of training; the step whose loss on them is lowest is the one saved"),
)


def check_prompt(prompt) -> str | list[str]:
    """A string, or a list of 1 to MAX_PROMPTS strings, each at most MAX_PROMPT_CHARS long."""
    many = isinstance(prompt, (list, tuple))
    prompts = list(prompt) if many else [prompt]
    if not prompts or len(prompts) > MAX_PROMPTS or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings, got {shown(prompt)}")
    long = [len(p) for p in prompts if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise ValueError(f"prompt must be at most {MAX_PROMPT_CHARS} characters, "
                         f"got {long[0]}")
    for p in prompts:
        _check_unicode("prompt", p)
    return prompts if many else prompts[0]


def _check_unicode(label: str, text: str) -> None:
    """Text that UTF-8 cannot encode (a lone surrogate) would fail later, writing the PNG; refuse it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{label} must be valid Unicode text; it has an unpaired surrogate at character "
                         f"{e.start}") from None


def check(name: str, value):
    """One generation setting, normalised; None passes for the optional ones (seed, width, height, scheduler,
    cache_interval)."""
    if name == "prompt":
        return check_prompt(value)
    return GENERATION[name].check(value)


def check_settings(settings: dict) -> dict:
    """Every setting of a dict checked and normalised; unknown names are refused by name."""
    unknown = sorted(set(settings) - set(GENERATION) - {"prompt"})
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: prompt, {', '.join(GENERATION)}")
    return {name: check(name, value) for name, value in settings.items()}


def check_edit(values: dict) -> dict:
    """An edit's parameters (`ImageCraftPipeline.edit`'s keywords but the source) checked and normalised: the edited
    prompt, the step shares (self_steps None: EDIT's default; cross_steps None stays, for the edit to choose by
    `edit_cross_steps`), `reweight` a {word: factor} dict and `blend` a list of words (empty: none)."""
    unknown = sorted(set(values) - {"prompt", "blend", *EDIT})
    if unknown:
        raise ValueError(f"unknown edit settings {unknown}; known: prompt, blend, {', '.join(EDIT)}")
    clean = {"self_steps": EDIT["self_steps"].check(EDIT["self_steps"].default if values.get("self_steps") is None
                                                    else values["self_steps"]),
             # None: chosen by the edit (`edit_cross_steps`)
             "cross_steps": None if values.get("cross_steps") is None else EDIT["cross_steps"].check(
                 values["cross_steps"])}
    if "prompt" in values:
        clean["prompt"] = check_prompt(values["prompt"])
    reweight = values.get("reweight") or {}
    if not isinstance(reweight, dict) or len(reweight) > MAX_EDIT_WORDS or not all(
            isinstance(w, str) and w.strip() for w in reweight):
        raise ValueError(f"reweight must be a dict of at most {MAX_EDIT_WORDS} words to factors, e.g. "
                         f"{{'red': 0.3}}, got {shown(reweight)}")
    clean["reweight"] = {}
    for word, factor in reweight.items():
        try:
            clean["reweight"][word] = EDIT["reweight"].check(factor)
        except ValueError:
            raise ValueError(f"the reweight factor of {shown(word)} must be {EDIT['reweight'].allows}, got "
                             f"{shown(factor)}") from None
    blend = values.get("blend") or []
    if isinstance(blend, str) or not isinstance(blend, (list, tuple)) or len(blend) > MAX_EDIT_WORDS or not all(
            isinstance(w, str) and w.strip() for w in blend):
        raise ValueError(f"blend must be a list of at most {MAX_EDIT_WORDS} words, e.g. ['circle'], got {shown(blend)}")
    clean["blend"] = list(blend)
    return clean


def check_finetune(values: dict) -> dict:
    """A fine-tune's settings (FinetuneRecipe's fields) checked and normalised, refusing the first bad one with its
    sentence; then the rules between fields."""
    unknown = sorted(set(values) - set(FINETUNE))
    if unknown:
        raise ValueError(f"unknown fine-tune settings {unknown}; known: {', '.join(FINETUNE)}")
    clean = {name: FINETUNE[name].check(value) for name, value in values.items()}
    prompts, images = clean.get("class_prompts", ()), clean.get("class_images", FINETUNE["class_images"].default)
    if prompts and images < len(prompts):
        raise ValueError(f"class_images ({images}) is fewer than the class prompts ({len(prompts)}): each prompt needs "
                         f"at least one image")
    if clean.get("method") == "full" and clean.get("text_encoder_lora"):
        raise ValueError("text_encoder_lora goes with method 'lora'; a full fine-tune trains the UNet only")
    if clean.get("method") == "full" and clean.get("word_token"):
        raise ValueError("word_token goes with method 'lora'; a full fine-tune's folder keeps the base tokenizer")
    if clean.get("method") == "full" and clean.get("word_lock"):
        raise ValueError("word_lock goes with method 'lora': it holds the LoRA of the cross-attention's keys and "
                         "values; for a full fine-tune use preserve")
    targets = clean.get("targets", FINETUNE["targets"].default)
    if clean.get("word_lock") and clean.get("method", "lora") == "lora" and not adapts_kv(targets):
        raise ValueError(f"word_lock holds the cross-attention's keys and values, which the targets "
                         f"{','.join(targets)} do not adapt: add attn or kv, or set word_lock to 0")
    return clean


def max_cost(device: str) -> int:
    """The most UNet work one request may ask for, in pixel-steps of a 512x512 image (`check_cost`):
    IMAGECRAFT_MAX_COST, else sized for the device (on a CPU, one 512x512 image at 50 steps, a few minutes; 16x that
    on a GPU)."""
    text = os.environ.get("IMAGECRAFT_MAX_COST")
    if text:
        try:
            return int(float(text))
        except ValueError:
            raise ValueError(f"IMAGECRAFT_MAX_COST must be a number, got {text!r}") from None
    base = 512 * 512 * 50
    return base if device == "cpu" else 16 * base


def max_train_cost() -> int:
    """The most work one training job of the app may ask for (`train_cost`): IMAGECRAFT_MAX_TRAIN_COST, else 8,000
    (the Fine-tune tab's default job, 600 steps of 4 images with preservation, costs 4,800; with prior preservation
    and 100 class images too 7,300)."""
    text = os.environ.get("IMAGECRAFT_MAX_TRAIN_COST", "8000")
    try:
        return int(float(text))
    except ValueError:
        raise ValueError(f"IMAGECRAFT_MAX_TRAIN_COST must be a number, got {text!r}") from None


def adapts_kv(targets) -> bool:
    """Whether LoRA `targets` adapt the cross-attention's keys and values, which the word lock holds."""
    return bool({"attn", "kv"} & set(targets))


def method_defaults(values: dict) -> dict:
    """`values` (FinetuneRecipe's fields, some of them) with the settings left to the method (None or absent)
    filled in from BY_METHOD."""
    method = values.get("method") or FINETUNE["method"].default
    targets = values.get("targets") or FINETUNE["targets"].default
    filled = dict(values)
    for name, value in BY_METHOD[method].items():
        if filled.get(name) is None:
            filled[name] = value if name != "word_lock" or adapts_kv(targets) else 0.0
    return filled


def train_cost(recipe: dict) -> int:
    """A training job's work in images trained on: steps x batch_size x grad_accum, once more for preservation and
    once more for prior preservation (each trains on as many images again beside the data), plus the class images
    the base model draws first."""
    value = method_defaults({name: recipe.get(name, FINETUNE[name].default) for name in (
        "method", "steps", "batch_size", "grad_accum", "class_images", "class_prompts", "preserve")})
    prior = bool(value["class_prompts"])
    per_step = value["batch_size"] * value["grad_accum"] * (1 + prior + bool(value["preserve"]))
    return value["steps"] * per_step + (value["class_images"] if prior else 0)


def check_train_cost(recipe: dict) -> None:
    """Refuses a training job over `max_train_cost` at once, with the limit."""
    cost, limit = train_cost(recipe), max_train_cost()
    if cost > limit:
        raise ValueError(f"this fine-tune is too large for this server: {cost:,} images to train on and draw (steps x "
                         f"batch, once more each for preservation and prior preservation, plus the class images), over the limit of {limit:,} "
                         f"(IMAGECRAFT_MAX_TRAIN_COST); ask for fewer steps or class images")


def unet_work(config, width: int, height: int, scale_factor: int = 8, context_tokens: int = 77) -> float:
    """Multiply-accumulates of one UNet pass over one width x height image, counted from the model's config: the
    convolutions and projections grow with the pixels, self-attention's scores and weighted sum with their square
    (N^2 x channels per block), which is what makes a large image far slower than its pixel count says.
    `scale_factor`: pixels per latent side (the VAE's)."""
    tokens = (width / scale_factor) * (height / scale_factor)  # latent positions at the first level
    work = 0.0
    for level, mult in enumerate(config.channel_mult):
        c, n = config.model_channels * mult, tokens / 4 ** level  # channels, positions at this level
        res = 18 * c * c * n  # a ResBlock: two 3x3 convolutions
        # a TransformerBlock: proj_in/out (2), attn1's q, k, v, out (4), attn2's q, out (2), the GEGLU feed-forward
        # (12) c^2 per position; attn2's keys and values once per prompt; the scores and weighted sums
        block = 20 * c * c * n + 2 * context_tokens * config.context_dim * c + 2 * n * n * c + \
            2 * n * context_tokens * c
        blocks = config.depth(level) * block if config.attention_levels[level] else 0.0
        work += config.num_res_blocks * (res + blocks)  # the way down
        work += (config.num_res_blocks + 1) * (res * 29 / 18 + blocks)  # the way up: skip inputs, twice the channels
        work += 9 * c * c * n  # the level's down- or upsampling convolution
        if level == len(config.channel_mult) - 1:  # the middle block: two ResBlocks around a transformer
            work += 2 * res + max(config.depth(level), 1) * block
    return work


def check_cost(width: int, height: int, steps: int, images: int, device: str, config=None,
               scale_factor: int = 8) -> None:
    """Refuses a request whose UNet work is over `max_cost`, with the limit. The work is `unet_work` of the model's
    config (SD 1.5's when None), expressed in pixel-steps of a 512x512 image: one 512x512 image at 50 steps costs
    512 x 512 x 50 on every model, while at 1024x1024 self-attention makes a step cost more than 4 of them."""
    from .unet import UNetConfig

    config = config or UNetConfig()
    ratio = unet_work(config, width, height, scale_factor) / unet_work(config, 512, 512, scale_factor)
    cost, limit = round(512 * 512 * ratio * steps * images), max_cost(device)
    if cost > limit:
        raise ValueError(f"this request is too large for this server: {width}x{height} x {steps} steps x {images} "
                         f"image(s) costs the UNet work of {cost:,} pixel-steps at 512x512 (self-attention grows "
                         f"with the square of the pixels), over the limit of {limit:,} (IMAGECRAFT_MAX_COST); ask "
                         f"for fewer steps, images or pixels")


def _whole(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def shown(value) -> str:
    """A value as an error quotes it: its repr, cut at 60 characters (a 1 MB prompt is not echoed back)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
