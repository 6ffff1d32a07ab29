"""GGUF block packers for the legacy 32-weight quant types (Q8_0, Q4_0, Q4_1, Q5_0) and float passthrough; the
256-weight K-quants (Q4_K, Q6_K) live in :mod:`taylorprune.export.gguf_kquants` and are dispatched to from here.

Block layouts (little-endian, one block per 32 consecutive weights along a row, i.e. along the input dimension):

* Q8_0 (34 B):  ``d`` fp16, ``qs`` int8[32];                                   value = d * q
* Q4_0 (18 B):  ``d`` fp16, ``qs`` u8[16] (low nibble: elements 0-15, high: 16-31); value = d * (c - 8), c in 0..15
* Q4_1 (20 B):  ``d`` fp16, ``m`` fp16, ``qs`` u8[16] as Q4_0;                  value = d * c + m
* Q5_0 (22 B):  ``d`` fp16, ``qh`` u32 (bit i = 5th bit of element i), ``qs`` as Q4_0; value = d * (c - 16), c in 0..31

Exact zero: Q8_0 (q = 0), Q4_0 (c = 8) and Q5_0 (c = 16) can always represent 0, so pruned weights stay exactly 0.
Q4_1 generally cannot (``d * c + m == 0`` needs ``-m / d`` to be an integer in 0..15); F32/F16/BF16 trivially can.

Two ways in: :func:`quantize` rounds float weights the way llama.cpp's reference quantizers do (or, given an
importance vector, by a weighted scale search in the spirit of llama.cpp's imatrix quantizers), and the
``*_from_*_grid`` functions pack integer codes plus per-group scales produced by a GPTQ run on the matching grid,
without re-rounding.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from taylorprune.export import gguf_kquants as gk

BLOCK = 32
BLOCK_BYTES = {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20, QT.Q5_0: 22}
QUANT_TYPES = (*BLOCK_BYTES, *gk.K_TYPES)
BLOCK_WEIGHTS = {**dict.fromkeys(BLOCK_BYTES, BLOCK), **dict.fromkeys(gk.K_TYPES, gk.QK_K)}  # weights per block
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
HOLDS_EXACT_ZERO = {
    QT.F32: True, QT.F16: True, QT.BF16: True, QT.Q8_0: True, QT.Q4_0: True, QT.Q5_0: True, QT.Q4_1: False,
    QT.Q6_K: True, QT.Q4_K: False,
}
# symmetric types: (offset added to the signed code, largest stored code)
_SYM = {QT.Q4_0: (8, 15), QT.Q5_0: (16, 31)}


def _np(a, dtype=None) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().float().numpy() if a.is_floating_point() else a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def _blocks(w: np.ndarray) -> np.ndarray:
    if w.ndim == 0 or w.shape[-1] % BLOCK:
        raise ValueError(f"row width {w.shape[-1] if w.ndim else 0} is not a multiple of {BLOCK}")
    return w.reshape(-1, BLOCK)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, ties away from zero (numpy's ``round`` ties to even)."""
    r = np.round(v)
    tie = np.abs(v - np.trunc(v)) == 0.5
    return np.where(tie, np.trunc(v) + np.sign(v), r)


def _fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[n, 32] codes (low 4 bits used) -> [n, 16] bytes: element j in the low nibble, element j + 16 in the high one."""
    c = codes.astype(np.uint8) & np.uint8(0x0F)
    return c[:, :16] | (c[:, 16:] << np.uint8(4))


def _unnibble(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


# ---------------------------------------------------------------------------------------------- packing of codes
def pack_blocks(qtype: QT, d, codes, m=None) -> np.ndarray:
    """Pack per-block scales ``d`` [n] (and mins ``m`` for Q4_1) with codes [n, 32] into raw bytes [n, bytes].

    Codes are the stored ones: int8 -128..127 for Q8_0, 0..15 for Q4_0/Q4_1, 0..31 for Q5_0.
    """
    codes = _np(codes).reshape(-1, BLOCK)
    n = codes.shape[0]
    lo, hi = (-128, 127) if qtype == QT.Q8_0 else (0, 31 if qtype == QT.Q5_0 else 15)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"{qtype.name} codes must lie in {lo}..{hi}")
    parts = [_fp16(_np(d, np.float32).reshape(n, 1)).view(np.uint8)]
    if qtype == QT.Q8_0:
        parts.append(codes.astype(np.int8).view(np.uint8))
    elif qtype == QT.Q4_0:
        parts.append(_nibbles(codes))
    elif qtype == QT.Q4_1:
        if m is None:
            raise ValueError("Q4_1 needs the block minimum m")
        parts += [_fp16(_np(m, np.float32).reshape(n, 1)).view(np.uint8), _nibbles(codes)]
    elif qtype == QT.Q5_0:
        high = ((codes.astype(np.uint32) >> 4) & 1) << np.arange(BLOCK, dtype=np.uint32)
        qh = np.bitwise_or.reduce(high, axis=1).astype("<u4").reshape(n, 1).view(np.uint8)
        parts += [qh, _nibbles(codes)]
    else:
        raise ValueError(f"no block packer for {qtype.name}")
    return np.concatenate(parts, axis=1)


def dequantize(raw, qtype: QT, shape=None) -> np.ndarray:
    """Our own decoder of raw block bytes (any leading shape, last dim = bytes per row) -> float32 weights."""
    raw = _np(raw, np.uint8)
    if qtype in FLOAT_TYPES:
        return _float_decode(raw, qtype, shape)
    if qtype in gk.K_TYPES:
        out = gk.dequantize(raw, qtype)
        return out.reshape(shape) if shape is not None else out
    nbytes = BLOCK_BYTES[qtype]
    rows = raw.shape[:-1]
    b = raw.reshape(-1, nbytes)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    if qtype == QT.Q8_0:
        out = d * b[:, 2:].view(np.int8).astype(np.float32)
    elif qtype == QT.Q4_0:
        out = d * (_unnibble(b[:, 2:]).astype(np.float32) - 8)
    elif qtype == QT.Q4_1:
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        out = d * _unnibble(b[:, 4:]).astype(np.float32) + m
    else:  # Q5_0
        qh = b[:, 2:6].copy().view("<u4").astype(np.uint32)
        high = ((qh >> np.arange(BLOCK, dtype=np.uint32)) & 1).astype(np.uint8) << np.uint8(4)
        out = d * ((_unnibble(b[:, 6:]) | high).astype(np.float32) - 16)
    out = out.reshape(*rows, -1) if rows else out.reshape(-1)
    return out.reshape(shape) if shape is not None else out


def _float_decode(raw: np.ndarray, qtype: QT, shape) -> np.ndarray:
    if qtype == QT.F32:
        out = raw.view(np.float32)
    elif qtype == QT.F16:
        out = raw.view(np.float16).astype(np.float32)
    else:
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return out.reshape(shape) if shape is not None else out


def encode_float(w, qtype: QT) -> np.ndarray:
    """F32/F16/BF16 passthrough: raw little-endian bytes [..., cols * size] (BF16 rounds to nearest even)."""
    w = _np(w, np.float32)
    if qtype == QT.F32:
        return np.ascontiguousarray(w).view(np.uint8)
    if qtype == QT.F16:
        return np.ascontiguousarray(w.astype(np.float16)).view(np.uint8)
    bits = np.ascontiguousarray(w).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    rounded = np.where(np.isnan(w), np.uint16(0x7FC0), rounded)  # keep NaNs NaN
    return np.ascontiguousarray(rounded).view(np.uint8)


# -------------------------------------------------------------------------------------------- float -> blocks
def quantize(w, qtype: QT, importance=None) -> np.ndarray:
    """Quantize float weights [rows, cols] (cols % 32 == 0) to raw blocks [rows, cols / 32 * bytes].

    Without ``importance`` this follows llama.cpp's reference rounding (``quantize_row_*_ref``). With a per-column
    importance vector (``diag(XᵀX)``, as in an imatrix; shape [cols]) Q4_0/Q5_0/Q4_1 use a weighted scale (and min)
    search with per-element weights ``imp_j * sqrt(σ² + x_j²)``; Q8_0 ignores it, as llama.cpp does. Q4_K/Q6_K
    (cols % 256 == 0) go to :func:`gk.quantize`, llama.cpp's ``_ref`` / imatrix ``_impl`` searches.
    """
    if qtype in FLOAT_TYPES:
        return encode_float(w, qtype)
    w = _np(w, np.float32)
    if qtype in gk.K_TYPES:  # 256-weight super-blocks: cols % 256 == 0
        flat = w.reshape(-1, w.shape[-1])
        imp = None if importance is None else _np(importance, np.float32)
        return gk.quantize(flat, qtype, imp).reshape(*w.shape[:-1], -1)
    rows = w.shape[:-1]
    x = _blocks(w)
    with np.errstate(all="ignore"):  # subnormal scales: 1/d overflows as in C; such blocks decode to ~0 anyway
        raw = _quantize_blocks(x, w, qtype, importance)
    return raw.reshape(*rows, -1)


def _quantize_blocks(x: np.ndarray, w: np.ndarray, qtype: QT, importance) -> np.ndarray:
    if importance is not None and qtype != QT.Q8_0:
        imp = np.broadcast_to(_np(importance, np.float32), w.shape)
        sigma2 = (w.astype(np.float64) ** 2).mean(axis=-1, keepdims=True)
        weight = (imp * np.sqrt(sigma2 + w.astype(np.float64) ** 2)).reshape(-1, BLOCK)
        raw = _weighted_q4_1(x, weight) if qtype == QT.Q4_1 else _weighted_sym(x, weight, qtype)
    elif qtype == QT.Q8_0:
        amax = np.abs(x).max(axis=1, keepdims=True)
        d = amax / np.float32(127)
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        raw = pack_blocks(qtype, d, np.nan_to_num(_round_half_away(x * inv)).astype(np.int8))
    elif qtype in _SYM:
        offset, top = _SYM[qtype]
        signed_max = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
        d = signed_max / np.float32(-offset)
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        codes = np.minimum(top, np.nan_to_num(np.trunc(x * inv + np.float32(offset + 0.5)))).astype(np.uint8)
        raw = pack_blocks(qtype, d, codes)
    elif qtype == QT.Q4_1:
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        d = (hi - lo) / np.float32(15)
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        codes = np.minimum(15, np.nan_to_num(np.trunc((x - lo) * inv + np.float32(0.5)))).astype(np.uint8)
        raw = pack_blocks(qtype, d, codes, lo)
    else:
        raise ValueError(f"cannot quantize to {qtype.name}")
    return raw


def _weighted_sym(x: np.ndarray, weight: np.ndarray, qtype: QT) -> np.ndarray:
    """Per block, try 19 reciprocal scales around ``-offset / max``; for each, round, fit the least-squares scale for
    those codes under ``weight`` and keep the one with the smallest weighted error. Codes are re-rounded with the
    fp16 scale actually stored."""
    offset, top = _SYM[qtype]
    x64 = x.astype(np.float64)
    signed_max = np.take_along_axis(x64, np.abs(x64).argmax(axis=1)[:, None], axis=1)
    safe_max = np.where(signed_max == 0, 1.0, signed_max)
    best_d, best_gain = np.zeros((x.shape[0], 1)), np.full((x.shape[0], 1), -np.inf)
    for step in range(-9, 10):
        inv = -(offset + 0.1 * step) / safe_max
        q = np.clip(np.round(x64 * inv), -offset, top - offset)
        sum_xq, sum_qq = (weight * x64 * q).sum(1, keepdims=True), (weight * q * q).sum(1, keepdims=True)
        d = np.divide(sum_xq, sum_qq, out=np.zeros_like(sum_xq), where=sum_qq > 0)
        gain = d * sum_xq  # weighted error = Σwx² − gain
        better = gain > best_gain
        best_d, best_gain = np.where(better, d, best_d), np.where(better, gain, best_gain)
    d16 = _fp16(best_d).astype(np.float64)
    inv = np.divide(1.0, d16, out=np.zeros_like(d16), where=d16 != 0)
    codes = np.clip(np.round(x64 * inv), -offset, top - offset) + offset
    return pack_blocks(qtype, d16, codes.astype(np.uint8))


def _weighted_q4_1(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per block, try 19 step sizes around ``(max - min) / 15``; for each, round, then solve the weighted 2×2
    least-squares problem for (d, m) and keep the pair with the smallest weighted error."""
    x64 = x.astype(np.float64)
    lo, hi = x64.min(1, keepdims=True), x64.max(1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    best = (np.zeros_like(lo), lo.copy(), np.full_like(lo, np.inf))
    sw, swx = weight.sum(1, keepdims=True), (weight * x64).sum(1, keepdims=True)
    for step in range(-9, 10):
        q = np.clip(np.round((x64 - lo) * (15 + 0.1 * step) / span), 0, 15)
        swq, swqq = (weight * q).sum(1, keepdims=True), (weight * q * q).sum(1, keepdims=True)
        swxq = (weight * x64 * q).sum(1, keepdims=True)
        det = sw * swqq - swq * swq
        ok = det > 1e-30
        safe = np.where(ok, det, 1.0)
        d = np.where(ok, (sw * swxq - swq * swx) / safe, 0.0)
        m = np.where(ok, (swqq * swx - swq * swxq) / safe, np.where(sw > 0, swx / np.where(sw > 0, sw, 1), lo))
        err = (weight * (x64 - d * q - m) ** 2).sum(1, keepdims=True)
        better = err < best[2]
        best = tuple(np.where(better, new, old) for new, old in zip((d, m, err), best, strict=True))
    d16, m16 = _fp16(best[0]).astype(np.float64), _fp16(best[1]).astype(np.float64)
    inv = np.divide(1.0, d16, out=np.zeros_like(d16), where=d16 != 0)
    codes = np.clip(np.round((x64 - m16) * inv), 0, 15).astype(np.uint8)
    return pack_blocks(QT.Q4_1, d16, codes, m16)


# ----------------------------------------------------------------------------------------- GPTQ grids -> blocks
def _grid_scales(scales, rows, groups, what: str, strict: bool) -> np.ndarray:
    s = _np(scales, np.float32).reshape(rows, groups)
    if strict and not np.array_equal(_fp16(s).astype(np.float32), s):
        raise ValueError(f"{what} are not fp16-representable: round them to fp16 before GPTQ's error feedback")
    return s


def q4_0_from_sym_grid(codes, scales, *, signed: bool = False, strict: bool = True) -> np.ndarray:
    """Symmetric 4-bit group-32 grid (value = scale · (c − 8), c in 0..15; or c in −8..7 with ``signed=True``, as
    compressed-tensors stores it) -> Q4_0 raw blocks [rows, cols / 32 * 18]. Exact when the scales are fp16 values
    (``strict`` checks that): Q4_0 decodes ``d · (c − 8)`` with the same d and c."""
    c = _np(codes).astype(np.int64) + (8 if signed else 0)
    rows, cols = c.shape
    s = _grid_scales(scales, rows, cols // BLOCK, "scales", strict)
    return pack_blocks(QT.Q4_0, s.reshape(-1), _blocks(c)).reshape(rows, -1)


def q8_0_from_sym_grid(codes, scales, *, strict: bool = True) -> np.ndarray:
    """Symmetric 8-bit group-32 grid (value = d · q, q int8) -> Q8_0 raw blocks [rows, cols / 32 * 34]."""
    q = _np(codes).astype(np.int64)
    rows, cols = q.shape
    s = _grid_scales(scales, rows, cols // BLOCK, "scales", strict)
    return pack_blocks(QT.Q8_0, s.reshape(-1), _blocks(q)).reshape(rows, -1)


def q4_1_from_asym_grid(codes, scales, zeros, *, strict: bool = True) -> tuple[np.ndarray, float]:
    """Asymmetric 4-bit group-32 grid (value = scale · (c − z), c in 0..15) -> Q4_1 blocks with d = scale,
    m = −scale · z. Returns (raw blocks, largest |value change|): the change is 0 when ``−scale · z`` is an fp16
    value (``strict`` raises otherwise), else the fp16 rounding of m; fp32 evaluation order may add an ulp."""
    c = _np(codes).astype(np.int64)
    rows, cols = c.shape
    s = _grid_scales(scales, rows, cols // BLOCK, "scales", strict)
    z = _np(zeros, np.float32).reshape(rows, cols // BLOCK)
    m = -s * z
    m16 = _fp16(m).astype(np.float32)
    if strict and not np.array_equal(m16, m):
        raise ValueError("Q4_1 cannot represent this grid exactly: −scale·zero is not an fp16 value")
    raw = pack_blocks(QT.Q4_1, s.reshape(-1), _blocks(c), m.reshape(-1)).reshape(rows, -1)
    want = (np.repeat(s, BLOCK, axis=1) * (c - np.repeat(z, BLOCK, axis=1))).astype(np.float32)
    return raw, float(np.abs(dequantize(raw, QT.Q4_1) - want).max(initial=0.0))
