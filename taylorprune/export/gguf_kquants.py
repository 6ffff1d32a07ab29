"""GGUF "K-quant" block packers: Q4_K and Q6_K (256-weight super-blocks), and our own decoder for both.

Why a second module: the super-block types search scales at two levels (per sub-block, then the sub-block scales
themselves are quantized against one fp16 super-scale), which is more code than the 32-weight types of
:mod:`taylorprune.export.gguf_blocks` and shares nothing with them but fp16 rounding.

Layouts (little-endian, one super-block per 256 consecutive weights of a row):

* Q4_K (144 B): ``d`` fp16, ``dmin`` fp16, ``scales`` u8[12] (eight 6-bit scales and eight 6-bit mins, packed),
  ``qs`` u8[128] (sub-blocks 2k and 2k+1 share 32 bytes: low nibbles 2k, high nibbles 2k+1);
  value = d·sc_j·q − dmin·m_j, q in 0..15, j = the 32-weight sub-block.
* Q6_K (210 B): ``ql`` u8[128] (low 4 bits), ``qh`` u8[64] (high 2 bits), ``scales`` int8[16], ``d`` fp16;
  value = d·sc_j·(q − 32), q in 0..63, j = the 16-weight sub-block.

Rounding follows llama.cpp's quantizers step by step: without importance ``quantize_row_q4_K_ref`` (a weighted
min/scale search per sub-block, weights ``rms + |x|``, 21 candidate step sizes) and ``quantize_row_q6_K_ref``
(an x²-weighted scale search per sub-block, 19 candidates); with a per-column importance vector (an imatrix) the
``*_impl`` variants (Q4_K: weights ``imp·sqrt(σ² + x²)``, 37 candidates, then a weighted fit of the 6-bit sub-block
scales; Q6_K: the importance itself as the search weight). Vectorized over blocks, with float32 sums added left to
right as the C loops do; a llama.cpp binary built with FMA contraction (-march=native) may still move a last bit
and, rarely, a near-tie between two candidate scales — the decoded values are what the file holds either way.

Exact zeros: Q6_K's q = 32 is 0, so pruned weights stay 0. Q4_K's ``d·sc·q − dmin·m`` holds 0 only by accident
(like Q4_1): pruned weights come back as small values near 0.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

QK_K = 256
K_BYTES = {QT.Q4_K: 144, QT.Q6_K: 210}
K_TYPES = tuple(K_BYTES)
_EPS = np.float32(1e-15)  # llama.cpp's GROUP_MAX_EPS: a group whose |max| is below it is all zeros
F32 = np.float32


def _fp16_round(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=F32).astype(np.float16)


def _safe(v: np.ndarray) -> np.ndarray:
    """inf/nan (from 0-width ranges, which the C code guards or lets be) -> 0 before rounding to integers."""
    return np.where(np.isfinite(v), v, F32(0)).astype(F32)


def _sum(a: np.ndarray) -> np.ndarray:
    """Σ over the last axis in float32, left to right as the C loops add (numpy's pairwise order would move last
    bits, and with them the odd near-tie between two candidate scales)."""
    acc = a[..., 0].astype(F32)
    for i in range(1, a.shape[-1]):
        acc = acc + a[..., i]
    return acc[..., None]


# ------------------------------------------------------------------------------------------------ scale searches
def _min_scale_search(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, clamp_above: bool):
    """Per group (rows of ``x``), codes L in 0..nmax, scale s and min m ≤ 0 minimizing Σ w (s·L + m − x)²: start
    from the range, then try ``nstep + 1`` step sizes, each followed by the weighted least-squares (s, m) for its
    codes (m forced to 0 when it comes out positive). ``clamp_above``: candidates round ``min(v, nmax)`` and map
    v ≤ 0 to 0 (llama.cpp's make_qkx3_quants), else clip the rounded value (make_qkx2_quants).
    Returns (scale [n, 1], the positive min −m [n, 1], codes [n, k] uint8)."""
    lo = np.minimum(x.min(-1, keepdims=True), F32(0))
    hi = x.max(-1, keepdims=True)
    flat = (hi <= lo) if clamp_above else (hi == lo)
    sum_w, sum_x = _sum(w), _sum(w * x)
    with np.errstate(all="ignore"):
        iscale = _safe(F32(nmax) / (hi - lo))
        scale = _safe(F32(1) / iscale)
        codes = np.clip(np.rint(iscale * (x - lo)), 0, nmax).astype(F32)
        best = _sum(w * (scale * codes + lo - x) ** 2)
        for step in range(nstep + 1):
            iscale = _safe((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo))
            v = _safe(iscale * (x - lo))
            cand = (np.where(v > 0, np.rint(np.minimum(v, F32(nmax))), F32(0)) if clamp_above
                    else np.clip(np.rint(v), 0, nmax)).astype(F32)
            sum_l, sum_l2, sum_xl = _sum(w * cand), _sum(w * cand * cand), _sum(w * cand * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            err = _sum(w * (this_scale * cand + this_min - x) ** 2)
            better = (det > 0) & (err < best) & ~flat
            codes = np.where(better, cand, codes)
            best, scale, lo = (np.where(better, a, b) for a, b in ((err, best), (this_scale, scale), (this_min, lo)))
    codes = np.where(flat, F32(0), codes)
    scale = np.where(flat, F32(0), scale)
    return scale.astype(F32), (-lo).astype(F32), codes.astype(np.uint8)


def _signed_scale_search(x, qw, nmax: int):
    """llama.cpp's make_qx_quants with rmse_type 1, per group: codes l in −nmax..nmax−1 (stored + nmax) and the
    scale maximizing (Σ w x l)² / Σ w l² over 19 reciprocal scales around −nmax / max, weights ``qw`` or x².
    Returns (scale [n, 1], codes [n, k] uint8)."""
    idx = np.abs(x).argmax(-1)[:, None]
    signed_max = np.take_along_axis(x, idx, -1)
    zero = np.abs(signed_max) < _EPS
    w = x * x if qw is None else qw
    with np.errstate(all="ignore"):
        def attempt(iscale):
            lv = np.clip(np.rint(_safe(iscale * x)), -nmax, nmax - 1).astype(F32)
            return lv, _sum(w * x * lv), _sum(w * lv * lv)

        lv, sumlx, suml2 = attempt(F32(-nmax) / signed_max)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            cand, slx, sl2 = attempt(-(F32(nmax) + F32(0.1) * F32(step)) / signed_max)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            lv = np.where(better, cand, lv)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
    codes = np.where(zero, F32(0), lv + F32(nmax))
    return np.where(zero, F32(0), scale).astype(F32), codes.astype(np.uint8)


def _fit_sub_scales(s: np.ndarray, sw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's make_qp_quants: the sub-block scales ``s`` [n, 8] (≥ 0) as integers 0..nmax times one block
    scale, weighted by ``sw`` (the sub-blocks' summed weights): pick the best of 9 step sizes, then up to 5 passes
    that move single integers while the weighted fit improves. Returns (block scale [n, 1], integers [n, 8])."""
    top = np.maximum(s.max(-1, keepdims=True), F32(0))
    zero = top < _EPS
    with np.errstate(all="ignore"):
        iscale = _safe(F32(nmax) / top)
        codes = np.rint(iscale * s)
        diff = s - _safe(F32(1) / iscale) * codes
        best = _sum(sw * diff * diff)  # (w·d)·d, the C order
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            cand_is = _safe((F32(0.1) * F32(step) + F32(nmax)) / top)
            lv = np.minimum(F32(nmax), np.rint(cand_is * s))
            diff = s - _safe(F32(1) / cand_is) * lv
            mse = _sum(sw * diff * diff)
            better = mse < best
            best, iscale = np.where(better, mse, best), np.where(better, cand_is, iscale)
        lv = np.minimum(F32(nmax), np.rint(iscale * s)).astype(F32)
        sumlx, suml2 = _sum(sw * s * lv), _sum(sw * lv * lv)
        for _ in range(5):
            for i in range(s.shape[1]):
                wi, xi, li = sw[:, i:i + 1], s[:, i:i + 1], lv[:, i:i + 1]
                slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
                ok = (slx > 0) & (sl2 > 0)
                new = np.minimum(F32(nmax), np.rint(_safe(xi * sl2 / slx)))
                slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
                take = ok & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                lv[:, i:i + 1] = np.where(take, new, li)
                sumlx, suml2 = np.where(take, slx2, sumlx), np.where(take, sl22, suml2)
        d = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), d).astype(F32), np.where(zero, F32(0), np.clip(lv, 0, nmax)).astype(np.uint8)


# -------------------------------------------------------------------------------------------------------- Q4_K
def _q4_k(x: np.ndarray, imp) -> np.ndarray:
    """x [nb, 256] -> raw Q4_K blocks [nb, 144]; ``imp`` [nb, 256] per-weight importance or None."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    if imp is None:  # quantize_row_q4_K_ref
        av = np.sqrt(_sum(sub * sub) / F32(32))
        scales, mins, codes = _min_scale_search(sub, av + np.abs(sub), 15, -1.0, 0.1, 20, False)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale = np.maximum(scales.max(-1, keepdims=True), F32(0))
        max_min = np.maximum(mins.max(-1, keepdims=True), F32(0))
        with np.errstate(all="ignore"):
            inv_s = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_m = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(np.rint(inv_s * scales).astype(np.int64) & 0xFF, 63)
        lm = np.minimum(np.rint(inv_m * mins).astype(np.int64) & 0xFF, 63)
        d, dmin = _fp16_round(max_scale / F32(63)), _fp16_round(max_min / F32(63))
    else:  # quantize_row_q4_K_impl
        sigma2 = F32(2) * _sum(x * x) / F32(QK_K)
        w = (imp.reshape(nb, 256) * np.sqrt(sigma2 + x * x)).astype(F32).reshape(nb * 8, 32)
        scales, mins, codes = _min_scale_search(sub, w, 15, -0.9, 0.05, 36, True)
        sw = _sum(w).reshape(nb, 8)
        d_block, ls = _fit_sub_scales(scales.reshape(nb, 8), sw, 63)
        m_block, lm = _fit_sub_scales(mins.reshape(nb, 8), sw, 63)
        d, dmin = _fp16_round(d_block), _fp16_round(m_block)
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    step = (d.astype(F32) * ls.astype(F32)).reshape(nb * 8, 1)
    offset = (dmin.astype(F32) * lm.astype(F32)).reshape(nb * 8, 1)
    with np.errstate(all="ignore"):
        again = np.clip(np.rint(_safe((sub + offset) / step)), 0, 15).astype(np.uint8)
    codes = np.where(step != 0, again, codes).reshape(nb, 4, 2, 32)
    qs = (codes[:, :, 0] | (codes[:, :, 1] << np.uint8(4))).reshape(nb, 128)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return np.concatenate([d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8), packed, qs], 1)


def _q4_k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes [nb, 12] -> (6-bit scales [nb, 8], 6-bit mins [nb, 8])."""
    a, b, c = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], 1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], 1)
    return scales, mins


# -------------------------------------------------------------------------------------------------------- Q6_K
def _q6_k(x: np.ndarray, imp) -> np.ndarray:
    """x [nb, 256] -> raw Q6_K blocks [nb, 210] (quantize_row_q6_K_ref, or _impl with importance [nb, 256])."""
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, codes = _signed_scale_search(sub, None if imp is None else imp.reshape(nb * 16, 16).astype(F32), 32)
    scales = scales.reshape(nb, 16)
    idx = np.abs(scales).argmax(-1)[:, None]
    max_scale = np.take_along_axis(scales, idx, -1)
    empty = np.abs(max_scale) < _EPS
    with np.errstate(all="ignore"):
        iscale = np.where(empty, F32(0), F32(-128) / max_scale)
        d = _fp16_round(np.where(empty, F32(0), F32(1) / iscale))
    sc = np.minimum(127, np.rint(iscale * scales).astype(np.int64)).astype(np.int8)
    sc = np.where(empty, np.int8(0), sc)
    step = (d.astype(F32) * sc.astype(F32)).reshape(nb * 16, 1)
    with np.errstate(all="ignore"):
        again = (np.clip(np.rint(_safe(sub / step)), -32, 31) + 32).astype(np.uint8)
    codes = np.where(step != 0, again, codes).reshape(nb, 256)
    codes = np.where(empty, np.uint8(0), codes).reshape(nb, 2, 4, 32)  # halves of 128, quarters of 32
    low, high = codes & np.uint8(0x0F), codes >> np.uint8(4)
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.reshape(nb, 1).view(np.uint8)],
                          1)


# ---------------------------------------------------------------------------------------------------- entry points
def quantize(w: np.ndarray, qtype: QT, importance=None) -> np.ndarray:
    """Float weights [rows, cols] (cols % 256 == 0) -> raw blocks [rows, cols / 256 * bytes]; ``importance``: a
    per-column vector [cols] (diag(XᵀX), as in an imatrix) selecting llama.cpp's imatrix-weighted search."""
    w = np.asarray(w, dtype=F32)
    if w.ndim != 2 or w.shape[1] % QK_K:
        raise ValueError(f"row width {w.shape[-1] if w.ndim else 0} is not a multiple of {QK_K}")
    rows, cols = w.shape
    x = w.reshape(-1, QK_K)
    imp = None if importance is None else np.broadcast_to(np.asarray(importance, F32), w.shape).reshape(-1, QK_K)
    if qtype == QT.Q4_K:
        raw = _q4_k(x, imp)
    elif qtype == QT.Q6_K:
        raw = _q6_k(x, imp)
    else:
        raise ValueError(f"no K-quant packer for {qtype.name}")
    return raw.reshape(rows, -1)


def dequantize(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """Our decoder: raw blocks [..., bytes] -> float32 [..., weights], the same float32 operations in the same
    order as llama.cpp's ``dequantize_row_*`` (so bit for bit what a GGUF reader gets)."""
    raw = np.asarray(raw, dtype=np.uint8)
    lead = raw.shape[:-1]
    b = raw.reshape(-1, K_BYTES[qtype])
    nb = b.shape[0]
    if qtype == QT.Q4_K:
        d = b[:, 0:2].copy().view(np.float16).astype(F32)
        dmin = b[:, 2:4].copy().view(np.float16).astype(F32)
        scales, mins = _q4_k_scales(b[:, 4:16])
        qs = b[:, 16:].reshape(nb, 4, 1, 32)
        q = np.concatenate([qs & 0x0F, qs >> 4], 2).reshape(nb, 8, 32).astype(F32)
        out = (d * scales.astype(F32))[:, :, None] * q - (dmin * mins.astype(F32))[:, :, None]
    else:
        ql, qh = b[:, :128].reshape(nb, 2, 64), b[:, 128:192].reshape(nb, 2, 32)
        sc = b[:, 192:208].view(np.int8).astype(F32)
        d = b[:, 208:210].copy().view(np.float16).astype(F32)
        low = np.concatenate([ql & 0x0F, ql >> 4], 2).reshape(nb, 2, 4, 32)
        high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], 2)
        q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(nb, 16, 16).astype(F32)
        out = (d * sc)[:, :, None] * q
    return out.reshape(*lead, -1) if lead else out.reshape(-1)
