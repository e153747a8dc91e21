"""Every processor that reads cross-attention out of UNet_SD, and the machinery that swaps them in.

Capture. `ImageCraftPipeline(..., attention=True)` runs the sampling loop inside `capture(unet, ...)`, which swaps
a `RecordingProcessor` into every cross-attention layer (`attn2`) of UNet_SD through its processor hook and puts
the original ones back afterwards. The recorder computes softmax(QK^T / sqrt(d)) next to the usual fused
attention call, whose output it leaves untouched, so images are bit-identical with capture on or off. Only the
thread that asked records: other requests on a shared model run the plain maths meanwhile.

What is kept, per image and per layer, for the tokens the prompt actually used (start token, words, end token;
the padding up to 77 is dropped, which is what bounds memory, see `check_memory`; a prompt encoded in several
chunks keeps its first start token, every chunk's words and its last end token, at their `positions`):
- per step, the head-averaged map at the layer's own resolution, in fp16 (a time scrubber needs steps);
- per head, the sum over all steps, in fp32 (DAAM's recipe needs heads, see `aggregate`);
- the same for the unconditional half (the negative prompt's tokens) when guidance is on;
- per step, |eps_cond - eps_uncond| (where guidance acted) and the UNet's input (to re-run a step).

Faithfulness. `ablation` re-runs one recorded step with a word's keys removed (`AblationProcessor`) and compares
where the noise prediction changed with the word's map.

Training. `keep_cross_attention` installs `KeepingProcessor`, which keeps the head-averaged probabilities with
their gradients, for the shapes trainer's grounding loss.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import contextmanager

import torch
from einops import rearrange

from ..unet import CrossAttention, SDPAProcessor, UNet_SD
from .aggregate import check_steps, pearson
from .maps import AttentionMaps, Layer, Side

DEFAULT_MAX_MB = 2048  # attention kept for one call, all images; IMAGECRAFT_ATTENTION_MB overrides it


def block_of(name: str) -> str:
    return {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}[name.split(".")[0]]


def latent_sizes(h: int, w: int, levels: int) -> list[tuple[int, int]]:
    """(h, w) of the feature maps at each UNet level: stride-2 convs round odd sizes up."""
    sizes = [(h, w)]
    for _ in range(levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def level_of(unet: UNet_SD, name: str) -> int:
    """The UNet level (0 = full latent resolution) of an attention layer, from its block's position."""
    cfg = unet.config
    kind, index = name.split(".")[:2]
    levels = len(cfg.channel_mult)
    if kind == "middle_block":
        return levels - 1
    index = int(index)
    if kind == "input_blocks":  # conv_in, then per level num_res_blocks blocks and a DownSample
        return (index - 1) // (cfg.num_res_blocks + 1)
    return levels - 1 - index // (cfg.num_res_blocks + 1)  # output_blocks: deepest level first


def cross_attention_layers(unet: UNet_SD) -> dict[str, CrossAttention]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, CrossAttention) and name.endswith("attn2")}


# --- swapping processors, one thread at a time ------------------------------------------------------------------
_swap_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_swap_guard = threading.Lock()


class OwnedProcessor:
    """A processor that does its own work only for the thread that installed it; every other thread (another
    request on the same shared model) gets the processor that was there before."""

    def __init__(self, inner):
        self.inner = inner
        self.owner = threading.get_ident()

    def __call__(self, attn, x, context=None):
        if threading.get_ident() != self.owner:
            return self.inner(attn, x, context)
        return self.run(attn, x, context)

    def run(self, attn, x, context):
        raise NotImplementedError


@contextmanager
def swapped(unet: UNet_SD, make: dict):
    """Installs `make[name](original)` on the named attention layers (cross-attention `attn2`, or self-attention
    `attn1` for an edit) for the duration of the block. Swaps on one UNet are serialised; the originals come back
    even when the block raises."""
    with _swap_guard:
        lock = _swap_locks.setdefault(unet, threading.Lock())
    with lock:
        layers = {name: m for name, m in unet.named_modules() if isinstance(m, CrossAttention)}
        originals = {name: layers[name].processor for name in make}
        try:
            for name, factory in make.items():
                layers[name].processor = factory(originals[name])
            yield
        finally:
            for name, processor in originals.items():
                layers[name].processor = processor


# --- recording ---------------------------------------------------------------------------------------------------
def probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention probabilities softmax(q k^T / sqrt(dim_head)) of projected queries and keys (B, heads, N or M,
    dim_head): (B, heads, N, M), each query's distribution over the keys."""
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)


class RecordingProcessor(OwnedProcessor):
    def __init__(self, inner, recorder: "Recorder", index: int):
        super().__init__(inner)
        self.recorder, self.index = recorder, index

    def run(self, attn, x, context):
        q, k, v = attn.qkv(x, context)  # (N, heads, HW or M, dim_head)
        self.recorder.record(self.index, q, k)
        return SDPAProcessor.attend(attn, q, k, v)


class Recorder:
    """Collects one pipeline call's cross-attention, per side (0: the prompts, 1: the negative prompts); see the
    module docstring for what is kept."""

    def __init__(self, layers: list[Layer], keep: tuple[list, list], guided: bool):
        # keep: per side, per image, the context positions kept (a slice from 0, or a list for chunked prompts)
        self.layers, self.guided = layers, guided
        self.keep = tuple([k if isinstance(k, slice) else torch.as_tensor(k) for k in side] for side in keep)
        self.by_hw = {layer.size[0] * layer.size[1]: layer.size for layer in layers}
        n = len(keep[0])
        self.steps = [[[[] for _ in layers] for _ in range(n)] for _ in keep]  # side, image, layer: [(T, h, w)] fp16
        self.sums = [[[None] * len(layers) for _ in range(n)] for _ in keep]  # side, image, layer: (heads, T, h, w)
        self.timesteps: list[int] = []
        self.inputs: list[torch.Tensor] = []  # per step (B, C, h, w): the conditional half of the UNet's input
        self.guidance: list[torch.Tensor] = []  # per step (B, h, w): |eps_cond - eps_uncond| over channels
        self.owner = threading.get_ident()

    def before_unet(self, module, args):
        if threading.get_ident() != self.owner:
            return
        x, t = args[0], args[1]
        batch = len(self.keep[0])
        self.timesteps.append(int(torch.as_tensor(t).reshape(-1)[0]))
        self.inputs.append(x[-batch:].detach().float().cpu())

    def after_unet(self, module, args, out):
        if threading.get_ident() != self.owner or not self.guided:
            return
        uncond, cond = out.float().chunk(2)
        self.guidance.append((cond - uncond).norm(dim=1).half().cpu())

    def record(self, index: int, q: torch.Tensor, k: torch.Tensor):
        h, w = self.by_hw[q.shape[2]]
        probs = probabilities(q.float(), k.float())  # (N, heads, HW, M)
        probs = rearrange(probs, "n heads (h w) m -> n heads m h w", h=h, w=w)
        batch = len(self.keep[0])
        cond = probs[batch:] if self.guided else probs  # the context is [negative prompts, prompts] under CFG
        for i in range(batch):
            self._add(0, i, index, cond[i, :, self._at(0, i, probs.device)])
            if self.guided:
                self._add(1, i, index, probs[i, :, self._at(1, i, probs.device)])

    def _at(self, side: int, image: int, device) -> slice | torch.Tensor:
        keep = self.keep[side][image]
        if isinstance(keep, torch.Tensor) and keep.device != device:
            keep = self.keep[side][image] = keep.to(device)
        return keep

    def _add(self, side: int, image: int, index: int, maps: torch.Tensor):
        """maps: (heads, T, h, w) of one image at one step."""
        self.steps[side][image][index].append(maps.mean(0).half().cpu())
        sums = self.sums[side][image]
        sums[index] = maps.clone() if sums[index] is None else sums[index].add_(maps)

    def maps(self, prompts: list[str], negative_prompt: str, tokens: list[list[str]],
             negative_tokens: list[list[str]], positions: tuple[list, list], latent_size: tuple[int, int],
             image_size: tuple[int, int], missing: list[str], truncated: list[int] | None = None) -> list[AttentionMaps]:
        """One `AttentionMaps` per image of what was recorded (see `capture` for the arguments)."""
        out = []
        for i in range(len(tokens)):
            if any(len(steps) != len(self.timesteps) for steps in self.steps[0][i]):
                raise RuntimeError("attention capture saw a different number of calls per layer than UNet steps")
            sides = (self.side(0, i, prompts[i], tokens[i], positions[0][i]),
                     self.side(1, i, negative_prompt, negative_tokens[i], positions[1][i]))
            guidance = torch.stack([g[i] for g in self.guidance]).numpy() if self.guidance else None
            out.append(AttentionMaps(sides, self.layers, self.timesteps, latent_size, image_size, guidance=guidance,
                                     inputs=torch.stack([x[i] for x in self.inputs]).numpy(),
                                     missing_layers=missing, truncated=truncated[i] if truncated else 0))
        return out

    def side(self, side: int, image: int, text: str, tokens: list[str], positions: list[int] | None = None) -> Side:
        """One image's maps of one side as numpy; without maps when that side was not recorded (guidance off)."""
        if side and not self.guided:
            return Side(text, tokens, None, None, positions)
        return Side(text, tokens, [torch.stack(s).numpy() for s in self.steps[side][image]],
                    [s.float().cpu().numpy() for s in self.sums[side][image]], positions)


@contextmanager
def capture(unet: UNet_SD, tokens: list[list[str]], negative_tokens: list[list[str]], guided: bool,
            latent_size: tuple[int, int], image_size: tuple[int, int], prompts: list[str], negative_prompt: str,
            truncated: list[int] | None = None, positions: tuple[list, list] | None = None):
    """Records cross-attention during the block; yields a list that holds one `AttentionMaps` per image after it.

    `tokens[i]` are image i's prompt tokens as the text encoder saw them (start and end tokens included), and
    `negative_tokens[i]` its negative prompt's. `positions` (prompts', negative prompts') give where each token
    sits in the context, for prompts encoded in chunks; by default token j is at position j. Raises ValueError
    when no layer can be captured; layers whose processor someone replaced are skipped and named in each result's
    `missing_layers`.
    """
    layers_by_name = cross_attention_layers(unet)
    captured, skipped = [], []
    for name, module in layers_by_name.items():
        if type(module.processor) is SDPAProcessor:
            captured.append(name)
        else:
            skipped.append(name)
    if not captured:
        raise ValueError(f"no cross-attention layer can be captured: every attn2 processor was replaced "
                         f"({type(layers_by_name[skipped[0]].processor).__name__} on {skipped[0]}, ...); "
                         f"set UNet_SD's SDPAProcessor back to see attention maps")
    if positions is None:
        positions = ([list(range(len(t))) for t in tokens], [list(range(len(t))) for t in negative_tokens])
    recorder = new_recorder(unet, captured, guided, latent_size, positions)
    out: list[AttentionMaps] = []
    make = {name: (lambda inner, i=i: RecordingProcessor(inner, recorder, i)) for i, name in enumerate(captured)}
    pre = unet.register_forward_pre_hook(recorder.before_unet)
    post = unet.register_forward_hook(recorder.after_unet)
    try:
        with swapped(unet, make):
            yield out
    finally:
        pre.remove()
        post.remove()
    out += recorder.maps(prompts, negative_prompt, tokens, negative_tokens, positions, latent_size, image_size,
                         skipped, truncated)


def new_recorder(unet: UNet_SD, names: list[str], guided: bool, latent_size: tuple[int, int],
                 positions: tuple[list, list]) -> Recorder:
    """A Recorder of the named cross-attention layers, keeping per side and image the context `positions` given
    (a Prompt-to-Prompt edit records its target's pass with one)."""
    layers_by_name = cross_attention_layers(unet)
    sizes = latent_sizes(*latent_size, len(unet.config.channel_mult))
    layers = [Layer(name, block_of(name), sizes[level_of(unet, name)], layers_by_name[name].heads) for name in names]
    keep = tuple([slice(0, len(p)) if p == list(range(len(p))) else p for p in side] for side in positions)
    return Recorder(layers, keep, guided)


def check_memory(num_images: int, steps: int, tokens: list[list[str]], negative_tokens: list[list[str]],
                 guided: bool, unet: UNet_SD, latent_size: tuple[int, int], max_mb: float | None = None) -> float:
    """The MB that capture will keep for this call; ValueError with the limit when it is over it."""
    sizes = latent_sizes(*latent_size, len(unet.config.channel_mult))
    per_token_step, per_token_sums = 0, 0
    for name, module in cross_attention_layers(unet).items():
        h, w = sizes[level_of(unet, name)]
        per_token_step += h * w * 2  # fp16 step maps
        per_token_sums += module.heads * h * w * 4  # fp32 head sums
    n_tok = sum(len(t) + (len(n) if guided else 0) for t, n in zip(tokens, negative_tokens))
    per_image_step = sizes[0][0] * sizes[0][1] * (unet.config.in_channels * 4 + 2)  # UNet input, CFG difference
    mb = (n_tok * (per_token_step * steps + per_token_sums) + num_images * per_image_step * steps) / 2**20
    limit = max_mb if max_mb is not None else float(os.environ.get("IMAGECRAFT_ATTENTION_MB", DEFAULT_MAX_MB))
    if mb > limit:
        raise ValueError(f"attention maps for {num_images} image(s) at {latent_size[1]}x{latent_size[0]} "
                         f"latents and {steps} steps would take {mb:.0f} MB, over the limit of {limit:.0f} MB "
                         f"(IMAGECRAFT_ATTENTION_MB); use fewer images, steps or a smaller size")
    return mb


# --- training: the grounding loss reads the maps with their gradients ---------------------------------------------
class KeepingProcessor:
    """Cross-attention that keeps its probabilities, averaged over heads as the attention maps show them
    ((B, pixels, tokens), with their gradients), in a list; the output is plain softmax attention over them."""

    def __init__(self, kept: list):
        self.kept = kept

    def __call__(self, attn, x, context=None):
        q, k, v = attn.qkv(x, context)  # (B, heads, pixels or tokens, dim_head)
        probs = probabilities(q, k)  # (B, heads, pixels, tokens)
        self.kept.append(probs.mean(dim=1))
        return attn.out((probs @ v).to(v.dtype))


def keep_cross_attention(unet: UNet_SD) -> list:
    """Installs KeepingProcessor on every cross-attention layer of `unet` for good; returns the list it fills,
    one (B, pixels, tokens) tensor per layer and forward, in call order (the caller clears it)."""
    kept = []
    for layer in cross_attention_layers(unet).values():
        layer.processor = KeepingProcessor(kept)
    return kept


# --- faithfulness: does the model use what the map shows? ----------------------------------------------------------
class AblationProcessor(OwnedProcessor):
    """Cross-attention with some keys removed (their scores set to -inf), for the faithfulness check."""

    def __init__(self, inner, drop: list[int]):
        super().__init__(inner)
        self.drop = drop

    def run(self, attn, x, context):
        q, k, v = attn.qkv(x, context)
        upcast = attn.upcast and q.dtype == torch.float16
        mask = torch.zeros(1, k.shape[-2], dtype=torch.float32 if upcast else q.dtype, device=q.device)
        mask[:, self.drop] = float("-inf")  # (1, M), broadcast over batch, heads and queries
        return SDPAProcessor.attend(attn, q, k, v, mask)


@torch.inference_mode()
def ablation(pipe, maps: AttentionMaps, word: str, step: int | None = None) -> dict:
    """Re-runs one sampling step with `word`'s keys removed from every cross-attention layer and returns where
    the noise prediction changed (`change`, (H, W)), the word's map at that step (`attention`) and their Pearson
    correlation: a map that shows what the model used correlates with the change it causes."""
    if maps.inputs is None:
        raise ValueError("these maps carry no UNet inputs to re-run (saved without them)")
    step = maps.num_steps // 2 if step is None else step
    check_steps(step, maps.num_steps)
    side = maps.sides[0]
    indices = [side.positions[i] for i in maps.token_indices(word)]  # where the word's tokens sit in the context
    # as many chunks as the generation's context had: the longer of the prompt and the negative prompt
    chunks = 1 + max(s.positions[-1] for s in maps.sides[:1 + maps.guided]) // pipe.tokenizer.model_max_length
    context, _ = pipe.encode_prompt([maps.prompt], chunks)
    x = torch.from_numpy(maps.inputs[step][None]).to(pipe.device, pipe.dtype)
    t = maps.timesteps[step]
    unet = pipe.unet
    full = unet(x, t, context).float()
    names = [l.name for l in maps.layers]
    with swapped(unet, {name: (lambda inner: AblationProcessor(inner, indices)) for name in names}):
        ablated = unet(x, t, context).float()
    change = (full - ablated).norm(dim=1)[0].cpu()  # (h, w)
    change_img = maps.to_image_size(change)
    attention = maps.word(word, steps=(step, step + 1))
    r = pearson(change_img, attention)
    return dict(change=change_img, attention=attention, correlation=r, step=step, timestep=t)
