"""AUTOMATIC1111's prompt weighting, and prompts longer than the text encoder's window encoded in chunks.

Syntax, as AUTOMATIC1111's `modules/prompt_parser.py` (`parse_prompt_attention`) reads it:
    (word)           x1.1; ((word)) x1.21, each pair multiplies
    [word]           /1.1
    (some words:0.8) x0.8: the number sets the group's multiplier instead of 1.1
    \\( \\) \\[ \\] \\\\   the character itself; a backslash before anything else is dropped, as there
    BREAK            ends the current chunk: what follows starts a new one (below)
Round and square brackets are two separate stacks, as there, so `(a [b) c]` weights b by 1.1/1.1. Unbalanced
prompts are read as AUTOMATIC1111 reads them, so that a prompt restored from one of its PNGs means what it meant
there: a bracket never closed weights everything after it (x1.1 or /1.1), and a closing bracket with nothing
open is text. Notes name them with their characters (`PromptTokens.notes`), and generation carries the notes in
its warnings; a weight too large for a float is refused. Parsing is one regex scan and one sweep per bracket
kind: linear time. Adjacent pieces of equal weight are joined before tokenising; pieces of different weights are
tokenised apart, so `(red)dish` is the tokens of "red" and "dish". BREAK also breaks inside brackets
(AUTOMATIC1111 reads it as text there, by accident).

Maths, AUTOMATIC1111's default emphasis ("Original"): the text encoder's output z (tokens x channels, one chunk
of one prompt) is multiplied per token by its weight, then by mean(z) / mean(weighted z), so its mean over tokens
and channels is what it was (unless that mean cannot be restored by scaling: see `emphasize`). The start, end and
padding tokens have weight 1. A chunk whose weights are all 1 is left as the encoder gave it, so a prompt without
syntax encodes to the same bytes as without this module.

Chunks: the tokens are cut into chunks of window - 2 (75 for SD's 77-token window), each given its own start and
end tokens and padded to the window as diffusers pads (start, tokens, end, padding), encoded separately and
concatenated along the sequence axis: (B, chunks x window, dim), which the UNet's cross-attention takes as it is.
A prompt that fits the window is one chunk, tokenised exactly as diffusers does. Prompts encoded together (a
batch, and the negative prompt beside them) get the same number of chunks, the shorter padded with empty ones
(the encoding of ""), as AUTOMATIC1111 does. Unlike it, a full chunk is not cut back to its last comma.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# Tokens one prompt may fill, counted in whole chunks: 16 chunks of SD's 75, 40 of the built-in model's 30. That is
# about 4,000 characters of English under CLIP's tokenizer (settings.MAX_PROMPT_CHARS), and 4,000 of the shapes
# world's words under the built-in one (960 tokens). Each chunk is one more text-encoder pass and a window more keys
# in every cross-attention layer, so emoji (several tokens a character) or a run of BREAKs, which could make
# hundreds of chunks, are refused.
MAX_TOKENS = 1200

ROUND, SQUARE = 1.1, 1 / 1.1  # (word) and [word]
TOKEN = re.compile(r"""
    \\[()\[\]\\]                                      # an escaped bracket or backslash: the character
  | \\                                                # any other backslash: dropped
  | [(\[]                                             # opens a group
  | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)           # closes a round group with its own weight
  | [)\]]                                             # closes a group
  | [^\\()\[\]:]+                                     # text
  | :                                                 # a colon that is no weight: text
""", re.X)
BREAK = re.compile(r"\s*\bBREAK\b\s*")
CLOSES = {"(": ")", "[": "]"}


@dataclass(frozen=True)
class Parsed:
    parts: list[list[tuple[str, float]]]  # (text, weight) pieces, one list per BREAK-separated part
    notes: list[str]  # sentences about unbalanced brackets: one for those never closed, per kind, one for strays

    @property
    def text(self) -> str:
        """The prompt without its syntax: what the tokenizer reads."""
        return " ".join("".join(text for text, _ in part) for part in self.parts)


def parse(prompt: str) -> Parsed:
    """The prompt's (text, weight) pieces, split at BREAK, and notes on unbalanced brackets."""
    pieces: list[str | None] = []  # None: a BREAK
    open_: dict[str, list[tuple[int, int]]] = {"(": [], "[": []}  # per kind: (first piece, character) of each open
    ranges: dict[str, list[tuple[int, int, float]]] = {"(": [], "[": []}  # per kind: (start, end, multiplier)
    strays = []  # (text, character) of each closing bracket with nothing open
    for m in TOKEN.finditer(prompt):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            pieces.append(text[1:])
        elif text in open_:
            open_[text].append((len(pieces), m.start()))
        elif (weight is not None or text == ")") and open_["("]:
            ranges["("].append((open_["("].pop()[0], len(pieces), ROUND if weight is None else _number(m)))
        elif text == "]" and open_["["]:
            ranges["["].append((open_["["].pop()[0], len(pieces), SQUARE))
        else:
            if weight is not None or text in (")", "]"):
                strays.append((text, m.start()))
            for i, part in enumerate(BREAK.split(text)):
                pieces += [None, part] if i else [part]
    for kind, still_open in open_.items():
        for start, _ in still_open:
            ranges[kind].append((start, len(pieces), ROUND if kind == "(" else SQUARE))
    notes = [_unclosed(kind, [char for _, char in still_open]) for kind, still_open in open_.items() if still_open]
    if strays:
        notes.append(_strays(strays))
    weights = [r * s for r, s in zip(_products(len(pieces), ranges["("]), _products(len(pieces), ranges["["]))]
    parts: list[list[tuple[list[str], float]]] = [[]]  # per part, (texts, weight) runs
    for piece, weight in zip(pieces, weights):
        if piece is None:
            parts.append([])
        elif parts[-1] and parts[-1][-1][1] == weight:  # equal weights read as one text, as AUTOMATIC1111 joins them
            parts[-1][-1][0].append(piece)
        else:
            parts[-1].append(([piece], weight))
    joined = [[("".join(texts), weight) for texts, weight in part] for part in parts]
    return Parsed([[(text, weight) for text, weight in part if text] for part in joined], notes)


def _number(m: re.Match) -> float:
    number = float(m.group(1))
    if not math.isfinite(number):
        raise ValueError(f"the weight at character {m.start(1) + 1} of the prompt is too large a number: "
                         f"{m.group(1)[:20]}...")
    return number


def _characters(chars: list[int]) -> str:
    shown = ", ".join(str(c + 1) for c in chars[:5])
    return f"character{'s' if len(chars) > 1 else ''} {shown}{', ...' if len(chars) > 5 else ''}"


def _unclosed(kind: str, chars: list[int]) -> str:
    effect = f"{'x' if kind == '(' else '/'}1.1"
    if len(chars) == 1:
        return (f"{kind!r} at {_characters(chars)} is never closed, so everything after it is weighted {effect}, as "
                f"AUTOMATIC1111 does (close it with {CLOSES[kind]!r}, or write \\{kind} for a literal one)")
    return (f"{len(chars)} {kind!r} are never closed (at {_characters(chars)}), so everything after each is weighted "
            f"{effect} more, as AUTOMATIC1111 does (close them with {CLOSES[kind]!r}, or write \\{kind} for literal "
            f"ones)")


def _strays(strays: list[tuple[str, int]]) -> str:
    if len(strays) == 1:
        text, char = strays[0]
        return (f"{text!r} at {_characters([char])} closes no bracket and is read as text (write \\{text[-1]} for "
                f"a literal one)")
    kinds = " or ".join(dict.fromkeys(f"\\{text[-1]}" for text, _ in strays))
    return (f"{len(strays)} closing brackets close nothing and are read as text (at "
            f"{_characters([char for _, char in strays])}; write {kinds} for literal ones)")


def _products(count: int, ranges: list[tuple[int, int, float]]) -> list[float]:
    """Per piece, the product of the multipliers of the ranges (start, end, multiplier) that hold it. Ranges of one
    bracket kind nest (they come off a stack), so one sweep with a stack of running products does it."""
    by_start: list[list[tuple[int, float]]] = [[] for _ in range(count)]
    for start, end, multiplier in reversed(ranges):  # closed inner first: reversed, outer before inner at one start
        if start < end:
            by_start[start].append((end, multiplier))
    stack, out = [(count, 1.0)], []  # (end, running product)
    for i in range(count):
        while stack[-1][0] <= i:
            stack.pop()
        for end, multiplier in by_start[i]:
            stack.append((end, stack[-1][1] * multiplier))
        out.append(stack[-1][1])
    return out


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as the text encoder reads it: token ids and weights per chunk, without start and end tokens."""

    prompt: str  # as typed
    chunks: list[list[int]]  # at most window - 2 ids each; one empty chunk for an empty prompt
    weights: list[list[float]]  # per id
    notes: list[str]  # sentences about unbalanced brackets, the prompt quoted
    window: int  # the text encoder's tokens per chunk, start and end included
    special: tuple[int, int, int]  # start, end and padding ids

    def rows(self, count: int) -> list[list[int]]:
        """`count` padded chunks (start, ids, end, padding), empty ones after the prompt's own."""
        start, end, pad = self.special
        chunks = self.chunks + [[]] * (count - len(self.chunks))
        return [[start, *ids, end] + [pad] * (self.window - 2 - len(ids)) for ids in chunks]

    def row_weights(self, count: int) -> list[list[float]]:
        chunks = self.weights + [[]] * (count - len(self.weights))
        return [[1.0, *w, 1.0] + [1.0] * (self.window - 2 - len(w)) for w in chunks]

    @property
    def ids(self) -> list[int]:
        """The ids that attention maps show: the first start token, every chunk's ids, the last end token."""
        start, end, _ = self.special
        return [start, *(i for ids in self.chunks for i in ids), end]

    @property
    def positions(self) -> list[int]:
        """Where each of `ids` sits in the encoded context (B, chunks x window, dim)."""
        inside = [c * self.window + 1 + j for c, ids in enumerate(self.chunks) for j in range(len(ids))]
        last = len(self.chunks) - 1
        return [0, *inside, last * self.window + 1 + len(self.chunks[last])]

    @property
    def token_weights(self) -> list[float]:
        """The weight of each of `ids` (1 for the start and end tokens)."""
        return [1.0, *(w for weights in self.weights for w in weights), 1.0]


def tokenize(tokenizer, prompt: str) -> PromptTokens:
    """Parses `prompt`, tokenises its pieces and cuts the tokens into chunks of the tokenizer's window."""
    window = tokenizer.model_max_length
    parsed = parse(prompt)
    texts = [text for part in parsed.parts for text, _ in part]
    pieces = iter(tokenizer(texts, add_special_tokens=False, verbose=False).input_ids if texts else [])
    chunks: list[list[tuple[int, float]]] = [[]]  # (id, weight) per token
    for i, part in enumerate(parsed.parts):
        if i:  # BREAK
            chunks.append([])
        for _, weight in part:
            for token in next(pieces):
                if len(chunks[-1]) == window - 2:
                    chunks.append([])
                chunks[-1].append((token, weight))
    if len(chunks) > 1 and not chunks[-1]:  # a trailing BREAK starts no chunk
        chunks.pop()
    most = MAX_TOKENS // (window - 2)
    if len(chunks) > most:
        raise ValueError(f"the prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} makes {len(chunks)} chunks of "
                         f"{window - 2} tokens; at most {most} are read ({most * (window - 2)} tokens): shorten it or "
                         "use fewer BREAKs")
    notes = [f"{prompt[:60]!r}{'...' if len(prompt) > 60 else ''}: {note}" for note in parsed.notes]
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return PromptTokens(prompt, [[i for i, _ in c] for c in chunks], [[w for _, w in c] for c in chunks], notes,
                        window, special)


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's default emphasis per prompt and chunk: z (B, chunks, window, dim) times each token's weight
    (B, chunks, window), then rescaled to its original mean over tokens and channels. In fp32; chunks whose weights
    are all 1 come back bit for bit. Where there is no mean to restore by scaling, the weights alone apply: a mean
    that is rounding noise (under 1e-5 of the mean magnitude: a text encoder whose final LayerNorm has no bias
    leaves every token with mean 0) or a weighted one of the other sign (negative weights) would make the ratio
    noise, infinite or a flip of the whole context."""
    if bool((weights == 1).all()):
        return z
    x = z.float()
    mean = x.mean(dim=(2, 3), keepdim=True)  # (B, chunks, 1, 1)
    real = mean.abs() > 1e-5 * x.abs().mean(dim=(2, 3), keepdim=True)
    x = x * weights.to(x.device, x.dtype)[..., None]
    ratio = mean / x.mean(dim=(2, 3), keepdim=True)
    return (x * torch.where(real & ratio.isfinite() & (ratio > 0), ratio, 1.0)).to(z.dtype)


def encode(text_encoder, prompts: list[PromptTokens], chunks: int = 1) -> torch.Tensor:
    """The weighted hidden states (B, n x window, dim) of the prompts, each in n = max(chunks, longest prompt's)
    chunks; the text encoder sees all of them as one batch (B x n, window)."""
    count = max(chunks, *(len(p.chunks) for p in prompts))
    ids = torch.tensor([row for p in prompts for row in p.rows(count)])  # (B x n, window)
    z = text_encoder(ids.to(text_encoder.device))[0]  # (B x n, window, dim)
    z = z.reshape(len(prompts), count, *z.shape[1:])  # (B, n, window, dim)
    weights = torch.tensor([p.row_weights(count) for p in prompts])  # (B, n, window)
    return emphasize(z, weights).flatten(1, 2)  # (B, n x window, dim)
