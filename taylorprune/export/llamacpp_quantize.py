"""llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) from Python, with an imatrix.

Why: llama-cpp-python ships the llama.cpp library but not its tools, and a comparison of our GGUF rounding with
llama.cpp's must run llama.cpp's on the same F32 file with the same importance matrix. The library takes the
imatrix as a null-terminated array of ``llama_model_imatrix_data`` (tensor name, mean x² per input column, size),
which is what ``llama-quantize`` builds from an imatrix file after dividing the sums by the counts
(``Imatrix.mean_sq``); the ``quantize.imatrix.*`` metadata it records are written the same way (kv overrides), so
the quantized file says which imatrix weighed it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from taylorprune.errors import UserError
from taylorprune.evaluate.llamacpp import INSTALL
from taylorprune.export.imatrix import Imatrix, read_imatrix

# the llama_ftype names llama-quantize offers that this helper was checked with (LLAMA_FTYPE_MOSTLY_<name>)
FTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")
_INT, _STR = 0, 3  # llama_model_kv_override_type


def _library():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"llama.cpp's quantizer needs llama-cpp-python, which is not installed: {INSTALL}") from None
    return llama_cpp


def _imatrix_array(lib, imatrix: Imatrix) -> tuple[ctypes.Array, list]:
    """The null-terminated ``llama_model_imatrix_data`` array, and the buffers it points into (keep them alive)."""
    entries = sorted(imatrix.mean_sq().items())
    array = (lib.llama_model_imatrix_data * (len(entries) + 1))()
    keep: list = []
    for slot, (name, values) in zip(array, entries, strict=False):
        raw, data = name.encode("utf-8"), np.ascontiguousarray(values, np.float32)
        keep += [raw, data]
        slot.name = raw
        slot.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = data.size
    return array, keep  # the last slot stays zero: name NULL ends the array


def _overrides(lib, items: list[tuple[str, int | str]]) -> ctypes.Array:
    """llama_model_kv_override entries (ints and strings) and the empty-key terminator."""
    array = (lib.llama_model_kv_override * (len(items) + 1))()
    for slot, (key, value) in zip(array, items, strict=False):
        slot.key = key.encode()[:127]
        if isinstance(value, str):
            slot.tag, slot.value.val_str = _STR, value.encode("utf-8")[:127]
        else:
            slot.tag, slot.value.val_i64 = _INT, int(value)
    return array


def quantize(source: str | Path, output: str | Path, kind: str, imatrix: Imatrix | str | Path | None = None,
             threads: int | None = None) -> Path:
    """``llama-quantize [--imatrix FILE] source output kind`` through the library; a one-line UserError when
    llama.cpp refuses (its reason is in its log on stderr). ``imatrix``: an Imatrix or a file of either format."""
    lib = _library()
    if kind not in FTYPES:
        raise UserError(f"llama.cpp quantization type {kind}: choose one of {', '.join(FTYPES)}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = int(threads or 0)  # 0: llama.cpp's default (hardware threads)
    keep: list = []
    if imatrix is not None:
        label = str(imatrix) if not isinstance(imatrix, Imatrix) else "taylorprune"
        mat = imatrix if isinstance(imatrix, Imatrix) else read_imatrix(imatrix)
        array, keep = _imatrix_array(lib, mat)
        meta = _overrides(lib, [("quantize.imatrix.file", label),
                                ("quantize.imatrix.dataset", (mat.datasets or ["taylorprune"])[0]),
                                ("quantize.imatrix.entries_count", len(mat.sums)),
                                ("quantize.imatrix.chunks_count", mat.chunk_count)])
        keep += [array, meta]
        params.imatrix = ctypes.cast(array, ctypes.POINTER(lib.llama_model_imatrix_data))
        params.kv_overrides = ctypes.cast(meta, ctypes.POINTER(lib.llama_model_kv_override))
    lib.llama_backend_init()
    code = lib.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
    if code != 0:
        raise UserError(f"llama.cpp could not quantize {source} to {kind} (code {code}; its log says why)")
    return Path(output)
