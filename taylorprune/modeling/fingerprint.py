"""The identity of a model's weights, for caches made from them (statistics, generated calibration text).

It lives here, below ``calib`` and ``stats``, because both key caches on it: a cache made by one model must never
be read for another, and the file name or hub id says nothing about the weights inside.
"""

from __future__ import annotations

import hashlib
import json


def model_fingerprint(model) -> str:
    """Identity of the dense model: its config plus name, shape, dtype and fp64 sum / abs-sum of every parameter
    and buffer (norms, embeddings and the head change what is cached as much as the pruned linears do)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or t.is_meta:
            continue
        seen.add(id(t))
        x = t.detach().double()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}{x.sum().item():.12e}{x.abs().sum().item():.12e}".encode())
    return h.hexdigest()
