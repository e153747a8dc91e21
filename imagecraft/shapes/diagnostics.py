"""What a shapes model has learnt, read while or after it trains: autoencoder round trips (`vae_report`) and
whether position words move the object where sampling starts (`position_separation`)."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..train.core import clean_prediction, noise_scheduler
from ..unet import UNet_SD
from . import world
from .recipe import UNetStage
from .score import score


def stage_scheduler(stage: UNetStage):
    """The DDPM training schedule of a stage's objective."""
    return noise_scheduler(stage.prediction_type, stage.zero_terminal_snr)


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
    scenes = [world.sample_scene(rng, allow_held_out=True) for _ in range(n)]
    back = round_trip(vae, np.stack([s[2] for s in scenes]))
    report = dict(contract=float(np.mean([score(b, s[0])["all"] for s, b in zip(scenes, back)])))
    for shape in world.SHAPES:
        ones = [(b, s[0]) for s, b in zip(scenes, back) if len(s[0].objects) == 1 and s[0].objects[0].shape == shape]
        report[f"contract_{shape}"] = float(np.mean([score(b, spec)["shape"] for b, spec in ones]))
    objects = [world.lone_object(rng, world.SHAPES[i % 3]) for i in range(n)]
    images = np.stack([o[0] for o in objects])
    back = round_trip(vae, images).astype(np.float32)
    errors = [np.abs(b - i.astype(np.float32))[ndimage.binary_erosion(m)].mean() / 255
              for b, i, (_, m) in zip(back, images, objects)]
    report.update(colour_error=float(np.mean(errors)), colour_error_p90=float(np.percentile(errors, 90)))
    for kind in ("diamond", "star", "cross"):
        objects = [world.lone_object(rng, kind) for _ in range(max(1, n // 3))]
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
def position_separation(unet: UNet_SD, text_encoder, tokenizer, stage: UNetStage, latent_size: int,
                        max_tokens: int) -> float:
    """Whether the position words move the object where sampling starts, in image pixels.

    At t=999 the model's estimate of x0 from noise is the layout it commits to. For 8 objects named with each of
    the 5 positions, the centre of mass of |x0(prompt) - mean of x0 over the object's 5 prompts| is taken; the
    result is (right - left) in x plus (bottom - top) in y, averaged over the objects: about 0 while position
    words are ignored. Sampling places objects in
    the named third only once this is well above 0, so training logs it at every checkpoint, long before the
    quality benchmark could tell."""
    prompts = [f"a {c} {s} {p}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")
               for p in world.POSITIONS]
    ids = tokenizer(prompts, padding="max_length", max_length=max_tokens, truncation=True,
                    return_tensors="pt").input_ids
    xt = torch.randn(len(prompts), unet.config.in_channels, latent_size, latent_size,
                     generator=torch.Generator().manual_seed(0))
    t = torch.full((len(prompts),), 999)
    pred = unet(xt, t, text_encoder(ids)[0]).float()
    a = stage_scheduler(stage).alphas_cumprod[999]
    x0 = clean_prediction(stage.prediction_type, a, xt, pred)
    x0 = x0.view(-1, len(world.POSITIONS), *x0.shape[1:])  # (objects, positions, C, H, W)
    weight = (x0 - x0.mean(dim=1, keepdim=True)).abs().sum(dim=2)  # (objects, positions, H, W)
    weight = weight / weight.sum(dim=(2, 3), keepdim=True).clamp(min=1e-12)
    coords = (torch.arange(latent_size) + 0.5) * world.SIZE / latent_size
    cx = (weight.sum(dim=2) * coords).sum(dim=2).mean(dim=0)  # (positions,)
    cy = (weight.sum(dim=3) * coords).sum(dim=2).mean(dim=0)
    where = {p: i for i, p in enumerate(world.POSITIONS)}
    return float(cx[where["on the right"]] - cx[where["on the left"]]
                 + cy[where["at the bottom"]] - cy[where["at the top"]])
