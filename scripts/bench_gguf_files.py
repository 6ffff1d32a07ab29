"""The GGUF file work of scripts/bench_gguf.py: llama.cpp's quantizer with its log kept, the graft of one tensor
from another file, and the tensor types read back. Kept apart so the runner stays short."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def llama_quantize(source: Path, out: Path, kind: str, imatrix: Path | None, threads: int) -> dict:
    """llama.cpp's quantizer into a temporary name, renamed when done; its log (on the C stderr) kept beside."""
    from taylorprune.export.llamacpp_quantize import quantize

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, log = out.with_name("model.gguf.tmp"), out.parent / "llama-quantize.log"
    with open(log, "w") as f, _stderr_to(f):
        quantize(source, tmp, kind, imatrix, threads)
    os.replace(tmp, out)
    lines = log.read_text().splitlines()
    return {"fallbacks": [ln.strip() for ln in lines if "falling back" in ln],
            "summary": [ln.strip() for ln in lines if "llama_model_quantize_impl:" in ln and "size" in ln
                        or "required fallback" in ln]}


def graft(ours: Path, donor: Path, out: Path, name: str) -> None:
    """``ours`` with tensor ``name`` replaced by the donor file's (same shape, another type): every key and every
    other tensor copied as it is. Why: our ``--gguf-type Q4_0`` rounds the tied embedding (SmolLM2's output head
    too) to Q4_0 where llama.cpp's Q4_0 file type keeps it at Q6_K (Q8_0 by the 576-column fallback), so this row
    compares GPTQ's linears with llama.cpp's at the same head."""
    import gguf

    reader, taken = gguf.GGUFReader(str(ours)), {t.name: t for t in gguf.GGUFReader(str(donor)).tensors}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("model.gguf.tmp")
    writer = gguf.GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        src = taken[name] if t.name == name else t
        writer.add_tensor(src.name, np.asarray(src.data), raw_dtype=src.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)


@contextlib.contextmanager
def _stderr_to(f):
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(f.fileno(), 2)
    try:
        with contextlib.redirect_stderr(f):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def tensor_types(path: Path) -> dict:
    """{tensor role (``attn_q``, ``ffn_down``, ``token_embd``...): {type: count}} read back from the file."""
    import gguf

    roles: dict[str, Counter] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        role = t.name.split(".")[2] if t.name.startswith("blk.") else t.name.rsplit(".", 1)[0]
        roles.setdefault(role, Counter())[t.tensor_type.name] += 1
    return {role: dict(c) for role, c in sorted(roles.items())}


# llama.cpp's weight types by block width: a row splits into whole blocks only (a K-quant on a 576-wide row falls
# back, see export/gguf_mix.py), so a row width that is no multiple of 256 leaves only the 32-weight types.
FLOOR_TYPES = {"3-bit K on 256-wide rows": ("Q4_0", "IQ4_NL", "Q3_K", "Q4_K", "IQ4_XS"),
               "any type llama.cpp has": ("Q4_0", "IQ4_NL", "MXFP4", "Q2_K", "IQ1_S", "IQ2_XXS", "TQ1_0")}


def size_floor(path: Path) -> dict:
    """The fewest bytes a GGUF of the model in ``path`` can have, per set of allowed types (``FLOOR_TYPES``):
    every 2-D tensor at the smallest type whose block divides its row width, 1-D tensors at F32, metadata not
    counted. Why: it tells whether a size target is reachable by choosing types at all, or needs fewer weights."""
    import gguf

    sizes = gguf.GGML_QUANT_SIZES
    tensors = [(t.name, [int(d) for d in t.shape], int(t.n_elements)) for t in gguf.GGUFReader(str(path)).tensors]
    out = {}
    for label, names in FLOOR_TYPES.items():
        kinds = [gguf.GGMLQuantizationType[n] for n in names if hasattr(gguf.GGMLQuantizationType, n)]
        total, chosen = 0, Counter()
        for _name, shape, n in tensors:
            if len(shape) < 2:
                total += 4 * n
                continue
            fits = [(n // sizes[k][0] * sizes[k][1], i, k.name) for i, k in enumerate(kinds)
                    if shape[0] % sizes[k][0] == 0]
            size, _, kind = min(fits)  # equal sizes: the type listed first
            total += size
            chosen[kind] += n
        out[label] = {"bytes": total, "weights_by_type": dict(chosen)}
    return out
