"""The diffusion training core that `train_shapes` (the built-in model from scratch) and `finetune` (a user's
images) share: SD's forward process and the target per prediction type, Min-SNR loss weights, the learning-rate
schedule, an EMA of the weights, and checkpoints that are written atomically and read back with
`weights_only=True`, so a run killed at any point resumes from its last checkpoint."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F


# --- checkpoints ---------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict):
    """torch.save to a temporary file, then an atomic rename: an interrupted save never leaves a half-written
    checkpoint, and the previous one stays whole until the new one is."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint's state, None when there is none; a ValueError naming the file when it cannot be read."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}); "
                         f"delete it to restart that phase") from e


def refuse_other_objective(path: Path, state: dict, objective: dict):
    """A checkpoint trained for another objective is not resumed: the message names both."""
    if state.get("objective") != objective:
        raise ValueError(f"checkpoint {path} was trained with {state.get('objective')}, this recipe has {objective}; "
                         f"delete it or pass another --work folder")


def check_output_folder(output: Path):
    """Creates `output` if needed and makes sure a file can be written in it, before any work starts; a sentence
    naming the folder otherwise."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a folder; give a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output folder {output} is not writable: {e}") from e


def as_tuples(x):
    """random.Random state comes back from torch.load with lists where it had tuples."""
    return tuple(as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- schedule and objective ----------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str = "cosine") -> float:
    """Linear warm-up to `peak`, then constant, or cosine decay to 10% of the peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def noise_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False, config: dict | None = None):
    """The DDPM training schedule: from a model's scheduler config when given (its betas, prediction type and
    zero-terminal-SNR rescaling), else Stable Diffusion's, rescaled to zero terminal SNR if asked; "trailing"
    spacing then makes sampling start at t=999, the step the model learnt to read pure noise at."""
    from diffusers import DDPMScheduler

    if config is not None:
        return DDPMScheduler.from_config(config)
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr,
                         timestep_spacing="trailing" if zero_terminal_snr else "leading",
                         clip_sample=False, steps_offset=1)


def noised_and_target(prediction_type: str, alphas_cumprod: torch.Tensor, x0, noise, t):
    """SD's forward process at timesteps t, and what the UNet is asked to predict there (epsilon or v)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return xt, (a.sqrt() * noise - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else noise)


def loss_weights(prediction_type: str, snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights of the MSE on the model's target. Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556) in
    x0 terms is min(snr, gamma); for v-prediction it is floored at 1 as well, so the noisiest steps, where layout is
    decided from the text alone, still count (plain Min-SNR gives t=999 weight 0 on a zero-terminal-SNR schedule)."""
    if not gamma:
        return torch.ones_like(snr)
    if prediction_type == "v_prediction":  # MSE on v = (snr + 1) x MSE on x0
        return snr.clamp(min=1, max=gamma) / (snr + 1)
    return snr.clamp(max=gamma) / snr.clamp(min=1e-12)  # MSE on epsilon = snr x MSE on x0


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, prediction_type: str, alphas_cumprod: torch.Tensor,
                   t: torch.Tensor, snr_gamma: float, reduce: bool = True) -> torch.Tensor:
    """The Min-SNR-weighted MSE between the UNet's prediction and its target, in fp32: a scalar, or one value per
    sample with reduce=False."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    a = alphas_cumprod[t]
    per_sample = per_sample * loss_weights(prediction_type, a / (1 - a), snr_gamma)
    return per_sample.mean() if reduce else per_sample


# --- EMA -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(live: torch.nn.Module, average: torch.nn.Module, step: int, decay: float):
    """average <- average + (1 - d) (live - average), with d = min(decay, (1 + step) / (10 + step)): a short
    warm-up, so that early checkpoints are usable."""
    d = min(decay, (1 + step) / (10 + step))
    for p, q in zip(live.parameters(), average.parameters()):
        q.lerp_(p.detach().to(q.dtype), 1 - d)
