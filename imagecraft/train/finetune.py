"""Fine-tunes a Stable Diffusion model on your own captioned images: LoRA through peft (the default) or the whole
UNet with an EMA, on accelerate (CPU or GPU, bf16 autocast where the hardware runs bf16 natively, one process or
many).

    imagecraft finetune --data my-images/ --output my-lora/                  # LoRA on the built-in model
    imagecraft finetune --data my-images/ --output my-model/ --method full
    imagecraft finetune --data my-images/ --output my-lora/ --model PATH --steps 1000 --rank 16
    accelerate launch --multi_gpu --num_processes 2 -m imagecraft.train.finetune --data my-images/ --output my-lora/

More than one process (DDP): `accelerate launch --multi_gpu --num_processes N` starts N processes, on GPUs where
there are, else on CPU cores (gloo); without --multi_gpu accelerate starts one process only. Every process draws
the same global batch from one seeded generator and trains on its slice, so N processes with --batch-size B train
exactly as one process with --batch-size N x B.

Data: a folder (subfolders too) of images, each with a same-name .txt caption beside it (kohya's layout), or a
metadata.jsonl / metadata.csv with `file_name` and `text` (diffusers' imagefolder). Images are turned upright
(EXIF), made RGB (transparency onto white, 16-bit scaled to 8), resized and centre-cropped to the model's size.
Horizontal flips are off unless asked: they swap "left" and "right". Latents are encoded once and cached.

Prior preservation (DreamBooth's, kohya's regularisation images): `--class-prompt P` (repeatable) has the base model
draw --class-images images for those prompts before training, and every step trains on as many of them as data
images, so that what the data does not show (the other colours, when the data teaches a new one) stays as it was.

The output folder gets:
  pytorch_lora_weights.safetensors   LoRA, diffusers/PEFT layout: `pipe.load_lora_weights(folder)` in diffusers
  lora_kohya.safetensors             the same LoRA in kohya layout, for AUTOMATIC1111 and ComfyUI
  (or, with --method full, a diffusers model folder: `StableDiffusionPipeline.from_pretrained(folder)`)
  loss.csv, loss.png                 training loss per step and the loss on a fixed batch
  previews/step-NNNNNN.png           fixed-seed samples: the base model, LoRA at scale 0.5, at scale 1
  README.md                          a model card: base, recipe, data, loss, previews
  checkpoints/last.pt, cache/        written atomically; rerun the same command to resume, Ctrl-C saves first
  cache/class-images/                the prior-preservation images and their captions, to look at
"""

from __future__ import annotations

import copy
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from .. import embeddings, lora as lora_lib
from ..loading import ModelLoadError
from ..pipeline import ImageCraftPipeline
from ..runtime import autocast, training_bf16
from ..settings import UNET_TARGETS
from .core import (Loop, RandomState, TrainingError, check_output_folder, diffusion_loss, noise_scheduler,
                   noised_and_target)
from .data import (class_examples, concept_words, data_key, encode_images, extract_zip, find_examples, images_digest,
                   known_words, swapped_words)
from .recipe import FinetuneRecipe, build_parser, check_recipe, recipe_from_args
from .report import export, previews, sample, write_curves

log = logging.getLogger("imagecraft.finetune")

# Preservation's captions per data caption: the caption without the taught words, and as many again less one with
# them swapped for other words the tokenizer knows ("a cyan square" -> "a square", "a purple square", ...), so the
# words nearest the new one keep their meaning too
KEEP_VARIANTS = 8
LOCK_DRAWS = 256  # contexts per step in the word lock's penalty (`WordLock`)

__all__ = ["FinetuneResult", "TrainingError", "finetune"]


@dataclass
class FinetuneResult:
    output: Path
    method: str
    step: int
    steps: int
    stopped: bool  # stopped early (Ctrl-C, the app's Stop), resumable
    history: list = field(default_factory=list)  # [step, loss, lr, validation loss or None]
    files: list = field(default_factory=list)
    preview: Path | None = None
    kept_step: int | None = None  # the step whose weights were saved, when held-out images chose it


class LoraState:
    """The LoRA weights of the UNet and the text encoder as a checkpoint entry: {layer: (A, B)} per model, and the
    embeddings of the words given tokens of their own ({word: (1, dim)})."""

    def __init__(self, unet, text_encoder, word_ids: dict[str, int] | None = None):
        self.models = {"unet": unet, "text_encoder": text_encoder}
        self.word_ids = word_ids or {}

    def state_dict(self) -> dict:
        state = {key: {n: (a, b) for n, (a, b, _) in lora_lib.lora_weights(model).items()}
                 for key, model in self.models.items()}
        state["words"] = embeddings.word_rows(self.models["text_encoder"], self.word_ids)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        for key, model in self.models.items():
            layers = lora_lib.lora_layers(model)
            for name, (a, b) in state.get(key, {}).items():
                layers[name].lora_A[lora_lib.ADAPTER].weight.copy_(a)
                layers[name].lora_B[lora_lib.ADAPTER].weight.copy_(b)
        embeddings.set_rows(self.models["text_encoder"], self.word_ids, state.get("words", {}))


def finetune(model, data, output, recipe: FinetuneRecipe | None = None, progress=None, should_stop=None,
             show_bar: bool = True) -> FinetuneResult:
    """Fine-tunes `model` (anything ImageCraftPipeline.from_pretrained loads) on the captioned images in `data`,
    writing to `output` (see the module's docstring). Resumes from output/checkpoints/last.pt when its recipe,
    base and data match. `progress(step, steps, loss)` is called after every step; training stops, saving a
    checkpoint first, when `should_stop()` returns True or on Ctrl-C."""
    recipe = check_recipe(recipe or FinetuneRecipe())
    output = Path(output)
    check_output_folder(output)
    examples = find_examples(data)
    cuda = torch.cuda.is_available()
    bf16 = training_bf16(recipe.precision, "cuda" if cuda else "cpu")
    options = dict(mixed_precision="bf16" if bf16 else "no", cpu=not cuda, gradient_accumulation_steps=recipe.grad_accum)
    try:
        accelerator = Accelerator(**options)
    except ValueError:  # accelerate keeps one precision per process: an earlier run here chose another one
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # private, as accelerate's own tests use it; the process group is kept
        accelerator = Accelerator(**options)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_process = accelerator.is_main_process

    log.info("training on %d process%s (%s), %s", world, "es" if world > 1 else "", device.type,
             "bf16 autocast" if bf16 else "fp32")
    # this process's own device (cuda:N under DDP); weights in fp32, the forward passes in accelerate's autocast
    pipe = ImageCraftPipeline.from_pretrained(model, device=str(device) if device.type == "cuda" else device.type,
                                              dtype="fp32")
    size = pipe.default_size
    digest = images_digest(examples)
    latents = encode_images(pipe, examples, size, recipe.flip, output / "cache", digest) if main_process else None
    accelerator.wait_for_everyone()
    if latents is None:
        latents = encode_images(pipe, examples, size, recipe.flip, output / "cache", digest)  # now a cache hit
    latents = latents.to(device)
    captions = [ex.caption for ex in examples]
    prompts = list(recipe.validation_prompts) or captions[:2]
    held = held_out(len(captions), recipe.validation_images, recipe.seed)
    train_rows = torch.tensor([i for i in range(len(captions)) if i not in held])
    words = list(recipe.concept_words) or concept_words(captions)
    # the base model's previews, before any word or LoRA is added
    base_images = sample(pipe, pipe.unet, prompts, recipe) if main_process else None
    # the taught words as tokens of their own, whose embeddings train (LoRA only: a full fine-tune's folder keeps
    # the base tokenizer)
    word_ids = {}
    if recipe.method == "lora" and recipe.word_token and words:
        word_ids = embeddings.add_word_tokens(pipe.tokenizer, pipe.text_encoder, words)
        log.info("the taught words get tokens of their own: %s", " ".join(repr(w) for w in word_ids) or "none")
        if len(word_ids) < len(words):
            log.info("already tokens of the tokenizer, so read as they are: %s",
                     " ".join(repr(w) for w in words if w not in word_ids))
    if recipe.preserve:
        if words:
            log.info("preserving the base model under the captions with %s removed or swapped for other words",
                     " ".join(repr(w) for w in words))
        else:
            log.info("preserving the base model's prediction for the empty caption (no word is in most captions)")
    if held:
        log.info("%d images held out; the step with the lowest loss on them is saved", len(held))

    objective = dict(method=recipe.method, rank=recipe.rank, alpha=recipe.lora_alpha, targets=list(recipe.targets),
                     text_encoder_lora=recipe.text_encoder_lora, model=pipe.model_id, model_hash=pipe.model_hash,
                     data=data_key(digest, size, recipe.flip, "")[:12], batch=recipe.batch_size * world,
                     grad_accum=recipe.grad_accum, seed=recipe.seed)
    if recipe.class_prompts:
        objective["prior"] = dict(prompts=list(recipe.class_prompts), images=recipe.class_images,
                                  weight=recipe.prior_weight)
    if word_ids:
        objective["word_tokens"] = dict(words=list(word_ids), lr=recipe.embedding_lr)
    if recipe.preserve:
        objective["preserve"] = dict(weight=recipe.preserve, words=words)
    if recipe.word_lock:  # LoRA only (check_recipe refuses it with a full fine-tune)
        objective["word_lock"] = dict(weight=recipe.word_lock, words=words)
    if held:
        objective["held_out"] = held
    loop = Loop(f"finetune ({recipe.method})", recipe.steps, output / "checkpoints" / "last.pt", objective,
                lr=recipe.peak_lr, warmup=recipe.warmup, schedule=recipe.lr_schedule, ema_decay=recipe.ema_decay,
                max_grad_norm=recipe.max_grad_norm, grad_accum=recipe.grad_accum, bf16=bf16,
                accelerator=accelerator, checkpoint_every=recipe.checkpoint_every, show_bar=show_bar,
                should_stop=should_stop)
    saved = loop.read_checkpoint()  # another recipe's checkpoint is refused before anything is made for this one

    prior_latents = prior_captions = None
    if recipe.class_prompts:  # made by the base model, before any LoRA is added
        prior_examples = class_examples(pipe, recipe, output / "cache" / "class-images", rank, world,
                                        accelerator.wait_for_everyone, should_stop)
        if prior_examples is None:
            log.info("stopped while making the prior-preservation images; rerun to go on")
            return FinetuneResult(output, recipe.method, saved["step"] if saved else 0, recipe.steps, True,
                                  [list(h) for h in saved["history"]] if saved else [])
        prior_latents = encode_images(pipe, prior_examples, size, False, output / "cache") if main_process else None
        accelerator.wait_for_everyone()
        if prior_latents is None:
            prior_latents = encode_images(pipe, prior_examples, size, False, output / "cache")  # now a cache hit
        prior_latents = prior_latents.to(device)
        prior_captions = [ex.caption for ex in prior_examples]

    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    teacher = copy.deepcopy(unet).eval() if recipe.method == "full" and recipe.preserve else None
    unet.gradient_checkpointing = recipe.gradient_checkpointing
    torch.manual_seed(recipe.seed)  # LoRA's initial A: the same in every process and every run
    generator = torch.Generator().manual_seed(recipe.seed)
    if recipe.method == "lora":
        lora_lib.remove_lora(unet)
        lora_lib.add_lora(unet, lora_lib.unet_targets(unet, recipe.targets), recipe.rank, recipe.lora_alpha,
                          gaussian=True)
        if recipe.text_encoder_lora:
            lora_lib.add_lora(text_encoder, lora_lib.target_names(text_encoder, lora_lib.TEXT_TARGETS), recipe.rank,
                              recipe.lora_alpha, gaussian=True)
        ema = None
        loop.state = {"lora": LoraState(unet, text_encoder, word_ids), "generator": RandomState(generator)}
    else:
        unet.requires_grad_(True)
        ema = copy.deepcopy(unet).requires_grad_(False)
        loop.state = {"unet": unet, "generator": RandomState(generator)}
        loop.ema = {"unet": (unet, ema)}
    groups = [dict(params=[p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad])]
    if word_ids:  # the embedding table trains, only the new words' rows: their gradient alone is kept, no decay
        table = text_encoder.get_input_embeddings().weight
        table.requires_grad_(True)
        trained_rows = torch.zeros(len(table), 1, device=table.device)
        trained_rows[list(word_ids.values())] = 1
        table.register_hook(lambda grad: grad * trained_rows.to(grad.dtype))
        groups.append(dict(params=[table], weight_decay=0.0, lr_scale=recipe.embedding_lr / recipe.peak_lr))
    loop.params = [p for g in groups for p in g["params"]]
    loop.optimizer = torch.optim.AdamW(groups, lr=recipe.peak_lr, weight_decay=recipe.weight_decay)

    def tokenize(texts):
        return pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device)

    @torch.no_grad()
    def embed(ids):
        return torch.cat([text_encoder(ids[i:i + 64])[0] for i in range(0, len(ids), 64)])

    # token ids of every caption (and of "" for caption dropout), of the prior images' captions and of the captions
    # without the taught words; their contexts once, when the text encoder does not train, and the base model's
    # contexts of the captions without the taught words, the preservation's teacher's (now, before any training)
    ids_all = tokenize(captions + [""])
    prior_ids = tokenize(prior_captions) if prior_captions else None
    # (a word given a token of its own is no `word</w>`, so the swap words are the base tokenizer's)
    keep_ids = tokenize(keep_captions(captions, words, known_words(pipe.tokenizer, words),
                                      recipe.seed)) if recipe.preserve or recipe.word_lock else None
    keep_base = embed(keep_ids) if keep_ids is not None else None
    lock = None
    if recipe.word_lock:  # the other words' contexts: the preservation's captions and ""
        lock = WordLock(unet, *split_contexts(torch.cat([keep_ids, ids_all[-1:]]), torch.cat(
            [keep_base, embed(ids_all[-1:])]), pipe.tokenizer.eos_token_id), recipe.word_lock)
        log.info("holding the keys and values of %d layers as they were on the contexts of other words",
                 len(lock.layers))
    if not recipe.preserve:
        keep_ids = keep_base = None
    contexts = prior_contexts = None
    text_trains = recipe.text_encoder_lora or bool(word_ids)
    if not text_trains:
        contexts = embed(ids_all)
        prior_contexts = embed(prior_ids) if prior_ids is not None else None

    @torch.no_grad()
    def base_prediction(xt, t, context):
        """The base model's prediction: the LoRA at scale 0, or the UNet as it was before a full fine-tune."""
        with autocast(bf16, device.type):
            if teacher is not None:
                return teacher(xt, t, context).float()
            lora_lib.set_scale(base_unet, 0.0)
            try:
                return base_unet(xt, t, context).float()
            finally:
                lora_lib.set_scale(base_unet, 1.0)

    scheduler = noise_scheduler(config=pipe.scheduler_config)
    alphas = scheduler.alphas_cumprod.to(device)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"the model predicts {prediction_type!r}; fine-tuning knows epsilon and v_prediction")

    base_unet = unet
    fixed = fixed_batch(latents, ids_all, contexts, held or list(range(min(recipe.fixed_batch_images, len(captions)))),
                        scheduler, device)
    if fixed is not None and keep_ids is not None:  # the base model's predictions, before any training
        xt, _ = noised_and_target(prediction_type, alphas, fixed["x0"], fixed["noise"], fixed["t"])
        rows = fixed["index"] * KEEP_VARIANTS + torch.arange(len(fixed["index"]), device=device) % KEEP_VARIANTS
        fixed.update(keep_ids=keep_ids[rows], keep_target=base_prediction(xt, fixed["t"], keep_base[rows]))
    best = Best(LoraState(unet, text_encoder, word_ids) if recipe.method == "lora" else ema)
    if held:
        loop.state["best"] = best
    loop.resume()
    unet = loop.prepare(unet)
    if text_trains:
        text_encoder = accelerator.prepare(text_encoder)

    n_data = len(captions)
    global_batch = recipe.batch_size * world
    steps_total = scheduler.config.num_train_timesteps

    def batch_loss(step):
        # one global batch drawn from the shared generator, each process taking its slice: the same samples, noise
        # and timesteps as one process with the whole batch
        draws = [train_rows[torch.randint(0, len(train_rows), (global_batch,), generator=generator)],  # images
                 torch.randn((global_batch, *latents.shape[1:]), generator=generator),  # noise
                 torch.randint(0, steps_total, (global_batch,), generator=generator),  # timesteps
                 torch.rand(global_batch, generator=generator) < recipe.caption_dropout,  # captions dropped
                 torch.rand(global_batch, generator=generator) < 0.5,  # flipped
                 torch.randn((global_batch, latents.shape[1], 1, 1), generator=generator)]  # noise offset
        if prior_latents is not None:  # as many prior images as data images
            draws += [torch.randint(0, len(prior_latents), (global_batch,), generator=generator),
                      torch.randn((global_batch, *latents.shape[1:]), generator=generator),
                      torch.randint(0, steps_total, (global_batch,), generator=generator),
                      torch.randn((global_batch, latents.shape[1], 1, 1), generator=generator)]
        n_keep = 0
        if keep_ids is not None:  # as many images again, each under one of its caption's preservation captions
            draws += [train_rows[torch.randint(0, len(train_rows), (global_batch,), generator=generator)],
                      torch.randint(0, KEEP_VARIANTS, (global_batch,), generator=generator),
                      torch.randn((global_batch, *latents.shape[1:]), generator=generator),
                      torch.randint(0, steps_total, (global_batch,), generator=generator)]
            n_keep = 4
        mine = slice(rank * recipe.batch_size, (rank + 1) * recipe.batch_size)
        draws = [v[mine].to(device) for v in draws]
        loss = compute_loss(*draws[:len(draws) - n_keep], keep=draws[len(draws) - n_keep:])
        if lock is not None:  # the same contexts in every process
            loss = loss + lock.penalty(generator)
        return loss

    def compute_loss(index, noise, t, drop, flipped, offset, *prior, keep=()):
        x0 = latents[index]
        if recipe.flip:
            x0 = torch.where(flipped.view(-1, 1, 1, 1), latents[index + n_data], x0)
        row = torch.where(drop, torch.full_like(index, n_data), index)
        ids, context = ids_all[row], None if contexts is None else contexts[row]
        if prior:  # the prior-preservation images in the same forward pass, after the data's
            p_index, p_noise, p_t, p_offset = prior
            x0, noise, t = torch.cat([x0, prior_latents[p_index]]), torch.cat([noise, p_noise]), torch.cat([t, p_t])
            offset, ids = torch.cat([offset, p_offset]), torch.cat([ids, prior_ids[p_index]])
            context = None if context is None else torch.cat([context, prior_contexts[p_index]])
        noise = noise + recipe.noise_offset * offset  # offset noise: one value per sample and channel
        xt, target = noised_and_target(prediction_type, alphas, x0, noise, t)
        if keep:  # preservation: the base model's prediction under a caption without the taught words
            k_index, k_variant, k_noise, k_t = keep
            k_row = k_index * KEEP_VARIANTS + k_variant
            k_xt, _ = noised_and_target(prediction_type, alphas, latents[k_index], k_noise, k_t)
            xt, t, target = torch.cat([xt, k_xt]), torch.cat([t, k_t]), torch.cat(
                [target, base_prediction(k_xt, k_t, keep_base[k_row])])
            ids = torch.cat([ids, keep_ids[k_row]])
            context = None if context is None else torch.cat([context, keep_base[k_row]])
        pred = unet(xt, t, context if context is not None else text_encoder(ids)[0])
        n, m = len(index), len(index) + (len(prior[0]) if prior else 0)
        loss = diffusion_loss(pred[:n], target[:n], prediction_type, alphas, t[:n], recipe.snr_gamma)
        if prior:
            loss = loss + recipe.prior_weight * diffusion_loss(pred[n:m], target[n:m], prediction_type, alphas,
                                                               t[n:m], recipe.snr_gamma)
        if keep:
            loss = loss + recipe.preserve * diffusion_loss(pred[m:], target[m:], prediction_type, alphas, t[m:],
                                                           recipe.snr_gamma)
        return loss

    def evaluate(step, loss, lr):
        if step % recipe.eval_every and step != recipe.steps:
            return [None]
        value = fixed_batch_loss(unet, text_encoder, fixed, prediction_type, alphas, recipe)
        unet.train()
        if held and value is not None:
            best.offer(step, value)
        return [value]

    result = FinetuneResult(output, recipe.method, loop.step, recipe.steps, False, loop.history)

    def after_step(step, steps, loss):
        if main_process and recipe.preview_every and step % recipe.preview_every == 0 and step < steps:
            result.preview = previews(pipe, base_unet, prompts, recipe, ema, base_images, output, step)
            write_curves(output, loop.history)
            unet.train()
        if progress is not None:
            progress(step, steps, loss)

    loop.after_step, loop.progress = evaluate, after_step
    unet.train()
    finished = loop.run(batch_loss)
    result.step, result.history = loop.step, loop.history
    if not finished:
        if main_process:
            write_curves(output, loop.history)
        result.stopped = True
        return result
    unet.eval()
    if held and best.step is not None:
        if best.step != loop.step:
            best.restore()
            log.info("saving step %d, whose loss on the held-out images (%.4f) is the lowest", best.step, best.value)
        result.kept_step = best.step
    if main_process:
        result.preview = previews(pipe, base_unet, prompts, recipe, ema, base_images, output, loop.step)
        write_curves(output, loop.history)
        result.files = export(pipe, base_unet, text_encoder if recipe.text_encoder_lora else None, ema, recipe,
                              output, examples, loop.history, loop.seconds, result.kept_step, word_ids)
    accelerator.wait_for_everyone()
    return result


def split_contexts(ids: torch.Tensor, contexts: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's output as rows (n, dim): at each caption's positions up to and including its first
    end-of-text token, and at the padding after it (most of the window, and alike from caption to caption)."""
    end = (ids == eos_id).int().argmax(dim=1)
    words = torch.arange(ids.shape[1], device=ids.device)[None] <= end[:, None]
    return contexts[words], contexts[~words]


class WordLock:
    """Holds a LoRA's cross-attention keys and values (attn2.to_k, attn2.to_v) as the base model's on the contexts
    of other words' prompts: `penalty(generator)` is `weight` x the energy of the LoRA's change on `draws` rows, half
    of them drawn from the words' positions and half from the padding's, over the layer's own output's, averaged
    over the layers. A prompt made only of those words then draws as before, whatever the LoRA learns for the
    taught ones; it costs no UNet pass."""

    def __init__(self, unet, words: torch.Tensor, padding: torch.Tensor, weight: float, draws: int = LOCK_DRAWS):
        self.layers = {name: layer for name, layer in lora_lib.lora_layers(unet).items()
                       if name.endswith(UNET_TARGETS["kv"])}
        self.pools = [p.detach() for p in (words, padding) if len(p)]
        self.weight, self.draws = weight, draws
        with torch.no_grad():
            every = torch.cat(self.pools)
            self.energy = {name: float((every @ layer.base_layer.weight.T).pow(2).sum(-1).mean())
                           for name, layer in self.layers.items()}

    def penalty(self, generator: torch.Generator) -> torch.Tensor:
        share = self.draws // len(self.pools)
        x = torch.cat([pool[torch.randint(0, len(pool), (share,), generator=generator).to(pool.device)]
                       for pool in self.pools])
        total = 0.0
        for name, layer in self.layers.items():
            a, b = layer.lora_A[lora_lib.ADAPTER].weight, layer.lora_B[lora_lib.ADAPTER].weight
            change = (x @ a.T) @ b.T * layer.scaling[lora_lib.ADAPTER]
            total = total + change.float().pow(2).sum(-1).mean() / self.energy[name]
        return self.weight * total / max(len(self.layers), 1)


def keep_captions(captions: list[str], words: list[str], vocabulary: list[str], seed: int) -> list[str]:
    """KEEP_VARIANTS captions per caption, in order: without the taught `words`, then with them swapped for words of
    `vocabulary` drawn with the seed. Without taught words, the empty caption: the data's own captions would ask
    the model to draw the data and to stay as it was at once."""
    if not words:
        return [""] * (len(captions) * KEEP_VARIANTS)
    rng = random.Random(seed)
    return [swapped_words(c, words, rng.choice(vocabulary) if v and vocabulary else "")
            for c in captions for v in range(KEEP_VARIANTS)]


def held_out(n: int, count: int, seed: int) -> list[int]:
    """The images held out of training to choose the step saved: `count` of the n, drawn with the seed; none where
    fewer than 8 would be left to train on."""
    if count <= 0 or n - count < 8:
        return []
    return sorted(random.Random(seed).sample(range(n), count))


class Best:
    """The weights at the step with the lowest validation loss so far (LoRA's A and B, or the full fine-tune's
    EMA UNet), as a checkpoint entry."""

    def __init__(self, weights):
        self.weights, self.step, self.value, self.saved = weights, None, float("inf"), None

    def offer(self, step: int, value: float):
        if value < self.value:
            self.step, self.value = step, value
            self.saved = copy.deepcopy(self.weights.state_dict())

    def restore(self):
        self.weights.load_state_dict(self.saved)

    def state_dict(self) -> dict:
        return dict(step=self.step, value=self.value, saved=self.saved)

    def load_state_dict(self, state: dict):
        self.step, self.value, self.saved = state["step"], state["value"], state["saved"]


def fixed_batch(latents, ids_all, contexts, rows: list[int], scheduler, device):
    """A fixed batch: the images of `rows` (the held-out ones, or the first training images) at five fixed timesteps
    each, with fixed noise. Its loss moves only when the model does, free of the batch-to-batch noise of the
    training loss; on held-out images it measures generalisation, on training images only fitting."""
    if not rows:
        return None
    generator = torch.Generator().manual_seed(12345)
    steps = scheduler.config.num_train_timesteps
    t = torch.tensor([int(steps * f) for f in (0.1, 0.3, 0.5, 0.7, 0.9)] * len(rows))
    index = torch.tensor(rows).repeat_interleave(5)
    noise = torch.randn((len(index), *latents.shape[1:]), generator=generator)
    index = index.to(device)
    return dict(x0=latents[index], noise=noise.to(device), t=t.to(device), index=index, ids=ids_all[index],
                contexts=None if contexts is None else contexts[index])


@torch.no_grad()
def fixed_batch_loss(unet, text_encoder, batch, prediction_type, alphas, recipe) -> float | None:
    """The loss on the fixed batch (`fixed_batch`), the preservation's term included as in training; None without
    one."""
    if batch is None:
        return None
    unet.eval()
    xt, target = noised_and_target(prediction_type, alphas, batch["x0"], batch["noise"], batch["t"])
    t = batch["t"]
    context = batch["contexts"] if batch["contexts"] is not None else text_encoder(batch["ids"])[0]
    pred = unet(xt, t, context)
    loss = float(diffusion_loss(pred, target, prediction_type, alphas, t, recipe.snr_gamma))
    if "keep_target" in batch:
        pred = unet(xt, t, text_encoder(batch["keep_ids"])[0])
        loss += recipe.preserve * float(diffusion_loss(pred, batch["keep_target"], prediction_type, alphas, t,
                                                       recipe.snr_gamma))
    return loss


# --- CLI -----------------------------------------------------------------------------------------------------
def run(args) -> int:
    try:
        recipe = check_recipe(recipe_from_args(args))
        data = Path(args.data)
        if data.is_file() and data.suffix.lower() == ".zip":
            data = extract_zip(data, Path(args.output) / "data")
        result = finetune(args.model, data, args.output, recipe)
    except (ValueError, ModelLoadError, TrainingError, lora_lib.LoraError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 1
    except OSError as e:  # a full disk mid-run: the last checkpoint is whole (atomic writes)
        print(f"error: {e}; the last checkpoint is kept, rerun the same command to resume", file=sys.stderr)
        return 1
    if result.stopped:
        print(f"stopped at step {result.step} of {result.steps}; rerun the same command to resume", file=sys.stderr)
        return 130
    for path in result.files:
        print(path)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
