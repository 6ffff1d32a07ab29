"""Attention implementation switches for passes that differentiate through attention."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch to the eager attention implementation for the duration.

    Fused SDPA / flash kernels lack forward-mode AD and double backward; eager attention is plain autograd.
    """
    previous = getattr(model.config, "_attn_implementation", None)
    if previous in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
