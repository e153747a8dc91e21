"""Prompt to image: transformers' CLIP text encoder, UNet_SD as the denoiser, diffusers' schedulers and VAE.

The steps mirror diffusers' StableDiffusionPipeline one for one (same tokenisation, same noise draws from CPU
generators, same classifier-free guidance and decoding), so the same seed and settings give the same image as
diffusers on the same weights.
"""

from __future__ import annotations

import copy
import inspect
import random
import time
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

from . import embeddings, loading, lora
from .explain import edit as p2p
from .explain.capture import (capture as capture_attention, check_memory as check_attention_memory,
                              cross_attention_layers, new_recorder)
from .png import pipeline_settings, restore_edit, restore_settings, restore_source, save_png
from .prompts import PromptTokens, encode as encode_weighted, tokenize as tokenize_weighted
from .port import config_from_diffusers, load_ldm_unet, load_pipe_into_our_UNet
from .schedulers import check_scheduler_name, make_scheduler, scheduler_name_of
from .settings import (DEFAULT_GUIDANCE, DEFAULT_STEPS, INVERT_GUIDANCE, LORA_SCALE, MAX_SEED, check_edit,
                       check_settings, edit_cross_steps)
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
        self.lora: dict | None = None  # the LoRA applied by load_lora: name, hash, scale, path, words
        self._base_vocabulary = None  # (tokenizer, embedding rows) before load_lora added words of their own
        self._words = {}  # the loaded LoRA's word embeddings, {word: (1, dim)}: on at any scale but 0
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
                Word embeddings in an `embeddings` folder beside the file (what `imagecraft finetune` writes for
                the words it taught) load with it: each word then reads as its trained vector, at any scale but 0.
            scale: how much of it: 0 is the base model, 1 the LoRA as trained; from -4 to 4.
        Returns the applied LoRA's name, hash, scale, path and words, which the PNG metadata records. A file for
        another base model, or a LyCORIS file, is refused with a `lora.LoraError` (an embedding that does not fit,
        `embeddings.EmbeddingError`) that says why.
        """
        scale = LORA_SCALE.check(scale)
        file = lora.lora_file(path)
        files = embeddings.files_beside(file)
        rows = embeddings.read(files, self.text_encoder.get_input_embeddings().weight.shape[1])
        self._words = {}
        self._set_words({})  # the base vocabulary, to check the words against and to apply the LoRA to
        taken = [w for w in rows if w in self.tokenizer.get_vocab()]
        if taken:
            raise embeddings.EmbeddingError(f"the tokenizer already has a token {taken[0]!r}; an embedding's word "
                                            f"must be new to it")
        lora.apply(file, self.unet, self.text_encoder, scale)
        self._words = rows
        self._set_words(rows if scale else {})
        name = file.parent.name if file.name == lora.WEIGHT_NAME else file.stem
        self.lora = dict(name=name, hash=loading.file_hash([file] + files), scale=scale, path=str(file),
                         words=list(rows))
        return dict(self.lora)

    def _set_words(self, rows: dict):
        """Gives each word of `rows` ({word: (1, dim)}) a token of its own with that embedding, after undoing
        the last call's: the tokenizer is a copy, so unloading restores the base model's exactly."""
        if self._base_vocabulary is not None:
            self.tokenizer, n = self._base_vocabulary
            self.text_encoder.resize_token_embeddings(n, mean_resizing=False)
            self._base_vocabulary = None
        if rows:
            base = (self.tokenizer, self.text_encoder.get_input_embeddings().weight.shape[0])
            self.tokenizer = copy.deepcopy(self.tokenizer)
            ids = embeddings.add_word_tokens(self.tokenizer, self.text_encoder, list(rows))
            self._base_vocabulary = base
            embeddings.set_rows(self.text_encoder, ids, rows)

    def set_lora_scale(self, scale: float):
        """Changes the loaded LoRA's scale without reloading it."""
        if self.lora is None:
            raise ValueError("no LoRA is loaded (load_lora first)")
        scale = LORA_SCALE.check(scale)
        lora.set_scale(self.unet, scale)
        lora.set_scale(self.text_encoder, scale)
        self._set_words(self._words if scale else {})  # at 0 the base model exactly, its tokenizer too
        self.lora["scale"] = scale

    def unload_lora(self):
        """Removes the LoRA: the model is the base model again, exactly."""
        lora.remove_lora(self.unet)
        lora.remove_lora(self.text_encoder)
        self._words = {}
        self._set_words({})
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

    def prompt_tokens(self, prompt: str) -> PromptTokens:
        """The prompt parsed for AUTOMATIC1111's weighting and tokenised into chunks of the text encoder's window:
        ids, weights, and where each token sits in the encoded context (`imagecraft.prompts`)."""
        return tokenize_weighted(self.tokenizer, prompt)

    def encode_prompt(self, prompts: list[str | PromptTokens], chunks: int = 1) -> tuple[torch.Tensor, list[str]]:
        """CLIP hidden states (B, n x window, dim) of the prompts with AUTOMATIC1111's weighting, and notes (with a
        warning each) on unbalanced brackets. A prompt that fits the window (77 tokens for SD, start and end
        included) is one chunk, the same bytes as diffusers' encoding when it has no weights; a longer one is
        encoded in chunks (`imagecraft.prompts`). All get n = max(chunks, the longest's) chunks."""
        tokenized = [p if isinstance(p, PromptTokens) else self.prompt_tokens(p) for p in prompts]
        notes = list(dict.fromkeys(note for p in tokenized for note in p.notes))
        for note in notes:
            warnings.warn(note, stacklevel=3)
        return encode_weighted(self.text_encoder, tokenized, chunks).to(self.dtype), notes

    def _scheduler(self, name: str, steps: int):
        """A fresh scheduler `name` set to `steps` steps, starting at the first."""
        sched = make_scheduler(name, self.scheduler_config)
        sched.set_timesteps(steps, device=self.device)
        if hasattr(sched, "set_begin_index"):
            # text-to-image starts at the first timestep. Said explicitly, because with Karras sigmas on a
            # zero-terminal-SNR model several leading timesteps round to 999, and diffusers' lookup by timestep then
            # starts at the second and runs past the end (diffusers' own pipeline raises IndexError there)
            sched.set_begin_index(0)
        return sched

    def _noise(self, seeds: list[int], shape: tuple, sched) -> tuple[torch.Tensor, list[torch.Generator]]:
        """The initial latents of images with these seeds (one CPU generator each, as diffusers draws them) and the
        generators, which ancestral samplers draw from afterwards."""
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latents = randn_tensor(shape, generator=generators, device=torch.device(self.device), dtype=self.dtype)
        return latents * sched.init_noise_sigma, generators

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], negative_prompt: str | None = "",
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 seed: int | None = None, width: int | None = None, height: int | None = None, num_images: int = 1,
                 scheduler: str | None = None, callback: Callable | None = None, attention: bool = False,
                 cache_interval: int | None = None) -> GenerationResult:
        """Generates `num_images` images for `prompt`.

        Args:
            prompt: the text; "" means unconditional. AUTOMATIC1111's weighting applies: `(word)` x1.1, `[word]`
                /1.1, `(some words:0.8)`, `\\(` for a literal bracket, BREAK (`imagecraft.prompts`); an
                unbalanced bracket is read as AUTOMATIC1111 reads it, with a warning naming it. Longer than the
                text encoder's window (77 tokens for SD) is encoded in chunks of the window. A list of prompts
                makes one image each (num_images is then ignored).
            negative_prompt: what to steer away from (classifier-free guidance's unconditional half); weighted
                and chunked as the prompt, and padded with empty chunks to the prompt's number (or it to its).
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

        parsed = {p: self.prompt_tokens(p) for p in dict.fromkeys([*prompts, negative_prompt])}
        tokenized, negative_tokens = [parsed[p] for p in prompts], parsed[negative_prompt]
        guided = guidance_scale > 1.0
        chunks = max(len(t.chunks) for t in [*tokenized, *([negative_tokens] if guided else [])])
        context, notes = self.encode_prompt(tokenized, chunks)
        if guided:
            negative, more = self.encode_prompt([negative_tokens] * num_images, chunks)
            notes += [n for n in more if n not in notes]
            context = torch.cat([negative, context])

        sched = self._scheduler(scheduler_name, num_inference_steps)
        shape = (num_images, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents, generators = self._noise(seeds, shape, sched)
        if attention:
            if attention is not True:
                raise ValueError(f"attention must be True or False, got {attention!r}")
            capture = self._attention_capture(tokenized, negative_tokens, guided, len(sched.timesteps), shape,
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
        """The tokens of `prompt` that attention maps show: the start token, every chunk's tokens without the
        weighting syntax, the end token; and how many were dropped (0: long prompts are encoded in chunks)."""
        return self.tokenizer.convert_ids_to_tokens(self.prompt_tokens(prompt).ids), 0

    def _attention_capture(self, tokenized, negative_tokens, guided, steps, shape, image_size):
        if any(not t.ids[1:-1] for t in tokenized):
            raise ValueError("attention maps need a prompt with words; the prompt is empty")
        tokens = [self.tokenizer.convert_ids_to_tokens(t.ids) for t in tokenized]
        negative = [self.tokenizer.convert_ids_to_tokens(negative_tokens.ids)] * len(tokenized)
        check_attention_memory(len(tokenized), steps, tokens, negative, guided, self.unet, shape[2:])
        positions = ([t.positions for t in tokenized], [negative_tokens.positions] * len(tokenized))
        return capture_attention(self.unet, tokens, negative, guided, shape[2:], image_size,
                                 [t.prompt for t in tokenized], negative_tokens.prompt, positions=positions)

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
        edit = restore_edit(png)
        if edit is not None:  # a Prompt-to-Prompt edit: made again from its source
            return self.edit(png, **edit)
        result = self(**pipeline_settings(settings))
        result.warnings[:0] = notes
        return result

    # --- Prompt-to-Prompt editing and inversion (the mechanism is imagecraft.explain.edit) --------------------------
    @torch.inference_mode()
    def edit(self, source, prompt: str | list[str], *, reweight: dict | None = None, blend: list[str] | None = None,
             cross_steps: float | None = None, self_steps: float | None = None, attention: bool = False,
             callback: Callable | None = None) -> GenerationResult:
        """Edits images by editing their prompt, keeping what the prompt keeps (Prompt-to-Prompt, Hertz et al. 2022).

            src = pipe("a red circle on the left", seed=3)
            pipe.edit(src, "a blue circle on the left")                         # a word swapped: the colour changes
            pipe.edit(src, "a red circle on the left on a black background")    # words added
            pipe.edit(src, "a red circle on the left", reweight={"red": 0.3})   # one word's attention scaled
            pipe.edit(src, "a blue circle on the left", blend=["circle"])       # only the circle's region changes

        Args:
            source: a GenerationResult (each of its images is edited), an ImageCraft PNG (a path or PIL image; of an
                edit, its source is edited), or `invert`'s result for any other picture. The source is drawn again
                with its own seed, latents, sampler and settings, beside the edit; same prompt and no reweight
                give the source's images bit for bit.
            prompt: the edited prompt, one for all images or one per image. Words are aligned with the source's
                (`explain.edit.align`): a kept or swapped word draws where its source word drew, an added one is free.
            reweight: {word of the edited prompt: factor} scales its attention (0 removes it; -5 to 5).
            blend: words of either prompt; only their region changes, the source's latents are kept elsewhere.
            cross_steps, self_steps: the shares of the steps that take the source's cross- and self-attention
                (`settings.EDIT`, measured on the built-in model; cross_steps by default 1.0 for an edit that only
                swaps or reweights words, 0.8 for one that adds words: `settings.edit_cross_steps`).
            attention: also record the edited images' own cross-attention maps (`result.attention`).
            callback: `callback(step, total, latents)` after each step, with the edited images' latents.
        Returns a GenerationResult of the edited images with the source's seeds; each record holds the edit, so its
        PNG is made again by `reproduce`. DeepCache (the source's cache_interval) applies to both passes.
        """
        check_callback(callback)
        records, inversion, notes = self._edit_source(source)
        e = check_edit(dict(prompt=prompt, reweight=reweight, blend=blend, cross_steps=cross_steps,
                            self_steps=self_steps))
        batch = len(records)
        targets = [e["prompt"]] * batch if isinstance(e["prompt"], str) else e["prompt"]
        if len(targets) != batch:
            raise ValueError(f"give one edited prompt, or one per source image ({batch}), got {len(targets)}")
        s = records[0]
        guided = s["guidance_scale"] > 1.0
        cache_interval = s.get("cache_interval") or 1
        if attention and attention is not True:
            raise ValueError(f"attention must be True or False, got {attention!r}")
        if attention and cache_interval > 1:
            raise ValueError("attention maps need every layer at every step, and this source was made with "
                             "DeepCache (cache_interval > 1): edit with attention=False")
        context, sources, edited, more = self._edit_contexts([r["prompt"] for r in records], targets,
                                                             s["negative_prompt"], guided)
        notes += [n for n in more if n not in notes]
        plan = p2p.plan_edit(sources, edited, e["reweight"], e["blend"], e["cross_steps"], e["self_steps"])
        if plan.cross_steps is None:  # chosen by the edit: a swap keeps the source's maps longer than a refinement
            plan.cross_steps = edit_cross_steps(any(a.adds_words for a in plan.alignments))
        sched = self._scheduler(s["scheduler"], s["num_inference_steps"])
        shape = (batch, self.unet.config.in_channels, s["height"] // self.vae_scale_factor,
                 s["width"] // self.vae_scale_factor)
        uncond = None  # per step, an inverted picture's null-text embedding
        if inversion is None:  # the source's noise, drawn twice: the target's generators stay level with the source's
            (latents, generators), (twin, twins) = (self._noise([r["seed"] for r in records], shape, sched)
                                                    for _ in range(2))
            latents, generators = torch.cat([latents, twin]), generators + twins
        else:
            latents, generators = inversion.latents.to(self.device, self.dtype).repeat(2, 1, 1, 1), None
            uncond = None if inversion.uncond is None else inversion.uncond.to(self.device)
        steps = len(sched.timesteps)
        blending = None if plan.blend is None else p2p.LocalBlend(
            plan.blend, p2p.blend_layers(self.unet, shape[2:]), shape[2:], p2p.step_count(p2p.BLEND_START, steps))
        recorder, finish = (self._edit_recorder(edited, s["negative_prompt"], guided, steps, shape)
                            if attention else (None, None))
        run = p2p.EditRun(self.unet, plan.to(self.device), batch, guided, steps, cache_interval, uncond, blending,
                          recorder)
        with p2p.editing(run):
            latents = denoise(run, sched, latents, context, s["guidance_scale"], generators, run.callback(callback))
        sources, latents = latents[:batch], latents[batch:]
        self.check_finite(latents, "sampling")
        images = self.decode(latents)
        if blending is not None and blending.last_mask is not None:
            images = p2p.composite(self.decode(sources), images, blending.last_mask)
        record = self.record(sched=sched, **{k: s[k] for k in ("negative_prompt", "num_inference_steps",
                                                              "guidance_scale", "width", "height", "scheduler")},
                             **({"cache_interval": cache_interval} if cache_interval > 1 else {}))
        out = []
        for r, target in zip(records, targets):
            edit = dict(source_prompt=r["prompt"], cross_steps=plan.cross_steps, self_steps=e["self_steps"],
                        reweight=e["reweight"], blend=e["blend"], **({"inverted": True} if inversion else {}))
            out.append(dict(record, prompt=target, seed=r.get("seed"), edit=edit))
        return GenerationResult(images, [r.get("seed") for r in records], out, notes, finish() if finish else None)

    def invert(self, image, prompt: str, *, negative_prompt: str = "", num_inference_steps: int | None = None,
               guidance_scale: float | None = None, null_text: bool | None = None,
               callback: Callable | None = None) -> "p2p.Inversion":
        """Makes a picture editable that ImageCraft did not draw (another tool's, or one drawn by hand): DDIM
        inversion under `prompt`, then null-text optimisation (Mokady et al. 2022) so that guided sampling draws the
        picture again; `edit` takes the result as its source.

            inv = pipe.invert("drawing.png", "a red circle on the left")
            inv.psnr                                         # how closely it is drawn again, in dB
            pipe.edit(inv, "a blue circle on the left")

        Args:
            image: a PIL image or an image file; its sides multiples of the VAE's factor, 64 to 2048 px.
            prompt: what the picture shows, in the words the model knows.
            negative_prompt: the negative prompt edits of it use (null-text starts from its embedding).
            num_inference_steps: DDIM steps of the inversion and of its edits (default: the generation default).
            guidance_scale: the guidance its edits run at (default: settings.INVERT_GUIDANCE, measured: edits at
                higher guidance draw the object larger than the picture's).
            null_text: optimise the unconditional embedding per step (True), or not (False: plain DDIM inversion,
                which draws the picture again only without guidance); None: when guidance is on.
            callback: `callback(step, total, latents)` after each inversion and optimisation step.
        Returns an `Inversion` with the picture drawn again (`images`), its PSNR against `image` and the seconds.
        """
        started = time.perf_counter()
        check_callback(callback)
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL image or an image file, got {type(image).__name__}")
        image = image.convert("RGB")
        s = self.check_settings(prompt=prompt, negative_prompt=negative_prompt, width=image.width, height=image.height,
                                scheduler="ddim",
                                num_inference_steps=DEFAULT_STEPS if num_inference_steps is None else num_inference_steps,
                                guidance_scale=INVERT_GUIDANCE if guidance_scale is None else guidance_scale)
        if not isinstance(s["prompt"], str):
            raise ValueError("invert takes one picture and one prompt")
        guided = s["guidance_scale"] > 1.0
        null_text = guided if null_text is None else null_text
        if null_text is not True and null_text is not False:
            raise ValueError(f"null_text must be True, False or None, got {null_text!r}")
        if null_text and not guided:
            raise ValueError("null-text optimisation fits the guided step: use guidance_scale above 1 with it")
        sched = self._scheduler("ddim", s["num_inference_steps"])
        with torch.no_grad():
            pixels = self.image_processor.preprocess(image).to(self.device, self.vae_dtype)  # (1, 3, H, W) in [-1, 1]
            z0 = (self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor).to(self.dtype)
            parsed = [self.prompt_tokens(p) for p in (s["prompt"], s["negative_prompt"])]
            chunks = max(len(p.chunks) for p in parsed[: 1 + guided])
            (cond, notes), (negative, _) = (self.encode_prompt([p], chunks) for p in parsed)
            path = p2p.ddim_invert(self.unet, sched, z0, cond, callback)
        uncond = (p2p.null_text(self.unet, sched, path, cond, negative, s["guidance_scale"], callback=callback)
                  if null_text else None)
        # contiguous: the VAE's latents come channels-last, and it decodes those with other rounding than the
        # contiguous latents an edit draws
        latents = path[-1].to(self.dtype).contiguous()
        with torch.no_grad():
            unet = self.unet if uncond is None else p2p.NullTextUNet(self.unet, uncond.to(self.device))
            drawn = denoise(unet, sched, latents, torch.cat([negative, cond]) if guided else cond,
                            s["guidance_scale"], None)
            images = self.decode(drawn)
        record = self.record(sched=sched, prompt=s["prompt"], negative_prompt=s["negative_prompt"],
                             num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                             width=s["width"], height=s["height"], scheduler="ddim")
        return p2p.Inversion(images, [record], latents.cpu(), None if uncond is None else uncond.cpu(),
                             p2p.psnr(images[0], image), time.perf_counter() - started, notes)

    def _edit_source(self, source) -> tuple[list[dict], "p2p.Inversion | None", list[str]]:
        """(per image the settings that draw the source, the inversion or None, notes)."""
        if isinstance(source, p2p.Inversion):
            return [dict(r) for r in source.records], source, list(source.warnings)
        if isinstance(source, GenerationResult):
            made, notes = [], []
            for r in source.records:  # an edit's image is edited from its source, as its PNG is
                edit = r.get("edit")
                if edit and edit.get("inverted"):
                    raise ValueError("this result is an edit of an inverted picture: edit the inversion itself")
                made.append(dict(r, prompt=edit["source_prompt"]) if edit else r)
                note = f"the source is an edit of {edit['source_prompt']!r}; this edit starts from that" if edit else ""
                if note and note not in notes:
                    notes.append(note)
        elif isinstance(source, (str, Path, Image.Image)):
            settings, notes = restore_source(source)
            made = [settings]
        else:
            raise ValueError(f"source must be a GenerationResult, an ImageCraft PNG (a path or PIL image) or the "
                             f"result of invert(), got {type(source).__name__}")
        if not made:
            raise ValueError("the source has no images to edit")
        records = []
        for r in made:
            clean = self.check_settings(**pipeline_settings(r))
            if clean["seed"] is None:
                raise ValueError("the source gives no seed, so its picture cannot be drawn again")
            records.append(clean)
        if len({tuple((k, v) for k, v in r.items() if k not in ("prompt", "seed")) for r in records}) > 1:
            raise ValueError("the source's images differ in settings other than prompt and seed; edit them apart")
        differs = self._made_elsewhere(made[0])
        if differs:
            notes.append(f"the source was made with {differs}, so it is drawn again a little differently here and the "
                         f"edit starts from that")
        return records, None, notes

    def _made_elsewhere(self, record: dict) -> str:
        """What of the model, dtype and LoRA that made a record differs from this pipeline's, in words ("" if none)."""
        found = []
        if record.get("model_hash") and self.model_hash and record["model_hash"] != self.model_hash:
            found.append(f"the model {record.get('model')!r} (hash {record['model_hash']})")
        if record.get("dtype") and record["dtype"] != str(self.dtype).replace("torch.", ""):
            found.append(f"dtype {record['dtype']}")
        mine = {k: self.lora[k] for k in ("name", "hash", "scale")} if self.lora else None
        if record.get("lora", None) != mine and not (record.get("lora") is None and mine is None):
            found.append(f"LoRA {record.get('lora')} (here {mine})")
        return ", ".join(found)

    def _edit_contexts(self, prompts: list[str], targets: list[str], negative_prompt: str, guided: bool):
        """The context of an edit, ordered as `denoise` and `EditRun` take it ([negative x 2B,] source prompts,
        edited prompts), the source's encoded as `__call__` encodes it; each side's `p2p.Tokens`; notes."""
        parsed = {p: self.prompt_tokens(p) for p in dict.fromkeys([*prompts, *targets, negative_prompt])}
        chunks = max(len(parsed[p].chunks) for p in [*prompts, *([negative_prompt] if guided else [])])
        longest = max(len(parsed[p].chunks) for p in targets)
        if longest > chunks:
            raise ValueError(f"the edited prompt takes {longest} chunks of the text encoder's "
                             f"{self.tokenizer.model_max_length} tokens and the source {chunks}; an edit keeps the "
                             f"number of chunks (shorten the edited prompt)")
        context, notes = self.encode_prompt([parsed[p] for p in prompts], chunks)
        edited, more = self.encode_prompt([parsed[p] for p in targets], chunks)
        parts = [context, edited]
        if guided:
            negative, _ = self.encode_prompt([parsed[negative_prompt]] * len(prompts), chunks)
            parts = [negative, negative, context, edited]
        window = self.tokenizer.model_max_length

        def tokens(p):
            return p2p.Tokens(p, self.tokenizer.convert_ids_to_tokens(parsed[p].ids), parsed[p].positions,
                              chunks * window, window)

        return (torch.cat(parts), [tokens(p) for p in prompts], [tokens(p) for p in targets],
                notes + [n for n in more if n not in notes])

    def _edit_recorder(self, edited: list, negative_prompt: str, guided: bool, steps: int, shape: tuple):
        """A Recorder of the edited images' own cross-attention (their queries against their prompt's keys), and
        the function that makes it one `AttentionMaps` per image after sampling."""
        if any(len(t.tokens) <= 2 for t in edited):
            raise ValueError("attention maps need a prompt with words; the edited prompt is empty")
        negative = self.prompt_tokens(negative_prompt)
        tokens = [t.tokens for t in edited]
        negative_tokens = [self.tokenizer.convert_ids_to_tokens(negative.ids)] * len(edited)
        check_attention_memory(len(edited), steps, tokens, negative_tokens, guided, self.unet, shape[2:])
        positions = ([t.positions for t in edited], [negative.positions] * len(edited))
        recorder = new_recorder(self.unet, list(cross_attention_layers(self.unet)), guided, shape[2:], positions)
        image_size = (shape[2] * self.vae_scale_factor, shape[3] * self.vae_scale_factor)
        return recorder, lambda: recorder.maps([t.text for t in edited], negative_prompt, tokens, negative_tokens,
                                               positions, shape[2:], image_size, [])
