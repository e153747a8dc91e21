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
  loss.csv, loss.png                 training loss per step and a deterministic held-out loss
  previews/step-NNNNNN.png           fixed-seed samples: the base model, LoRA at scale 0.5, at scale 1
  README.md                          a model card: base, recipe, data, loss, previews
  checkpoints/last.pt, cache/        written atomically; rerun the same command to resume, Ctrl-C saves first
  cache/class-images/                the prior-preservation images and their captions, to look at
"""

from __future__ import annotations

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import lora as lora_lib
from ..runtime import training_bf16
from ..loading import ModelLoadError
from .core import (check_output_folder, diffusion_loss, ema_update, load_checkpoint, lr_at, noise_scheduler,
                   noised_and_target, refuse_other_objective, save_checkpoint)
from .data import class_examples, data_key, encode_images, find_examples, images_digest
from .data import extract_zip
from .recipe import FinetuneRecipe, build_parser, check_recipe, recipe_from_args
from .report import _base_previews, _export, _previews, _write_curves

log = logging.getLogger("imagecraft.finetune")


# --- training ------------------------------------------------------------------------------------------------
class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (NaN loss); the last good checkpoint is kept."""


@dataclass
class FinetuneResult:
    output: Path
    method: str
    step: int
    steps: int
    stopped: bool  # stopped early (Ctrl-C, the app's Stop), resumable
    history: list = field(default_factory=list)  # [step, loss, lr, heldout or None]
    files: list = field(default_factory=list)
    preview: Path | None = None


def finetune(model, data, output, recipe: FinetuneRecipe | None = None, progress=None, should_stop=None,
             show_bar: bool = True) -> FinetuneResult:
    """Fine-tunes `model` (anything ImageCraftPipeline.from_pretrained loads) on the captioned images in `data`,
    writing to `output` (see the module's docstring). Resumes from output/checkpoints/last.pt when its recipe,
    base and data match. `progress(step, steps, loss)` is called after every step; training stops, saving a
    checkpoint first, when `should_stop()` returns True or on Ctrl-C."""
    from accelerate import Accelerator

    from ..pipeline import ImageCraftPipeline

    recipe = check_recipe(recipe or FinetuneRecipe())
    output = Path(output)
    check_output_folder(output)
    examples = find_examples(data)
    cuda = torch.cuda.is_available()
    bf16 = training_bf16(recipe.precision, "cuda" if cuda else "cpu")
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not cuda,
                              gradient_accumulation_steps=recipe.grad_accum)
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

    objective = dict(method=recipe.method, rank=recipe.rank, alpha=recipe.lora_alpha, targets=list(recipe.targets),
                     text_encoder_lora=recipe.text_encoder_lora, model=pipe.model_id, model_hash=pipe.model_hash,
                     data=data_key(digest, size, recipe.flip, "")[:12], batch=recipe.batch_size * world,
                     grad_accum=recipe.grad_accum, seed=recipe.seed)
    if recipe.class_prompts:
        objective["prior"] = dict(prompts=list(recipe.class_prompts), images=recipe.class_images,
                                  weight=recipe.prior_weight)
    checkpoint_path = output / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint_path)
    if state:  # before anything is made for this recipe
        refuse_other_objective(checkpoint_path, state, objective)

    prior_latents = prior_captions = None
    if recipe.class_prompts:  # made by the base model, before any LoRA is added
        prior_examples = class_examples(pipe, recipe, output / "cache" / "class-images", rank, world,
                                        accelerator.wait_for_everyone, should_stop)
        if prior_examples is None:
            log.info("stopped while making the prior-preservation images; rerun to go on")
            return FinetuneResult(output, recipe.method, state["step"] if state else 0, recipe.steps, True,
                                  [list(h) for h in state["history"]] if state else [])
        prior_latents = encode_images(pipe, prior_examples, size, False, output / "cache") if main_process else None
        accelerator.wait_for_everyone()
        if prior_latents is None:
            prior_latents = encode_images(pipe, prior_examples, size, False, output / "cache")  # now a cache hit
        prior_latents = prior_latents.to(device)
        prior_captions = [ex.caption for ex in prior_examples]

    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.gradient_checkpointing = recipe.gradient_checkpointing
    torch.manual_seed(recipe.seed)  # LoRA's initial A: the same in every process and every run
    if recipe.method == "lora":
        lora_lib.remove_lora(unet)
        lora_lib.add_lora(unet, lora_lib.unet_targets(unet, recipe.targets), recipe.rank, recipe.lora_alpha,
                          gaussian=True)
        if recipe.text_encoder_lora:
            lora_lib.add_lora(text_encoder, lora_lib.target_names(text_encoder, lora_lib.TEXT_TARGETS), recipe.rank,
                              recipe.lora_alpha, gaussian=True)
        ema = None
    else:
        unet.requires_grad_(True)
        ema = copy.deepcopy(unet).requires_grad_(False)
    trainable = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=recipe.peak_lr, weight_decay=recipe.weight_decay)

    def tokenize(texts):
        return pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device)

    @torch.no_grad()
    def embed(ids):
        return torch.cat([text_encoder(ids[i:i + 64])[0] for i in range(0, len(ids), 64)])

    # token ids of every caption (and of "" for caption dropout) and of the prior images' captions; their contexts
    # once, when the text encoder does not train
    ids_all = tokenize(captions + [""])
    prior_ids = tokenize(prior_captions) if prior_captions else None
    contexts = prior_contexts = None
    if not recipe.text_encoder_lora:
        contexts = embed(ids_all)
        prior_contexts = embed(prior_ids) if prior_ids is not None else None

    scheduler = noise_scheduler(config=pipe.scheduler_config)
    alphas = scheduler.alphas_cumprod.to(device)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"the model predicts {prediction_type!r}; fine-tuning knows epsilon and v_prediction")

    generator = torch.Generator().manual_seed(recipe.seed)
    step, history = 0, []
    if state:
        _load_trainable(unet, text_encoder, state, recipe)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], [list(h) for h in state["history"]]
        generator.set_state(state["generator"])
        log.info("resumed at step %d of %d from %s", step, recipe.steps, checkpoint_path)

    unet, opt = accelerator.prepare(unet, opt)
    if recipe.text_encoder_lora:
        text_encoder = accelerator.prepare(text_encoder)
    base_unet = accelerator.unwrap_model(unet)

    heldout = _heldout_batch(latents, ids_all, contexts, recipe, scheduler, device)
    n_data = len(captions)
    global_batch = recipe.batch_size * world

    def compute_loss(index, noise, t, drop, flipped, offset, *prior):
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
        pred = unet(xt, t, context if context is not None else text_encoder(ids)[0])
        n = len(index)
        loss = diffusion_loss(pred[:n], target[:n], prediction_type, alphas, t[:n], recipe.snr_gamma)
        if prior:
            loss = loss + recipe.prior_weight * diffusion_loss(pred[n:], target[n:], prediction_type, alphas, t[n:],
                                                               recipe.snr_gamma)
        return loss

    base_images = None
    if main_process:
        base_images = _base_previews(pipe, base_unet, prompts, recipe, ema)
    result = FinetuneResult(output, recipe.method, step, recipe.steps, False, history)
    bar = None
    if main_process and show_bar:
        from tqdm import tqdm

        bar = tqdm(total=recipe.steps, initial=step, desc=f"finetune ({recipe.method})", unit="step")
    last_saved = step
    started = time.time()
    try:
        unet.train()
        while step < recipe.steps:
            lr = lr_at(step, recipe.steps, recipe.peak_lr, recipe.warmup, recipe.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            losses = []
            for _ in range(recipe.grad_accum):
                # one global batch drawn from the shared generator, each process taking its slice: the same
                # samples, noise and timesteps as one process with the whole batch
                index = torch.randint(0, n_data, (global_batch,), generator=generator)
                noise = torch.randn((global_batch, *latents.shape[1:]), generator=generator)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (global_batch,), generator=generator)
                drop = torch.rand(global_batch, generator=generator) < recipe.caption_dropout
                flipped = torch.rand(global_batch, generator=generator) < 0.5
                offset = torch.randn((global_batch, latents.shape[1], 1, 1), generator=generator)
                draws = [index, noise, t, drop, flipped, offset]
                if prior_latents is not None:  # as many prior images as data images
                    draws += [torch.randint(0, len(prior_latents), (global_batch,), generator=generator),
                              torch.randn((global_batch, *latents.shape[1:]), generator=generator),
                              torch.randint(0, scheduler.config.num_train_timesteps, (global_batch,),
                                            generator=generator),
                              torch.randn((global_batch, latents.shape[1], 1, 1), generator=generator)]
                mine = slice(rank * recipe.batch_size, (rank + 1) * recipe.batch_size)
                batch = [v[mine].to(device) for v in draws]
                with accelerator.accumulate(unet):
                    loss = compute_loss(*batch)
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"the loss became {loss.item()} at step {step + 1} (learning rate {lr:.2e}); training "
                            f"stopped and the last good checkpoint (step {last_saved}) is kept: lower the learning "
                            f"rate (--lr) and rerun")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and recipe.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, recipe.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
            step += 1
            if ema is not None:
                ema_update(base_unet, ema, step, recipe.ema_decay)
            value = sum(losses) / len(losses)
            held = None
            if step % recipe.eval_every == 0 or step == recipe.steps:
                held = _heldout_loss(unet, text_encoder, heldout, prediction_type, alphas, recipe)
                unet.train()
            history.append([step, value, lr, held])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", **({"heldout": f"{held:.4f}"} if held is not None else {}))
            if progress is not None:
                progress(step, recipe.steps, value)
            if step % recipe.checkpoint_every == 0 and step < recipe.steps:
                _save(accelerator, checkpoint_path, base_unet, text_encoder, ema, opt, step, generator, history,
                      objective, recipe)
                last_saved = step
            if main_process and recipe.preview_every and step % recipe.preview_every == 0 and step < recipe.steps:
                result.preview = _previews(pipe, base_unet, prompts, recipe, ema, base_images, output, step)
                _write_curves(output, history)
                unet.train()
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        _save(accelerator, checkpoint_path, base_unet, text_encoder, ema, opt, step, generator, history, objective,
              recipe)
        if main_process:
            _write_curves(output, history)
        log.info("stopped at step %d of %d; the checkpoint is saved: run the same command again to resume", step,
                 recipe.steps)
        result.step, result.stopped = step, True
        return result
    if bar is not None:
        bar.close()
    unet.eval()
    _save(accelerator, checkpoint_path, base_unet, text_encoder, ema, opt, step, generator, history, objective,
          recipe)
    if main_process:
        result.preview = _previews(pipe, base_unet, prompts, recipe, ema, base_images, output, step)
        _write_curves(output, history)
        result.files = _export(pipe, base_unet, text_encoder if recipe.text_encoder_lora else None, ema, recipe,
                               output, examples, history, time.time() - started)
    accelerator.wait_for_everyone()
    result.step = step
    return result


def _load_trainable(unet, text_encoder, state, recipe):
    if recipe.method == "lora":
        for model, key in ((unet, "unet"), (text_encoder, "text_encoder")):
            layers = lora_lib.lora_layers(model)
            with torch.no_grad():
                for name, (a, b) in state.get(key, {}).items():
                    layers[name].lora_A[lora_lib.ADAPTER].weight.copy_(a)
                    layers[name].lora_B[lora_lib.ADAPTER].weight.copy_(b)
    else:
        unet.load_state_dict(state["unet"])


def _save(accelerator, path, unet, text_encoder, ema, opt, step, generator, history, objective, recipe):
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = dict(step=step, optimizer=opt.state_dict(), generator=generator.get_state(), history=history,
                     objective=objective)
        if recipe.method == "lora":
            state["unet"] = {n: (a, b) for n, (a, b, _) in lora_lib.lora_weights(unet).items()}
            state["text_encoder"] = {n: (a, b) for n, (a, b, _) in lora_lib.lora_weights(text_encoder).items()}
        else:
            state["unet"], state["ema"] = unet.state_dict(), ema.state_dict()
        save_checkpoint(path, state)
    accelerator.wait_for_everyone()


def _heldout_batch(latents, ids_all, contexts, recipe, scheduler, device):
    """A fixed batch for the held-out loss: the first images at five fixed timesteps each, with fixed noise."""
    n = min(recipe.heldout_images, len(ids_all) - 1)
    if n == 0:
        return None
    generator = torch.Generator().manual_seed(12345)
    steps = scheduler.config.num_train_timesteps
    t = torch.tensor([int(steps * f) for f in (0.1, 0.3, 0.5, 0.7, 0.9)] * n)
    index = torch.arange(n).repeat_interleave(5)
    noise = torch.randn((len(index), *latents.shape[1:]), generator=generator)
    index = index.to(device)
    return dict(x0=latents[index], noise=noise.to(device), t=t.to(device), index=index, ids=ids_all[index],
                contexts=None if contexts is None else contexts[index])


@torch.no_grad()
def _heldout_loss(unet, text_encoder, batch, prediction_type, alphas, recipe) -> float | None:
    """The loss on a fixed batch (same images, noise and timesteps every time): it moves only when the model does.
    The images are training images, so it shows fitting, not generalisation; with few images that is the useful
    signal, and it is free of the batch-to-batch noise of the training loss."""
    if batch is None:
        return None
    unet.eval()
    xt, target = noised_and_target(prediction_type, alphas, batch["x0"], batch["noise"], batch["t"])
    context = batch["contexts"] if batch["contexts"] is not None else text_encoder(batch["ids"])[0]
    pred = unet(xt, batch["t"], context)
    return float(diffusion_loss(pred, target, prediction_type, alphas, batch["t"], recipe.snr_gamma))



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
