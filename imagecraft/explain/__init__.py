"""Cross-attention explained: `capture` records it while sampling (and keeps it for the shapes trainer's grounding
loss), `maps` holds it per side of guidance, `aggregate` turns it into one map per word by DAAM's recipe, `plots`
draws it (imported on its own: `from imagecraft.explain import plots`, which loads matplotlib)."""

from .aggregate import BLOCKS, DEFAULT_BLOCKS, pearson, spatial_entropy
from .capture import ablation, check_memory, keep_cross_attention
from .maps import END, START, AttentionMaps, Layer, Side, word_indices

__all__ = ["AttentionMaps", "Side", "Layer", "ablation", "check_memory", "keep_cross_attention", "word_indices",
           "pearson", "spatial_entropy", "BLOCKS", "DEFAULT_BLOCKS", "START", "END"]
