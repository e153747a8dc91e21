"""Matplotlib figures of cross-attention maps: overlays per word, a timestep strip, a per-layer strip, the token
distribution at one pixel, and the faithfulness check.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot), so they render headless and from any
thread; `save(fig, path)` writes a PNG. Images up to 256 px are drawn with nearest-neighbour scaling, so the
cells of a 64 px image stay visible.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from ..files import atomic_write
from .aggregate import pearson, spatial_entropy
from .maps import AttentionMaps

PANEL = 2.3  # inches per panel
NORMALIZE = ("word", "absolute")


def _interpolation(image: Image.Image) -> str:
    return "nearest" if max(image.size) <= 256 else "bilinear"


def _check(cmap: str, alpha: float, normalize: str):
    from matplotlib import colormaps

    if cmap not in colormaps:
        raise ValueError(f"unknown colormap {cmap!r}; use a matplotlib one such as jet, viridis, inferno, magma")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be 'word' (each map to its own maximum) or 'absolute' (one scale for "
                         f"all), got {normalize!r}")


def _grid(n: int, columns: int | None) -> tuple[Figure, list]:
    columns = max(1, min(n, columns or n))
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(PANEL * columns, PANEL * rows + 0.3), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes:
        ax.set_axis_off()
    return fig, axes


def _overlay(ax, image: Image.Image, heat: np.ndarray, vmax: float, cmap: str, alpha: float, title: str):
    interpolation = _interpolation(image)
    ax.imshow(image, interpolation=interpolation)
    ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=vmax if vmax > 0 else 1, interpolation=interpolation)
    ax.set_title(title, fontsize=14)


def _scale(heats: list[np.ndarray], normalize: str) -> list[float]:
    if normalize == "word":
        return [float(h.max()) for h in heats]
    top = max(float(h.max()) for h in heats)
    return [top] * len(heats)


def plot_overlay(image: Image.Image, maps: AttentionMaps, words: list[str] | None = None, cmap: str = "jet",
                 alpha: float = 0.5, normalize: str = "word", columns: int | None = 4, **filters) -> Figure:
    """The image, then one panel per word with its map over the image, the word as the title. `words=None`
    shows every word of the prompt (the grid); filters are those of `AttentionMaps.word`."""
    _check(cmap, alpha, normalize)
    words = maps.words(filters.get("negative", False)) if words is None else list(words)
    if not words:
        raise ValueError("no words to plot")
    heats = [maps.word(w, **filters) for w in words]
    fig, axes = _grid(len(words) + 1, columns and columns + 1)
    axes[0].imshow(image, interpolation=_interpolation(image))
    axes[0].set_title("image", fontsize=14)
    for ax, word, heat, vmax in zip(axes[1:], words, heats, _scale(heats, normalize)):
        _overlay(ax, image, heat, vmax, cmap, alpha, word)
    fig.suptitle(_caption(maps, filters), fontsize=11)
    return fig


def plot_side_by_side(drawn: list[tuple[Image.Image, AttentionMaps]], words: list[str],
                      labels: tuple[str, str] = ("a", "b"), cmap: str = "jet", alpha: float = 0.5,
                      normalize: str = "word", pairs_per_row: int = 2, **filters) -> Figure:
    """Two images of one prompt drawn differently (a LoRA at scale 0 and 1), then each word's map over both, in
    pairs side by side. A word's two maps share one scale ("word"), or every map shares one ("absolute"), so a
    brighter map means more attention in that image, not a different colour scale."""
    _check(cmap, alpha, normalize)
    if len(drawn) != 2 or len(labels) != 2:
        raise ValueError("plot_side_by_side compares two images")
    if not words:
        raise ValueError("no words to plot")
    heats = [[maps.word(w, **filters) for w in words] for _, maps in drawn]
    tops = [max(float(a.max()), float(b.max())) for a, b in zip(*heats)]
    tops = tops if normalize == "word" else [max(tops)] * len(tops)
    fig, axes = _grid(2 * (len(words) + 1), 2 * pairs_per_row)
    for side, ((image, _), label) in enumerate(zip(drawn, labels)):
        axes[side].imshow(image, interpolation=_interpolation(image))
        axes[side].set_title(label, fontsize=14)
        for k, (word, top) in enumerate(zip(words, tops), start=1):
            _overlay(axes[2 * k + side], image, heats[side][k - 1], top, cmap, alpha, f"{word}: {label}")
    return fig


def plot_grid(image: Image.Image, maps: AttentionMaps, **kwargs) -> Figure:
    """Every word of the prompt (and the start and end tokens), one panel each."""
    words = [*maps.words(kwargs.get("negative", False)), "<end>"]
    return plot_overlay(image, maps, words, **kwargs)


def plot_timesteps(image: Image.Image, maps: AttentionMaps, words: list[str] | None = None, columns: int = 5,
                   cmap: str = "jet", alpha: float = 0.5, normalize: str = "word", **filters) -> Figure:
    """Rows: words; columns: the sampling steps split into `columns` consecutive ranges, noisiest first."""
    _check(cmap, alpha, normalize)
    if "steps" in filters:
        raise ValueError("the timestep strip covers every step; give no steps filter")
    words = maps.words(filters.get("negative", False)) if words is None else list(words)
    if not words:
        raise ValueError("no words to plot")
    columns = max(1, min(int(columns), maps.num_steps))
    edges = np.linspace(0, maps.num_steps, columns + 1).round().astype(int)
    fig = Figure(figsize=(PANEL * 0.8 * columns + 1, PANEL * 0.8 * len(words) + 0.5), layout="constrained")
    axes = fig.subplots(len(words), columns, squeeze=False)
    for r, word in enumerate(words):
        heats = [maps.word(word, steps=(a, b), **filters) for a, b in zip(edges[:-1], edges[1:])]
        for c, (heat, vmax) in enumerate(zip(heats, _scale(heats, normalize))):
            a, b = edges[c], edges[c + 1]
            title = f"steps {a}-{b - 1}\nt={maps.timesteps[a]}" if r == 0 else ""
            _overlay(axes[r, c], image, heat, vmax, cmap, alpha, title)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(word, fontsize=11)
    fig.suptitle(f"{maps.prompt!r}: attention over time", fontsize=9)
    return fig


def plot_layers(image: Image.Image, maps: AttentionMaps, word: str, cmap: str = "jet", alpha: float = 0.5,
                columns: int | None = 4, negative: bool = False) -> Figure:
    """One panel per captured layer (middle block included) with the word's map, its spatial entropy and its
    correlation with the consensus (DAAM's default aggregation)."""
    _check(cmap, alpha, "word")
    consensus = maps.word(word, negative=negative)
    fig, axes = _grid(len(maps.layers), columns)
    for ax, layer in zip(axes, maps.layers):
        heat = maps.word(word, layers=[layer.name], negative=negative)
        entropy, r = spatial_entropy(heat), pearson(heat, consensus)
        short = f"{layer.block} {layer.size[0]}x{layer.size[1]} #{layer.name.split('.')[1]}"
        _overlay(ax, image, heat, float(heat.max()), cmap, alpha, f"{short}\nH={entropy:.2f} r={r:.2f}")
    fig.suptitle(f"{word!r} per layer (H: spatial entropy, r: correlation with the consensus)", fontsize=9)
    return fig


def plot_token_distribution(maps: AttentionMaps, x: int, y: int, skip_start: bool = True, **filters) -> Figure:
    """A bar chart of how the attention at pixel (x, y) splits over the prompt's tokens. The start token takes
    most of every pixel's attention in SD models, so it is left out (and the rest renormalised) by default."""
    shares = maps.at(x, y, **filters)
    names, values = list(shares), np.array(list(shares.values()))
    start_share = values[0]
    if skip_start:
        names, values = names[1:], values[1:] / max(values[1:].sum(), 1e-12)
    fig = Figure(figsize=(max(4.0, 0.5 * len(names) + 1.5), 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.set_xticks(range(len(names)), [n.split(":", 1)[1] for n in names], rotation=45, ha="right")
    ax.set_ylabel("share of attention")
    note = f"\n<start> took {start_share:.0%} and is not shown" if skip_start else ""
    ax.set_title(f"pixel ({x}, {y}){note}", fontsize=12)
    return fig


def plot_ablation(image: Image.Image, result: dict, word: str, cmap: str = "jet", alpha: float = 0.5) -> Figure:
    """The faithfulness check (`capture.ablation`): the word's map at one step next to where removing the word
    changed the noise prediction at that step."""
    fig, axes = _grid(3, 3)
    axes[0].imshow(image, interpolation=_interpolation(image))
    axes[0].set_title("image", fontsize=10)
    _overlay(axes[1], image, result["attention"], float(result["attention"].max()), cmap, alpha,
             f"{word!r} attention, step {result['step']}")
    _overlay(axes[2], image, result["change"], float(result["change"].max()), cmap, alpha,
             f"change without {word!r}")
    fig.suptitle(f"faithfulness: Pearson r = {result['correlation']:.2f} (t={result['timestep']})", fontsize=9)
    return fig


def plot_segmentation(image: Image.Image, maps: AttentionMaps, words: list[str], threshold: float = 0.4,
                      **filters) -> Figure:
    """Each pixel coloured by its strongest word (`AttentionMaps.segment`), background where none reaches the
    threshold."""
    labels = maps.segment(words, threshold, **filters)
    from matplotlib import colormaps

    colours = colormaps["tab10"](np.arange(len(words)))[:, :3]
    seg = np.zeros((*labels.shape, 4))
    for i in range(len(words)):
        seg[labels == i] = [*colours[i], 0.6]
    fig, axes = _grid(1, 1)
    axes[0].imshow(image, interpolation=_interpolation(image))
    axes[0].imshow(seg, interpolation=_interpolation(image))
    axes[0].set_title(" / ".join(words), fontsize=10)
    return fig


def _caption(maps: AttentionMaps, filters: dict) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in filters.items() if v is not None) or "DAAM's aggregation"
    return f"{maps.prompt!r} ({shown})"


def save(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Writes the figure as a PNG, atomically (`files.atomic_write`)."""
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, dpi=dpi, format="png")
    return path
