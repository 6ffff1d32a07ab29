"""llama.cpp importance matrices ("imatrix"): the calibration's per-input-column Σx² of every linear, both ways.

Why: an imatrix is what ``llama-quantize --imatrix`` weighs its rounding with (the diagonal of XᵀX, the same
statistic our Wanda scores and importance-weighted block searches use). Writing ours lets llama.cpp quantize a
pruned model with the activations of *that* model; reading one (ours, or one made by ``llama-imatrix``) gives our
own GGUF writer the same weighting (``write_gguf(importance=...)``, ``--imatrix FILE``).

Formats, as ``tools/imatrix`` writes and ``common/imatrix-loader`` reads them:

* GGUF (current): ``general.type = "imatrix"``, ``imatrix.datasets`` (string array), ``imatrix.chunk_count`` and
  ``imatrix.chunk_size`` (u32; all three must be present, else llama-quantize refuses the file as lacking metadata),
  no architecture; per weight ``<name>.in_sum2`` F32 [n_mat, n_cols] (Σx² over tokens) and ``<name>.counts`` F32
  [n_mat, 1] (tokens). llama-quantize uses ``in_sum2 / counts``, the mean of x².
* legacy ``.dat``: int32 entry count; per entry int32 name length, name, int32 ``ncall`` (chunks), int32 value
  count, float32 values (mean x² · ncall); then optionally int32 chunk count, int32 length + dataset name.
  llama-quantize uses ``values / ncall``.

Names are llama.cpp's tensor names (``blk.N.attn_q.weight``); we map them to and from HF names with the GGUF
writer's table. Dense tensors only (one matrix per entry): MoE entries (n_mat > 1) are refused when read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from taylorprune.export.gguf_writer import gguf_name, hf_name

_SUM2, _COUNTS = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    """Per GGUF weight name: Σx² per input column (float32 [cols]) and how many rows went into it (tokens; for a
    legacy file, the chunk count ``ncall`` its values were scaled by)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    chunk_size: int = 0
    chunk_count: int = 0
    datasets: list[str] = field(default_factory=list)
    legacy: bool = False

    @classmethod
    def from_hf(cls, sums: Mapping[str, object], counts: Mapping[str, int], *, chunk_size: int,
                datasets: Iterable[str] = ("taylorprune",)) -> Imatrix:
        """From {HF linear (``model.layers.0.self_attn.q_proj``) or weight name: Σx² [cols]} and token counts."""
        out = cls(chunk_size=int(chunk_size), datasets=list(datasets))
        for name, s in sums.items():
            g = to_gguf(name)
            out.sums[g] = _f32(s).reshape(-1)
            out.counts[g] = int(counts[name])
        out.chunk_count = max(out.counts.values(), default=0) // max(int(chunk_size), 1)
        return out

    @classmethod
    def from_act_norm_sq(cls, stats: Mapping[str, Mapping[str, object]], *, nseq: int, seqlen: int,
                         datasets: Iterable[str] = ("taylorprune",)) -> Imatrix:
        """From the run's ``act_norm_sq`` statistics ({linear path: {"act_norm_sq": Σx² / nseq}}, Wanda's
        scaler_row, :class:`taylorprune.stats.hooks.ActNormSq`) over ``nseq`` windows of ``seqlen`` tokens."""
        sums = {p: _f32(d["act_norm_sq"]) * np.float32(nseq) for p, d in stats.items() if "act_norm_sq" in d}
        return cls.from_hf(sums, dict.fromkeys(sums, nseq * seqlen), chunk_size=seqlen, datasets=datasets)

    def mean_sq(self) -> dict[str, np.ndarray]:
        """{GGUF name: mean x² per column}: what llama-quantize weighs with (1 where no rows were seen)."""
        return {n: (s / np.float32(self.counts[n])) if self.counts[n] > 0 else np.ones_like(s)
                for n, s in self.sums.items()}


def _f32(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


def to_gguf(name: str) -> str:
    """HF linear or weight name -> llama.cpp tensor name (``model.layers.3.mlp.down_proj`` -> ``blk.3.ffn_down
    .weight``)."""
    g = gguf_name(name if name.endswith((".weight", ".bias")) else f"{name}.weight")
    if g is None:
        raise ValueError(f"{name}: no llama.cpp tensor name")
    return g


class _NoArchWriter(gguf.GGUFWriter):
    def add_architecture(self) -> None:  # imatrix files carry no architecture, as llama.cpp writes them
        pass


def write_imatrix(path, imatrix: Imatrix) -> Path:
    """Write the GGUF imatrix format at ``path`` (llama-quantize reads it whatever the suffix; ``.gguf`` is usual)."""
    path = Path(path)
    writer = _NoArchWriter(str(path), "")
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, list(imatrix.datasets) or ["taylorprune"])  # empty: key dropped
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(imatrix.chunk_count))
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(imatrix.chunk_size))
    for name in sorted(imatrix.sums):  # llama.cpp sorts its entries too
        writer.add_tensor(name + _SUM2, np.ascontiguousarray(imatrix.sums[name].reshape(1, -1), np.float32))
        writer.add_tensor(name + _COUNTS, np.full((1, 1), imatrix.counts[name], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_legacy(path, imatrix: Imatrix) -> Path:
    """Write the legacy ``.dat`` format at ``path`` (what llama.cpp before the GGUF format reads): per entry the
    mean x² times ``ncall`` = the chunk count, then the chunk count and the first dataset's name."""
    path = Path(path)
    ncall = max(int(imatrix.chunk_count), 1)
    mean = imatrix.mean_sq()
    blob = bytearray(struct.pack("<i", len(mean)))
    for name in sorted(mean):
        raw = name.encode("utf-8")
        values = np.ascontiguousarray(mean[name] * np.float32(ncall), "<f4")
        blob += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size) + values.tobytes()
    dataset = (imatrix.datasets[0] if imatrix.datasets else "taylorprune").encode("utf-8")
    blob += struct.pack("<i", ncall) + struct.pack("<i", len(dataset)) + dataset
    path.write_bytes(bytes(blob))
    return path


def read_imatrix(path) -> Imatrix:
    """Read either format (GGUF by its magic, else legacy ``.dat``); ValueError in one line when it is neither."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    out = Imatrix(legacy=False)
    if gguf.Keys.IMatrix.DATASETS in fields:
        out.datasets = list(fields[gguf.Keys.IMatrix.DATASETS].contents())
    out.chunk_count = int(fields[gguf.Keys.IMatrix.CHUNK_COUNT].contents()) if (
        gguf.Keys.IMatrix.CHUNK_COUNT in fields) else 0
    out.chunk_size = int(fields[gguf.Keys.IMatrix.CHUNK_SIZE].contents()) if (
        gguf.Keys.IMatrix.CHUNK_SIZE in fields) else 0
    tensors = {t.name: t for t in reader.tensors}
    for tname, t in tensors.items():
        if not tname.endswith(_SUM2):
            continue
        name = tname[: -len(_SUM2)]
        counts = tensors.get(name + _COUNTS)
        if counts is None or int(t.tensor_type) != int(gguf.GGMLQuantizationType.F32):
            raise ValueError(f"{path}: {name} has no F32 sums with counts; not an imatrix file")
        n_mat = int(np.prod(counts.shape))
        if n_mat != 1:
            raise ValueError(f"{path}: {name} holds {n_mat} matrices (MoE experts); only dense weights are read")
        out.sums[name] = np.array(t.data, dtype=np.float32).reshape(-1)
        out.counts[name] = int(round(float(np.asarray(counts.data).reshape(-1)[0])))
    if not out.sums:
        raise ValueError(f"{path}: a GGUF file without imatrix entries (no *.in_sum2 tensors)")
    return out


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ValueError(f"{path}: truncated or not an imatrix file (legacy .dat layout)")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ValueError(f"{path}: no imatrix entries (legacy .dat layout)")
    out = Imatrix(legacy=True)
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise ValueError(f"{path}: not an imatrix file (bad entry name length {length})")
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise ValueError(f"{path}: entry {name} has no values")
        out.sums[name] = np.array(take(f"<{nval}f"), dtype=np.float32)
        out.counts[name] = int(ncall)
    if pos + 4 <= len(data):  # optional trailer: chunk count, dataset name
        (out.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - pos:
                out.datasets = [take(f"<{length}s")[0].decode("utf-8", "replace")]
    return out


def importance_for(imatrix: Imatrix | str | Path, columns: Mapping[str, int], *, source: str = "imatrix") -> dict[
        str, np.ndarray]:
    """{HF weight name: mean x² per input column} for the writer's ``importance``, checked against the model's
    input widths ``columns`` ({HF weight name: columns}); a file of another model is a one-line ValueError."""
    if not isinstance(imatrix, Imatrix):
        source, imatrix = str(imatrix), read_imatrix(imatrix)
    out = {}
    for gname, values in imatrix.mean_sq().items():
        hf = hf_name(gname)
        if hf not in columns:
            raise ValueError(f"{source} is of another model: {gname} is no tensor of this one")
        if values.size != columns[hf]:
            raise ValueError(f"{source} is of another model: {gname} has {values.size} columns, this model's "
                             f"{hf} has {columns[hf]}")
        out[hf] = values
    return out


def collect(model: nn.Module, input_ids: torch.Tensor, *, datasets: Iterable[str] = ("taylorprune",),
            with_output: bool = False) -> Imatrix:
    """Run ``model`` on ``input_ids`` [n, seqlen] (one sequence at a time) and sum x² per input column of every
    linear llama.cpp names — the transformer blocks' linears, and ``lm_head`` with ``with_output`` (llama-imatrix's
    --process-output) — counting tokens; the chunk size is the sequence length, as llama-imatrix's n_ctx."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (path == "lm_head" and not with_output):
            continue
        try:
            to_gguf(path)
        except ValueError:
            continue

        def hook(_mod, args, _out, path=path):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[path] = sums.get(path, 0) + x.pow(2).sum(0).cpu()
            counts[path] = counts.get(path, 0) + x.shape[0]

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for row in input_ids:
                model(row[None].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return Imatrix.from_hf(sums, counts, chunk_size=int(input_ids.shape[-1]), datasets=datasets)
