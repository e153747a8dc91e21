"""Prompt to image: transformers' CLIP text encoder, UNet_SD as the denoiser, diffusers' schedulers and VAE.

The steps mirror diffusers' StableDiffusionPipeline one for one (same tokenisation, same noise draws from CPU
generators, same classifier-free guidance and decoding), so the same seed and settings give the same image as
diffusers on the same weights.
"""

from __future__ import annotations

import inspect
import random
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from . import loading, lora
from .explain.capture import capture as capture_attention, check_memory as check_attention_memory
from .png import pipeline_settings, restore_settings, save_png
from .port import config_from_diffusers, load_ldm_unet, load_pipe_into_our_UNet
from .schedulers import check_scheduler_name, make_scheduler, scheduler_name_of
from .settings import DEFAULT_GUIDANCE, DEFAULT_STEPS, LORA_SCALE, MAX_SEED, check_settings
from .runtime import check_device, resolve_dtype
from .unet import FeatureCache, UNet_SD


def vae_scale_factor(block_out_channels) -> int:
    """How many image pixels one latent pixel covers, per side: each AutoencoderKL level after the first halves it."""
    return 2 ** (len(block_out_channels) - 1)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    records: list[dict]  # per image: every setting plus model and environment, as stored in its PNG
    warnings: list[str] = field(default_factory=list)
    attention: list | None = None  # per image an `imagecraft.explain.maps.AttentionMaps`, when asked for

    def save(self, path_pattern: str | Path) -> list[Path]:
        """Saves each image as a PNG with its metadata; `{i}` and `{seed}` in the pattern are filled in."""
        return [save_png(image, output_path(path_pattern, i, record["seed"], len(self.images)), record)
                for i, (image, record) in enumerate(zip(self.images, self.records))]


class NonFiniteError(ValueError):
    """The latents or the decoded image became NaN or infinite; the message names the likely cause."""


def check_callback(callback) -> None:
    """A step callback must take (step, total, latents); checked before sampling, not at the first step."""
    if callback is None:
        return
    try:
        inspect.signature(callback).bind(0, 1, None)
    except TypeError:
        raise ValueError(f"callback must be a function of (step, total, latents), got {callback!r:.80}") from None
    except ValueError:  # a builtin without a signature: it will say so itself when called
        pass


def output_path(pattern: str | Path, i: int = 0, seed: int = 0, count: int = 1) -> str:
    """Image i's file name from a pattern with `{i}` and `{seed}`; "-i" is added for a batch that names neither.
    ValueError for any other field, before anything is generated when called with the defaults."""
    path = str(pattern)
    if count > 1 and "{i}" not in path and "{seed}" not in path:
        stem, dot, suffix = path.rpartition(".")
        path = f"{stem}-{{i}}.{suffix}" if dot else f"{path}-{{i}}"
    try:
        return path.format(i=i, seed=seed)
    except (KeyError, IndexError, ValueError, AttributeError):
        raise ValueError(f"an output name may use {{seed}} and {{i}} and no other field in braces (write {{{{ or }}}} "
                         f"for a brace), got {str(pattern)!r}") from None


def denoise(unet: UNet_SD, scheduler, latents: torch.Tensor, context: torch.Tensor, guidance_scale: float,
            generator=None, callback: Callable | None = None, cache: FeatureCache | None = None) -> torch.Tensor:
    """The sampling loop: classifier-free guidance (Ho & Salimans 2022) around `scheduler.step`.

    `context` is (2B, tokens, dim) with the negative prompt's half first when guidance is on, else (B, ...).
    `callback(step, total, latents)` runs after every step.
    """
    guided = context.shape[0] == 2 * latents.shape[0]
    accepts = inspect.signature(scheduler.step).parameters  # as diffusers: eta for DDIM, generator for ancestral
    extra = {k: v for k, v in (("generator", generator), ("eta", 0.0)) if k in accepts}
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise = unet(model_input, t, context, cache=cache) if cache is not None else unet(model_input, t, context)
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        if callback is not None:
            callback(i, len(timesteps), latents)
    return latents



class ImageCraftPipeline:
    """Text-to-image with UNet_SD.

    Build it with `ImageCraftPipeline.from_pretrained(source)`, then call it:

        pipe = ImageCraftPipeline.from_pretrained()            # the built-in shapes model
        result = pipe("a red circle on the left", seed=42)
        result.images[0], result.seeds[0]
        result.save("out.png")                                 # PNGs carry A1111 and ImageCraft metadata
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, vae: AutoencoderKL, unet: UNet_SD,
                 scheduler_config: dict, model_id: str = "custom", weight_files: list[Path] | None = None,
                 device: str | None = None, dtype=None, sample_size: int = 64):
        self.device = check_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(self.device, self.dtype).eval()
        # The VAE decodes in fp32 whatever the UNet runs in: fp16 VAEs overflow into black or NaN images
        # (diffusers' force_upcast), and bf16 costs colour accuracy for a small share of the time.
        self.vae_dtype = torch.float32
        # .float(), not .to(dtype): diffusers' ModelMixin.to warns on every dtype cast ("modules ... that should be
        # kept in float32: []"), even with none to keep; there are none in fp32 anyway
        self.vae = vae.to(self.device).float().eval()
        self.unet = unet.to(self.device, self.dtype).eval()
        self.scheduler_config = dict(scheduler_config)
        self.default_scheduler = scheduler_name_of(self.scheduler_config)
        self.model_id = model_id
        self.weight_files = weight_files or []
        self.vae_scale_factor = vae_scale_factor(vae.config.block_out_channels)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.default_size = sample_size * self.vae_scale_factor  # the model's trained image size
        self.lora: dict | None = None  # the LoRA applied by load_lora: name, hash, scale, path
        self.source = model_id  # what from_pretrained loads this from (set there: a Hub id, folder or file)

    # --- loading --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str | Path | None = None, device: str | None = None, dtype=None,
                        config: str | Path | None = None) -> "ImageCraftPipeline":
        """Loads a pipeline.

        Args:
            source: None or "default" (the built-in model under assets/), a diffusers folder (model_index.json
                with tokenizer, text_encoder, vae, unet, scheduler), a Hub repo id (downloaded when there is
                network), or a single-file original SD checkpoint (`.safetensors`, CompVis/LDM keys).
            device: "cpu", "cuda", "cuda:N", "mps"; detected when None. One this machine lacks is refused.
            dtype: "auto" (the default: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32), "fp32" (exactly
                diffusers' fp32 pipeline), "bf16" or "fp16". The VAE decodes in fp32 whatever this is.
            config: for a single file, a diffusers folder or Hub id that supplies the tokenizer, the text
                encoder and VAE configs, and the scheduler (single files carry weights only).
        """
        device = check_device(device)  # before the weights load, not after
        kind, path, model_id = loading.resolve(source)
        if kind == "single_file":
            parts, configs, weight_files = cls._load_single_file(path, config)
        else:
            parts, configs, weight_files = cls._load_folder(path)
        sample_size = loading.read_json(configs / "unet" / "config.json").get("sample_size")
        scheduler_config = loading.read_json(configs / "scheduler" / "scheduler_config.json")
        pipe = cls(**parts, scheduler_config=scheduler_config, model_id=model_id, weight_files=weight_files,
                   device=device, dtype=dtype, sample_size=sample_size if isinstance(sample_size, int) else 64)
        # what loads this model again, anywhere it is: the Hub id, else the local folder or file (the model id of a
        # local folder is only its name, which loads nothing)
        pipe.source = model_id if model_id == str(source) and not Path(str(source)).exists() else str(path)
        return pipe

    @staticmethod
    def _load_folder(path: Path):
        """(components, folder with the configs, UNet weight files) of a diffusers folder."""
        loading.check_folder(path)
        unet = UNet_SD(config_from_diffusers(loading.read_json(path / "unet" / "config.json")))
        unet_files = loading.weights_file(path / "unet")
        load_pipe_into_our_UNet(unet, loading.load_safetensors(unet_files))
        try:
            parts = dict(tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
                         text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True),
                         vae=AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True), unet=unet)
        except (OSError, ValueError, KeyError) as e:
            raise loading.ModelLoadError(f"cannot load the model in {path}: {e}") from e
        return parts, path, unet_files

    @staticmethod
    def _load_single_file(path: Path, config):
        """UNet_SD from the checkpoint's LDM keys (ours are the same names); the VAE and CLIP text encoder
        through diffusers' LDM key converters, with configs, tokenizer and scheduler from the `config` folder."""
        from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint,
                                                         convert_open_clip_checkpoint)

        if config is None:
            raise loading.ModelLoadError("a single-file checkpoint carries weights only: pass config= a diffusers "
                                         "folder or Hub id of the same SD version (for the tokenizer and configs)")
        config_path = loading.resolve(config)[1]
        loading.check_folder(config_path, weights=False)
        checkpoint = loading.load_safetensors([path])
        loading.check_ldm_keys(checkpoint, path)
        unet = UNet_SD(config_from_diffusers(loading.read_json(config_path / "unet" / "config.json")))
        load_ldm_unet(unet, checkpoint)

        vae_config = loading.read_json(config_path / "vae" / "config.json")
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextModel.config_class.from_pretrained(config_path / "text_encoder"))
        if any(k.startswith("cond_stage_model.model.") for k in checkpoint):  # SD2: OpenCLIP layout
            text_weights = convert_open_clip_checkpoint(text_encoder, checkpoint)
        else:
            text_weights = convert_ldm_clip_checkpoint(checkpoint)
        for part, module, weights in (("VAE", vae, convert_ldm_vae_checkpoint(checkpoint, vae_config)),
                                      ("text encoder", text_encoder, text_weights)):
            expected = module.state_dict()
            missing = sorted(expected.keys() - weights.keys())
            unknown = sorted(weights.keys() - expected.keys() - {"text_model.embeddings.position_ids"})
            if missing or unknown:
                raise loading.ModelLoadError(f"{path}: the {part} weights do not match {config_path}: missing "
                                             f"{missing[:6]}, unknown {unknown[:6]}")
            module.load_state_dict({k: v.reshape(expected[k].shape) for k, v in weights.items() if k in expected})
        parts = dict(tokenizer=CLIPTokenizer.from_pretrained(config_path / "tokenizer"), text_encoder=text_encoder,
                     vae=vae, unet=unet)
        return parts, config_path, [path]

    @cached_property
    def model_hash(self) -> str:
        return loading.file_hash(self.weight_files) if self.weight_files else ""

    # --- LoRA -----------------------------------------------------------------------------------------------
    def load_lora(self, path: str | Path, scale: float = 1.0) -> dict:
        """Applies a LoRA to the UNet (and the text encoder, if the file has it), replacing any earlier one.

        Args:
            path: a `.safetensors` LoRA file, or a folder holding `pytorch_lora_weights.safetensors` (what
                `imagecraft finetune` and diffusers write); diffusers/PEFT and kohya (A1111) SD 1.x/2.x layouts.
            scale: how much of it: 0 is the base model, 1 the LoRA as trained; from -4 to 4.
        Returns the applied LoRA's name, hash, scale and path, which the PNG metadata records. A file for another
        base model, or a LyCORIS file, is refused with a `lora.LoraError` that says why.
        """
        scale = LORA_SCALE.check(scale)
        file = lora.lora_file(path)
        lora.apply(file, self.unet, self.text_encoder, scale)
        name = file.parent.name if file.name == lora.WEIGHT_NAME else file.stem
        self.lora = dict(name=name, hash=loading.file_hash([file]), scale=scale, path=str(file))
        return dict(self.lora)

    def set_lora_scale(self, scale: float):
        """Changes the loaded LoRA's scale without reloading it."""
        if self.lora is None:
            raise ValueError("no LoRA is loaded (load_lora first)")
        scale = LORA_SCALE.check(scale)
        lora.set_scale(self.unet, scale)
        lora.set_scale(self.text_encoder, scale)
        self.lora["scale"] = scale

    def unload_lora(self):
        """Removes the LoRA: the model is the base model again, exactly."""
        lora.remove_lora(self.unet)
        lora.remove_lora(self.text_encoder)
        self.lora = None

    # --- generation -----------------------------------------------------------------------------------------
    def check_settings(self, **settings) -> dict:
        """The settings checked by `imagecraft.settings` (the same schema as the CLI and the app) and normalised,
        plus this model's own rules: sizes on its VAE's grid, its scheduler when none is named."""
        clean = check_settings(settings)
        for name in ("width", "height"):
            if clean[name] % self.vae_scale_factor:
                raise ValueError(f"{name} must be a multiple of {self.vae_scale_factor} for this model, "
                                 f"got {clean[name]}")
        clean["scheduler"] = clean["scheduler"] or check_scheduler_name(self.default_scheduler)
        return clean

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """CLIP hidden states (B, max_length, dim) of the prompts, padded and truncated as diffusers does."""
        notes = []
        limit = self.tokenizer.model_max_length
        for prompt in prompts:
            n = len(self.tokenizer(prompt).input_ids)
            if n > limit:
                note = (f"the prompt is {n} tokens long; the text encoder takes {limit}, so the last {n - limit} "
                        f"were dropped: {prompt[:60]!r}...")
                if note not in notes:
                    notes.append(note)
                    warnings.warn(note, stacklevel=3)
        ids = self.tokenizer(prompts, padding="max_length", max_length=limit, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0].to(self.dtype), notes

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], negative_prompt: str | None = "",
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 seed: int | None = None, width: int | None = None, height: int | None = None, num_images: int = 1,
                 scheduler: str | None = None, callback: Callable | None = None, attention: bool = False,
                 cache_interval: int | None = None) -> GenerationResult:
        """Generates `num_images` images for `prompt`.

        Args:
            prompt: the text; "" means unconditional. Longer than the text encoder's limit (77 tokens for SD)
                is truncated, with a warning that says how many tokens were dropped. A list of prompts makes
                one image each (num_images is then ignored).
            negative_prompt: what to steer away from (classifier-free guidance's unconditional half).
            num_inference_steps: 1..150 sampling steps.
            guidance_scale: classifier-free guidance (settings.DEFAULT_GUIDANCE, measured); <= 1 turns it off.
            seed: image i uses seed + i, so it equals a single-image call with that seed; random when None.
            width, height: multiples of 8 in 64..2048; the model's trained size when None.
            num_images: 1..16, generated as one batch.
            scheduler: ddim, euler, euler_a, dpm++2m, dpm++2m_karras, pndm, lms (or A1111 names); the
                model's own when None.
            callback: `callback(step, total, latents)` after each step (progress bars, previews).
            attention: also record the cross-attention maps (`result.attention`, one
                `imagecraft.explain.maps.AttentionMaps` per image); the images are the same bit for bit.
            cache_interval: DeepCache (`unet.FeatureCache`): the whole UNet runs every `cache_interval`-th step,
                the steps between reuse its deep features and run only the shallow blocks. None or 1: off, the
                images exactly as without it.
        Returns a GenerationResult with `images`, `seeds`, per-image `records` and `warnings`.
        """
        check_callback(callback)
        s = self.check_settings(prompt=prompt, negative_prompt=negative_prompt or "",
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                width=self.default_size if width is None else width,
                                height=self.default_size if height is None else height, num_images=num_images,
                                scheduler=scheduler or None, seed=seed, cache_interval=cache_interval)
        cache = FeatureCache(s["cache_interval"]) if (s["cache_interval"] or 1) > 1 else None
        if attention and cache:
            raise ValueError("attention maps need every layer at every step: use cache_interval=None (or 1) "
                             "with attention=True")
        prompt, negative_prompt, num_inference_steps, guidance_scale = (
            s["prompt"], s["negative_prompt"], s["num_inference_steps"], s["guidance_scale"])
        width, height, num_images, scheduler_name, seed = (s["width"], s["height"], s["num_images"], s["scheduler"],
                                                           s["seed"])
        if seed is None:
            seed = random.randint(0, MAX_SEED - num_images)
        prompts = [prompt] * num_images if isinstance(prompt, str) else prompt
        num_images = len(prompts)
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(num_images)]

        context, notes = self.encode_prompt(prompts)
        guided = guidance_scale > 1.0
        if guided:
            negative, more = self.encode_prompt([negative_prompt] * num_images)
            notes += [n for n in more if n not in notes]
            context = torch.cat([negative, context])

        sched = make_scheduler(scheduler_name, self.scheduler_config)
        sched.set_timesteps(num_inference_steps, device=self.device)
        if hasattr(sched, "set_begin_index"):
            # text-to-image starts at the first timestep. Said explicitly, because with Karras sigmas on a
            # zero-terminal-SNR model several leading timesteps round to 999, and diffusers' lookup by timestep then
            # starts at the second and runs past the end (diffusers' own pipeline raises IndexError there)
            sched.set_begin_index(0)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        shape = (num_images, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generators, device=torch.device(self.device), dtype=self.dtype)
        latents = latents * sched.init_noise_sigma
        if attention:
            if attention is not True:
                raise ValueError(f"attention must be True or False, got {attention!r}")
            capture = self._attention_capture(prompts, negative_prompt, guided, len(sched.timesteps), shape,
                                              (height, width))
            with capture as attention_maps:
                latents = denoise(self.unet, sched, latents, context, guidance_scale, generators, callback)
        else:
            attention_maps = None
            latents = denoise(self.unet, sched, latents, context, guidance_scale, generators, callback, cache)

        self.check_finite(latents, "sampling")
        images = self.decode(latents)
        record = self.record(negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, width=width, height=height,
                             scheduler=scheduler_name, sched=sched,
                             **({"cache_interval": cache.interval} if cache else {}))
        records = [dict(record, prompt=p, seed=s) for p, s in zip(prompts, seeds)]
        return GenerationResult(images, seeds, records, notes, attention_maps)

    def tokens(self, prompt: str) -> tuple[list[str], int]:
        """The tokens the text encoder sees for `prompt` (start and end tokens included, truncated to its
        limit) and how many were dropped."""
        limit = self.tokenizer.model_max_length
        full = self.tokenizer(prompt).input_ids
        ids = self.tokenizer(prompt, truncation=True, max_length=limit).input_ids
        return self.tokenizer.convert_ids_to_tokens(ids), max(0, len(full) - limit)

    def _attention_capture(self, prompts, negative_prompt, guided, steps, shape, image_size):
        if any(not p.strip() for p in prompts):
            raise ValueError("attention maps need a prompt with words; the prompt is empty")
        split = [self.tokens(p) for p in prompts]
        tokens = [t for t, _ in split]
        negative = [self.tokens(negative_prompt)[0]] * len(prompts)
        check_attention_memory(len(prompts), steps, tokens, negative, guided, self.unet, shape[2:])
        return capture_attention(self.unet, tokens, negative, guided, shape[2:], image_size, prompts, negative_prompt,
                                 truncated=[dropped for _, dropped in split])

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        latents = latents.to(self.vae_dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        self.check_finite(image, "the VAE's decoding")
        return self.image_processor.postprocess(image.float(), output_type="pil")

    def check_finite(self, x: torch.Tensor, stage: str) -> None:
        """A NonFiniteError naming the likely cause when `x` holds NaN or infinity: such images come out black (the
        diffusers ecosystem's "black image" reports), and saying why beats a silent black square. The VAE already
        decodes in fp32 (the fallback for fp16 VAEs), so no fallback is left to try here."""
        if torch.isfinite(x).all():
            return
        if self.lora:
            cause = (f"the LoRA {self.lora['name']!r} at scale {self.lora['scale']:g} (try a lower scale, or "
                     f"generate without it)")
        elif self.dtype == torch.float16:
            cause = "fp16 overflowing in this model (load it in bf16 or fp32)"
        else:
            cause = "the model's weights (its file may be damaged)"
        raise NonFiniteError(f"{stage} produced NaN or infinite values, so the image would come out black; the "
                             f"likely cause is {cause}")

    def record(self, sched, **settings) -> dict:
        import diffusers
        import transformers

        from . import __version__

        if self.lora:
            settings["lora"] = {k: self.lora[k] for k in ("name", "hash", "scale")}
        return dict(settings, model=self.model_id, model_hash=self.model_hash,
                    scheduler_config=dict(sched.config), dtype=str(self.dtype).replace("torch.", ""),
                    versions={"imagecraft": __version__, "torch": torch.__version__,
                              "diffusers": diffusers.__version__, "transformers": transformers.__version__})

    def reproduce(self, png) -> GenerationResult:
        """Generates again from the settings stored in one of our PNGs (or an A1111 one). A setting the PNG lacks or
        holds out of range takes its default, and the result's `warnings` say which."""
        settings, notes = restore_settings(png)
        if "prompt" not in settings:
            raise ValueError(f"the PNG gives no prompt ImageCraft can use ({'; '.join(notes)})")
        result = self(**pipeline_settings(settings))
        result.warnings[:0] = notes
        return result
