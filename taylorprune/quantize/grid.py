"""Uniform integer quantization grids along the input dimension of a weight, as GPTQ and compressed-tensors define them.

A grid maps each weight to an unsigned code q ∈ [0, 2^wbits − 1]. Parameters are shared by a *group*: one output
row (``group_size=-1``, per channel) or ``group_size`` consecutive input columns of one row (32: GGUF's legacy
blocks; 128: compressed-tensors' ``W4A16`` preset). Three kinds:

- symmetric (``symmetric=True``): value = scale·(q − zero) with zero = 2^(wbits−1) and scale = 2·amax/(2^wbits − 1),
  amax = max |w| of the group. That is compressed-tensors' ``scale = amax / (bit_range/2)`` with signed codes
  q − zero ∈ [−2^(b−1), 2^(b−1) − 1] (its packer adds 2^(b−1), which gives our unsigned codes), and GPTQ's ``sym``
  quantizer for every group holding a negative weight (``quant.py`` sets xmin = −amax only where xmin < 0; a group
  without negative weights gets scale xmax/maxq there, so weights above (2^(b−1) − 1)/maxq·xmax are clipped; we do
  not reproduce that quirk).
- asymmetric with an integer zero point (``zero_point="integer"``, GPTQ and compressed-tensors): the group's min and
  max are first widened to include 0, scale = (max − min)/maxq, zero = round(−min/scale) clamped to [0, maxq], the
  scale being the stored (rounded) one; compressed-tensors' ``calculate_qparams`` takes the zero point from the
  unrounded scale and rounds the scale afterwards (to ``scale_dtype``, else it stays in the observed weight dtype).
- asymmetric with a float minimum (``zero_point="float"``, llama.cpp's Q4_1/Q5_1 reference form ``d·q + m``):
  d = (max − min)/maxq, m = min, no widening to 0.

Scales (and float minima) are rounded to their stored precision (``scale_dtype``, fp16 by default, as GGUF and the
half-precision checkpoints store them) *before* codes are chosen, so what GPTQ's error feedback sees is exactly what
a runtime will dequantize; zero points are integers and need no rounding. An all-zero group gets GPTQ's range ±1.

``holds_zero``: the two integer kinds represent 0 exactly (q = zero gives scale·0); the float-minimum kind only by
accident (−m/d integral), so pruning masks are refused with it (see the design note §1c).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taylorprune.errors import UserError

GROUP_SIZES = (-1, 32, 64, 128)
ZERO_POINTS = ("integer", "float")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class GridSpec:
    """Bits, grouping and kind of a grid; defaults are compressed-tensors' ``W4A16`` preset (int4 sym, group 128)."""

    wbits: int = 4
    group_size: int = 128
    symmetric: bool = True
    zero_point: str = "integer"  # asymmetric grids only: "integer" (GPTQ / compressed-tensors) or "float" (Q4_1)
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if isinstance(self.wbits, bool) or not isinstance(self.wbits, int) or not MIN_BITS <= self.wbits <= MAX_BITS:
            raise UserError(f"--wbits {self.wbits}: choose a whole number from {MIN_BITS} to {MAX_BITS}")
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"--group-size {self.group_size}: choose -1 (per output channel), 32, 64 or 128")
        if self.zero_point not in ZERO_POINTS:
            raise UserError(f"--zero-point {self.zero_point}: choose integer or float")
        if self.symmetric and self.zero_point != "integer":
            raise UserError("--zero-point float applies to asymmetric grids only (a symmetric grid's zero is 2^(b-1))")
        if self.scale_dtype not in SCALE_DTYPES:
            raise UserError(f"--scale-dtype {self.scale_dtype}: choose one of {', '.join(SCALE_DTYPES)}")

    @property
    def maxq(self) -> int:
        return 2**self.wbits - 1

    @property
    def stored_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def groups(self, width: int, name: str = "") -> int:
        """Groups per row for an input width, refusing widths the group size does not divide."""
        if self.group_size == -1:
            return 1
        if width % self.group_size:
            where = f"{name}: " if name else ""
            raise UserError(f"{where}input width {width} is not a multiple of group size {self.group_size}; "
                            "use group size -1 or a divisor of the width")
        return width // self.group_size

    def describe(self) -> str:
        kind = "sym" if self.symmetric else f"asym ({self.zero_point} zero point)"
        group = "per channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.wbits} {group} {kind}, {self.scale_dtype} scales"


@dataclass(frozen=True)
class Grid:
    """Parameters of every group of one weight, each ``[out, groups]``.

    ``zero`` (uint8 codes) is set for the integer kinds, ``minimum`` (stored dtype) for the float-minimum kind.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None
    minimum: torch.Tensor | None

    @property
    def offset(self) -> torch.Tensor:
        """The second parameter, whichever kind: zero codes or float minima."""
        return self.zero if self.zero is not None else self.minimum

    def column(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) of one group for all rows, each ``[out]``."""
        return self.scale[:, group], self.offset[:, group]


def holds_zero(spec: GridSpec) -> bool:
    """Whether every group of this grid kind can store an exact 0 (needed to keep pruned weights at 0)."""
    return spec.symmetric or spec.zero_point == "integer"


def require_zero(spec: GridSpec, name: str = "") -> None:
    """Refuse a pruning mask on a grid without an exact 0, in one line."""
    if not holds_zero(spec):
        where = f"{name}: " if name else ""
        raise UserError(f"{where}{spec.describe()} cannot store an exact 0 (d·q + m = 0 needs -m/d integral), so "
                        "pruned weights would not stay 0; use a symmetric grid or an integer zero point")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 as GPTQ computes (``GPTQ_PRECISION``), fp64 when an input is fp64 (the tests' references)."""
    out = torch.float32
    for t in tensors:
        out = torch.promote_types(out, t.dtype)
    return out


def _store(values: torch.Tensor, spec: GridSpec, positive: bool) -> torch.Tensor:
    """Round to the stored dtype; a positive scale never becomes 0 or inf (compressed-tensors replaces 0 by eps)."""
    finfo = torch.finfo(spec.stored_dtype)
    stored = values.clamp(-finfo.max, finfo.max).to(spec.stored_dtype)
    if positive:
        stored = torch.where(stored == 0, torch.full_like(stored, finfo.tiny), stored)
    return stored


def minmax(x: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(unrounded min-max scale, group minimum) over the last dim; the minimum is widened to ≤ 0 for integer kinds."""
    x = x.to(compute_dtype(x))
    xmin, xmax = x.amin(dim=-1), x.amax(dim=-1)
    if spec.zero_point == "float" and not spec.symmetric:
        return (xmax - xmin) / spec.maxq, xmin
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    if spec.symmetric:
        amax = torch.maximum(-xmin, xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        return 2 * amax / spec.maxq, -amax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    return (xmax - xmin) / spec.maxq, xmin


def params_from(raw_scale: torch.Tensor, xmin: torch.Tensor, spec: GridSpec) -> Grid:
    """Stored parameters for a raw scale: scale rounded first, then the zero point from the rounded scale."""
    if spec.symmetric:
        scale = _store(raw_scale, spec, positive=True)
        zero = torch.full(scale.shape, 2 ** (spec.wbits - 1), dtype=torch.uint8, device=scale.device)
        return Grid(scale, zero, None)
    if spec.zero_point == "float":  # d = 0 (constant group) stays 0: every code is 0 and the value is m
        return Grid(_store(raw_scale.clamp(min=0), spec, positive=False), None, _store(xmin, spec, positive=False))
    scale = _store(raw_scale, spec, positive=True)
    zero = torch.round(-xmin / scale.to(xmin.dtype)).clamp(0, spec.maxq)
    return Grid(scale, zero.to(torch.uint8), None)


def group_params(x: torch.Tensor, spec: GridSpec) -> Grid:
    """Min-max parameters of the groups laid out along the last dim of ``x`` (GPTQ's ``find_params``)."""
    raw, xmin = minmax(x, spec)
    return params_from(raw, xmin, spec)


def grouped(weight: torch.Tensor, spec: GridSpec, name: str = "") -> torch.Tensor:
    """``weight`` [out, in] viewed as [out, groups, group width]."""
    rows, cols = weight.shape
    groups = spec.groups(cols, name)
    return weight.reshape(rows, groups, cols // groups)


def compute_grid(weight: torch.Tensor, spec: GridSpec, name: str = "") -> Grid:
    """Min-max grid of every group of ``weight`` [out, in] (the static grid of llm-compressor's observer)."""
    return group_params(grouped(weight, spec, name), spec)


def column_groups(width: int, spec: GridSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """Group of each input column when groups are contiguous (static groups, no ``g_idx``)."""
    cols = torch.arange(width, device=device)
    return torch.zeros_like(cols) if spec.group_size == -1 else cols // spec.group_size


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Codes (uint8) of ``x`` on a grid, parameters broadcast against ``x``; round half to even as torch.round."""
    dtype = compute_dtype(x)
    x, s = x.to(dtype), scale.to(dtype)
    if spec.symmetric or spec.zero_point == "integer":
        q = torch.round(x / s) + offset.to(dtype)
    else:
        q = torch.where(s > 0, torch.round((x - offset.to(dtype)) / s), torch.zeros_like(x))
    return q.clamp(0, spec.maxq).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: GridSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of codes: scale·(q − zero) for the integer kinds (exact small integers times the stored scale, so a
    code at the zero point is exactly 0), d·q + m for the float-minimum kind."""
    q, s = codes.to(dtype), scale.to(dtype)
    if spec.symmetric or spec.zero_point == "integer":
        return s * (q - offset.to(dtype))
    return s * q + offset.to(dtype)


def expand(grid: Grid, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element (scale, offset), each [out, in], for the group of every input column."""
    return grid.scale[:, group_index], grid.offset[:, group_index]


def quantize_weight(weight: torch.Tensor, grid: Grid, spec: GridSpec,
                    group_index: torch.Tensor | None = None) -> torch.Tensor:
    """Codes [out, in] of a whole weight; ``group_index`` defaults to contiguous groups."""
    if group_index is None:
        group_index = column_groups(weight.shape[1], spec, weight.device)
    return quantize(weight, *expand(grid, group_index), spec)


def dequantize_weight(codes: torch.Tensor, grid: Grid, spec: GridSpec, group_index: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values [out, in] of the codes of a whole weight."""
    if group_index is None:
        group_index = column_groups(codes.shape[1], spec, codes.device)
    return dequantize(codes, *expand(grid, group_index), spec, dtype)
