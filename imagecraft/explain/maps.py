"""Cross-attention maps of one generated image: which pixels each word of the prompt attended to.

`capture` records them while sampling (see its docstring for what is kept and why); `AttentionMaps` holds them
per side of classifier-free guidance: `sides[0]` the prompt's (the conditional half of the batch), `sides[1]` the
negative prompt's (the unconditional half, maps only when guidance was on). Each `Side` has its text, its tokens
and, per captured layer, the head-averaged map of every step (fp16) and the per-head sum over steps (fp32).
Every query (`word`, `token`, `all_tokens`, `at`, `segment`, `layer_stats`) takes the same filters, reads one
side and aggregates it by DAAM's recipe (`aggregate`); `negative=True` picks the negative prompt's side.

Files: `save` writes one `.npz` with a JSON `meta` and per layer i `steps_i`, `sums_i` (and `neg_steps_i`,
`neg_sums_i` for the negative side), `guidance` and `inputs`; `load` reads it back.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write
from ..prompts import parse
from .aggregate import (check_heads, check_steps, is_int, layer_maps, pearson, select_layers, spatial_entropy,
                        weighted_mean)

START, END = "<start>", "<end>"
SIDES = ("prompt", "negative prompt")  # what `sides[0]` and `sides[1]` are called in errors
PREFIXES = ("", "neg_")  # of each side's arrays in a saved file


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
    (one or more words, any case, weighting syntax ignored: "(red:1.3)" is "red"); "<start>" and "<end>" name the
    special tokens. ValueError listing the prompt's words when it is not there."""
    if not isinstance(word, str) or not parse(word).text.strip():
        raise ValueError(f"a word must be a non-empty string, got {word!r}")
    text = parse(word).text.strip().lower()
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


@dataclass(frozen=True)
class Layer:
    """One cross-attention layer as recorded."""

    name: str  # module name in UNet_SD, e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    block: str  # "down", "mid" or "up"
    size: tuple[int, int]  # (h, w) of its maps
    heads: int


@dataclass(eq=False)
class Side:
    """One side of classifier-free guidance: the prompt's maps or the negative prompt's."""

    text: str  # the prompt or the negative prompt
    raw_tokens: list[str]  # as the tokenizer split it, start and end tokens included
    step_maps: list[np.ndarray] | None  # per layer (S, T, h, w) fp16, head-averaged; None: not recorded
    head_sums: list[np.ndarray] | None  # per layer (heads, T, h, w) fp32, summed over steps; None: not recorded
    positions: list[int] | None = None  # each token's position in the encoded context; None: token i at i
    tokens: list[str] = field(init=False)  # as shown: "<start>", the words' pieces, "<end>"

    def __post_init__(self):
        self.raw_tokens = list(self.raw_tokens)
        self.positions = list(range(len(self.raw_tokens)) if self.positions is None else self.positions)
        if len(self.positions) != len(self.raw_tokens):
            raise ValueError(f"{len(self.raw_tokens)} tokens but {len(self.positions)} positions")
        self.tokens = [display_token(t, i, len(self.raw_tokens)) for i, t in enumerate(self.raw_tokens)]


class AttentionMaps:
    """The cross-attention of one generated image; see `aggregate` for the default aggregation.

    `tokens` are the prompt's tokens as the tokenizer split them, "<start>" and "<end>" included; `words()` the
    words they make. `word(w, **filters)` and `token(i, **filters)` give (H, W) float arrays at the image's size.
    Filters: `blocks` ("down", "mid", "up"; default down and up), `resolutions` (map heights in cells, e.g. 64,
    32, 16, 8 at 512 px SD1.5; default all but those 1/64 of the image), `layers` (module names, overriding both),
    `heads` (int or ints), `steps` ((start, stop) over sampling steps), `negative` (the negative prompt's maps).
    """

    def __init__(self, sides: tuple[Side, Side], layers: list[Layer], timesteps: list[int],
                 latent_size: tuple[int, int], image_size: tuple[int, int], *, guidance: np.ndarray | None = None,
                 inputs: np.ndarray | None = None, missing_layers: list[str] | None = None, truncated: int = 0):
        self.sides = tuple(sides)  # (prompt, negative prompt)
        self.layers = list(layers)
        self.timesteps = list(timesteps)
        self.latent_size, self.image_size = tuple(latent_size), tuple(image_size)  # (h, w) each
        self.guidance, self.inputs = guidance, inputs  # (S, h, w) fp16, (S, C, h, w) fp32
        self.missing_layers = list(missing_layers or [])
        self.truncated = truncated  # prompt tokens dropped past the text encoder's limit

    # --- what there is --------------------------------------------------------------------------------------------
    @property
    def prompt(self) -> str:
        return self.sides[0].text

    @property
    def negative_prompt(self) -> str:
        return self.sides[1].text

    @property
    def tokens(self) -> list[str]:
        return self.sides[0].tokens

    @property
    def negative_tokens(self) -> list[str]:
        return self.sides[1].tokens

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def guided(self) -> bool:
        return self.sides[1].head_sums is not None

    def side(self, negative: bool = False) -> Side:
        """The negative prompt's side or the prompt's; ValueError when it has no maps (guidance was off)."""
        if negative and not self.guided:
            raise ValueError("there are no negative-prompt maps: guidance was off (CFG scale <= 1)")
        return self.sides[bool(negative)]

    def words(self, negative: bool = False) -> list[str]:
        """The prompt's words in order, each once."""
        return list(dict.fromkeys(word for word, _ in group_words(self.sides[bool(negative)].raw_tokens)))

    def token_indices(self, word: str, negative: bool = False) -> list[int]:
        """Indices into `tokens` of every occurrence of `word` (one or more words, any case); "<start>" and
        "<end>" name the special tokens."""
        return word_indices(self.side(negative).raw_tokens, word, SIDES[bool(negative)], self.truncated)

    # --- aggregation ------------------------------------------------------------------------------------------------
    def select_layers(self, blocks=None, resolutions=None, layers=None) -> list[int]:
        """Indices into `self.layers` that the filters keep; ValueError naming what exists when none does."""
        return select_layers(self.layers, self.image_size, blocks, resolutions, layers)

    def latent_maps(self, indices: list[int], *, negative=False, blocks=None, resolutions=None, layers=None,
                    heads=None, steps=None, per_layer=False) -> torch.Tensor:
        """Aggregated maps of the given token indices on the latent grid: (len(indices), h, w), or per selected
        (layer, head) (n, len(indices), h, w) with `per_layer`."""
        side = self.side(negative)
        count = len(side.tokens)
        if any(not 0 <= i < count for i in indices):
            raise ValueError(f"token index out of range: the {'negative ' if negative else ''}prompt has "
                             f"{count} tokens (0..{count - 1}), got {indices}")
        chosen = self.select_layers(blocks, resolutions, layers)
        heads = check_heads(heads, self.layers, chosen)
        if steps is not None and heads is not None:
            raise ValueError("heads and steps cannot be combined: per-step maps are kept head-averaged")
        steps = None if steps is None else check_steps(steps, self.num_steps)
        stacked, weights = layer_maps(side, self.layers, indices, self.latent_size, chosen, heads, steps)
        return stacked if per_layer else weighted_mean(stacked, weights)

    def to_image_size(self, maps: torch.Tensor) -> np.ndarray:
        """(..., h, w) latent-grid maps bicubic to (..., H, W)."""
        lead = maps.shape[:-2]
        out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]), size=self.image_size, mode="bicubic")
        return out.reshape(*lead, *self.image_size).numpy()

    def token(self, index: int, normalize: bool = False, **filters) -> np.ndarray:
        """The (H, W) map of token `index` (0 is the start token, len(tokens) - 1 the end token)."""
        if not is_int(index):
            raise ValueError(f"a token index must be an integer, got {index!r}")
        return _normalized(self.to_image_size(self.latent_maps([int(index)], **filters)[0]), normalize)

    def word(self, word: str, normalize: bool = False, **filters) -> np.ndarray:
        """The (H, W) map of `word`: the mean of its tokens' maps over every occurrence."""
        indices = self.token_indices(word, filters.get("negative", False))
        return _normalized(self.to_image_size(self.latent_maps(indices, **filters).mean(0)), normalize)

    def all_tokens(self, **filters) -> np.ndarray:
        """(T, H, W): every token's map."""
        count = len(self.sides[bool(filters.get("negative"))].tokens)
        return self.to_image_size(self.latent_maps(list(range(count)), **filters))

    def at(self, x: int, y: int, **filters) -> dict[str, float]:
        """How the attention at pixel (x, y) splits over the prompt's tokens (values sum to 1)."""
        h, w = self.image_size
        if not (is_int(x) and is_int(y) and 0 <= x < w and 0 <= y < h):
            raise ValueError(f"a pixel must be integers x in 0..{w - 1} and y in 0..{h - 1}, got ({x!r}, {y!r})")
        values = np.clip(self.all_tokens(**filters)[:, y, x], 0, None)
        values = values / max(values.sum(), 1e-12)
        names = self.sides[bool(filters.get("negative"))].tokens
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
        heads = check_heads(filters.get("heads"), self.layers, chosen)
        labels = [(self.layers[i].name, h) for i in chosen for h in (heads or range(self.layers[i].heads))]
        stats = []
        for (name, head), m in zip(labels, maps):
            stats.append(dict(layer=name, head=head, entropy=spatial_entropy(m), correlation=pearson(m, consensus)))
        return stats

    def cfg_difference(self, steps=None) -> np.ndarray:
        """(H, W): where classifier-free guidance acted, |eps_cond - eps_uncond| over channels, mean over steps."""
        if self.guidance is None:
            raise ValueError("there is no CFG difference: guidance was off (CFG scale <= 1)")
        start, stop = (0, self.num_steps) if steps is None else check_steps(steps, self.num_steps)
        mean = torch.from_numpy(self.guidance[start:stop]).float().mean(0)
        return self.to_image_size(mean)

    # --- files ---------------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, tokens=self.sides[0].raw_tokens,
                    negative_tokens=self.sides[1].raw_tokens, positions=self.sides[0].positions,
                    negative_positions=self.sides[1].positions, layers=[asdict(l) for l in self.layers],
                    timesteps=self.timesteps, latent_size=self.latent_size, image_size=self.image_size,
                    missing_layers=self.missing_layers, truncated=self.truncated, format=1)

    def save(self, path: str | Path) -> Path:
        """Writes everything to one `.npz` (arrays plus a JSON `meta`), atomically."""
        path = Path(path)
        arrays = {"meta": np.array(json.dumps(self.meta()))}
        for i in range(len(self.layers)):
            for prefix, side in zip(PREFIXES, self.sides):
                if side.head_sums is not None:
                    arrays[f"{prefix}steps_{i}"], arrays[f"{prefix}sums_{i}"] = side.step_maps[i], side.head_sums[i]
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
                per_layer = lambda key: [data[f"{key}_{i}"] for i in range(len(layers))]  # noqa: E731
                sides = []
                for prefix, text, tokens, positions in zip(
                        PREFIXES, (meta["prompt"], meta["negative_prompt"]), (meta["tokens"], meta["negative_tokens"]),
                        (meta.get("positions"), meta.get("negative_positions"))):  # older files: none, one chunk
                    recorded = not prefix or f"{prefix}sums_0" in data  # the negative side: with guidance only
                    sides.append(Side(text, tokens, *((per_layer(f"{prefix}steps"), per_layer(f"{prefix}sums"))
                                                      if recorded else (None, None)), positions))
                return cls(sides, layers, meta["timesteps"], meta["latent_size"], meta["image_size"],
                           guidance=data["guidance"] if "guidance" in data else None,
                           inputs=data["inputs"] if "inputs" in data else None,
                           missing_layers=meta["missing_layers"], truncated=meta["truncated"])
        except (OSError, KeyError, IndexError, TypeError, AttributeError, ValueError, EOFError,
                zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not an ImageCraft attention file (.npz from AttentionMaps.save): "
                             f"{type(e).__name__}: {e}") from e


def _normalized(m: np.ndarray, normalize: bool) -> np.ndarray:
    return m / max(float(m.max()), 1e-12) if normalize else m
