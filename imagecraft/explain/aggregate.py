"""DAAM's aggregation: one side's recorded cross-attention turned into one map per token on the latent grid.

The recipe (Tang et al., "What the DAAM", ACL 2023, https://arxiv.org/abs/2210.04885; castorini/daam
`compute_global_heat_map`):
1. cross-attention of the down and up blocks, not the middle block;
2. maps whose side is 1/64 of the image side (8x8 at 512 px) skipped;
3. every head, summed over all steps;
4. each (layer, head) map bicubic-upsampled to the latent grid and clamped at 0;
5. all (layer, head) maps averaged with equal weight;
6. a word is the mean of its tokens (every occurrence; token i of the prompt is map i + 1, after the start token);
7. bicubic to the image size.
Steps 1-5 are here (`select_layers`, `layer_maps`, `weighted_mean`); 6 and 7 are `AttentionMaps.word`. Filters
narrow any step: `blocks`, `resolutions`, `layers`, `heads`, `steps`, and the side (`negative`). With a `steps`
range the per-step maps are used; they are head-averaged, so the clamp of step 4 comes after the head mean there,
and each layer's map stands for all its heads in the mean.

Each function checks the filter it reads and raises a ValueError that names what exists.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .maps import Layer, Side

BLOCKS = ("down", "mid", "up")
DEFAULT_BLOCKS = ("down", "up")


def is_int(value) -> bool:
    """An int or numpy int, and not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def select_layers(layers: list[Layer], image_size: tuple[int, int], blocks=None, resolutions=None,
                  names=None) -> list[int]:
    """Indices into `layers` that the filters keep (recipe steps 1 and 2 by default); ValueError naming what exists
    when none does. `names` (module names) overrides `blocks` and `resolutions`."""
    if names is not None:
        wanted = [names] if isinstance(names, str) else list(names) if isinstance(names, (list, tuple)) else None
        known = [l.name for l in layers]
        if wanted is None or not all(isinstance(n, str) for n in wanted):
            raise ValueError(f"layers must be module names (strings), got {names!r}; captured: {', '.join(known)}")
        unknown = [n for n in wanted if n not in known]
        if unknown or not wanted:
            raise ValueError(f"no captured layer named {unknown or wanted}; captured: {', '.join(known)}")
        return [known.index(n) for n in wanted]
    if blocks is not None and not isinstance(blocks, (str, list, tuple)):
        raise ValueError(f"blocks must be some of {', '.join(BLOCKS)}, got {blocks!r}")
    blocks = DEFAULT_BLOCKS if blocks is None else ((blocks,) if isinstance(blocks, str) else tuple(blocks))
    bad = [b for b in blocks if b not in BLOCKS]
    if bad or not blocks:
        raise ValueError(f"blocks must be some of {', '.join(BLOCKS)}, got {list(blocks)}")
    if resolutions is None:
        chosen = [i for i, l in enumerate(layers) if l.block in blocks
                  and l.size[0] * 64 != image_size[0]]  # DAAM skips maps 1/64 of the image side
    else:
        resolutions = [resolutions] if not isinstance(resolutions, (list, tuple)) else list(resolutions)
        if not resolutions or not all(is_int(r) for r in resolutions):
            raise ValueError(f"resolutions must be map heights in cells (integers), got {resolutions!r}")
        chosen = [i for i, l in enumerate(layers) if l.block in blocks and l.size[0] in resolutions]
    if not chosen:
        have = sorted({(l.block, l.size[0]) for l in layers})
        raise ValueError(f"no captured layer in blocks {list(blocks)} at resolutions {resolutions}; there "
                         f"are: {', '.join(f'{b} {r}' for b, r in have)}")
    return chosen


def check_steps(steps, num_steps: int) -> tuple[int, int]:
    """A step index or a (start, stop) range as (start, stop) within the `num_steps` sampling steps."""
    pair = (steps, steps + 1) if is_int(steps) else tuple(steps) if isinstance(steps, (list, tuple)) else ()
    if len(pair) != 2 or not all(is_int(v) for v in pair):
        raise ValueError(f"steps must be a step index or a (start, stop) range of integers, got {steps!r}")
    start, stop = int(pair[0]), int(pair[1])
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"steps {start}..{stop} are outside the {num_steps} sampling steps "
                         f"(give 0 <= start < stop <= {num_steps})")
    return start, stop


def check_heads(heads, layers: list[Layer], chosen: list[int]) -> list[int] | None:
    """Head indices valid in every chosen layer, or None for all heads."""
    if heads is None:
        return None
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads]
    fewest = min(layers[i].heads for i in chosen)
    if not heads or any(not is_int(h) or not 0 <= h < fewest for h in heads):
        raise ValueError(f"heads must be indices from 0 to {fewest - 1} (the selected layers have {fewest} "
                         f"or more), got {heads}")
    return [int(h) for h in heads]


def layer_maps(side: Side, layers: list[Layer], indices: list[int], latent_size: tuple[int, int],
               chosen: list[int], heads: list[int] | None = None,
               steps: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[float]]:
    """Recipe steps 3 and 4 for the tokens `indices` of one side: per chosen (layer, head) the map summed over
    steps, bicubic to the latent grid and clamped, (n, len(indices), h, w), with each map's weight in the mean.
    With `steps` (start, stop), one head-averaged map per layer over that range, weighted by its head count."""
    up, weights = [], []
    for i in chosen:
        if steps is None:
            maps = torch.from_numpy(side.head_sums[i][:, indices])  # (heads, k, h, w)
            if heads is not None:
                maps = maps[heads]
            weights += [1.0] * maps.shape[0]
        else:
            start, stop = steps
            maps = torch.from_numpy(side.step_maps[i][start:stop, indices]).float().sum(0, keepdim=True)  # (1, k, h, w)
            weights.append(float(layers[i].heads))  # a head-averaged map stands for all its heads
        up.append(F.interpolate(maps, size=latent_size, mode="bicubic").clamp_(min=0))
    return torch.cat(up), weights  # (layer-heads, k, h, w)


def weighted_mean(stacked: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Recipe step 5: the (layer, head) maps (n, k, h, w) averaged with their weights: (k, h, w)."""
    w = torch.tensor(weights)[:, None, None, None]
    return (stacked * w).sum(0) / w.sum()


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
