"""The shapes world as training data: batches of scenes for the autoencoder, the training set's pools and
group means for the UNet, and the timesteps each UNet stage draws."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .recipe import UNetStage, VAESpec


def scene_batch(rng: random.Random, n: int, gap: float = world.GAP,
                margin: float = world.MARGIN) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """n training scenes as (n, 3, 64, 64) in [-1, 1], their captions (no held-out pairs), and where the objects
    are as (n, 1, 64, 64): 1 on an object, -1 on the background. Two objects' boxes lie `gap` px apart at least,
    each `margin` px from the border."""
    images, prompts, coverage = [], [], []
    for _ in range(n):
        _, prompt, image, masks = world.sample_scene(rng, gap=gap, margin=margin)
        images.append(image)
        prompts.append(prompt)
        coverage.append(np.any(masks, axis=0))
    return pixels(images), prompts, torch.from_numpy(np.stack(coverage))[:, None].float() * 2 - 1


def general_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of the autoencoder's broader world (world.general_scene) as (n, 3, 64, 64) in [-1, 1], and where
    their objects are as (n, 1, 64, 64), 1 on an object and -1 elsewhere."""
    images, covers = zip(*(world.general_scene(rng) for _ in range(n)))
    return pixels(images), torch.from_numpy(np.stack(covers))[:, None].float() * 2 - 1


def lexicon_batch(rng: random.Random, lexicon: world.Lexicon, n: int, gap: float = world.GAP,
                  margin: float = world.MARGIN) -> tuple[torch.Tensor, list[str]]:
    """n one-object scenes named by the lexicon's made-up words (world.lexicon_scene) as (n, 3, 64, 64) in [-1, 1],
    and their captions."""
    captions, images = zip(*(world.lexicon_scene(rng, lexicon, gap, margin) for _ in range(n)))
    return pixels(images), list(captions)


def pixels(images) -> torch.Tensor:
    """(n, 64, 64, 3) uint8 images -> (n, 3, 64, 64) float in [-1, 1], as the autoencoder reads them."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def caption_corpus(seed: int, n: int = 20000) -> list[str]:
    rng = random.Random(seed)
    return [world.prompt_of(world.sample_spec(rng)) for _ in range(n)]


def vae_batch(vae: VAESpec, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """One autoencoder batch (images, coverage), cropped to vae.crop: scenes of the world as it is
    (the UNet's scenes may keep more space) and a vae.general share of the broader world."""
    general = round(vae.batch * vae.general)
    x, _, coverage = scene_batch(rng, vae.batch - general)
    if general:
        more, cover = general_batch(rng, general)
        x, coverage = torch.cat([x, more]), torch.cat([coverage, cover])
    if vae.crop < world.SIZE:  # one crop per batch, on the latent grid so the colour target lines up
        f = vae.latent_factor
        top, left = (rng.randrange((world.SIZE - vae.crop) // f + 1) * f for _ in range(2))
        x = x[:, :, top:top + vae.crop, left:left + vae.crop]
        coverage = coverage[:, :, top:top + vae.crop, left:left + vae.crop]
    return x, coverage


def outline_pixels(coverage: torch.Tensor) -> torch.Tensor:
    """(n, 1, h, w) coverage (1 on objects, -1 elsewhere) -> 1.0 on pixels within 1 px of an outline, else 0."""
    return (F.max_pool2d(coverage, 3, 1, 1) != -F.max_pool2d(-coverage, 3, 1, 1)).float()


def scene_pools(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the one-object scenes and of the two-object scenes, read from their captions."""
    two = torch.tensor([len(world.parse_prompt(c).objects) == 2 for c in captions])
    return torch.nonzero(~two).flatten(), torch.nonzero(two).flatten()


def position_of(caption: str) -> str | None:
    """The position a caption names (one of world.POSITIONS), or None."""
    spec = world.parse_prompt(caption)
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


def draw_timesteps(stage: UNetStage, n: int, rng: torch.Generator) -> torch.Tensor:
    """Uniform below stage.max_t; with a group-mean target, all of a layout batch and a third of any other from
    stage.mean_target_t up, where that target applies."""
    t = torch.randint(0, stage.max_t, (n,), generator=rng)
    if stage.mean_target_t:
        high = torch.randint(stage.mean_target_t, 1000, (n,), generator=rng)
        t = high if stage.layout else torch.where(torch.arange(n) % 3 == 0, high, t)
    return t
