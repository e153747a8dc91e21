"""Sampler names: our short names, AUTOMATIC1111's display names and the diffusers schedulers behind them.

Each scheduler is built with `from_config` over the model's own scheduler config, so betas, prediction type and
timestep spacing stay the model's; only the sampling algorithm changes. A model trained on zero-terminal-SNR betas
(`rescale_betas_zero_snr`) gets them in every scheduler, also in those without that option (PLMS, LMS).
"""

from __future__ import annotations

import importlib
import inspect

# short name -> (AUTOMATIC1111 name, diffusers class name, config overrides). Names, not classes: the names are
# all that the settings, the CLI's --help and the app's menus need, and diffusers loads only when a scheduler is made
SCHEDULERS = {
    "ddim": ("DDIM", "DDIMScheduler", {}),
    "euler": ("Euler", "EulerDiscreteScheduler", {}),
    "euler_a": ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPM++ 2M", "DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpm++2m_karras": ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # PLMS as in CompVis and A1111, without PNDM's Runge-Kutta warm-up (what SD's own scheduler configs set).
    # The warm-up takes 12 extra model calls and fails below 4 steps; configs from other schedulers (the built-in
    # model ships Euler a) would otherwise get it, since skip_prk_steps defaults to False.
    "pndm": ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMS", "LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    # UniPC (Zhao et al. 2023): a predictor-corrector multistep sampler meant for few steps (A1111's "UniPC")
    "unipc": ("UniPC", "UniPCMultistepScheduler", {"use_karras_sigmas": False}),
}
A1111_NAMES = {display: short for short, (display, _, _) in SCHEDULERS.items()}


def check_scheduler_name(name: str) -> str:
    """The short name for `name`, which may also be an AUTOMATIC1111 display name; a clear error otherwise."""
    if name in SCHEDULERS:
        return name
    if name in A1111_NAMES:
        return A1111_NAMES[name]
    raise ValueError(f"unknown scheduler {name!r}; valid names are {', '.join(SCHEDULERS)} "
                     f"(or AUTOMATIC1111's {', '.join(repr(n) for n in A1111_NAMES)})")


def make_scheduler(name: str, config: dict):
    """A fresh scheduler `name` over the model's scheduler `config` (a fresh one per call keeps requests apart)."""
    _, cls_name, overrides = SCHEDULERS[check_scheduler_name(name)]
    cls = _diffusers_class(cls_name)
    config = dict(config)
    if config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(cls).parameters:
        config["trained_betas"] = zero_terminal_snr_betas(config)
    return cls.from_config(config, **overrides)


def _diffusers_class(name: str):
    return getattr(importlib.import_module("diffusers"), name)


def zero_terminal_snr_betas(config: dict) -> list[float]:
    """The config's betas rescaled to zero terminal SNR, for schedulers that cannot rescale them themselves. The
    last cumulative alpha is 2**-24 rather than 0, as in diffusers' DPM-Solver and Euler, so no step divides by
    zero."""
    import torch

    alphas_cumprod = _diffusers_class("DDPMScheduler").from_config(config).alphas_cumprod.double()
    alphas_cumprod[-1] = 2.0**-24
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return (1 - alphas_cumprod / previous).tolist()


def scheduler_name_of(config: dict) -> str:
    """Our short name for the scheduler a model ships with (its config's `_class_name`); "euler" for one we
    have no name for (Heun, DPM++ SDE, ...)."""
    cls_name = config.get("_class_name")
    karras = bool(config.get("use_karras_sigmas", False))
    for short, (_, name, overrides) in SCHEDULERS.items():
        if name == cls_name and overrides.get("use_karras_sigmas", karras) == karras:
            return short
    return "euler"
