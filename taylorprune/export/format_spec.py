"""What an output format declares (``export.formats`` registers them), so the writer and the readers are blind to it.

A format says how it writes a run's model (``write``), how it checks what it wrote by reading it back (``verify``),
the size of its weight files (``size``), how a reader sees the linears of a folder in that format (``linears``,
for ``inspect`` and ``check --min-sparsity``; ``detect`` recognises such a folder), and what it can hold
(``Holds``): quantization codes and grids, exact zeros, compact (structured) shapes. What a run will put in its
output (``Contents``) is known before any weight is loaded, so a format refuses what it cannot hold in one line
before any work, the way compressed-tensors' compressors each own ``compress`` and ``decompress``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from taylorprune.options import NoOptions, Options


@dataclass(frozen=True)
class GridKind:
    """The grid of a run's quantized linears, as far as a format cares."""

    wbits: int
    group_size: int
    symmetric: bool
    zero_point: str  # asymmetric grids: "integer" or "float" (d·q + m)
    ordered_groups: bool  # groups are runs of consecutive columns (False: a checkpoint needs a g_idx)
    scale_dtype: str = "float16"

    def describe(self) -> str:
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        kind = "symmetric" if self.symmetric else f"asymmetric ({self.zero_point} zero point)"
        return f"{self.wbits}-bit {group} {kind}"


@dataclass(frozen=True)
class Contents:
    """What a run writes besides float weights: a grid (None: no quantization), masks, shapes smaller than the
    source's (structured pruning)."""

    grid: GridKind | None = None
    masks: bool = False
    compact: bool = False
    architecture: str | None = None  # config.json's model_type (None: not known)
    config: Any = None  # the source's config (None: not known), for what a format's runtime would compute otherwise


@dataclass
class Output:
    """What the write phase hands a format: the model in memory, its tokenizer, the per-linear records the folder
    is verified against, the widths config.json must carry (structured runs), the names of the quantized linears
    and, for formats that store codes, their codes and grids (``export.compressed_tensors.LinearQuant``)."""

    model: Any
    tokenizer: Any
    linears: list[dict]
    widths: dict[str, int] | None = None
    quantized: frozenset[str] = frozenset()
    grids: Mapping[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the format could write only with a caveat
    options: Any = None  # the format's own options (``Format.options``), None for a format without any
    source_gguf: str | None = None  # the GGUF the model and its tokenizer were read from (its tokenizer is copied)


@dataclass(frozen=True)
class StoredLinear:
    """A weight as a reader sees it: tensor name (``….weight``), shape, stored dtype, the float values on demand,
    and its grid ({wbits, group_size, symmetric}; None for a float tensor)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], torch.Tensor]
    grid: dict | None = None


@dataclass(frozen=True)
class Holds:
    """What a format can hold. ``codes``: quantized linears as codes + grid (else as their dequantized values);
    ``needs_grid``: only quantized runs; ``grid``: why a grid cannot be stored (None: it can)."""

    codes: bool
    needs_grid: bool = False
    exact_zeros: bool = True
    compact_shapes: bool = True
    grid: Callable[[GridKind], str | None] = lambda kind: None


@dataclass(frozen=True)
class Format:
    """An output format: see the module docstring."""

    name: str
    summary: str
    holds: Holds
    write: Callable[[Output, Path], None]
    verify: Callable[[Path, Output], None]
    size: Callable[[Path], int]
    detect: Callable[[Path], bool]
    linears: Callable[[Path], Iterator[StoredLinear]]
    options: type[Options] = NoOptions  # the format's own flags (the CLI derives them)
    refuses: Callable[[Contents, Any], str | None] | None = None  # what its options cannot go with
    width_unit: Callable[[Any], int] = lambda options: 1  # weights its blocks need along a row, for its options

    def refusal(self, contents: Contents, options: Any = None) -> str | None:
        """Why this format cannot hold ``contents`` with its ``options`` (None: it can)."""
        if self.refuses is not None:
            reason = self.refuses(contents, options if options is not None else self.options())
            if reason:
                return reason
        h = self.holds
        if contents.grid is None and h.needs_grid:
            return "stores quantized weights; add --quantize rtn or --quantize gptq"
        if contents.masks and not h.exact_zeros:
            return "cannot keep pruned weights exactly 0"
        if contents.compact and not h.compact_shapes:
            return "cannot hold the smaller shapes of a structured run"
        return h.grid(contents.grid) if contents.grid is not None and h.codes else None


def quantization_method(folder: Path) -> str | None:
    """``quantization_config.quant_method`` of a folder's config.json (None: no config, or float weights)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    return qcfg.get("quant_method") if isinstance(qcfg, dict) else None
