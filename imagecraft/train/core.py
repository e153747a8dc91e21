"""The training core: `Loop`, the one training loop that fine-tuning (`train.finetune`) and every phase of the
built-in model's training (`shapes.train`) drive, and what it is made of: SD's forward process and the target per
prediction type, Min-SNR loss weights, the learning-rate schedule, an EMA of the weights, and checkpoints that are
written atomically and read back with `weights_only=True`, so a run killed at any point resumes from its last one.

A trainer builds its models, optimizer and data, then hands the loop a function that draws one (micro-)batch and
returns its loss. The loop owns everything around that: resume (refusing a checkpoint of another objective), the
learning rate, backward, clipping, the optimizer step (the only one in the package), the EMA, the non-finite-loss
guard, progress (tqdm, a callback, log lines), checkpoints (one layout) and the stop signal (Ctrl-C or
`should_stop()`: a checkpoint is written first).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm import tqdm

from ..runtime import autocast

log = logging.getLogger("imagecraft.train")


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


def clean_prediction(prediction_type: str, alpha: torch.Tensor, xt: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The clean latents x0 that a UNet output `out` at `xt` implies, with alphas_cumprod[t] = `alpha`: the inverse
    of `noised_and_target` (diffusers' schedulers call it pred_original_sample)."""
    if prediction_type == "v_prediction":
        return alpha.sqrt() * xt - (1 - alpha).sqrt() * out
    return (xt - (1 - alpha).sqrt() * out) / alpha.sqrt()


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


# --- the loop ------------------------------------------------------------------------------------------------
class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (a non-finite loss); the last good checkpoint is kept."""


class RandomState:
    """A random source as a checkpoint entry: a torch.Generator, a random.Random, or torch's global generator
    (None)."""

    def __init__(self, source: torch.Generator | random.Random | None = None):
        self.source = source

    def state_dict(self):
        if self.source is None:
            return torch.get_rng_state()
        return self.source.getstate() if isinstance(self.source, random.Random) else self.source.get_state()

    def load_state_dict(self, state):
        if self.source is None:
            torch.set_rng_state(state)
        elif isinstance(self.source, random.Random):
            self.source.setstate(as_tuples(state))
        else:
            self.source.set_state(state)


@dataclass
class Loop:
    """One training run of `steps` optimizer steps over `params` (see the module docstring).

    `state` names everything a checkpoint keeps besides the optimizer and the EMA: modules, random sources
    (`RandomState`) or any object with state_dict/load_state_dict. `ema` names (live, average) module pairs kept
    as an EMA after every step. With an accelerate `Accelerator` the backward pass, clipping, gradient
    accumulation and the loss's mean over processes go through it, and only the main process writes."""

    name: str
    steps: int
    checkpoint: Path | None
    objective: dict
    optimizer: torch.optim.Optimizer | None = None
    params: list = field(default_factory=list)  # what is clipped
    state: dict = field(default_factory=dict)
    lr: float = 1e-4  # the peak
    warmup: int = 0
    schedule: str = "cosine"  # or "constant" (after the warm-up)
    ema: dict = field(default_factory=dict)
    ema_decay: float = 0.999
    max_grad_norm: float = 1.0  # 0: no clipping
    grad_accum: int = 1
    bf16: bool = False  # forward passes in bf16 autocast (`runtime.training_bf16`); weights stay fp32
    accelerator: object = None
    checkpoint_every: int = 250
    log_every: int = 0  # 0: no log lines (the bar shows progress)
    show_bar: bool = True
    progress: Callable | None = None  # progress(step, steps, loss) after every step
    should_stop: Callable | None = None  # checked after every step; True stops with a checkpoint
    after_step: Callable | None = None  # after_step(step, loss, lr) -> extra history columns (a list) or None
    describe: Callable | None = None  # describe() -> text appended to the log line
    on_checkpoint: Callable | None = None  # on_checkpoint(step) after each checkpoint is written
    step: int = 0
    history: list = field(default_factory=list)  # [step, loss, lr, *after_step's columns]
    seconds: float = 0.0  # spent in `run`
    _saved: dict | None = field(default=None, repr=False)
    _prepared: list = field(default_factory=list, repr=False)  # the models `prepare` wrapped

    # --- resume --------------------------------------------------------------------------------------------
    def read_checkpoint(self) -> dict | None:
        """The checkpoint's state, if there is one; a checkpoint of another objective is refused here, before the
        caller makes anything for this run."""
        if self._saved is None and self.checkpoint is not None:
            self._saved = load_checkpoint(self.checkpoint)
            if self._saved is not None:
                refuse_other_objective(self.checkpoint, self._saved, self.objective)
        return self._saved

    def resume(self) -> int:
        """Loads the checkpoint into the state, the EMA and the optimizer; returns the step to go on from."""
        saved = self.read_checkpoint()
        if saved:
            for name, target in self.state.items():
                target.load_state_dict(saved["state"][name])
            for name, (_, average) in self.ema.items():
                average.load_state_dict(saved["ema"][name])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.step, self.history = saved["step"], [list(row) for row in saved["history"]]
            log.info("%s: resumed at step %d of %d from %s", self.name, self.step, self.steps, self.checkpoint)
        return self.step

    def prepare(self, *models):
        """The models and the optimizer through the accelerator (DDP, mixed precision); the models back."""
        *self._prepared, self.optimizer = self.accelerator.prepare(*models, self.optimizer)
        return self._prepared[0] if len(models) == 1 else list(self._prepared)

    @property
    def main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def autocast(self):
        """bf16 autocast for a forward pass where `bf16`, else nothing (with an accelerator, it casts itself)."""
        if self.accelerator is not None:
            return nullcontext()
        return autocast(self.bf16)

    def lr_now(self) -> float:
        return lr_at(self.step, self.steps, self.lr, self.warmup, self.schedule)

    # --- run -----------------------------------------------------------------------------------------------
    def run(self, batch_loss: Callable[[int], torch.Tensor]) -> bool:
        """Trains from `self.step` to `self.steps`; `batch_loss(step)` draws one (micro-)batch and returns its loss
        (called `grad_accum` times per step). Returns False when stopped early (Ctrl-C or `should_stop`), after
        writing a checkpoint; True when every step is done and the last checkpoint written."""
        bar = None
        if self.show_bar and self.main_process and self.step < self.steps:
            bar = tqdm(total=self.steps, initial=self.step, desc=self.name, unit="step")
        started, running, last_saved = time.time(), None, self.step
        try:
            while self.step < self.steps:
                lr = self.lr_now()
                for group in self.optimizer.param_groups:  # a group's lr_scale: its peak against the loop's
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                losses = []
                for _ in range(self.grad_accum):
                    losses.append(self._descend(batch_loss, lr, last_saved))
                self.step += 1
                for live, average in self.ema.values():
                    ema_update(live, average, self.step, self.ema_decay)
                loss = sum(losses) / len(losses)
                extra = self.after_step(self.step, loss, lr) if self.after_step is not None else None
                self.history.append([self.step, loss, lr, *(extra or [])])
                running = loss if running is None else 0.98 * running + 0.02 * loss
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.1e}")
                if self.progress is not None:
                    self.progress(self.step, self.steps, loss)
                if self.log_every and self.step % self.log_every == 0:
                    log.info("%s step %d/%d loss %.4f lr %.2e (%.1f min)%s", self.name, self.step, self.steps, running,
                             lr, (time.time() - started) / 60, self.describe() if self.describe else "")
                if self.step % self.checkpoint_every == 0 or self.step == self.steps:
                    self.save()
                    last_saved = self.step
                if self.should_stop is not None and self.should_stop() and self.step < self.steps:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if self.step != last_saved:
                self.save()
            log.info("%s: stopped at step %d of %d; the checkpoint is saved: run the same command again to resume",
                     self.name, self.step, self.steps)
            return False
        finally:
            self.seconds += time.time() - started
            if bar is not None:
                bar.close()
        return True

    def _descend(self, batch_loss, lr: float, last_saved: int) -> float:
        """One (micro-)batch: loss, backward, clipping and the optimizer step; its loss (the processes' mean)."""
        accelerator = self.accelerator
        with accelerator.accumulate(*self._prepared) if accelerator is not None else nullcontext():
            loss = batch_loss(self.step)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at step {self.step + 1} (learning rate {lr:.2e}); training "
                    f"stopped and the last good checkpoint (step {last_saved}) is kept: lower the learning rate "
                    f"(--lr) and rerun")
            if accelerator is None:
                loss.backward()
                if self.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            else:
                accelerator.backward(loss)
                if accelerator.sync_gradients and self.max_grad_norm:
                    accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if accelerator is None:
            return loss.item()
        return accelerator.reduce(loss.detach(), reduction="mean").item()

    def save(self):
        """The checkpoint (one layout for every trainer), written atomically by the main process."""
        if self.checkpoint is not None and self.main_process:
            self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.checkpoint, dict(
                step=self.step, objective=self.objective, history=self.history,
                optimizer=self.optimizer.state_dict(),
                state={name: target.state_dict() for name, target in self.state.items()},
                ema={name: average.state_dict() for name, (_, average) in self.ema.items()}))
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.step)
