"""Sparsity of a checkpoint's linears read straight from its weight files, one tensor at a time.

Nothing is instantiated: no model class, no transformers import. So ``inspect`` and ``check --min-sparsity`` work
on any Hugging Face folder, of any size, in seconds and with the memory of the largest single tensor. The folder's
output format (``export.formats``: plain safetensors, or compressed-tensors, whose packed linears are read with
their grid and dequantized) says how its linears are read.

Which tensors count as linears, without the model's code: 2-D tensors whose name ends in ``.weight`` and
sits inside a numbered decoder block (``….layers.<i>.…``, ``….h.<i>.…`` or ``….blocks.<i>.…``). That covers
the projections ``taylorprune run`` prunes and leaves out embeddings, ``lm_head`` and norms (1-D). When a
folder carries a taylorprune report, callers can pass the exact names the report lists instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from taylorprune.errors import UserError
from taylorprune.export.format_spec import StoredLinear
from taylorprune.export.formats import FORMATS, format_of
from taylorprune.prune.masks import check_nm

BLOCK_RE = re.compile(r"\.(?:layers|h|blocks)\.\d+\.")
# Checked for every linear; 1:2 implies 2:4 implies 4:8, so a 2:4 model also reports 4:8 (and 1:2 when sparser).
NM_CANDIDATES: tuple[tuple[int, int], ...] = ((1, 2), (1, 4), (2, 4), (1, 8), (2, 8), (4, 8))


@dataclass(frozen=True)
class TensorSparsity:
    """Zeros of one stored weight and the N:M patterns it satisfies."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    zeros: int
    nm: tuple[str, ...] = ()
    grid: dict | None = None  # a quantized linear's {wbits, group_size, symmetric, scale_dtype}

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "numel": self.numel,
                "zeros": self.zeros, "sparsity": self.sparsity, "nm": list(self.nm), "grid": self.grid}


def weight_folder(folder: Path, flag: str = "DIR") -> None:
    """A folder some output format reads (``export.formats``), or a UserError saying why not."""
    if not folder.exists():
        raise UserError(f"{flag} {folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: not a folder")
    if not any(f.detect(folder) for f in FORMATS.values()):
        raise UserError(f"{flag} {folder}: no weights of any output format in it ({', '.join(FORMATS)})")


def is_block_linear(name: str, shape: Iterable[int]) -> bool:
    """A 2-D ``.weight`` inside a numbered decoder block (see the module docstring)."""
    return name.endswith(".weight") and len(tuple(shape)) == 2 and bool(BLOCK_RE.search(name))


def nm_patterns(weight: torch.Tensor, candidates: Iterable[tuple[int, int]] = NM_CANDIDATES) -> tuple[str, ...]:
    """The candidate N:M patterns ``weight`` satisfies (along its input columns, as the pruner writes them)."""
    return tuple(f"{n}:{m}" for n, m in candidates if weight.shape[1] >= m and check_nm(weight, n, m))


def scan(
    folder: Path,
    names: Iterable[str] | None = None,
    candidates: Iterable[tuple[int, int]] = NM_CANDIDATES,
    flag: str = "DIR",
) -> list[TensorSparsity]:
    """Per-linear zeros (and N:M compliance) of ``folder``; ``names`` (tensor names) overrides the block rule."""
    wanted = set(names) if names is not None else None
    candidates = tuple(candidates)
    weight_folder(folder, flag)
    fmt = format_of(folder)
    found: list[TensorSparsity] = []
    try:
        for stored in fmt.linears(folder):
            if stored.name in wanted if wanted is not None else is_block_linear(stored.name, stored.shape):
                found.append(_row(stored, candidates))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{flag} {folder}: cannot read its {fmt.name} weights ({str(exc).splitlines()[0]})") from None
    if wanted is not None and (missing := wanted - {t.name for t in found}):
        raise UserError(f"{flag} {folder}: the report lists {len(missing)} linears missing from the weights, "
                        f"e.g. {sorted(missing)[0]}")
    if not found:
        raise UserError(f"{flag} {folder}: no 2-D '.weight' tensors inside decoder blocks (….layers.<i>.…)")
    return sorted(found, key=lambda t: _natural_key(t.name))


def _row(stored: StoredLinear, candidates: tuple[tuple[int, int], ...]) -> TensorSparsity:
    t = stored.load()
    if t.dtype.is_floating_point and t.element_size() == 1:
        t = t.to(torch.float16)  # float8: comparisons are not implemented for it everywhere
    nm = nm_patterns(t, candidates) if t.dim() == 2 else ()
    return TensorSparsity(stored.name, stored.shape, stored.dtype, t.numel(), int((t == 0).sum().item()), nm,
                          stored.grid)


def total(rows: list[TensorSparsity]) -> tuple[int, int, float]:
    """(numel, zeros, sparsity) over all rows, weighted by size."""
    numel = sum(r.numel for r in rows)
    zeros = sum(r.zeros for r in rows)
    return numel, zeros, zeros / max(numel, 1)


def common_nm(rows: list[TensorSparsity]) -> list[str]:
    """N:M patterns that every row satisfies, in candidate order."""
    held = [f"{n}:{m}" for n, m in NM_CANDIDATES]
    return [p for p in held if rows and all(p in r.nm for r in rows)]


def _natural_key(name: str) -> list[object]:
    """layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
