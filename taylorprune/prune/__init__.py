"""Prune: masks from scores, weight updates, and the layer-by-layer engine."""
