"""Trains the built-in model from scratch on the shapes world, on a CPU, and writes it in diffusers layout.

    python -m imagecraft.shapes.train --output assets/shapes-sd             # the built-in model's recipe
    python -m imagecraft.shapes.train --output /tmp/smoke --smoke           # a few steps, for CI
    python -m imagecraft.shapes.train --output /tmp/large --recipe large    # the earlier built-in model (~109 min AMX)

Checkpoints and cached latents go to runs/<output name>/ (or --work).

Phases, each checkpointed so an interrupted run resumes where it stopped (run the same command again):
  1. tokenizer: a CLIP BPE vocabulary trained on training captions;
  2. vae: a small AutoencoderKL (4 latent channels, 64x64 -> 16x16) trained to reconstruct scenes, its first
     three latent channels tied to the 4x4-average colour (with --vae-coverage, the fourth to where objects are);
  3. latents: a fixed set of scenes encoded once (the fast recipe keeps two objects 8 px apart, --scene-gap, and
     every object 4 px from the border, --scene-margin), and the latent scaling factor (1 / std);
  3b. vae-decoder (only with --decoder-steps): the decoder trained on alone, the encoder and so the latents left
     as they are;
  4-. unet-layout (only with --layout-steps, for a recipe on v-prediction from the start, --v-from-start; the fast
     recipe has it): where each position word puts an object, learnt from pure noise against the mean latent of
     each position class;
  4. unet: UNet_SD and a small CLIPTextModel trained together (Min-SNR weighted), captions dropped 10% of the time
     for classifier-free guidance, with an EMA of the weights: the fast recipe on v-prediction with SD's betas
     rescaled to zero terminal SNR, the large one with SD's epsilon loss on SD's schedule;
  4b. unet-zsnr (the large recipe): the same two fine-tuned to v-prediction on zero-terminal-SNR betas, which is
     what makes position words work (see Recipe);
  4c. unet-two: the same objective, with batches drawn mostly from two-object scenes (fewer lost or doubled objects);
  4d. unet-shape (only with --shape-steps; the fast recipe has it): the same objective at timesteps below 700 only,
     where the noise leaves the shapes to draw;
  4e. unet-detail (only with --detail-steps; the fast recipe has it): the same objective at timesteps below 400
     only, where the last sampling steps set edges and corners (optionally with its own Min-SNR gamma);
  5. export: tokenizer, text_encoder, vae, unet (diffusers layout, safetensors), scheduler (the recipe's sampler:
     DPM++ 2M), model_index.json.
Held-out colour-shape pairs (shapes.HELD_OUT) never appear in a caption.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import world as shapes
from ..pipeline import vae_scale_factor
from ..runtime import autocast, training_bf16, unfused_library_attention
from ..port import to_diffusers
from ..train.core import (as_tuples, check_output_folder, diffusion_loss, ema_update, load_checkpoint, lr_at, noise_scheduler,
                       noised_and_target, refuse_other_objective, save_checkpoint)
from ..schedulers import check_scheduler_name, make_scheduler
from ..unet import UNet_SD, UNetConfig

log = logging.getLogger("imagecraft.shapes.train")


@dataclass
class Recipe:
    seed: int = 0
    threads: int = 0  # torch threads; 0 = all cores
    # "bf16": forward passes in bf16 autocast, fast on CPUs with AMX or AVX-512 bf16; "fp32": plain fp32, which is
    # 14x faster than bf16 on a CPU without them (AVX2: 2.1 s against 28.5 s per UNet step); "auto" picks
    precision: str = "auto"
    # tokenizer and text encoder
    vocab_size: int = 640  # 514 byte tokens and specials, the rest merges (whole words of the grammar)
    max_tokens: int = 32  # tokenizer model_max_length; the longest caption is ~20 tokens
    text_width: int = 128  # CLIPTextModel hidden size
    text_layers: int = 3
    # VAE
    vae_channels: tuple = (64, 64, 64)  # three levels: 64x64 images -> 16x16 latents (factor 4)
    vae_groups: int = 16  # GroupNorm groups (4 channels each; one channel per group trained far slower)
    # The autoencoder is convolutional, so it trains on random crops of the scenes (a multiple of the latent factor;
    # 64: whole images): crops give more steps per minute, which the round trips need more than whole scenes.
    vae_crop: int = 64
    vae_steps: int = 1800
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_warmup: int = 100
    vae_colour: float = 1.0  # weight of the auxiliary loss tying latent channels 0-2 to the patch-average colour
    # weight of the auxiliary loss tying latent channel 3 to object coverage (-1 background, 1 object), whatever
    # the colours. 0 (the large recipe): channel 3 is free, the latents are mostly background colour, the five
    # position classes differ by 0.17% of their variance, and position words are learnt last (see
    # position_separation). With coverage, the layout stage below learns them in ~150 steps instead of never.
    vae_coverage: float = 0.0
    # Weight of an extra L1 term on the pixels within 1 px of an object's outline (their mean): the outline is a
    # small share of the pixels, and what the strict scorer and the round trips of thin shapes (a star's points) need.
    vae_edge: float = 0.0
    vae_kl: float = 1e-6  # tiny KL, as SD's VAE: the latents stay near zero, the autoencoder near-deterministic
    # Share of each VAE batch drawn from the broader world (shapes.general_scene: any colour, shape, size), the rest
    # from the UNet's world. 0: the UNet's world only, whose autoencoder snaps colours outside the palette to it
    # (pink comes back purple) and draws shapes it never saw as blobs, so no fine-tune could teach them.
    vae_general: float = 0.0
    # Latent channels: the first three are tied to the patch colour, the fourth (with vae_coverage) to where objects
    # are; more are free for the edges' detail. The UNet's input and output follow.
    vae_latent_channels: int = 4
    # An autoencoder stage that trains the decoder alone, the encoder frozen (so the UNet's latents do not change),
    # optionally on latents with Gaussian noise added (std drawn per image from 0 to decoder_noise, in latent stds).
    # The fast recipe has none: with vae_edge the VAE alone round-trips the world 99.7% right, and 8,000 decoder
    # steps change neither that nor the UNet's samples (docs/built-in-model.md). With noise, the decoder learns to
    # round edges where unsure. 0: no such stage.
    decoder_steps: int = 0
    decoder_lr: float = 5e-4
    decoder_noise: float = 0.2
    # latents
    num_scenes: int = 50000  # fixed training set, encoded once
    # Least space between two objects' bounding boxes in the UNet's training scenes, in px (the world's contract: 2;
    # the VAE always trains on that). 2 px is half a latent cell: trained on such scenes the UNet draws two objects
    # touching, which read as one. A wider gap (still no overlap) shows them kept apart.
    scene_gap: float = shapes.GAP
    # Least px of background between an object and the image border in the UNet's training scenes (the world's
    # contract: 1; the VAE always trains on that). Trained on objects 1 px from the border, the UNet's small errors of
    # size and place make objects touch it, which the world never does and the scorer rejects: 54 of the 143 shapes
    # a model trained so got wrong in bench_quality, squares most (docs/built-in-model.md). A 4 px margin removed them.
    scene_margin: float = shapes.MARGIN
    # UNet
    unet: dict = field(default_factory=lambda: dict(
        model_channels=64, channel_mult=(1, 2, 2), attention_levels=(False, True, True), num_res_blocks=1,
        num_heads=None, head_dim=32, transformer_depth=1, norm_groups=32))
    unet_steps: int = 4200
    unet_batch: int = 64
    unet_lr: float = 4e-4
    warmup: int = 200
    uncond_prob: float = 0.1  # caption dropped for classifier-free guidance
    snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023, arXiv:2303.09556); 0 = plain MSE
    prediction_type: str = "epsilon"  # first stage: SD's objective
    zero_terminal_snr: bool = False
    # Second stage. SD's scaled-linear betas leave signal at t=999 (SNR 0.0047): a model trained on them takes the
    # layout from that leftover signal, so at sampling, from pure noise, the noise places the objects and position
    # words are ignored (positions at chance after stage one). Rescaling the betas to zero terminal SNR (Lin et al.
    # 2023, arXiv:2305.08891) removes the leak; epsilon cannot be predicted from pure noise, so the UNet is
    # fine-tuned to predict v. Where the noise is low, v is nearly epsilon, so the shapes learnt in stage one
    # survive; trained from scratch on this objective, the same budget learns positions but leaves shapes blurred.
    zsnr_steps: int = 1500  # 0: no second stage
    zsnr_lr: float = 2e-4
    zsnr_warmup: int = 100
    # Third stage: the second stage's objective, with batches drawn mostly from two-object scenes. After stage two,
    # 3 two-object images in 10 lost, merged or duplicated an object, while single objects were right 95% of the time.
    two_steps: int = 600  # 0: no third stage
    two_lr: float = 1e-4
    two_warmup: int = 50
    two_share: float = 0.8  # share of two-object scenes in a stage-three batch (the training set has 0.5)
    # A last stage with timesteps below shape_max_t only, where the noise leaves the shapes to draw (layout and
    # colour are set by then); it includes the lowest timesteps, which the last sampling steps need. 0: no such
    # stage (the large recipe).
    shape_steps: int = 0
    shape_lr: float = 1e-4
    shape_max_t: int = 700
    # A stage after it on the lower timesteps only (below detail_max_t), optionally with its own Min-SNR gamma: the
    # last sampling steps are where a clean triangle's sides bow (bench/bench_shape_loss.py), and in the shape stage
    # they are a small share of the batches. More share mattered, more weight did not: 3,000 steps below t=400 or
    # 250 took the triangles the strict scorer rejects in bench_quality from 43 of 221 to 23 or 16 (below 150: 24;
    # below 250 with gamma 100: 21, with more objects miscounted; docs/built-in-model.md). 0: no such stage.
    detail_steps: int = 0
    detail_lr: float = 1e-4
    detail_max_t: int = 400
    detail_snr_gamma: float = 5.0
    # Position words, faster (off in the large recipe). Position words move only a small, noisy part of each training
    # target, so a UNet learns them last (after ~5,000 steps in the large recipe). Two aids, both for
    # zero-terminal-SNR v-prediction:
    # - layout_steps: a first stage where every sample is at t >= 980 (pure noise, only the words can place the
    #   object), half the batch has a position in its caption, and x0 is replaced by the mean latent of the
    #   caption's position class (5 positions, or none): the UNet learns where each position word puts an object
    #   in ~150 steps, given latents whose channel 3 shows where objects are (vae_coverage);
    # - mean_target_t: from this timestep up, x0 in the target is the mean latent of all training scenes with the
    #   same caption (an estimate of E[x0 | caption], which is what the model should predict there, with far less
    #   noise than one scene), and a third of each batch is drawn there. 0: off.
    layout_steps: int = 0
    layout_lr: float = 4e-4
    mean_target_t: int = 0
    ema_decay: float = 0.999
    # Weight of the grounding loss (0: off): each object's colour and shape tokens should draw their cross-attention
    # from the latent cells the object covers, as in TokenCompose (Wang et al. 2024, arXiv:2312.03626). The text
    # encoder is trained from scratch and causal, so the shape token already knows the colour; without this term
    # the UNet may read the colour from it and leave the colour word's map spread over the image, which the
    # attention tab would then show.
    ground_weight: float = 0.0
    # Share of training captions (0: none) whose colour word (one object's) is replaced by a made-up word, the image
    # unchanged. The tokenizer's merges are the grammar's words, so a word a fine-tune teaches ("pink") is several
    # byte tokens and puts the shape word at a token position no caption ever put one (6 instead of 3): a LoRA
    # trained on pink circles and squares then cannot draw a pink triangle. Made-up words teach the shape words at
    # those positions, after a word the model does not know.
    made_up_words: float = 0.0
    # The sampler the model ships with (its scheduler folder; our short names, see imagecraft.schedulers). DPM++ 2M:
    # on the fast recipe's model (bench_speed_quality, 25 steps, bf16) 94.4% of images have every attribute right
    # with it and 83.9% with Euler a, which led on earlier models; DDIM and Euler come within 1-2 points
    # (docs/built-in-model.md).
    sampler: str = "dpm++2m"
    checkpoint_every: int = 250
    log_every: int = 50

    @classmethod
    def smoke(cls) -> "Recipe":
        """A few steps of everything at toy sizes: checks the script end to end in seconds."""
        return cls(vae_channels=(16, 32, 32), vae_groups=8, vae_crop=32, vae_steps=4, vae_batch=4, num_scenes=64,
                   text_width=32, text_layers=1,
                   unet=dict(model_channels=32, channel_mult=(1, 2), attention_levels=(False, True), num_res_blocks=1,
                             num_heads=2, norm_groups=8),
                   unet_steps=6, unet_batch=4, warmup=2, zsnr_steps=4, zsnr_warmup=1, two_steps=3, two_warmup=1,
                   checkpoint_every=3, log_every=2)

    @classmethod
    def fast(cls) -> "Recipe":
        """The built-in model's recipe: a small VAE trained on 32x32 crops of the world and of a broader one (any
        colour and shape, so that fine-tunes can teach new ones), channel 3 tied to coverage; 30,000 scenes with two
        objects kept 8 px apart and every object 4 px from the border; zero-terminal-SNR v-prediction from the
        start, after a layout stage, with caption-mean targets at high noise; a long stage on shapes (t < 700) and a
        last one on their detail (t < 400); the grounding loss throughout; a tenth of the captions with a made-up
        colour word; the VAE's loss weighting object outlines; DPM++ 2M sampling."""
        return cls(vae_channels=(32, 64, 64), vae_groups=8, vae_crop=32, vae_coverage=1.0, vae_general=0.5,
                   vae_edge=1.0, vae_steps=32000, num_scenes=30000, scene_gap=8, scene_margin=4,
                   prediction_type="v_prediction", zero_terminal_snr=True, layout_steps=300, mean_target_t=900,
                   unet_steps=3500, unet_batch=32, unet_lr=3e-4, zsnr_steps=0, two_steps=1200, shape_steps=14000,
                   shape_lr=3e-4, detail_steps=3000, ground_weight=0.01, made_up_words=0.1, sampler="dpm++2m")

    def stages(self) -> list["Stage"]:
        out = [Stage("unet-layout", self.layout_steps, self.layout_lr, min(100, self.layout_steps), "v_prediction",
                     True, layout=True, mean_target_t=980)] if self.layout_steps else []
        out.append(Stage("unet", self.unet_steps, self.unet_lr, self.warmup, self.prediction_type,
                         self.zero_terminal_snr, mean_target_t=self.mean_target_t if self.zero_terminal_snr else 0))
        if self.zsnr_steps:
            out.append(Stage("unet-zsnr", self.zsnr_steps, self.zsnr_lr, self.zsnr_warmup, "v_prediction", True,
                             mean_target_t=self.mean_target_t))
        if self.two_steps:
            out.append(Stage("unet-two", self.two_steps, self.two_lr, self.two_warmup, out[-1].prediction_type,
                             out[-1].zero_terminal_snr, two_share=self.two_share, mean_target_t=out[-1].mean_target_t))
        if self.shape_steps:
            out.append(Stage("unet-shape", self.shape_steps, self.shape_lr, min(50, self.shape_steps),
                             out[-1].prediction_type, out[-1].zero_terminal_snr, max_t=self.shape_max_t))
        if self.detail_steps:
            out.append(Stage("unet-detail", self.detail_steps, self.detail_lr, min(50, self.detail_steps),
                             out[-1].prediction_type, out[-1].zero_terminal_snr, max_t=self.detail_max_t,
                             snr_gamma=self.detail_snr_gamma))
        return out

    def latent_factor(self) -> int:
        return vae_scale_factor(self.vae_channels)

    def uses_bf16(self) -> bool:
        return training_bf16(self.precision)

    def autocast(self):
        """bf16 autocast where the CPU runs bf16 natively (or the recipe asks for it), else a no-op (fp32)."""
        return autocast(self.uses_bf16())


@dataclass(frozen=True)
class Stage:
    """One UNet training stage: its checkpoint name, length, learning rate and objective."""
    name: str
    steps: int
    lr: float
    warmup: int
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    two_share: float | None = None  # share of two-object scenes per batch; None: the training set's own mix
    layout: bool = False  # the layout stage: every t >= mean_target_t, position-class means (Recipe.layout_steps)
    mean_target_t: int = 0  # group-mean x0 targets from this timestep up (Recipe.mean_target_t); 0: off
    max_t: int = 1000  # timesteps drawn below this (a shape stage: where the noise leaves shapes to draw)
    snr_gamma: float | None = None  # Min-SNR gamma of this stage; None: the recipe's


def check_settings(recipe: Recipe, output: Path):
    """Refuses nonsense before any work starts, with the setting named."""
    for name in ("vae_steps", "unet_steps", "num_scenes", "checkpoint_every", "log_every"):
        if getattr(recipe, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(recipe, name)}")
    for name in ("vae_batch", "unet_batch"):
        if getattr(recipe, name) < 1:
            raise ValueError(f"{name} (batch size) must be at least 1, got {getattr(recipe, name)}")
    if recipe.zsnr_steps < 0:
        raise ValueError(f"zsnr_steps must be 0 (no second stage) or positive, got {recipe.zsnr_steps}")
    if recipe.shape_steps < 0:
        raise ValueError(f"shape_steps must be 0 (no shape stage) or positive, got {recipe.shape_steps}")
    if recipe.decoder_steps < 0:
        raise ValueError(f"decoder_steps must be 0 (no decoder stage) or positive, got {recipe.decoder_steps}")
    if not 0 <= recipe.decoder_noise <= 2:
        raise ValueError(f"decoder_noise must be from 0 to 2 latent stds, got {recipe.decoder_noise}")
    if not 0 <= recipe.made_up_words < 1:
        raise ValueError(f"made_up_words must be a share in [0, 1), got {recipe.made_up_words}")
    if not 0 <= recipe.ground_weight <= 10:
        raise ValueError(f"ground_weight must be from 0 (off) to 10, got {recipe.ground_weight}")
    if recipe.detail_steps < 0:
        raise ValueError(f"detail_steps must be 0 (no detail stage) or positive, got {recipe.detail_steps}")
    if not 20 <= recipe.detail_max_t <= 1000:
        raise ValueError(f"detail_max_t must be a timestep from 20 to 1000, got {recipe.detail_max_t}")
    if not 0 <= recipe.detail_snr_gamma <= 10000:
        raise ValueError(f"detail_snr_gamma must be 0 (plain MSE) to 10000, got {recipe.detail_snr_gamma}")
    if not 100 <= recipe.shape_max_t <= 1000:
        raise ValueError(f"shape_max_t must be a timestep from 100 to 1000, got {recipe.shape_max_t}")
    if recipe.two_steps < 0:
        raise ValueError(f"two_steps must be 0 (no third stage) or positive, got {recipe.two_steps}")
    if not 0 < recipe.two_share <= 1:
        raise ValueError(f"two_share must be in (0, 1], got {recipe.two_share}")
    factor = recipe.latent_factor()
    if not (factor <= recipe.vae_crop <= shapes.SIZE and recipe.vae_crop % factor == 0):
        raise ValueError(f"vae_crop must be a multiple of {factor} (the latent factor) from {factor} to {shapes.SIZE}, "
                         f"got {recipe.vae_crop}")
    if recipe.vae_coverage and recipe.vae_crop % (2 * factor):
        raise ValueError(f"vae_crop must be a multiple of {2 * factor} with vae_coverage (tied on 2x2 latent cells), "
                         f"got {recipe.vae_crop}")
    if not shapes.GAP <= recipe.scene_gap <= 8:
        raise ValueError(f"scene_gap must be from {shapes.GAP:g} px (the world's least gap) to 8 px (at 10, one scene "
                         f"in 20,000 found no room for its relation), got {recipe.scene_gap}")
    if not (shapes.MARGIN <= recipe.scene_margin <= 4 and float(recipe.scene_margin).is_integer()):
        raise ValueError(f"scene_margin must be a whole number of px from {shapes.MARGIN:g} (the world's) to 4 "
                         f"(beyond, two large objects in a relation rarely fit), got {recipe.scene_margin}")
    if not 4 <= recipe.vae_latent_channels <= 16:
        raise ValueError(f"vae_latent_channels must be from 4 (three tied to colour, one to coverage) to 16, got "
                         f"{recipe.vae_latent_channels}")
    if not 0 <= recipe.vae_general <= 1:
        raise ValueError(f"vae_general (share of broader-world images in a VAE batch) must be in [0, 1], got "
                         f"{recipe.vae_general}")
    check_scheduler_name(recipe.sampler)  # names the valid samplers
    if recipe.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {recipe.precision!r}")
    for name in ("vae_colour", "vae_coverage", "vae_edge"):
        value = getattr(recipe, name)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} (an auxiliary loss weight) must be 0 or a positive number, got {value}")
    for name in ("vae_lr", "unet_lr", "zsnr_lr", "two_lr", "layout_lr", "shape_lr"):
        value = getattr(recipe, name)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} (learning rate) must be a positive number, got {value}")
    if recipe.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {recipe.prediction_type!r}")
    if recipe.layout_steps < 0:
        raise ValueError(f"layout_steps must be 0 (no layout stage) or positive, got {recipe.layout_steps}")
    if recipe.mean_target_t and not 500 <= recipe.mean_target_t <= 990:
        raise ValueError(f"mean_target_t must be 0 (off) or a timestep from 500 to 990, got {recipe.mean_target_t}")
    if recipe.layout_steps and not (recipe.prediction_type == "v_prediction" and recipe.zero_terminal_snr):
        raise ValueError("layout_steps needs the first stage on v_prediction with zero_terminal_snr: the layout "
                         "stage's pure-noise v-prediction is lost on an epsilon objective")
    if recipe.zero_terminal_snr and recipe.prediction_type == "epsilon":
        raise ValueError("zero_terminal_snr needs prediction_type 'v_prediction': at t=999 the input is pure noise, "
                         "so epsilon is the input itself and the loss weight is undefined")
    if not 0 <= recipe.uncond_prob < 1:
        raise ValueError(f"uncond_prob must be in [0, 1), got {recipe.uncond_prob}")
    check_output_folder(output)


# --- data ----------------------------------------------------------------------------------------------------
def scene_batch(rng: random.Random, n: int, gap: float = shapes.GAP,
                margin: float = shapes.MARGIN) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """n training scenes as (n, 3, 64, 64) in [-1, 1], their captions (no held-out pairs), and where the objects
    are as (n, 1, 64, 64): 1 on an object, -1 on the background. Two objects' boxes lie `gap` px apart at least,
    each `margin` px from the border."""
    images, prompts, coverage = [], [], []
    for _ in range(n):
        _, prompt, image, masks = shapes.sample_scene(rng, gap=gap, margin=margin)
        images.append(image)
        prompts.append(prompt)
        coverage.append(np.any(masks, axis=0))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, prompts, torch.from_numpy(np.stack(coverage))[:, None].float() * 2 - 1


def general_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of the autoencoder's broader world (shapes.general_scene) as (n, 3, 64, 64) in [-1, 1], and where
    their objects are as (n, 1, 64, 64), 1 on an object and -1 elsewhere."""
    images, covers = zip(*(shapes.general_scene(rng) for _ in range(n)))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(np.stack(covers))[:, None].float() * 2 - 1


def caption_corpus(seed: int, n: int = 20000) -> list[str]:
    rng = random.Random(seed)
    return [shapes.prompt_of(shapes.sample_spec(rng)) for _ in range(n)]


# --- phases --------------------------------------------------------------------------------------------------
def train_tokenizer(recipe: Recipe, work: Path):
    from transformers import CLIPTokenizer

    from ..tokenizer import train_clip_tokenizer

    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        tokenizer = train_clip_tokenizer(caption_corpus(recipe.seed), recipe.vocab_size, recipe.max_tokens)
        tokenizer.save_pretrained(folder)
        log.info("tokenizer: %d tokens", len(tokenizer))
    return CLIPTokenizer.from_pretrained(folder)


def vae_batch(recipe: Recipe, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """One autoencoder batch (images, coverage), cropped to recipe.vae_crop: scenes of the world as it is
    (scene_gap is for the UNet) and a recipe.vae_general share of the broader world."""
    general = round(recipe.vae_batch * recipe.vae_general)
    x, _, coverage = scene_batch(rng, recipe.vae_batch - general)
    if general:
        more, cover = general_batch(rng, general)
        x, coverage = torch.cat([x, more]), torch.cat([coverage, cover])
    if recipe.vae_crop < shapes.SIZE:  # one crop per batch, on the latent grid so the colour target lines up
        f = recipe.latent_factor()
        top, left = (rng.randrange((shapes.SIZE - recipe.vae_crop) // f + 1) * f for _ in range(2))
        x = x[:, :, top:top + recipe.vae_crop, left:left + recipe.vae_crop]
        coverage = coverage[:, :, top:top + recipe.vae_crop, left:left + recipe.vae_crop]
    return x, coverage


def make_vae(recipe: Recipe):
    from diffusers import AutoencoderKL

    levels = len(recipe.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=recipe.vae_latent_channels,
                         block_out_channels=recipe.vae_channels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         layers_per_block=1, norm_num_groups=recipe.vae_groups, sample_size=shapes.SIZE)


def descend(opt, loss: torch.Tensor, params: list, bar) -> int:
    """One optimiser step on `loss` with gradients clipped to norm 1, shown on the tqdm bar; returns 1 (a step)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.4f}")
    return 1


def unfused_attention(recipe: Recipe, vae=None, text_encoder=None):
    return unfused_library_attention(recipe.uses_bf16(), vae, text_encoder)


def outline_pixels(coverage: torch.Tensor) -> torch.Tensor:
    """(n, 1, h, w) coverage (1 on objects, -1 elsewhere) -> 1.0 on pixels within 1 px of an outline, else 0."""
    return (F.max_pool2d(coverage, 3, 1, 1) != -F.max_pool2d(-coverage, 3, 1, 1)).float()


def train_vae(recipe: Recipe, work: Path):
    vae = make_vae(recipe)
    path = work / "vae.pt"
    state = load_checkpoint(path)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    step, rng = 0, random.Random(recipe.seed + 1)
    objective = dict(channels=list(recipe.vae_channels), crop=recipe.vae_crop, colour=recipe.vae_colour,
                     coverage=recipe.vae_coverage)
    if recipe.vae_general:
        objective["general"] = recipe.vae_general
    if recipe.vae_latent_channels != 4:
        objective["latent_channels"] = recipe.vae_latent_channels
    if recipe.vae_edge:
        objective["edge"] = recipe.vae_edge
    if state and "objective" in state:  # checkpoints from before the coverage loss lack it
        refuse_other_objective(path, state, objective)
    if state:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        rng.setstate(as_tuples(state["rng"]))
        torch.set_rng_state(state["torch_rng"])
    if step >= recipe.vae_steps:
        return vae.eval()
    vae.train()
    restore_attention = unfused_attention(recipe, vae)
    bar = tqdm(total=recipe.vae_steps, initial=step, desc="vae", unit="step")
    while step < recipe.vae_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.vae_steps, recipe.vae_lr, recipe.vae_warmup)
        x, coverage = vae_batch(recipe, rng)
        with recipe.autocast():
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.mode()).sample
        # Decoding the posterior mean trains in minutes what sampling it takes hours to (the sampled noise swamps
        # the latents until the encoder shrinks its variance); the UNet is trained on these same means. L1 keeps
        # flat colours and edges crisp; the tiny KL keeps the latents near zero. The auxiliary term asks the first
        # three latent channels to be the patch-average colour of the image: the autoencoder then learns in a few
        # hundred steps instead of thousands, and the latents are image-like, which suits the diffusion model.
        # With vae_coverage the fourth channel is asked to show where the objects are, on 2x2 latent cells (8x8 px),
        # leaving the edges' detail free (tied cell by cell, it costs the edges).
        latents = posterior.mode().float()
        f = recipe.latent_factor()
        loss = (F.l1_loss(recon.float(), x) + recipe.vae_kl * posterior.kl().mean()
                + recipe.vae_colour * F.mse_loss(latents[:, :3], F.avg_pool2d(x, f)))
        if recipe.vae_coverage:
            loss = loss + recipe.vae_coverage * F.mse_loss(F.avg_pool2d(latents[:, 3:4], 2),
                                                           F.avg_pool2d(coverage, 2 * f))
        if recipe.vae_edge:
            edge = outline_pixels(coverage)
            loss = loss + recipe.vae_edge * ((recon.float() - x).abs() * edge).sum() / (3 * edge.sum()).clamp(min=1)
        step += descend(opt, loss, list(vae.parameters()), bar)
        if step % recipe.log_every == 0:
            log.info("vae step %d/%d loss %.4f", step, recipe.vae_steps, loss.item())
        if step % recipe.checkpoint_every == 0 or step == recipe.vae_steps:
            save_checkpoint(path, dict(model=vae.state_dict(), optimizer=opt.state_dict(), step=step,
                                       rng=rng.getstate(), torch_rng=torch.get_rng_state(), objective=objective))
    bar.close()
    restore_attention()
    return vae.eval()


def train_decoder(recipe: Recipe, vae, scaling_factor: float, work: Path):
    """Recipe.decoder_steps of the decoder alone on latents (noised up to decoder_noise) of the VAE's own training
    mix (its crops, its share of the broader world); the encoder is left as it is. Returns the VAE with that
    decoder; checkpointed in work/decoder.pt, resumed on a rerun."""
    if not recipe.decoder_steps:
        return vae
    vae = copy.deepcopy(vae)
    vae.requires_grad_(False)
    decoder = [vae.post_quant_conv, vae.decoder]
    params = [q for m in decoder for q in m.parameters()]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, weight_decay=0.0)
    path = work / "decoder.pt"
    state = load_checkpoint(path)
    objective = dict(noise=recipe.decoder_noise, general=recipe.vae_general, crop=recipe.vae_crop,
                     vae_steps=recipe.vae_steps)
    step, rng, generator = 0, random.Random(recipe.seed + 5), torch.Generator().manual_seed(recipe.seed + 5)
    if state:
        refuse_other_objective(path, state, objective)
        for m, weights in zip(decoder, state["decoder"]):
            m.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        rng.setstate(as_tuples(state["rng"]))
        generator.set_state(state["generator"])
    if step >= recipe.decoder_steps:
        return vae.eval()
    vae.eval()  # no dropout or batch statistics in this VAE; eval keeps the frozen encoder as it is
    restore_attention = unfused_attention(recipe, vae)
    bar = tqdm(total=recipe.decoder_steps, initial=step, desc="vae-decoder", unit="step")
    while step < recipe.decoder_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.decoder_steps, recipe.decoder_lr, min(100, recipe.decoder_steps))
        x, _ = vae_batch(recipe, rng)
        with torch.no_grad(), recipe.autocast():
            latents = vae.encode(x).latent_dist.mode().float()
        std = torch.rand(len(x), 1, 1, 1, generator=generator) * recipe.decoder_noise / scaling_factor
        noisy = latents + std * torch.randn(latents.shape, generator=generator)
        with recipe.autocast():
            recon = vae.decode(noisy).sample
        loss = F.l1_loss(recon.float(), x)
        step += descend(opt, loss, params, bar)
        if step % recipe.log_every == 0:
            log.info("vae-decoder step %d/%d loss %.4f", step, recipe.decoder_steps, loss.item())
        if step % recipe.checkpoint_every == 0 or step == recipe.decoder_steps:
            save_checkpoint(path, dict(decoder=[m.state_dict() for m in decoder], optimizer=opt.state_dict(),
                                       step=step, rng=rng.getstate(), generator=generator.get_state(),
                                       objective=objective))
    bar.close()
    restore_attention()
    return vae.eval()


@torch.no_grad()
def round_trip(vae, images: np.ndarray, batch: int = 100) -> np.ndarray:
    """Images (N, 64, 64, 3) uint8 through the autoencoder (the latent mean, as the UNet's latents are), uint8."""
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def vae_report(vae, n: int = 150, seed: int = 0) -> dict:
    """How well an autoencoder keeps what the model needs, on fresh images:
      contract: share of the world's scenes (held-out pairs included) whose round trip the strict scorer reads fully
        right, and per shape (`contract_<shape>`), the share of objects read as that shape;
      colour_error: mean |error| / 255 on random-colour circles, squares and triangles, over the object's pixels
        less a 1 px rim (and `colour_error_p90`, the 90th percentile over objects);
      iou_<kind>: mean mask IoU of diamond, star and cross round trips (a pixel is the object's where it lies
        nearer the object's colour than the background's)."""
    from scipy import ndimage

    was_training = vae.training
    vae.eval()
    rng = random.Random(seed)
    scenes = [shapes.sample_scene(rng, allow_held_out=True) for _ in range(n)]
    back = round_trip(vae, np.stack([s[2] for s in scenes]))
    report = dict(contract=float(np.mean([shapes.score(b, s[0])["all"] for s, b in zip(scenes, back)])))
    for shape in shapes.SHAPES:
        ones = [(b, s[0]) for s, b in zip(scenes, back) if len(s[0].objects) == 1 and s[0].objects[0].shape == shape]
        report[f"contract_{shape}"] = float(np.mean([shapes.score(b, spec)["shape"] for b, spec in ones]))
    objects = [shapes.lone_object(rng, shapes.SHAPES[i % 3]) for i in range(n)]
    images = np.stack([o[0] for o in objects])
    back = round_trip(vae, images).astype(np.float32)
    errors = [np.abs(b - i.astype(np.float32))[ndimage.binary_erosion(m)].mean() / 255
              for b, i, (_, m) in zip(back, images, objects)]
    report.update(colour_error=float(np.mean(errors)), colour_error_p90=float(np.percentile(errors, 90)))
    for kind in ("diamond", "star", "cross"):
        objects = [shapes.lone_object(rng, kind) for _ in range(max(1, n // 3))]
        images = np.stack([o[0] for o in objects])
        back = round_trip(vae, images).astype(np.float32)
        ious = []
        for b, i, (_, m) in zip(back, images, objects):
            colour, background = i[m][0].astype(np.float32), i[~m][0].astype(np.float32)
            ours = ((b - colour) ** 2).sum(-1) < ((b - background) ** 2).sum(-1)
            ious.append((ours & m).sum() / (ours | m).sum())
        report[f"iou_{kind}"] = float(np.mean(ious))
    vae.train(was_training)
    return report


@torch.no_grad()
def encode_scenes(recipe: Recipe, vae, work: Path):
    """(latents (N, 4, 64 / f, 64 / f) float32, captions, scaling factor), cached in work/latents.pt."""
    path = work / "latents.pt"
    state = load_checkpoint(path)
    if (state and state["num_scenes"] == recipe.num_scenes and state.get("scene_gap", shapes.GAP) == recipe.scene_gap
            and state.get("scene_margin", shapes.MARGIN) == recipe.scene_margin):
        return state["latents"], state["captions"], state["scaling_factor"]
    rng = random.Random(recipe.seed + 2)
    latents, captions = [], []
    for start in tqdm(range(0, recipe.num_scenes, 256), desc="encode", unit="batch"):
        x, prompts, _ = scene_batch(rng, min(256, recipe.num_scenes - start), recipe.scene_gap, recipe.scene_margin)
        latents.append(vae.encode(x).latent_dist.mean)
        captions += prompts
    latents = torch.cat(latents)
    scaling_factor = float(1.0 / latents.std())
    save_checkpoint(path, dict(latents=latents, captions=captions, scaling_factor=scaling_factor,
                               num_scenes=recipe.num_scenes, scene_gap=recipe.scene_gap,
                               scene_margin=recipe.scene_margin))
    log.info("encoded %d scenes, latent std %.4f -> scaling factor %.4f", len(captions), 1 / scaling_factor,
             scaling_factor)
    return latents, captions, scaling_factor


def scene_pools(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the one-object scenes and of the two-object scenes, read from their captions."""
    two = torch.tensor([len(shapes.parse_prompt(c).objects) == 2 for c in captions])
    return torch.nonzero(~two).flatten(), torch.nonzero(two).flatten()


def position_of(caption: str) -> str | None:
    """The position a caption names (one of shapes.POSITIONS), or None."""
    spec = shapes.parse_prompt(caption)
    return spec.objects[0].position if len(spec.objects) == 1 else None


def group_means(latents: torch.Tensor, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean latent of each group of scenes that share a key, and each scene's group: (means, index)."""
    groups = {}
    index = torch.tensor([groups.setdefault(k, len(groups)) for k in keys])
    sums = torch.zeros(len(groups), *latents.shape[1:]).index_add_(0, index, latents)
    return sums / torch.bincount(index, minlength=len(groups)).view(-1, 1, 1, 1), index


def batch_indices(pools, two_share: float | None, n: int, generator: torch.Generator) -> torch.Tensor:
    """n scene indices for a batch: uniform over the training set, or a `two_share` of them two-object scenes."""
    if two_share is None:
        return torch.randint(0, sum(len(p) for p in pools), (n,), generator=generator)
    pick = torch.rand(n, generator=generator) < two_share
    twos = pools[1][torch.randint(0, len(pools[1]), (n,), generator=generator)]
    ones = pools[0][torch.randint(0, len(pools[0]), (n,), generator=generator)]
    return torch.where(pick, twos, ones)


def word_objects(tokenizer, captions: list[str], max_tokens: int) -> torch.Tensor:
    """(N, max_tokens) int8: for each caption's tokens, the object (0 or 1, in the caption's order) whose colour or
    shape word the token belongs to, -1 for every other token (articles, positions, relations, the background, the
    start, end and padding)."""
    out = torch.full((len(captions), max_tokens), -1, dtype=torch.int8)
    rows = {}
    for i, caption in enumerate(captions):
        if caption not in rows:
            tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption, max_length=max_tokens,
                                                               truncation=True).input_ids)
            words, current = [], []
            for j, token in enumerate(tokens[1:-1], start=1):  # the start and end tokens name no word
                current.append(j)
                if token.endswith("</w>"):
                    words.append(current)
                    current = []
            text = caption.split()
            assert len(words) == len(text), (caption, tokens)
            row, k = torch.full((max_tokens,), -1, dtype=torch.int8), 0
            for w, word in enumerate(text):  # each shape word is the next object ("red background" is none)
                if word in shapes.SHAPES:
                    row[words[w]] = k
                    if w and text[w - 1] in shapes.COLOURS:  # a made-up colour word is not grounded
                        row[words[w - 1]] = k
                    k += 1
            rows[caption] = row
        out[i] = rows[caption]
    return out


GRAMMAR_WORDS = {w for phrase in (*shapes.COLOURS, *shapes.SHAPES, *shapes.POSITIONS, *shapes.RELATIONS,
                                   "a an on background") for w in phrase.split()}


def made_up_colour(caption: str, generator: torch.Generator) -> str:
    """The caption with one object's colour word replaced by a made-up word of 3-6 letters, which the tokenizer
    splits into pieces (its merges are the grammar's words), as it splits a word a fine-tune will teach."""
    text = caption.split()
    spots = [w for w in range(len(text) - 1) if text[w] in shapes.COLOURS and text[w + 1] in shapes.SHAPES]
    w = spots[int(torch.randint(len(spots), (1,), generator=generator))]
    word = ""
    while not word or word in GRAMMAR_WORDS:
        letters = torch.randint(26, (int(torch.randint(3, 7, (1,), generator=generator)),), generator=generator)
        word = "".join(chr(ord("a") + int(c)) for c in letters)
    text[w] = word
    return " ".join(text)


def object_masks(recipe: Recipe, n: int, latent_size: int, work: Path) -> torch.Tensor:
    """(n, 2, latent_size, latent_size) bool: the latent cells each object of the encoded scenes touches (the second
    all False for one-object scenes), cached in work/masks.pt. The scenes are drawn again from encode_scenes' seed,
    so they are the same scenes in the same order."""
    path = work / "masks.pt"
    state = load_checkpoint(path)
    key = dict(seed=recipe.seed, num_scenes=n, scene_gap=recipe.scene_gap, latent_size=latent_size)
    if recipe.scene_margin != shapes.MARGIN:  # the key of a work folder made before the margin existed still holds
        key["scene_margin"] = recipe.scene_margin
    if state and state["key"] == key:
        return state["masks"]
    rng = random.Random(recipe.seed + 2)  # as encode_scenes: scene_batch draws each scene with sample_scene
    cells = torch.zeros(n, 2, latent_size, latent_size, dtype=torch.bool)
    for i in tqdm(range(n), desc="masks", unit="scene"):
        _, _, _, objects = shapes.sample_scene(rng, gap=recipe.scene_gap, margin=recipe.scene_margin)
        pixels = torch.from_numpy(np.stack(objects)).float()  # (objects, 64, 64)
        cells[i, :len(objects)] = F.adaptive_max_pool2d(pixels, latent_size) > 0
    save_checkpoint(path, dict(masks=cells, key=key))
    return cells


class KeepingProcessor:
    """Cross-attention that keeps its probabilities, averaged over heads as the attention tab shows them
    ((B, pixels, tokens), with their gradients), in a list; the maths of the default processor otherwise."""

    def __init__(self, kept: list):
        self.kept = kept

    def __call__(self, attn, x, context=None):
        from ..explain.maps import probabilities

        q, k, v = attn.qkv(x, context)
        probs = probabilities(q, k)  # (B, heads, pixels, tokens)
        self.kept.append(probs.mean(dim=1))
        return attn.out((probs @ v).to(v.dtype))


def keep_cross_attention(unet: UNet_SD) -> list:
    """Installs KeepingProcessor on every cross-attention layer of `unet`; returns the list it fills per forward."""
    from ..explain.maps import cross_attention_layers

    kept = []
    for layer in cross_attention_layers(unet).values():
        layer.processor = KeepingProcessor(kept)
    return kept


def inside_share(maps: list[torch.Tensor], words: torch.Tensor, masks: torch.Tensor) -> torch.Tensor | None:
    """For each grounded token of the batch (words: (B, T) object index or -1), the share of its attention that
    falls on cells of its object (masks: (B, 2, H, W) bool, pooled to each layer's size), averaged over the
    layers; None when the batch has no such token."""
    valid = words >= 0
    if not valid.any():
        return None
    shares, targets = [], {}
    for probs in maps:  # (B, N, T)
        side = math.isqrt(probs.shape[1])
        if side not in targets:  # layers at one resolution share their target
            cells = F.adaptive_max_pool2d(masks.float(), side).flatten(2)  # (B, 2, N)
            targets[side] = cells.gather(1, words.clamp(min=0)[:, :, None].expand(-1, -1, cells.shape[2]))  # (B, T, N)
        target = targets[side]
        attention = probs.float().transpose(1, 2)  # (B, T, N)
        shares.append((attention * target).sum(-1) / attention.sum(-1).clamp(min=1e-8))
    return torch.stack(shares).mean(dim=0)[valid]


def make_text_encoder(recipe: Recipe, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_width, intermediate_size=4 * recipe.text_width,
        num_hidden_layers=recipe.text_layers, num_attention_heads=max(1, recipe.text_width // 32),
        max_position_embeddings=recipe.max_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def make_noise_scheduler(stage: Stage):
    return noise_scheduler(stage.prediction_type, stage.zero_terminal_snr)


@torch.no_grad()
def position_separation(unet: UNet_SD, text_encoder, tokenizer, stage: Stage, latent_size: int,
                        max_tokens: int) -> float:
    """Whether the position words move the object where sampling starts, in image pixels.

    At t=999 the model's estimate of x0 from noise is the layout it commits to. For 8 objects named with each of
    the 5 positions, the centre of mass of |x0(prompt) - mean of x0 over the object's 5 prompts| is taken; the
    result is (right - left) in x plus (bottom - top) in y, averaged over the objects: about 0 while position
    words are ignored, 11.6 for the large recipe's model, 8.7 for the built-in model. Sampling places objects in
    the named third only once this is well above 0, so training logs it at every checkpoint, long before the
    quality benchmark could tell."""
    prompts = [f"a {c} {s} {p}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")
               for p in shapes.POSITIONS]
    ids = tokenizer(prompts, padding="max_length", max_length=max_tokens, truncation=True,
                    return_tensors="pt").input_ids
    xt = torch.randn(len(prompts), unet.config.in_channels, latent_size, latent_size,
                     generator=torch.Generator().manual_seed(0))
    t = torch.full((len(prompts),), 999)
    pred = unet(xt, t, text_encoder(ids)[0]).float()
    a = make_noise_scheduler(stage).alphas_cumprod[999]
    if stage.prediction_type == "v_prediction":
        x0 = a.sqrt() * xt - (1 - a).sqrt() * pred
    else:
        x0 = (xt - (1 - a).sqrt() * pred) / a.sqrt()
    x0 = x0.view(-1, len(shapes.POSITIONS), *x0.shape[1:])  # (objects, positions, C, H, W)
    weight = (x0 - x0.mean(dim=1, keepdim=True)).abs().sum(dim=2)  # (objects, positions, H, W)
    weight = weight / weight.sum(dim=(2, 3), keepdim=True).clamp(min=1e-12)
    coords = (torch.arange(latent_size) + 0.5) * shapes.SIZE / latent_size
    cx = (weight.sum(dim=2) * coords).sum(dim=2).mean(dim=0)  # (positions,)
    cy = (weight.sum(dim=3) * coords).sum(dim=2).mean(dim=0)
    where = {p: i for i, p in enumerate(shapes.POSITIONS)}
    return float(cx[where["on the right"]] - cx[where["on the left"]]
                 + cy[where["at the bottom"]] - cy[where["at the top"]])


def draw_timesteps(stage: Stage, n: int, rng: torch.Generator) -> torch.Tensor:
    """Uniform below stage.max_t; with a group-mean target, all of a layout batch and a third of any other from
    stage.mean_target_t up, where that target applies."""
    t = torch.randint(0, stage.max_t, (n,), generator=rng)
    if stage.mean_target_t:
        high = torch.randint(stage.mean_target_t, 1000, (n,), generator=rng)
        t = high if stage.layout else torch.where(torch.arange(n) % 3 == 0, high, t)
    return t


def train_unet(recipe: Recipe, stage: Stage, work: Path, tokenizer, latents, captions, scaling_factor, init=None,
               init_from: str | None = None):
    """Trains one stage from `init` (the previous stage's EMA UNet and text encoder, `init_from` naming it, e.g.
    "unet@4200") or from scratch; returns the EMA of both."""
    torch.manual_seed(recipe.seed + 3)
    text_encoder = make_text_encoder(recipe, tokenizer)
    unet = UNet_SD(UNetConfig(context_dim=recipe.text_width, in_channels=recipe.vae_latent_channels,
                              out_channels=recipe.vae_latent_channels,
                              sample_size=shapes.SIZE // recipe.latent_factor(), **recipe.unet))
    if init:
        unet.load_state_dict(init[0].state_dict())
        text_encoder.load_state_dict(init[1].state_dict())
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False), "text": copy.deepcopy(text_encoder).requires_grad_(False)}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.01)
    noise_scheduler = make_noise_scheduler(stage)
    path = work / f"{stage.name}.pt"
    state = load_checkpoint(path)
    objective = dict(prediction_type=stage.prediction_type, zero_terminal_snr=stage.zero_terminal_snr,
                     unet=json.loads(json.dumps(recipe.unet)), text_width=recipe.text_width)
    if init_from:
        objective["init"] = init_from  # a stage started from another earlier stage is not resumed
    if stage.two_share is not None:
        objective["two_share"] = stage.two_share
    if stage.layout:
        objective["layout"] = True
    if stage.mean_target_t:
        objective["mean_target_t"] = stage.mean_target_t
    if stage.max_t < 1000:
        objective["max_t"] = stage.max_t
    snr_gamma = recipe.snr_gamma if stage.snr_gamma is None else stage.snr_gamma
    if stage.snr_gamma is not None:
        objective["snr_gamma"] = snr_gamma
    if recipe.ground_weight:
        objective["ground_weight"] = recipe.ground_weight
    if recipe.made_up_words:
        objective["made_up_words"] = recipe.made_up_words
    if (recipe.scene_gap, recipe.scene_margin) != (shapes.GAP, shapes.MARGIN):  # other training scenes
        objective["scenes"] = dict(gap=recipe.scene_gap, margin=recipe.scene_margin)
    if state:
        refuse_other_objective(path, state, objective)
    stage_number = [s.name for s in recipe.stages()].index(stage.name)
    step, rng = 0, torch.Generator().manual_seed(recipe.seed + 4 + 10 * stage_number)
    if state:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema["unet"].load_state_dict(state["ema_unet"])
        ema["text"].load_state_dict(state["ema_text"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        rng.set_state(state["rng"])
        log.info("resumed %s training at step %d", stage.name, step)
    if step >= stage.steps:
        return ema["unet"].eval(), ema["text"].eval()

    latents = latents * scaling_factor
    ids_all = tokenizer(captions, padding="max_length", max_length=recipe.max_tokens, truncation=True,
                        return_tensors="pt").input_ids
    ids_empty = tokenizer([""], padding="max_length", max_length=recipe.max_tokens, return_tensors="pt").input_ids
    alphas = noise_scheduler.alphas_cumprod
    pools, share = scene_pools(captions), stage.two_share
    if stage.layout:  # half of each batch from the scenes whose caption names a position
        positions = [position_of(c) for c in captions]
        positioned = torch.tensor([p is not None for p in positions])
        pools, share = (torch.nonzero(~positioned).flatten(), torch.nonzero(positioned).flatten()), 0.5
        targets = group_means(latents, positions)
    elif stage.mean_target_t:
        targets = group_means(latents, captions)
    if recipe.ground_weight:
        objects = word_objects(tokenizer, captions, recipe.max_tokens)
        masks = object_masks(recipe, len(captions), latents.shape[-1], work)
        maps = keep_cross_attention(unet)
    unet.train(), text_encoder.train()
    unfused_attention(recipe, text_encoder=text_encoder)  # the training copy only: the EMA, exported, keeps sdpa
    bar = tqdm(total=stage.steps, initial=step, desc=stage.name, unit="step")
    running, inside, started = None, None, time.time()
    while step < stage.steps:
        lr = lr_at(step, stage.steps, stage.lr, stage.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        # batch: random scenes, captions dropped for guidance, SD's noising at uniform timesteps
        index = batch_indices(pools, share, recipe.unet_batch, rng)
        x0 = latents[index]
        ids = ids_all[index].clone()
        drop = torch.rand(recipe.unet_batch, generator=rng) < recipe.uncond_prob
        ids[drop] = ids_empty
        if recipe.made_up_words:  # some colour words replaced by made-up ones; the images stay as they are
            made_up = (torch.rand(recipe.unet_batch, generator=rng) < recipe.made_up_words) & ~drop
            changed = [made_up_colour(captions[i], rng) for i in index[made_up].tolist()]
            if changed:
                ids[made_up] = tokenizer(changed, padding="max_length", max_length=recipe.max_tokens,
                                         truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=rng)
        t = draw_timesteps(stage, recipe.unet_batch, rng)
        xt, target = noised_and_target(stage.prediction_type, alphas, x0, noise, t)
        if stage.mean_target_t:
            _, mean_target = noised_and_target(stage.prediction_type, alphas, targets[0][targets[1][index]], noise, t)
            target = torch.where((t >= stage.mean_target_t).view(-1, 1, 1, 1), mean_target, target)
        # forward in bf16 autocast where the CPU has native bf16, loss in fp32
        with recipe.autocast():
            context = text_encoder(ids)[0]
            pred = unet(xt, t, context)
        loss = diffusion_loss(pred, target, stage.prediction_type, alphas, t, snr_gamma)
        if recipe.ground_weight:
            words = objects[index].long()
            words[drop] = -1  # no caption, no words to ground
            if recipe.made_up_words and changed:
                words[made_up] = word_objects(tokenizer, changed, recipe.max_tokens).long()
            grounded = inside_share(maps, words, masks[index])
            maps.clear()
            if grounded is not None:
                loss = loss + recipe.ground_weight * ((1 - grounded) ** 2).mean()
                now = grounded.mean().item()
                inside = now if inside is None else 0.98 * inside + 0.02 * now
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema_update(unet, ema["unet"], step, recipe.ema_decay)
        ema_update(text_encoder, ema["text"], step, recipe.ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.1e}")
        if step % recipe.log_every == 0:
            log.info("%s step %d/%d loss %.4f lr %.2e (%.1f min)%s", stage.name, step, stage.steps, running, lr,
                     (time.time() - started) / 60,
                     "" if inside is None else f"; colour and shape words' attention inside their object {inside:.0%}")
        if step % recipe.checkpoint_every == 0 or step == stage.steps:
            log.info("%s step %d: position separation at t=999 %.1f px (0: position words ignored; large recipe 11.6)",
                     stage.name, step, position_separation(ema["unet"].eval(), ema["text"].eval(), tokenizer, stage,
                                                           latents.shape[-1], recipe.max_tokens))
            save_checkpoint(path, dict(unet=unet.state_dict(), text_encoder=text_encoder.state_dict(),
                                       ema_unet=ema["unet"].state_dict(), ema_text=ema["text"].state_dict(),
                                       optimizer=opt.state_dict(), step=step, rng=rng.get_state(),
                                       objective=objective))
    bar.close()
    return ema["unet"].eval(), ema["text"].eval()


def export(output: Path, recipe: Recipe, tokenizer, text_encoder, vae, unet: UNet_SD, scaling_factor: float):
    """Writes the model as a plain diffusers StableDiffusionPipeline folder (safetensors)."""
    from diffusers import StableDiffusionPipeline

    vae = pin_posterior(copy.deepcopy(vae).float())
    vae.register_to_config(scaling_factor=scaling_factor)
    # the UNet is stored in fp16 to keep the model under 30 MB; diffusers and ImageCraft load it back into fp32
    diffusers_unet = to_diffusers(unet.float()).half()
    scheduler = make_scheduler(recipe.sampler, make_noise_scheduler(recipe.stages()[-1]).config)
    pipe = StableDiffusionPipeline(vae=vae.float(), text_encoder=text_encoder.float(), tokenizer=tokenizer,
                                   unet=diffusers_unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(output, safe_serialization=True)
    _write_legacy_tokenizer_files(tokenizer, output / "tokenizer")


@torch.no_grad()
def pin_posterior(vae):
    """The VAE with its posterior's log-variance pinned to diffusers' floor (-30: std 3e-7), the mean untouched.
    Training reads only the mean, so the tiny KL term leaves the variance at 1 (std 1, against latents of std ~0.6),
    and a reader that samples the posterior, as diffusers' img2img does, would drown the image in noise."""
    c = vae.config.latent_channels
    vae.quant_conv.weight[c:] = 0
    vae.quant_conv.bias[c:] = -30.0
    return vae


def _write_legacy_tokenizer_files(tokenizer, folder: Path):
    """vocab.json and merges.txt beside tokenizer.json, for older readers of CLIP tokenizer folders."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    (folder / "vocab.json").write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for the model (and work/ with checkpoints)")
    parser.add_argument("--work", default=None,
                        help="folder for checkpoints and cached latents (default: runs/<output name>)")
    parser.add_argument("--recipe", choices=("fast", "large", "smoke"), default="fast",
                        help="fast (default): the built-in model's recipe (see its model card); large: the "
                             "earlier built-in model's (~109 min with AMX, ~5 h on AVX2); smoke: a few steps at toy "
                             "sizes (CI); the flags below override it")
    parser.add_argument("--smoke", action="store_true", help="same as --recipe smoke")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--zsnr-steps", type=int, default=None, help="second UNet stage (0: none)")
    parser.add_argument("--two-steps", type=int, default=None, help="third UNet stage (0: none)")
    parser.add_argument("--shape-steps", type=int, default=None,
                        help=f"UNet stage after the two-object one, timesteps below {Recipe.shape_max_t} only (0: "
                             f"none; the fast recipe has {Recipe.fast().shape_steps})")
    parser.add_argument("--detail-steps", type=int, default=None,
                        help=f"last UNet stage, after the shape stage, timesteps below --detail-max-t only (0: none; "
                             f"the fast recipe has {Recipe.fast().detail_steps})")
    parser.add_argument("--detail-max-t", type=int, default=None,
                        help=f"the detail stage's timesteps are below this (default {Recipe.detail_max_t})")
    parser.add_argument("--detail-snr-gamma", type=float, default=None,
                        help="the detail stage's Min-SNR gamma (0: plain MSE on the target)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                        help="auto (default): bf16 autocast where the CPU runs bf16 natively, else fp32")
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--decoder-steps", type=int, default=None,
                        help="decoder-only steps on noised latents after the VAE (0: none)")
    parser.add_argument("--decoder-noise", type=float, default=None,
                        help="largest std of the noise added to the latents in the decoder stage, in latent stds")
    parser.add_argument("--batch-size", type=int, default=None, help="UNet batch size")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of the first UNet stage")
    parser.add_argument("--num-scenes", type=int, default=None, help="training scenes encoded once")
    parser.add_argument("--sampler", default=None, help="the scheduler the model ships with (fast recipe: dpm++2m)")
    parser.add_argument("--scene-gap", type=float, default=None, help="least px between two objects in training scenes")
    parser.add_argument("--scene-margin", type=float, default=None,
                        help="least px between an object and the border in the UNet's training scenes (1 to 4)")
    parser.add_argument("--vae-crop", type=int, default=None, help="VAE training crop (a multiple of 4, to 64)")
    parser.add_argument("--vae-coverage", type=float, default=None,
                        help="weight tying latent channel 3 to object coverage (0: free, as the large recipe)")
    parser.add_argument("--vae-general", type=float, default=None,
                        help="share of broader-world images (any colour and shape) in each VAE batch, 0..1")
    parser.add_argument("--vae-edge", type=float, default=None,
                        help="weight of the VAE's extra L1 term on pixels along object outlines (0: none)")
    parser.add_argument("--vae-latent-channels", type=int, default=None,
                        help="latent channels (4: SD's; more keep sharper edges); the UNet follows")
    parser.add_argument("--v-from-start", action="store_true",
                        help="first UNet stage on zero-terminal-SNR v-prediction instead of SD's epsilon")
    parser.add_argument("--layout-steps", type=int, default=None, help="layout stage before the first (0: none)")
    parser.add_argument("--ground-weight", type=float, default=None,
                        help="weight of the loss that keeps colour and shape words' attention on their object (0: off)")
    parser.add_argument("--made-up-words", type=float, default=None,
                        help="share of captions whose colour word is replaced by a made-up word (0: none)")
    parser.add_argument("--mean-target-t", type=int, default=None,
                        help="caption-mean x0 targets from this timestep up, zero-SNR stages (0: off)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    recipe = {"large": Recipe, "fast": Recipe.fast, "smoke": Recipe.smoke}["smoke" if args.smoke else args.recipe]()
    for flag, name in (("seed", "seed"), ("unet_steps", "unet_steps"), ("zsnr_steps", "zsnr_steps"),
                       ("two_steps", "two_steps"), ("shape_steps", "shape_steps"), ("vae_steps", "vae_steps"),
                       ("precision", "precision"), ("batch_size", "unet_batch"), ("lr", "unet_lr"),
                       ("num_scenes", "num_scenes"), ("sampler", "sampler"), ("scene_gap", "scene_gap"),
                       ("scene_margin", "scene_margin"), ("vae_crop", "vae_crop"), ("vae_coverage", "vae_coverage"),
                       ("layout_steps", "layout_steps"),
                       ("mean_target_t", "mean_target_t"), ("vae_general", "vae_general"), ("vae_edge", "vae_edge"),
                       ("vae_latent_channels", "vae_latent_channels"), ("ground_weight", "ground_weight"),
                       ("decoder_steps", "decoder_steps"), ("decoder_noise", "decoder_noise"),
                       ("made_up_words", "made_up_words"), ("detail_steps", "detail_steps"),
                       ("detail_max_t", "detail_max_t"), ("detail_snr_gamma", "detail_snr_gamma")):
        if getattr(args, flag) is not None:
            setattr(recipe, name, getattr(args, flag))
    if args.v_from_start:
        recipe.prediction_type, recipe.zero_terminal_snr = "v_prediction", True
    output = Path(args.output)
    try:
        check_settings(recipe, output)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    work = Path(args.work) if args.work else Path("runs") / output.name
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))

    log.info("precision: %s", "bf16 autocast" if recipe.uses_bf16() else "fp32")
    started = time.time()
    try:
        tokenizer = train_tokenizer(recipe, work)
        vae = train_vae(recipe, work)
        latents, captions, scaling_factor = encode_scenes(recipe, vae, work)
        vae = train_decoder(recipe, vae, scaling_factor, work)
        models, previous = None, None
        for stage in recipe.stages():
            models = train_unet(recipe, stage, work, tokenizer, latents, captions, scaling_factor, init=models,
                                init_from=previous and f"{previous.name}@{previous.steps}")
            previous = stage
        unet, text_encoder = models
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    export(output, recipe, tokenizer, text_encoder, vae, unet, scaling_factor)
    minutes = (time.time() - started) / 60
    (work / "time.json").write_text(json.dumps({"minutes_this_run": minutes}))
    log.info("wrote %s in %.1f min", output, minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
