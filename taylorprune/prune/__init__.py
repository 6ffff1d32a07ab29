"""Mask and update: keep-masks from scores (unstructured, N:M) and weight updates of what is kept (OBS)."""
