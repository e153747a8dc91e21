"""Cross-attention maps: capture during sampling, the maps and their aggregation, and matplotlib figures."""
