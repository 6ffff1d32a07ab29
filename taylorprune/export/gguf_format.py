"""``--format gguf``: the model as one llama.cpp GGUF file (``model.gguf`` in the output folder, beside the report).

Written by our own writer and block packers (``export.gguf_writer``, ``export.gguf_blocks``): llama or gemma3
architecture (``export.gguf_arch``; llama's Q/K rows permuted to GGML's RoPE layout), compact widths and head counts
as llama.cpp reads them (llama.cpp's ``deci`` architecture when a llama's layers differ; refused for gemma3),
SentencePiece or byte-level BPE tokenizer metadata (copied from the GGUF the model was loaded from). ``--gguf-type``
picks the type of the 2-D tensors, or ``Q4_K_M``: llama.cpp's per-tensor mix of Q4_K and Q6_K (``export.gguf_mix``).
When the run quantizes (``--quantize``) to a grid a GGUF block type holds exactly — 4-bit symmetric in groups of 32
with fp16 scales is Q4_0, 8-bit symmetric is Q8_0 — those linears are packed from the run's own codes and scales (no
second rounding), and ``auto`` (the default) writes every other 2-D tensor as F16; without a grid ``auto`` is F16,
and a block type rounds as llama.cpp does. What the file cannot hold is refused before any work, in one line:
another architecture, a Gemma 3 that llama.cpp's graph would compute otherwise (``gguf_arch``: attention pattern,
local RoPE base, attention scale, soft-capping), another grid, a type whose blocks hold no exact 0 (Q4_1's d·q + m)
with pruned weights; what only the pruned model shows (uneven widths, a Gemma 3's layer pattern after removing
blocks) is the writer's one-line error when writing. Q4_K
(d·s·q − dmin·m) holds no exact 0 either, but is llama.cpp's standard 4-bit mix: it is written, pruned weights come
back as small values near 0, and the run's warnings say so.

Reading back (``verify``): every linear's shape and sparsity from our decoder of the written blocks, and every
grid-packed linear's values bit for bit against the model in memory (in GGUF row order).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from taylorprune.errors import RunError
from taylorprune.export import gguf_arch as ga
from taylorprune.export import gguf_blocks as gb
from taylorprune.export import gguf_mix as mix
from taylorprune.export import imatrix, save
from taylorprune.export.format_spec import Contents, Format, GridKind, Holds, Output, StoredLinear
from taylorprune.export.gguf_writer import FILE_TYPES, gguf_name, hf_name, permute_rows, write_gguf
from taylorprune.options import Options, option

FILE = "model.gguf"
TYPES = ("auto", *(t.name for t in FILE_TYPES), *mix.PRESETS)
NO_ZERO = ("Q4_1",)  # block types whose values d·q + m hold no exact 0
ARCHITECTURES = tuple(ga.BY_MODEL_TYPE)  # config.json model_types written
_QK = re.compile(r"\.self_attn\.(q|k)_proj$")


@dataclass(frozen=True)
class GgufOptions(Options):
    gguf_type: str = option("auto", "GGUF type of the 2-D tensors: auto (linears on a --quantize grid a GGUF block "
                            "holds exactly as Q4_0 (4-bit symmetric, group 32) or Q8_0 (8-bit), everything else "
                            "F16), one of F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K (llama.cpp's rounding), "
                            "or Q4_K_M (llama.cpp's mix: Q6_K for output and some attn_v/ffn_down, Q4_K elsewhere).",
                            choices=TYPES)
    imatrix: str | None = option(None, "llama.cpp importance matrix (its GGUF format or the legacy .dat) that weighs "
                                 "the block rounding, as llama-quantize --imatrix does; it must be of this model "
                                 "(its names and widths).")


def grid_type(kind: GridKind) -> QT | None:
    """The block type that holds a grid exactly (None: none does)."""
    if kind.group_size != gb.BLOCK or not kind.symmetric or kind.scale_dtype != "float16" or not kind.ordered_groups:
        return None
    return {4: QT.Q4_0, 8: QT.Q8_0}.get(kind.wbits)


def refuse_grid(kind: GridKind) -> str | None:
    if grid_type(kind) is None:
        return (f"holds {kind.describe()} grids in no block type; quantize with --wbits 4 or 8 --group-size 32 "
                "--symmetric --scale-dtype float16 (Q4_0, Q8_0), or write --format safetensors")
    return None


def refuses(contents: Contents, options: GgufOptions) -> str | None:
    """What the options and the run's contents cannot go together with (before any work)."""
    if contents.architecture is not None and contents.architecture not in ARCHITECTURES:
        return f"writes the {', '.join(ARCHITECTURES)} architecture, not {contents.architecture}"
    if contents.config is not None and contents.architecture is not None:
        config, arch = contents.config, ga.for_model_type(contents.architecture)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        reason = arch.refuses(config, int(head_dim), int(config.num_attention_heads))
        if reason:  # the same line the writer raises, before any work rather than after the run
            return f"llama.cpp's {arch.name} cannot run this model: {reason}"
    wanted = options.gguf_type
    if options.imatrix:
        if wanted in ("auto", "F32", "F16", "BF16"):
            return f"--imatrix weighs block rounding; --gguf-type {wanted} rounds no blocks (pick Q4_K_M, Q4_0, …)"
        try:
            imatrix.read_imatrix(options.imatrix)
        except (OSError, ValueError) as exc:
            return f"--imatrix {options.imatrix}: {exc.strerror if isinstance(exc, OSError) else exc}"
    if contents.masks and wanted in NO_ZERO:
        return f"--gguf-type {wanted} holds no exact 0 (d·q + m), so pruned weights would not stay 0; use Q4_0"
    if contents.grid is not None and wanted != "auto" and wanted != grid_type(contents.grid).name:
        return (f"the run's {contents.grid.describe()} grid is {grid_type(contents.grid).name} in GGUF; use "
                f"--gguf-type auto or {grid_type(contents.grid).name}")
    return None


def _packed(output: Output) -> dict[str, tuple[QT, np.ndarray]]:
    """The quantized linears as raw blocks from their own codes and scales (HF row order)."""
    packed = {}
    for name, q in output.grids.items():
        codes, scales = q.codes.numpy(), q.scales.float().numpy()
        if q.wbits == 4:
            packed[f"{name}.weight"] = (QT.Q4_0, gb.q4_0_from_sym_grid(codes, scales))
        else:
            packed[f"{name}.weight"] = (QT.Q8_0, gb.q8_0_from_sym_grid(codes.astype(np.int64) - 128, scales))
    return packed


def write(output: Output, folder: Path) -> None:
    wanted = output.options.gguf_type if output.options is not None else "auto"
    packed = _packed(output)
    qtype = "F16" if wanted == "auto" else wanted
    state = {k: v for k, v in output.model.state_dict().items() if k not in packed}
    path = output.options.imatrix if output.options is not None else None
    try:
        importance = imatrix.importance_for(path, {k: v.shape[-1] for k, v in state.items() if v.ndim == 2}) if (
            path) else None
        report = write_gguf(folder / FILE, output.model.config, state, output.tokenizer, qtype=qtype, packed=packed,
                            importance=importance, tokenizer_source=output.source_gguf)
    except (NotImplementedError, ValueError) as exc:
        raise RunError(f"writing GGUF failed: {exc}") from None
    output.warnings.extend(report.fallbacks)
    near_zero = [n for n, t in report.types.items() if not gb.HOLDS_EXACT_ZERO.get(t, True)]
    if near_zero and any(r.get("sparsity", 0) > 0 for r in output.linears):
        output.warnings.append(f"{len(near_zero)} tensors are {report.types[near_zero[0]].name} (d·s·q − dmin·m): "
                               "their pruned weights are stored near 0, not exactly 0 (llama.cpp's rounding)")


def _heads(config, name: str, rows: int) -> int | None:
    """Heads to permute a Q/K weight's rows by (None: not Q or K, or an architecture that keeps HF's order)."""
    if not _QK.search(name) or not ga.for_model_type(getattr(config, "model_type", None) or "llama").permute_qk:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return rows // head_dim


def _decoded(tensor) -> np.ndarray:
    """A GGUF tensor's values [rows, cols] (float32) by our decoder."""
    qtype = QT(tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return gb.dequantize(np.ascontiguousarray(tensor.data).view(np.uint8), qtype, shape)


def verify(folder: Path, output: Output) -> None:
    """Every linear's shape and sparsity, and every grid-packed linear's values bit for bit."""
    tensors = {t.name: t for t in gguf.GGUFReader(str(folder / FILE)).tensors}
    tied = getattr(output.model.config, "tie_word_embeddings", False)
    arch = ga.for_model_type(getattr(output.model.config, "model_type", None) or "llama")
    for record in output.linears:
        name = record["name"]
        gname = gguf_name(f"{name}.weight", arch)
        if gname not in tensors and not (tied and gname == "output.weight"):
            raise RunError(f"verification failed: {name} is missing from the written GGUF")
        values = _decoded(tensors[gname])
        if not gb.HOLDS_EXACT_ZERO.get(QT(tensors[gname].tensor_type), True):  # Q4_K: shape only, zeros move
            record = {**record, "sparsity": float((values == 0).mean())}
        save.check_tensor(name, torch.from_numpy(values), record)
        if name in output.grids:
            memory = output.model.get_submodule(name).weight.detach().float().cpu().numpy()
            heads = _heads(output.model.config, name, memory.shape[0])
            memory = permute_rows(memory, heads) if heads is not None else memory
            if not np.array_equal(values, memory):
                raise RunError(f"verification failed: {name}'s blocks decode to other values than the run's grid")


def linears(folder: Path) -> Iterator[StoredLinear]:
    """Every tensor of ``model.gguf`` under its HF name, in GGUF row order (llama's Q/K rows permuted: shapes and
    sparsity are what ``inspect`` reads), decoded by our decoder when loaded (Gemma's norms less the 1 the file
    adds); block types show as their name."""
    reader = gguf.GGUFReader(str(Path(folder) / FILE))
    field = reader.fields.get("general.architecture")
    arch = ga.for_file(field.contents() if field is not None else None)
    for tensor in reader.tensors:
        qtype = QT(tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))
        grid = None if qtype in gb.FLOAT_TYPES else {"type": qtype.name}
        offset = arch.norm_offset if tensor.name.endswith("norm.weight") else 0.0
        yield StoredLinear(hf_name(tensor.name, arch), shape, qtype.name,
                           lambda t=tensor, o=offset: torch.from_numpy(_decoded(t) - np.float32(o)), grid)


def width_unit(options: GgufOptions) -> int:
    """Weights along a row that the blocks of ``--gguf-type`` need (32 legacy, 256 K-quants, 1 floats; ``auto``
    writes floats besides a grid, whose group the quantize stage already declares): a structured run keeps its
    widths multiples of this, so no tensor falls back to another type."""
    wanted = options.gguf_type
    if wanted == "auto":
        return 1
    qtype = mix.PRESETS[wanted].base if wanted in mix.PRESETS else QT[wanted]
    return gguf.GGML_QUANT_SIZES[qtype][0]


def size(folder: Path) -> int:
    return (Path(folder) / FILE).stat().st_size


GGUF = Format("gguf", "one llama.cpp GGUF file, model.gguf (--gguf-type; Q4_0/Q8_0 exactly from a --quantize grid)",
              Holds(codes=True, grid=refuse_grid), write, verify, size, lambda folder: (Path(folder) / FILE).is_file(),
              linears, options=GgufOptions, refuses=refuses, width_unit=width_unit)
