"""Trains the built-in model from scratch on the shapes world, on a CPU, and writes it in diffusers layout.

    python -m imagecraft.shapes.train --output assets/shapes-sd            # the built-in model's recipe (lexicon)
    python -m imagecraft.shapes.train --output /tmp/fast --recipe fast     # its first five UNet stages only
    python -m imagecraft.shapes.train --output /tmp/smoke --recipe smoke   # every phase in seconds, at toy sizes
    python -m imagecraft.shapes.train --output /tmp/m --set vae.steps=8000 --set stages.unet-detail.steps=0
    python -m imagecraft.shapes.train --output /tmp/lex --from /tmp/fast --start-at unet-lexicon  # continue a model

The recipe is data (`shapes.recipe`: presets fast, lexicon, large, smoke; `--set FIELD=VALUE` changes one field);
`--from MODEL --start-at STAGE` continues a model this script exported with the stages from STAGE on. Phases,
each checkpointed in the work folder (runs/<output name>/, or --work) so a rerun of the same command resumes:
  1. tokenizer: a CLIP BPE vocabulary trained on the grammar's captions;
  2. vae: an AutoencoderKL trained to reconstruct scenes, its first three latent channels tied to the patch colour
     (and, with vae.coverage, the fourth to where objects are; with vae.edge, object outlines weighted);
  3. latents: the UNet's training scenes encoded once, and the latent scaling factor (1 / std);
  4. vae-decoder (only with decoder.steps): the decoder trained on alone, the latents left as they are;
  5. the UNet stages in order (`recipe.stages`), UNet_SD and a CLIP text encoder trained together, each stage from
     the previous one's EMA, with captions dropped for classifier-free guidance, the grounding loss and made-up
     colour words where the recipe asks (shapes.grounding), and a stage's `lexicon` share of each batch from
     scenes whose colour (or shape) is named by a made-up word (world.lexicon_scene, encoded once);
  6. export: tokenizer, text_encoder, vae, unet (fp16 safetensors), scheduler (the recipe's sampler),
     model_index.json: a plain diffusers StableDiffusionPipeline folder.
Every phase runs on `train.core.Loop`. Held-out colour-shape pairs (world.HELD_OUT) never appear in a caption.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..port import from_diffusers, to_diffusers
from ..runtime import training_bf16, unfused_library_attention
from ..schedulers import make_scheduler
from ..tokenizer import train_clip_tokenizer
from ..train.core import (Loop, RandomState, check_output_folder, diffusion_loss, load_checkpoint, noised_and_target,
                          save_checkpoint)
from ..unet import UNet_SD, UNetConfig
from . import world
from .data import (batch_indices, caption_corpus, draw_timesteps, group_means, lexicon_batch, outline_pixels,
                   position_of, scene_batch, scene_pools, vae_batch)
from .diagnostics import position_separation, stage_scheduler
from ..explain.capture import keep_cross_attention
from .grounding import inside_share, made_up_colour, object_masks, word_objects
from .recipe import PRESETS, ShapesRecipe, UNetStage, check_recipe, override

log = logging.getLogger("imagecraft.shapes.train")


def loop_for(recipe: ShapesRecipe, name: str, steps: int, work: Path, objective: dict, **settings) -> Loop:
    """A Loop with the recipe's precision, checkpoint and log intervals; `settings` fills in the rest."""
    return Loop(name, steps, work / f"{name}.pt", objective, bf16=training_bf16(recipe.precision),
                checkpoint_every=recipe.checkpoint_every, log_every=recipe.log_every, **settings)


# --- tokenizer and autoencoder -------------------------------------------------------------------------------
def train_tokenizer(recipe: ShapesRecipe, work: Path):
    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        tokenizer = train_clip_tokenizer(caption_corpus(recipe.seed), recipe.text.vocab_size, recipe.text.max_tokens)
        tokenizer.save_pretrained(folder)
        log.info("tokenizer: %d tokens", len(tokenizer))
    return CLIPTokenizer.from_pretrained(folder)


def make_vae(recipe: ShapesRecipe):
    spec, levels = recipe.vae, len(recipe.vae.channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=spec.latent_channels,
                         block_out_channels=spec.channels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1,
                         norm_num_groups=spec.groups, sample_size=world.SIZE)


def train_vae(recipe: ShapesRecipe, work: Path):
    """The autoencoder, trained (or resumed) to recipe.vae.steps."""
    spec = recipe.vae
    vae = make_vae(recipe)
    rng = random.Random(recipe.seed + 1)
    objective = dict(channels=list(spec.channels), crop=spec.crop, colour=spec.colour, coverage=spec.coverage,
                     general=spec.general, latent_channels=spec.latent_channels, edge=spec.edge)
    loop = loop_for(recipe, "vae", spec.steps, work, objective, params=list(vae.parameters()), lr=spec.lr,
                    warmup=spec.warmup,
                    state={"model": vae, "rng": RandomState(rng), "torch_rng": RandomState(None)})
    loop.optimizer = torch.optim.AdamW(loop.params, lr=spec.lr, weight_decay=0.0)
    if loop.resume() >= spec.steps:
        return vae.eval()
    f = spec.latent_factor

    def batch_loss(step):
        x, coverage = vae_batch(spec, rng)
        with loop.autocast():
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.mode()).sample
        # Decoding the posterior mean trains in minutes what sampling it takes hours to (the sampled noise swamps
        # the latents until the encoder shrinks its variance); the UNet is trained on these same means. L1 keeps
        # flat colours and edges crisp; the tiny KL keeps the latents near zero. The colour term asks the first
        # three latent channels to be the patch-average colour, so the latents are image-like; the coverage term
        # asks the fourth to show where the objects are, on 2x2 latent cells (tied cell by cell, it costs the
        # edges); the edge term weights the pixels along object outlines, a small share of all pixels.
        latents = posterior.mode().float()
        loss = (F.l1_loss(recon.float(), x) + spec.kl * posterior.kl().mean()
                + spec.colour * F.mse_loss(latents[:, :3], F.avg_pool2d(x, f)))
        if spec.coverage:
            loss = loss + spec.coverage * F.mse_loss(F.avg_pool2d(latents[:, 3:4], 2), F.avg_pool2d(coverage, 2 * f))
        if spec.edge:
            edge = outline_pixels(coverage)
            loss = loss + spec.edge * ((recon.float() - x).abs() * edge).sum() / (3 * edge.sum()).clamp(min=1)
        return loss

    vae.train()
    restore_attention = unfused_library_attention(loop.bf16, vae)
    loop.run(batch_loss)
    restore_attention()
    return vae.eval()


def train_decoder(recipe: ShapesRecipe, vae, scaling_factor: float, work: Path):
    """recipe.decoder.steps of the decoder alone on latents (noised up to decoder.noise) of the VAE's own training
    mix; the encoder is left as it is. Returns the VAE with that decoder."""
    spec = recipe.decoder
    if not spec.steps:
        return vae
    vae = copy.deepcopy(vae)
    vae.requires_grad_(False)
    decoder = torch.nn.ModuleList([vae.post_quant_conv, vae.decoder])
    decoder.requires_grad_(True)
    rng, generator = random.Random(recipe.seed + 5), torch.Generator().manual_seed(recipe.seed + 5)
    objective = dict(noise=spec.noise, general=recipe.vae.general, crop=recipe.vae.crop, vae_steps=recipe.vae.steps)
    loop = loop_for(recipe, "vae-decoder", spec.steps, work, objective, params=list(decoder.parameters()),
                    lr=spec.lr, warmup=min(100, spec.steps),
                    state={"decoder": decoder, "rng": RandomState(rng), "generator": RandomState(generator)})
    loop.optimizer = torch.optim.AdamW(loop.params, lr=spec.lr, weight_decay=0.0)
    if loop.resume() >= spec.steps:
        return vae.eval()

    def batch_loss(step):
        x, _ = vae_batch(recipe.vae, rng)
        with torch.no_grad(), loop.autocast():
            latents = vae.encode(x).latent_dist.mode().float()
        std = torch.rand(len(x), 1, 1, 1, generator=generator) * spec.noise / scaling_factor
        noisy = latents + std * torch.randn(latents.shape, generator=generator)
        with loop.autocast():
            recon = vae.decode(noisy).sample
        return F.l1_loss(recon.float(), x)

    vae.eval()  # no dropout or batch statistics in this VAE; eval keeps the frozen encoder as it is
    restore_attention = unfused_library_attention(loop.bf16, vae)
    loop.run(batch_loss)
    restore_attention()
    return vae.eval()


@torch.no_grad()
def encode_scenes(recipe: ShapesRecipe, vae, work: Path):
    """(latents (N, C, 64 / f, 64 / f) float32, captions, scaling factor), cached in work/latents.pt."""
    path, scenes = work / "latents.pt", recipe.scenes
    state = load_checkpoint(path)
    if state and (state["num_scenes"], state["scene_gap"], state["scene_margin"]) == (scenes.count, scenes.gap,
                                                                                       scenes.margin):
        return state["latents"], state["captions"], state["scaling_factor"]
    rng = random.Random(recipe.seed + 2)
    latents, captions = [], []
    for start in tqdm(range(0, scenes.count, 256), desc="encode", unit="batch"):
        x, prompts, _ = scene_batch(rng, min(256, scenes.count - start), scenes.gap, scenes.margin)
        latents.append(vae.encode(x).latent_dist.mean)
        captions += prompts
    latents = torch.cat(latents)
    scaling_factor = float(1.0 / latents.std())
    save_checkpoint(path, dict(latents=latents, captions=captions, scaling_factor=scaling_factor,
                               num_scenes=scenes.count, scene_gap=scenes.gap, scene_margin=scenes.margin))
    log.info("encoded %d scenes, latent std %.4f -> scaling factor %.4f", len(captions), 1 / scaling_factor,
             scaling_factor)
    return latents, captions, scaling_factor


@torch.no_grad()
def encode_lexicon(recipe: ShapesRecipe, vae, work: Path):
    """(latents, captions) of recipe.lexicon.scenes scenes named by made-up words (world.lexicon_scene), cached in
    work/lexicon.pt; (None, []) when the recipe has none."""
    spec, scenes = recipe.lexicon, recipe.scenes
    if not spec.scenes:
        return None, []
    path = work / "lexicon.pt"
    key = dict(seed=recipe.seed, spec=dataclasses.asdict(spec), gap=scenes.gap, margin=scenes.margin)
    state = load_checkpoint(path)
    if state and state["key"] == key:
        return state["latents"], state["captions"]
    rng = random.Random(recipe.seed + 6)
    lexicon = world.make_lexicon(rng, spec.colour_words, spec.shape_words)
    latents, captions = [], []
    for start in tqdm(range(0, spec.scenes, 256), desc="encode lexicon scenes", unit="batch"):
        x, prompts = lexicon_batch(rng, lexicon, min(256, spec.scenes - start), scenes.gap, scenes.margin)
        latents.append(vae.encode(x).latent_dist.mean)
        captions += prompts
    latents = torch.cat(latents)
    save_checkpoint(path, dict(latents=latents, captions=captions, key=key))
    log.info("encoded %d lexicon scenes (%d made-up colour words, %d shape words)", len(captions),
             spec.colour_words, spec.shape_words)
    return latents, captions


# --- the UNet ------------------------------------------------------------------------------------------------
def make_text_encoder(recipe: ShapesRecipe, tokenizer):
    width = recipe.text.width
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=recipe.text.layers, num_attention_heads=max(1, width // 32),
        max_position_embeddings=recipe.text.max_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def make_unet(recipe: ShapesRecipe) -> UNet_SD:
    channels = recipe.vae.latent_channels
    return UNet_SD(UNetConfig(context_dim=recipe.text.width, in_channels=channels, out_channels=channels,
                              sample_size=world.SIZE // recipe.vae.latent_factor, **recipe.unet))


def stage_objective(recipe: ShapesRecipe, stage: UNetStage, init_from: str | None) -> dict:
    """What a stage's checkpoint must have been trained for to be resumed."""
    return dict(prediction_type=stage.prediction_type, zero_terminal_snr=stage.zero_terminal_snr,
                unet=json.loads(json.dumps(recipe.unet)), text_width=recipe.text.width, init=init_from,
                two_share=stage.two_share, layout=stage.layout, mean_target_t=stage.mean_target_t, max_t=stage.max_t,
                snr_gamma=stage.snr_gamma, ground_weight=recipe.ground_weight, made_up_words=recipe.made_up_words,
                scenes=dict(gap=recipe.scenes.gap, margin=recipe.scenes.margin), lexicon=stage.lexicon,
                lexicon_spec=dataclasses.asdict(recipe.lexicon) if stage.lexicon else None)


def train_unet(recipe: ShapesRecipe, stage: UNetStage, work: Path, tokenizer, latents, captions, scaling_factor,
               init=None, init_from: str | None = None, lexicon=(None, [])):
    """Trains one stage from `init` (the previous stage's EMA UNet and text encoder, `init_from` naming it, e.g.
    "unet@4200") or from scratch; returns the EMA of both. `lexicon` is (latents, captions) of the lexicon's
    scenes, from which a stage.lexicon share of each batch is drawn."""
    torch.manual_seed(recipe.seed + 3)
    text_encoder = make_text_encoder(recipe, tokenizer)
    unet = make_unet(recipe)
    if init:
        unet.load_state_dict(init[0].state_dict())
        text_encoder.load_state_dict(init[1].state_dict())
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False), "text": copy.deepcopy(text_encoder).requires_grad_(False)}
    stage_number = [s.name for s in recipe.stages].index(stage.name)
    rng = torch.Generator().manual_seed(recipe.seed + 4 + 10 * stage_number)
    loop = loop_for(recipe, stage.name, stage.steps, work, stage_objective(recipe, stage, init_from),
                    params=list(unet.parameters()) + list(text_encoder.parameters()), lr=stage.lr,
                    warmup=stage.warmup, ema_decay=recipe.ema_decay,
                    state={"unet": unet, "text_encoder": text_encoder, "rng": RandomState(rng)},
                    ema={"unet": (unet, ema["unet"]), "text": (text_encoder, ema["text"])})
    loop.optimizer = torch.optim.AdamW(loop.params, lr=stage.lr, weight_decay=0.01)
    if loop.resume() >= stage.steps:
        return ema["unet"].eval(), ema["text"].eval()

    max_tokens = recipe.text.max_tokens
    world_count = len(captions)
    if stage.lexicon:  # the lexicon's scenes after the world's: indices from world_count on
        latents, captions = torch.cat([latents, lexicon[0]]), captions + lexicon[1]
    latents = latents * scaling_factor
    ids_all = tokenizer(captions, padding="max_length", max_length=max_tokens, truncation=True,
                        return_tensors="pt").input_ids
    ids_empty = tokenizer([""], padding="max_length", max_length=max_tokens, return_tensors="pt").input_ids
    alphas = stage_scheduler(stage).alphas_cumprod
    snr_gamma = recipe.snr_gamma if stage.snr_gamma is None else stage.snr_gamma
    pools, share = scene_pools(captions[:world_count]), stage.two_share
    if stage.layout:  # half of each batch from the scenes whose caption names a position
        positions = [position_of(c) for c in captions]
        positioned = torch.tensor([p is not None for p in positions])
        pools, share = (torch.nonzero(~positioned).flatten(), torch.nonzero(positioned).flatten()), 0.5
        targets = group_means(latents, positions)
    elif stage.mean_target_t:
        targets = group_means(latents, captions)
    if recipe.ground_weight:  # the world's scenes only: a lexicon scene's words are not grounded
        objects = word_objects(tokenizer, captions[:world_count], max_tokens)
        masks = object_masks(recipe, world_count, latents.shape[-1], work)
        if len(captions) > world_count:
            objects = torch.cat([objects, torch.full((len(captions) - world_count, max_tokens), -1, dtype=torch.int8)])
            masks = torch.cat([masks, torch.zeros(len(captions) - world_count, *masks.shape[1:], dtype=torch.bool)])
        maps = keep_cross_attention(unet)
    grounded_share = [None]  # a running mean of the attention inside its object, for the log

    def batch_loss(step):
        # random scenes, captions dropped for guidance, some colour words made up, SD's noising
        index = batch_indices(pools, share, recipe.batch, rng)
        if stage.lexicon:
            named = torch.rand(recipe.batch, generator=rng) < stage.lexicon
            drawn = world_count + torch.randint(0, len(captions) - world_count, (recipe.batch,), generator=rng)
            index = torch.where(named, drawn, index)
        x0 = latents[index]
        ids = ids_all[index].clone()
        drop = torch.rand(recipe.batch, generator=rng) < recipe.uncond_prob
        ids[drop] = ids_empty
        changed = []
        if recipe.made_up_words:  # the images stay as they are
            made_up = (torch.rand(recipe.batch, generator=rng) < recipe.made_up_words) & ~drop & (index < world_count)
            changed = [made_up_colour(captions[i], rng) for i in index[made_up].tolist()]
            if changed:
                ids[made_up] = tokenizer(changed, padding="max_length", max_length=max_tokens, truncation=True,
                                         return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=rng)
        t = draw_timesteps(stage, recipe.batch, rng)
        xt, target = noised_and_target(stage.prediction_type, alphas, x0, noise, t)
        if stage.mean_target_t:
            _, mean_target = noised_and_target(stage.prediction_type, alphas, targets[0][targets[1][index]], noise, t)
            target = torch.where((t >= stage.mean_target_t).view(-1, 1, 1, 1), mean_target, target)
        with loop.autocast():  # the forward passes in bf16 where the CPU has it natively, the loss in fp32
            context = text_encoder(ids)[0]
            pred = unet(xt, t, context)
        loss = diffusion_loss(pred, target, stage.prediction_type, alphas, t, snr_gamma)
        if recipe.ground_weight:
            words = objects[index].long()
            words[drop] = -1  # no caption, no words to ground
            if changed:
                words[made_up] = word_objects(tokenizer, changed, max_tokens).long()
            grounded = inside_share(maps, words, masks[index])
            maps.clear()
            if grounded is not None:
                loss = loss + recipe.ground_weight * ((1 - grounded) ** 2).mean()
                now, before = grounded.mean().item(), grounded_share[0]
                grounded_share[0] = now if before is None else 0.98 * before + 0.02 * now
        return loss

    def describe() -> str:
        share_now = grounded_share[0]
        return "" if share_now is None else f"; colour and shape words' attention inside their object {share_now:.0%}"

    def on_checkpoint(step):
        log.info("%s step %d: position separation at t=999 %.1f px (0: position words ignored)", stage.name, step,
                 position_separation(ema["unet"].eval(), ema["text"].eval(), tokenizer, stage, latents.shape[-1],
                                     max_tokens))

    loop.describe, loop.on_checkpoint = describe, on_checkpoint
    unet.train(), text_encoder.train()
    unfused_library_attention(loop.bf16, text_encoder=text_encoder)  # the training copy only: the EMA keeps sdpa
    loop.run(batch_loss)
    return ema["unet"].eval(), ema["text"].eval()


# --- export --------------------------------------------------------------------------------------------------
def export(output: Path, recipe: ShapesRecipe, tokenizer, text_encoder, vae, unet: UNet_SD, scaling_factor: float):
    """Writes the model as a plain diffusers StableDiffusionPipeline folder (safetensors)."""
    vae = pin_posterior(copy.deepcopy(vae).float())
    vae.register_to_config(scaling_factor=scaling_factor)
    # the UNet is stored in fp16 to keep the model under 30 MB; diffusers and ImageCraft load it back into fp32
    diffusers_unet = to_diffusers(unet.float()).half()
    scheduler = make_scheduler(recipe.sampler, stage_scheduler(recipe.stages[-1]).config)
    pipe = StableDiffusionPipeline(vae=vae.float(), text_encoder=text_encoder.float(), tokenizer=tokenizer,
                                   unet=diffusers_unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(output, safe_serialization=True)
    write_legacy_tokenizer_files(tokenizer, output / "tokenizer")


@torch.no_grad()
def pin_posterior(vae):
    """The VAE with its posterior's log-variance pinned to diffusers' floor (-30: std 3e-7), the mean untouched.
    Training reads only the mean, so the tiny KL term leaves the variance at 1 (std 1, against latents of std ~0.6),
    and a reader that samples the posterior, as diffusers' img2img does, would drown the image in noise."""
    c = vae.config.latent_channels
    vae.quant_conv.weight[c:] = 0
    vae.quant_conv.bias[c:] = -30.0
    return vae


def write_legacy_tokenizer_files(tokenizer, folder: Path):
    """vocab.json and merges.txt beside tokenizer.json, for older readers of CLIP tokenizer folders."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    (folder / "vocab.json").write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# --- the whole run -------------------------------------------------------------------------------------------
def train(recipe: ShapesRecipe, output: Path, work: Path, start: Path | None = None,
          start_at: str | None = None) -> Path:
    """Every phase of `recipe`, resumed from `work` where it stopped, then the model written to `output`. With
    `start` (a model folder this script exported) and `start_at` (a stage's name), the tokenizer, VAE, text encoder
    and UNet are the folder's and only the stages from `start_at` on are trained, from its weights: the exported
    weights are the EMA a next stage starts from, so this continues a finished model by stages added to its recipe."""
    check_recipe(recipe)
    check_output_folder(output)
    names = [s.name for s in recipe.stages]
    if (start is None) != (start_at is None):
        raise ValueError("--from and --start-at go together: a model folder and the first stage to train on it")
    if start_at is not None and start_at not in names:
        raise ValueError(f"no stage named {start_at!r} to start at; this recipe's stages: {', '.join(names)}")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(recipe.to_json())
    log.info("precision: %s", "bf16 autocast" if training_bf16(recipe.precision) else "fp32")
    started = time.time()
    stages, models, init_from = recipe.stages, None, None
    if start is not None:
        tokenizer, vae, models = from_folder(recipe, Path(start))
        stages, init_from = stages[names.index(start_at):], f"{Path(start).resolve()}"
    else:
        tokenizer = train_tokenizer(recipe, work)
        vae = train_vae(recipe, work)
    latents, captions, scaling_factor = encode_scenes(recipe, vae, work)
    if start is None:
        vae = train_decoder(recipe, vae, scaling_factor, work)
    lexicon = encode_lexicon(recipe, vae, work) if any(s.lexicon for s in stages) else (None, [])
    for stage in stages:
        models = train_unet(recipe, stage, work, tokenizer, latents, captions, scaling_factor, init=models,
                            init_from=init_from, lexicon=lexicon)
        init_from = f"{stage.name}@{stage.steps}"
    unet, text_encoder = models
    export(output, recipe, tokenizer, text_encoder, vae, unet, scaling_factor)
    minutes = (time.time() - started) / 60
    (work / "time.json").write_text(json.dumps({"minutes_this_run": minutes}))
    log.info("wrote %s in %.1f min", output, minutes)
    return output


def from_folder(recipe: ShapesRecipe, folder: Path):
    """(tokenizer, VAE, (UNet_SD, text encoder)) of a model folder this script exported, checked against the
    recipe's architecture."""
    if not (folder / "model_index.json").exists():
        raise ValueError(f"--from {folder}: not a model folder (no model_index.json); give one this script wrote")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    unet = from_diffusers(UNet2DConditionModel.from_pretrained(folder / "unet")).float()
    shapes_of = lambda model: {k: tuple(v.shape) for k, v in model.state_dict().items()}  # noqa: E731
    if shapes_of(make_unet(recipe)) != shapes_of(unet) or text_encoder.config.hidden_size != recipe.text.width:
        raise ValueError(f"--from {folder}: its UNet or text encoder is not the recipe's architecture")
    return tokenizer, vae, (unet, text_encoder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for the model")
    parser.add_argument("--work", default=None,
                        help="folder for checkpoints and cached latents (default: runs/<output name>)")
    parser.add_argument("--recipe", choices=list(PRESETS), default="lexicon",
                        help="lexicon (default): the built-in model's, fast's stages and then two with the world's "
                             "shapes in any colour named by made-up words (continue a fast model with --from MODEL "
                             "--start-at unet-lexicon); fast: without those two; large: an earlier built-in model's; "
                             "smoke: a few steps of every phase at toy sizes")
    parser.add_argument("--smoke", action="store_true", help="the same as --recipe smoke")
    parser.add_argument("--from", dest="start", default=None, metavar="MODEL",
                        help="a model folder this script exported: continue it (with --start-at)")
    parser.add_argument("--start-at", default=None, metavar="STAGE",
                        help="with --from: the first stage to train on the folder's weights (e.g. unet-lexicon)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one field of the recipe (repeat for more): seed=1, precision=fp32, "
                             "vae.steps=8000, scenes.gap=4, stages.unet-shape.steps=0 (drops that stage), "
                             "stages.unet.lr=2e-4; the fields are in imagecraft/shapes/recipe.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    output = Path(args.output)
    try:
        recipe = PRESETS["smoke" if args.smoke else args.recipe]
        for assignment in args.set:
            recipe = override(recipe, assignment)
        train(recipe, output, Path(args.work) if args.work else Path("runs") / output.name,
              Path(args.start) if args.start else None, args.start_at)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
