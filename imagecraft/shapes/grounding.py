"""The grounding loss (TokenCompose, Wang et al. 2024, arXiv:2312.03626): each object's colour and shape tokens
should draw their cross-attention from the latent cells the object covers. The text encoder is trained from scratch
and causal, so the shape token already knows the colour; without this term the UNet may read the colour from it and
leave the colour word's map spread over the image, which the Attention tab would then show.

Also here: made-up colour words. The tokenizer's merges are the grammar's words, so a word a fine-tune teaches is
several byte tokens and puts the shape word at a token position no caption ever put one; replacing one colour word
in a share of the captions by a made-up word (the image unchanged) teaches the shape words at those positions.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..train.core import load_checkpoint, save_checkpoint
from . import world
from .recipe import ShapesRecipe


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
                if word in world.SHAPES:
                    row[words[w]] = k
                    if w and text[w - 1] in world.COLOURS:  # a made-up colour word is not grounded
                        row[words[w - 1]] = k
                    k += 1
            rows[caption] = row
        out[i] = rows[caption]
    return out


GRAMMAR_WORDS = {w for phrase in (*world.COLOURS, *world.SHAPES, *world.POSITIONS, *world.RELATIONS,
                                   "a an on background") for w in phrase.split()}



def made_up_colour(caption: str, generator: torch.Generator) -> str:
    """The caption with one object's colour word replaced by a made-up word of 3-6 letters, which the tokenizer
    splits into pieces (its merges are the grammar's words), as it splits a word a fine-tune will teach."""
    text = caption.split()
    spots = [w for w in range(len(text) - 1) if text[w] in world.COLOURS and text[w + 1] in world.SHAPES]
    w = spots[int(torch.randint(len(spots), (1,), generator=generator))]
    word = ""
    while not word or word in GRAMMAR_WORDS:
        letters = torch.randint(26, (int(torch.randint(3, 7, (1,), generator=generator)),), generator=generator)
        word = "".join(chr(ord("a") + int(c)) for c in letters)
    text[w] = word
    return " ".join(text)


def object_masks(recipe: ShapesRecipe, n: int, latent_size: int, work: Path) -> torch.Tensor:
    """(n, 2, latent_size, latent_size) bool: the latent cells each object of the encoded scenes touches (the second
    all False for one-object scenes), cached in work/masks.pt. The scenes are drawn again from encode_scenes' seed,
    so they are the same scenes in the same order."""
    path = work / "masks.pt"
    state = load_checkpoint(path)
    key = dict(seed=recipe.seed, num_scenes=n, scene_gap=recipe.scenes.gap, scene_margin=recipe.scenes.margin,
               latent_size=latent_size)
    if state and state["key"] == key:
        return state["masks"]
    rng = random.Random(recipe.seed + 2)  # as encode_scenes: scene_batch draws each scene with sample_scene
    cells = torch.zeros(n, 2, latent_size, latent_size, dtype=torch.bool)
    for i in tqdm(range(n), desc="masks", unit="scene"):
        _, _, _, objects = world.sample_scene(rng, gap=recipe.scenes.gap, margin=recipe.scenes.margin)
        pixels = torch.from_numpy(np.stack(objects)).float()  # (objects, 64, 64)
        cells[i, :len(objects)] = F.adaptive_max_pool2d(pixels, latent_size) > 0
    save_checkpoint(path, dict(masks=cells, key=key))
    return cells


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
