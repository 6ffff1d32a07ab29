"""Sparsity patterns and the keep-masks they induce from importance scores.

Unstructured masks prune the lowest scores within a comparison group: each output row (Wanda's group,
the default) or the whole matrix. N:M masks follow the hardware convention (NVIDIA 2:4): in every row,
each block of M consecutive input columns keeps at most N non-zeros. Ties are broken by a stable sort,
so the same scores always give the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taylorprune.errors import RunError, UserError

GROUPS = ("row", "layer")


class Fallback(RunError):
    """A step could not finish for one linear, which is plain-masked instead: ``weight`` is that linear's masked
    weight and ``score`` what chose the mask (None: the mask it was given). The engine records the message as a
    warning and goes on, so one bad layer does not end a long run."""

    def __init__(self, message: str, weight: torch.Tensor, score: torch.Tensor | None) -> None:
        super().__init__(message)
        self.weight, self.score = weight, score


@dataclass(frozen=True)
class Pattern:
    """What to prune: ``sparsity`` for unstructured, or keep ``n`` of every ``m``."""

    sparsity: float
    group: str = "row"
    n: int | None = None
    m: int | None = None
    count: int | None = None  # exact number of weights to prune in a matrix (set by layer-wise allocations)

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"unstructured {self.sparsity:g} per {self.group}"


def parse_pattern(sparsity: float | None, pattern: str | None, group: str = "row") -> Pattern:
    """Validate the CLI's --sparsity/--pattern/--group; N:M implies sparsity 1 - N/M."""
    if group not in GROUPS:
        raise UserError(f"--group {group}: choose row or layer")
    if pattern is None or pattern == "unstructured":
        if sparsity is None:
            raise UserError("give --sparsity (e.g. 0.5) or --pattern N:M (e.g. 2:4)")
        if not 0.0 < sparsity < 1.0:
            raise UserError(f"--sparsity {sparsity}: must be between 0 and 1 (exclusive)")
        return Pattern(float(sparsity), group)
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--pattern {pattern}: expected N:M with whole numbers, e.g. 2:4")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise UserError(f"--pattern {pattern}: need 0 < N < M (N non-zeros kept in every M columns)")
    implied = 1.0 - n / m
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise UserError(f"--pattern {pattern} implies sparsity {implied:g}; drop --sparsity or set it to that")
    return Pattern(implied, "row", n, m)


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim pruning the ``k`` lowest scores of each row (stable tie-break)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        keep.scatter_(-1, idx, False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each row, every block of ``m`` consecutive columns keeps its ``n`` highest scores.

    A trailing partial block of r < m columns keeps at most ``n`` (so it is pruned only when r > n).
    """
    rows, cols = scores.shape
    full = cols - cols % m
    keep = torch.ones_like(scores, dtype=torch.bool)
    if full:
        blocks = scores[:, :full].reshape(rows, full // m, m)
        keep[:, :full] = _prune_lowest(blocks, m - n).reshape(rows, full)
    if cols - full > n:
        keep[:, full:] = _prune_lowest(scores[:, full:], cols - full - n)
    return keep


def build_mask(scores: torch.Tensor, pattern: Pattern, name: str = "") -> torch.Tensor:
    """Keep-mask (True = keep) for a 2-D score matrix; non-finite scores are an error, never a mask."""
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).sum().item()
        raise RunError(
            f"{name or 'a layer'}: {bad} non-finite importance scores (NaN/Inf, e.g. fp16 overflow); "
            "try --dtype float32 or bfloat16"
        )
    scores = scores.to(torch.float32)
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    if pattern.group == "row":
        if pattern.count is None:
            return _prune_lowest(scores, int(scores.shape[1] * pattern.sparsity))
        return _prune_per_row(scores, pattern.count)
    count = int(scores.numel() * pattern.sparsity) if pattern.count is None else pattern.count
    return _prune_lowest(scores.reshape(1, -1), count).reshape(scores.shape)


def _prune_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune ``count`` weights spread evenly over the rows (the first count % rows rows prune one more)."""
    rows = scores.shape[0]
    base, extra = divmod(count, rows)
    keep = _prune_lowest(scores, base)
    if extra:
        keep[:extra] = _prune_lowest(scores[:extra], base + 1)
    return keep


def global_keep(scores: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Masks keeping exactly the ``keep`` highest scores over all tensors (ties: first in order)."""
    flat = torch.cat([s.flatten() for s in scores])
    keep = max(0, min(keep, flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep:
        threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values
        above = flat > threshold
        ties = (flat == threshold).nonzero().flatten()[: keep - int(above.sum())]
        mask = above
        mask[ties] = True
    return list(mask.split([s.numel() for s in scores]))


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every full block of ``m`` columns in every row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    full = cols - cols % m
    nz = (weight[:, :full] != 0).reshape(rows, -1, m).sum(-1)
    tail_ok = cols == full or bool(((weight[:, full:] != 0).sum(-1) <= n).all())
    return bool((nz <= n).all()) and tail_ok
