"""Cross-attention maps: which pixels each word of the prompt attended to while the image was drawn.

Capture. `ImageCraftPipeline(..., attention=True)` runs the sampling loop inside `capture(unet, ...)`, which swaps
a recording processor into every cross-attention layer (`attn2`) of UNet_SD through its processor hook and puts
the original ones back afterwards. The recorder computes softmax(QK^T / sqrt(d)) next to the usual fused
attention call, whose output it leaves untouched, so images are bit-identical with capture on or off. Only the
thread that asked records: other requests on a shared model run the plain maths meanwhile.

What is kept, per image and per layer, for the tokens the prompt actually used (start token, words, end token;
the padding up to 77 is dropped, which is what bounds memory):
- per step, the head-averaged map at the layer's own resolution, in fp16 (a time scrubber needs steps);
- per head, the sum over all steps, in fp32 (DAAM's recipe needs heads);
- the same for the unconditional half (the negative prompt's tokens) when guidance is on;
- per step, |eps_cond - eps_uncond| (where guidance acted) and the UNet's input (to re-run a step).

Aggregation, by default DAAM's recipe (Tang et al., "What the DAAM", ACL 2023, https://arxiv.org/abs/2210.04885;
castorini/daam `compute_global_heat_map`):
1. cross-attention of the down and up blocks, not the middle block;
2. maps whose side is 1/64 of the image side (8x8 at 512 px) skipped;
3. every head, summed over all steps;
4. each (layer, head) map bicubic-upsampled to the latent grid and clamped at 0;
5. all (layer, head) maps averaged with equal weight;
6. a word is the mean of its tokens (every occurrence; token i of the prompt is map i + 1, after the start token);
7. bicubic to the image size.
Filters narrow any step: `blocks`, `resolutions`, `layers`, `heads`, `steps`, `negative`. With a `steps` range
the per-step maps are used; they are head-averaged, so the clamp of step 4 comes after the head mean there.
"""

from __future__ import annotations

import json
import math
import os
import threading
import weakref
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from ..files import atomic_write
from ..unet import CrossAttention, SDPAProcessor, UNet_SD

START, END = "<start>", "<end>"
BLOCKS = ("down", "mid", "up")
DEFAULT_BLOCKS = ("down", "up")
DEFAULT_MAX_MB = 2048  # attention kept for one call, all images; IMAGECRAFT_ATTENTION_MB overrides it


@dataclass(frozen=True)
class Layer:
    """One cross-attention layer as recorded."""

    name: str  # module name in UNet_SD, e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    block: str  # "down", "mid" or "up"
    size: tuple[int, int]  # (h, w) of its maps
    heads: int


def block_of(name: str) -> str:
    return {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}[name.split(".")[0]]


def latent_sizes(h: int, w: int, levels: int) -> list[tuple[int, int]]:
    """(h, w) of the feature maps at each UNet level: stride-2 convs round odd sizes up."""
    sizes = [(h, w)]
    for _ in range(levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


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
    """Installs `make[name](original)` on the named cross-attention layers for the duration of the block. Swaps on
    one UNet are serialised; the originals come back even when the block raises."""
    with _swap_guard:
        lock = _swap_locks.setdefault(unet, threading.Lock())
    with lock:
        layers = cross_attention_layers(unet)
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
    """Collects one pipeline call's cross-attention; see the module docstring for what is kept."""

    def __init__(self, layers: list[Layer], keep: list[int], keep_negative: list[int], guided: bool):
        self.layers, self.keep, self.keep_negative, self.guided = layers, keep, keep_negative, guided
        self.by_hw = {layer.size[0] * layer.size[1]: layer.size for layer in layers}
        n = len(keep)
        self.steps = [[[] for _ in layers] for _ in range(n)]  # image -> layer -> per-step (T, h, w) fp16
        self.sums = [[None] * len(layers) for _ in range(n)]  # image -> layer -> (heads, T, h, w) fp32
        self.neg_steps = [[[] for _ in layers] for _ in range(n)]
        self.neg_sums = [[None] * len(layers) for _ in range(n)]
        self.timesteps: list[int] = []
        self.inputs: list[torch.Tensor] = []  # per step (B, C, h, w): the conditional half of the UNet's input
        self.guidance: list[torch.Tensor] = []  # per step (B, h, w): |eps_cond - eps_uncond| over channels
        self.owner = threading.get_ident()

    def before_unet(self, module, args):
        if threading.get_ident() != self.owner:
            return
        x, t = args[0], args[1]
        batch = len(self.keep)
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
        batch = len(self.keep)
        cond = probs[batch:] if self.guided else probs  # the context is [negative prompts, prompts] under CFG
        for i in range(batch):
            self._add(self.steps[i][index], self.sums[i], index, cond[i, :, : self.keep[i]])
            if self.guided:
                self._add(self.neg_steps[i][index], self.neg_sums[i], index, probs[i, :, : self.keep_negative[i]])

    @staticmethod
    def _add(steps: list, sums: list, index: int, maps: torch.Tensor):
        """maps: (heads, T, h, w) of one image at one step."""
        steps.append(maps.mean(0).half().cpu())
        sums[index] = maps.clone() if sums[index] is None else sums[index].add_(maps)


@contextmanager
def capture(unet: UNet_SD, tokens: list[list[str]], negative_tokens: list[list[str]], guided: bool,
            latent_size: tuple[int, int], image_size: tuple[int, int], prompts: list[str], negative_prompt: str,
            truncated: list[int] | None = None):
    """Records cross-attention during the block; yields a list that holds one `AttentionMaps` per image after it.

    `tokens[i]` are image i's prompt tokens as the text encoder saw them (start and end tokens included), and
    `negative_tokens[i]` its negative prompt's. Raises ValueError when no layer can be captured; layers whose
    processor someone replaced are skipped and named in each result's `missing_layers`.
    """
    layers_by_name = cross_attention_layers(unet)
    sizes = latent_sizes(*latent_size, len(unet.config.channel_mult))
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
    layers = []
    for name in captured:
        level = _level_of(unet, name)
        layers.append(Layer(name, block_of(name), sizes[level], layers_by_name[name].heads))

    recorder = Recorder(layers, [len(t) for t in tokens], [len(t) for t in negative_tokens], guided)
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
    for i in range(len(tokens)):
        out.append(AttentionMaps.from_recorder(recorder, i, tokens[i], negative_tokens[i], prompts[i],
                                               negative_prompt, latent_size, image_size, skipped,
                                               truncated[i] if truncated else 0))


def check_memory(num_images: int, steps: int, tokens: list[list[str]], negative_tokens: list[list[str]],
                 guided: bool, unet: UNet_SD, latent_size: tuple[int, int], max_mb: float | None = None) -> float:
    """The MB that capture will keep for this call; ValueError with the limit when it is over it."""
    sizes = latent_sizes(*latent_size, len(unet.config.channel_mult))
    per_token_step, per_token_sums = 0, 0
    for name, module in cross_attention_layers(unet).items():
        h, w = sizes[_level_of(unet, name)]
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


def _level_of(unet: UNet_SD, name: str) -> int:
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


# --- the maps ------------------------------------------------------------------------------------------------------
@cache
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE (GPT-2's, CLIP's) writes each byte as one printable character; this maps them back, so that
    a token of an emoji or an accented letter reads as the text it came from."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def decode_piece(text: str) -> str:
    """The text a (merged) byte-level BPE piece stands for; left as it is when it is not one."""
    decoder = _byte_decoder()
    if not all(ch in decoder for ch in text):
        return text
    return bytes(decoder[ch] for ch in text).decode("utf-8", errors="replace")


def display_token(token: str, index: int, count: int) -> str:
    if index == 0:
        return START
    if index == count - 1 and token.startswith("<|end"):
        return END
    return decode_piece(token.replace("</w>", ""))


def group_words(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """(word, token indices) for each word of a tokenised prompt: BPE pieces are merged up to the one that ends
    the word ("</w>"). Indices count the start token, which is not part of any word."""
    words, piece, indices = [], "", []
    for i, token in enumerate(tokens[1:-1], start=1):
        piece += token.replace("</w>", "")
        indices.append(i)
        if token.endswith("</w>"):
            words.append((decode_piece(piece), indices))
            piece, indices = "", []
    if indices:  # truncated in the middle of a word
        words.append((decode_piece(piece), indices))
    return words


def word_indices(tokens: list[str], word: str, what: str = "prompt", truncated: int = 0) -> list[int]:
    """Indices into `tokens` (as the tokenizer split the prompt, start token first) of every occurrence of `word`
    (one or more words, any case); "<start>" and "<end>" name the special tokens. ValueError listing the
    prompt's words when it is not there."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"a word must be a non-empty string, got {word!r}")
    text = word.strip().lower()
    if text in (START, END):
        return [0] if text == START else [len(tokens) - 1]
    words = group_words(tokens)
    wanted = text.split()
    found = []
    for start in range(len(words) - len(wanted) + 1):
        if [w.lower() for w, _ in words[start:start + len(wanted)]] == wanted:
            found += [i for _, indices in words[start:start + len(wanted)] for i in indices]
    if not found:
        listed = ", ".join(dict.fromkeys(w for w, _ in words)) or "(none)"
        more = f" ({truncated} tokens past the text encoder's limit were dropped)" if truncated else ""
        raise ValueError(f"{word!r} is not in the {what}; its words are: {listed}{more}")
    return found


class AttentionMaps:
    """The cross-attention of one generated image; see the module docstring for the default aggregation.

    `tokens` are the prompt's tokens as the tokenizer split them, "<start>" and "<end>" included; `words()` the
    words they make. `word(w, **filters)` and `token(i, **filters)` give (H, W) float arrays at the image's size.
    Filters: `blocks` ("down", "mid", "up"; default down and up), `resolutions` (map heights in cells, e.g. 64,
    32, 16, 8 at 512 px SD1.5; default all but those 1/64 of the image), `layers` (module names, overriding both),
    `heads` (int or ints), `steps` ((start, stop) over sampling steps), `negative` (the negative prompt's maps).
    """

    def __init__(self, prompt: str, negative_prompt: str, tokens: list[str], negative_tokens: list[str],
                 layers: list[Layer], step_maps: list[np.ndarray], head_sums: list[np.ndarray],
                 neg_step_maps: list[np.ndarray] | None, neg_head_sums: list[np.ndarray] | None,
                 timesteps: list[int], latent_size: tuple[int, int], image_size: tuple[int, int],
                 guidance: np.ndarray | None = None, inputs: np.ndarray | None = None,
                 missing_layers: list[str] | None = None, truncated: int = 0):
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.raw_tokens, self.raw_negative_tokens = list(tokens), list(negative_tokens)
        self.tokens = [display_token(t, i, len(tokens)) for i, t in enumerate(tokens)]
        self.negative_tokens = [display_token(t, i, len(negative_tokens)) for i, t in enumerate(negative_tokens)]
        self.layers = list(layers)
        self.step_maps, self.head_sums = step_maps, head_sums  # per layer (S, T, h, w) fp16, (heads, T, h, w) fp32
        self.neg_step_maps, self.neg_head_sums = neg_step_maps, neg_head_sums
        self.timesteps = list(timesteps)
        self.latent_size, self.image_size = tuple(latent_size), tuple(image_size)  # (h, w) each
        self.guidance, self.inputs = guidance, inputs  # (S, h, w) fp16, (S, C, h, w) fp32
        self.missing_layers = list(missing_layers or [])
        self.truncated = truncated  # prompt tokens dropped past the text encoder's limit

    @classmethod
    def from_recorder(cls, rec: Recorder, i: int, tokens, negative_tokens, prompt, negative_prompt, latent_size,
                      image_size, missing, truncated=0) -> "AttentionMaps":
        if any(len(steps) != len(rec.timesteps) for steps in rec.steps[i]):
            raise RuntimeError("attention capture saw a different number of calls per layer than UNet steps")
        stack = lambda steps: [torch.stack(s).numpy() for s in steps]  # noqa: E731
        sums = lambda sums: [s.float().cpu().numpy() for s in sums]  # noqa: E731
        return cls(prompt, negative_prompt, tokens, negative_tokens, rec.layers, stack(rec.steps[i]),
                   sums(rec.sums[i]), stack(rec.neg_steps[i]) if rec.guided else None,
                   sums(rec.neg_sums[i]) if rec.guided else None, rec.timesteps, latent_size, image_size,
                   torch.stack([g[i] for g in rec.guidance]).numpy() if rec.guidance else None,
                   torch.stack([x[i] for x in rec.inputs]).numpy(), missing, truncated)

    # --- what there is --------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def guided(self) -> bool:
        return self.neg_head_sums is not None

    def words(self, negative: bool = False) -> list[str]:
        """The prompt's words in order, each once."""
        seen = []
        for word, _ in group_words(self.raw_negative_tokens if negative else self.raw_tokens):
            if word not in seen:
                seen.append(word)
        return seen

    def token_indices(self, word: str, negative: bool = False) -> list[int]:
        """Indices into `tokens` of every occurrence of `word` (one or more words, any case); "<start>" and
        "<end>" name the special tokens."""
        if negative and not self.guided:
            raise ValueError("there are no negative-prompt maps: guidance was off (CFG scale <= 1)")
        tokens = self.raw_negative_tokens if negative else self.raw_tokens
        return word_indices(tokens, word, "negative prompt" if negative else "prompt", self.truncated)

    # --- aggregation ------------------------------------------------------------------------------------------------
    def select_layers(self, blocks=None, resolutions=None, layers=None) -> list[int]:
        """Indices into `self.layers` that the filters keep; ValueError naming what exists when none does."""
        if layers is not None:
            names = [layers] if isinstance(layers, str) else list(layers) if isinstance(layers, (list, tuple)) else None
            known = [l.name for l in self.layers]
            if names is None or not all(isinstance(n, str) for n in names):
                raise ValueError(f"layers must be module names (strings), got {layers!r}; captured: {', '.join(known)}")
            unknown = [n for n in names if n not in known]
            if unknown or not names:
                raise ValueError(f"no captured layer named {unknown or names}; captured: {', '.join(known)}")
            chosen = [known.index(n) for n in names]
        else:
            if blocks is not None and not isinstance(blocks, (str, list, tuple)):
                raise ValueError(f"blocks must be some of {', '.join(BLOCKS)}, got {blocks!r}")
            blocks = DEFAULT_BLOCKS if blocks is None else ((blocks,) if isinstance(blocks, str) else tuple(blocks))
            bad = [b for b in blocks if b not in BLOCKS]
            if bad or not blocks:
                raise ValueError(f"blocks must be some of {', '.join(BLOCKS)}, got {list(blocks)}")
            if resolutions is None:
                chosen = [i for i, l in enumerate(self.layers) if l.block in blocks
                          and l.size[0] * 64 != self.image_size[0]]  # DAAM skips maps 1/64 of the image side
            else:
                resolutions = [resolutions] if not isinstance(resolutions, (list, tuple)) else list(resolutions)
                if not resolutions or not all(_is_int(r) for r in resolutions):
                    raise ValueError(f"resolutions must be map heights in cells (integers), got {resolutions!r}")
                chosen = [i for i, l in enumerate(self.layers) if l.block in blocks and l.size[0] in resolutions]
            if not chosen:
                have = sorted({(l.block, l.size[0]) for l in self.layers})
                raise ValueError(f"no captured layer in blocks {list(blocks)} at resolutions {resolutions}; there "
                                 f"are: {', '.join(f'{b} {r}' for b, r in have)}")
        return chosen

    def _check_steps(self, steps) -> tuple[int, int]:
        pair = (steps, steps + 1) if _is_int(steps) else tuple(steps) if isinstance(steps, (list, tuple)) else ()
        if len(pair) != 2 or not all(_is_int(v) for v in pair):
            raise ValueError(f"steps must be a step index or a (start, stop) range of integers, got {steps!r}")
        start, stop = int(pair[0]), int(pair[1])
        if not 0 <= start < stop <= self.num_steps:
            raise ValueError(f"steps {start}..{stop} are outside the {self.num_steps} sampling steps "
                             f"(give 0 <= start < stop <= {self.num_steps})")
        return start, stop

    def _check_heads(self, heads, chosen) -> list[int] | None:
        if heads is None:
            return None
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads]
        fewest = min(self.layers[i].heads for i in chosen)
        if not heads or any(not _is_int(h) or not 0 <= h < fewest for h in heads):
            raise ValueError(f"heads must be indices from 0 to {fewest - 1} (the selected layers have {fewest} "
                             f"or more), got {heads}")
        return [int(h) for h in heads]

    def latent_maps(self, indices: list[int], *, negative=False, blocks=None, resolutions=None, layers=None,
                    heads=None, steps=None, per_layer=False) -> torch.Tensor:
        """Aggregated maps of the given token indices on the latent grid: (len(indices), h, w), or per selected
        (layer, head) (n, len(indices), h, w) with `per_layer`."""
        if negative and not self.guided:
            raise ValueError("there are no negative-prompt maps: guidance was off (CFG scale <= 1)")
        sums = self.neg_head_sums if negative else self.head_sums
        step_maps = self.neg_step_maps if negative else self.step_maps
        count = len(self.negative_tokens if negative else self.tokens)
        if any(not 0 <= i < count for i in indices):
            raise ValueError(f"token index out of range: the {'negative ' if negative else ''}prompt has "
                             f"{count} tokens (0..{count - 1}), got {indices}")
        chosen = self.select_layers(blocks, resolutions, layers)
        heads = self._check_heads(heads, chosen)
        if steps is not None and heads is not None:
            raise ValueError("heads and steps cannot be combined: per-step maps are kept head-averaged")
        up, weights = [], []
        for i in chosen:
            if steps is None:
                maps = torch.from_numpy(sums[i][:, indices])  # (heads, k, h, w)
                if heads is not None:
                    maps = maps[heads]
                weights += [1.0] * maps.shape[0]
            else:
                start, stop = self._check_steps(steps)
                maps = torch.from_numpy(step_maps[i][start:stop, indices]).float().sum(0, keepdim=True)
                weights.append(float(self.layers[i].heads))  # a head-averaged map stands for all its heads
            maps = F.interpolate(maps, size=self.latent_size, mode="bicubic").clamp_(min=0)
            up.append(maps)
        stacked = torch.cat(up)  # (layer-heads, k, h, w)
        if per_layer:
            return stacked
        w = torch.tensor(weights)[:, None, None, None]
        return (stacked * w).sum(0) / w.sum()

    def to_image_size(self, maps: torch.Tensor) -> np.ndarray:
        """(..., h, w) latent-grid maps bicubic to (..., H, W)."""
        lead = maps.shape[:-2]
        out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]), size=self.image_size, mode="bicubic")
        return out.reshape(*lead, *self.image_size).numpy()

    def token(self, index: int, normalize: bool = False, **filters) -> np.ndarray:
        """The (H, W) map of token `index` (0 is the start token, len(tokens) - 1 the end token)."""
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise ValueError(f"a token index must be an integer, got {index!r}")
        return _normalized(self.to_image_size(self.latent_maps([int(index)], **filters)[0]), normalize)

    def word(self, word: str, normalize: bool = False, **filters) -> np.ndarray:
        """The (H, W) map of `word`: the mean of its tokens' maps over every occurrence."""
        indices = self.token_indices(word, filters.get("negative", False))
        return _normalized(self.to_image_size(self.latent_maps(indices, **filters).mean(0)), normalize)

    def all_tokens(self, **filters) -> np.ndarray:
        """(T, H, W): every token's map."""
        count = len(self.negative_tokens if filters.get("negative") else self.tokens)
        return self.to_image_size(self.latent_maps(list(range(count)), **filters))

    def at(self, x: int, y: int, **filters) -> dict[str, float]:
        """How the attention at pixel (x, y) splits over the prompt's tokens (values sum to 1)."""
        h, w = self.image_size
        if not (_is_int(x) and _is_int(y) and 0 <= x < w and 0 <= y < h):
            raise ValueError(f"a pixel must be integers x in 0..{w - 1} and y in 0..{h - 1}, got ({x!r}, {y!r})")
        values = np.clip(self.all_tokens(**filters)[:, y, x], 0, None)
        values = values / max(values.sum(), 1e-12)
        names = self.negative_tokens if filters.get("negative") else self.tokens
        return {f"{i}:{name}": float(v) for i, (name, v) in enumerate(zip(names, values))}

    def segment(self, words: list[str], threshold: float = 0.4, **filters) -> np.ndarray:
        """(H, W) ints: per pixel the index into `words` of the strongest word, -1 where no word's map reaches
        `threshold` of its own maximum (DAAM's tau)."""
        if not words or isinstance(words, str):
            raise ValueError(f"segment needs a list of words, got {words!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a number between 0 and 1, got {threshold!r}")
        maps = np.stack([self.word(w, normalize=True, **filters) for w in words])
        labels = maps.argmax(0)
        labels[maps.max(0) < threshold] = -1
        return labels

    # --- beyond the anchors ----------------------------------------------------------------------------------------
    def layer_stats(self, word: str, **filters) -> list[dict]:
        """Per selected (layer, head): the spatial entropy of the word's map (0 = one cell, 1 = uniform) and its
        Pearson correlation with the consensus map (the mean over all of them)."""
        filters = {k: v for k, v in filters.items() if k not in ("steps", "per_layer")}
        indices = self.token_indices(word, filters.get("negative", False))
        maps = self.latent_maps(indices, per_layer=True, **filters).mean(1)  # (layer-heads, h, w)
        consensus = maps.mean(0).flatten()
        chosen = self.select_layers(filters.get("blocks"), filters.get("resolutions"), filters.get("layers"))
        heads = self._check_heads(filters.get("heads"), chosen)
        labels = [(self.layers[i].name, h) for i in chosen for h in (heads or range(self.layers[i].heads))]
        stats = []
        for (name, head), m in zip(labels, maps):
            stats.append(dict(layer=name, head=head, entropy=spatial_entropy(m), correlation=pearson(m, consensus)))
        return stats

    def cfg_difference(self, steps=None) -> np.ndarray:
        """(H, W): where classifier-free guidance acted, |eps_cond - eps_uncond| over channels, mean over steps."""
        if self.guidance is None:
            raise ValueError("there is no CFG difference: guidance was off (CFG scale <= 1)")
        start, stop = (0, self.num_steps) if steps is None else self._check_steps(steps)
        mean = torch.from_numpy(self.guidance[start:stop]).float().mean(0)
        return self.to_image_size(mean)

    # --- files ---------------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, tokens=self.raw_tokens,
                    negative_tokens=self.raw_negative_tokens, layers=[asdict(l) for l in self.layers],
                    timesteps=self.timesteps, latent_size=self.latent_size, image_size=self.image_size,
                    missing_layers=self.missing_layers, truncated=self.truncated, format=1)

    def save(self, path: str | Path) -> Path:
        """Writes everything to one `.npz` (arrays plus a JSON `meta`), atomically."""
        path = Path(path)
        arrays = {"meta": np.array(json.dumps(self.meta()))}
        for i in range(len(self.layers)):
            arrays[f"steps_{i}"], arrays[f"sums_{i}"] = self.step_maps[i], self.head_sums[i]
            if self.guided:
                arrays[f"neg_steps_{i}"], arrays[f"neg_sums_{i}"] = self.neg_step_maps[i], self.neg_head_sums[i]
        if self.guidance is not None:
            arrays["guidance"] = self.guidance
        if self.inputs is not None:
            arrays["inputs"] = self.inputs
        with atomic_write(path) as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttentionMaps":
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                layers = [Layer(l["name"], l["block"], tuple(l["size"]), l["heads"]) for l in meta["layers"]]
                n = len(layers)
                get = lambda key: [data[f"{key}_{i}"] for i in range(n)]  # noqa: E731
                guided = "neg_sums_0" in data
                return cls(meta["prompt"], meta["negative_prompt"], meta["tokens"], meta["negative_tokens"],
                           layers, get("steps"), get("sums"), get("neg_steps") if guided else None,
                           get("neg_sums") if guided else None, meta["timesteps"], meta["latent_size"],
                           meta["image_size"], data["guidance"] if "guidance" in data else None,
                           data["inputs"] if "inputs" in data else None, meta["missing_layers"], meta["truncated"])
        except (OSError, KeyError, IndexError, TypeError, AttributeError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not an ImageCraft attention file (.npz from AttentionMaps.save): "
                             f"{type(e).__name__}: {e}") from e


def _is_int(value) -> bool:
    """An int or numpy int, and not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _normalized(m: np.ndarray, normalize: bool) -> np.ndarray:
    return m / max(float(m.max()), 1e-12) if normalize else m


def pearson(a, b) -> float:
    """Pearson correlation of two maps (tensors or arrays of any shape, same size); 0 when either is flat."""
    a, b = torch.as_tensor(a).flatten().double(), torch.as_tensor(b).flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denom) if denom > 0 else 0.0


def spatial_entropy(m) -> float:
    """The entropy of a map (negative values clipped) as a distribution over its cells, over its maximum: 0 when
    one cell holds everything, 1 when it is uniform."""
    p = torch.as_tensor(m).flatten().double().clamp(min=0)
    p = p / p.sum().clamp(min=1e-12)
    return float(-(p * p.clamp(min=1e-12).log()).sum() / math.log(len(p)))


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
    maps._check_steps(step)
    indices = maps.token_indices(word)
    context, _ = pipe.encode_prompt([maps.prompt])
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
