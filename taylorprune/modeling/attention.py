"""Attention implementation switches: eager attention for passes that differentiate through attention twice, and
causal self-attention computed in blocks of queries on a CPU (the same function as PyTorch's SDPA, faster there).

Eager: fused SDPA / flash kernels lack forward-mode AD and double backward; eager attention is plain autograd.

Why: PyTorch's CPU flash-attention kernel picks its tile sizes from the sequence length, and for windows of
256-1024 tokens its backward is slow: on stories260K's shapes (4 × 8 heads × 512 tokens, head size 8, 2 threads)
a forward took 5.9 ms and its backward 18.6 ms, against 4.5 and 11.2 ms when the 512 queries go in blocks of 64
(each block attends to the keys up to its end, with an explicit causal mask), and SmolLM2's (9 heads of 64) 50.6
against 38.7 ms for forward and backward in blocks of 128. At 192 tokens and at 2048 the blocks gain nothing
(2048: 124 against 135 ms), so they are used only from ``SHORTEST`` to ``LONGEST`` tokens. Recovery, whose step is
mostly attention on small models, trains with it (``blocked``); the rest of the package keeps the model's own
attention, so its references are untouched. The outputs differ from one SDPA call by round-off only (the softmax
sums run in another order: 6e-6 at most on unit-normal inputs), and each query block is exactly the causal
attention of its rows. Anything else (a padding or sliding-window mask, a GPU, a cache, other lengths) goes to
transformers' SDPA function unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "taylorprune_blocked"
SHORTEST, LONGEST = 256, 1024  # query lengths the blocks speed up (measured, see above)


def block_size(head_dim: int) -> int:
    """Queries per block: 64 for small heads (stories260K: 15.7 ms against 17.2 with 128), else 128."""
    return 64 if head_dim <= 16 else 128


@lru_cache(maxsize=64)
def _causal(rows: int, keys: int, device: torch.device) -> torch.Tensor:
    """The causal mask of the last ``rows`` queries over ``keys`` keys (True: attended)."""
    return torch.ones(rows, keys, dtype=torch.bool, device=device).tril(keys - rows)


def blocked_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, is_causal: bool | None = None, **kwargs
                              ) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (batch, heads, tokens, head size) in, (batch, tokens, heads, head size)
    out."""
    length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (query.device.type != "cpu" or attention_mask is not None or not causal or dropout or kwargs.get("softcap")
            or key.shape[2] != length or not SHORTEST <= length <= LONGEST):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    step = block_size(query.shape[-1])
    parts = [F.scaled_dot_product_attention(query[:, :, :step], key[:, :, :step], value[:, :, :step],
                                            is_causal=True, scale=scaling)]
    for start in range(step, length, step):
        stop = min(length, start + step)
        parts.append(F.scaled_dot_product_attention(query[:, :, start:stop], key[:, :, :stop], value[:, :, :stop],
                                                    attn_mask=_causal(stop - start, stop, query.device),
                                                    scale=scaling))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, blocked_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # masks as for SDPA: none for plain causal windows


def implementation(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


@contextlib.contextmanager
def using(model: nn.Module, name: str | None) -> Iterator[None]:
    """``model`` runs with attention implementation ``name`` (None or its own: unchanged) until the context
    ends."""
    before = implementation(model)
    if name is None or before is None or name == before or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def blocked(model: nn.Module, device: torch.device) -> contextlib.AbstractContextManager:
    """Blocked attention for ``model`` on a CPU where it runs SDPA; otherwise nothing changes."""
    return using(model, NAME if device.type == "cpu" and implementation(model) == "sdpa" else None)


def eager_attention(model: nn.Module) -> contextlib.AbstractContextManager:
    """Eager attention for the duration (see the module docstring)."""
    return using(model, "eager")
