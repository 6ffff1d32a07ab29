"""``--format compressed-tensors``: quantized linears packed as compressed-tensors ``pack-quantized`` (int32 words,
scales, and zero points for asymmetric grids; ``export.compressed_tensors``), everything else as float tensors.

Such a folder is what llm-compressor saves for W4A16/W8A16: vLLM serves it, and transformers loads it (on a CPU
too) once the ``compressed-tensors`` package is installed. What it cannot hold is refused before any work:
- a run without ``--quantize`` (there would be nothing to pack: use safetensors);
- float minima (``--zero-point float``): compressed-tensors stores integer zero points;
- dynamic groups with activation order: the groups then follow the permuted columns and need a ``g_idx``, which
  compressed-tensors deprecated (llm-compressor PR #2893) and our writer does not write;
- asymmetric grids: compressed-tensors 0.18-0.20.1 leave zero points unpacked when transformers loads the folder
  (size mismatch, an upstream bug; 0.17.1 loads them), so such a folder would not load by the default route.
Pruned weights are held exactly: their code is the zero point, whose value is 0.

Reading back (``verify``) uses our own unpacker (``read_folder``): every quantized linear's codes and scales bit
for bit, the sparsity of every linear, and the widths config.json must carry.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from taylorprune.errors import RunError
from taylorprune.export import save
from taylorprune.export.compressed_tensors import read_folder, vllm_fusion_conflicts, write_folder
from taylorprune.export.format_spec import Format, GridKind, Holds, Output, StoredLinear, quantization_method

METHOD = "compressed-tensors"
# dtype names as safetensors writes them (what ``inspect`` shows for a plain folder)
STORED_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def refuse_grid(grid: GridKind) -> str | None:
    if not grid.symmetric and grid.zero_point == "float":
        return "stores integer zero points only, not float minima (--zero-point float); use --format safetensors"
    if not grid.ordered_groups:
        return ("cannot hold groups that follow the activation order (they need a g_idx); use --static-groups or "
                "--no-act-order")
    if not grid.symmetric:
        return ("asymmetric folders do not load in transformers with compressed-tensors 0.18-0.20.1 (zero points "
                "left unpacked, an upstream bug); keep --symmetric, or use --format safetensors")
    return None


def write(output: Output, folder: Path) -> None:
    """Pack the quantized linears; fused shards (q/k/v, gate/up) with different schemes, possible only with a
    --targets that splits them, still load in transformers but not in vLLM: written, with a warning."""
    names = [n for n, m in output.model.named_modules() if isinstance(m, torch.nn.Linear)]
    conflicts = vllm_fusion_conflicts(output.grids, names)
    if conflicts:
        output.warnings.append(f"vLLM fuses {conflicts[0]} into one matrix and would refuse this folder "
                               "(transformers loads it); quantize all of them or none")
    try:
        write_folder(output.model, output.tokenizer, output.grids, folder, strict_vllm=False)
    except ValueError as exc:
        raise RunError(f"writing compressed-tensors failed: {exc}") from None


def verify(folder: Path, output: Output) -> None:
    """Codes and scales of every quantized linear bit for bit, every linear's sparsity, and the widths."""
    _, tensors, quant = read_folder(folder)
    for record in output.linears:
        name = record["name"]
        if name in output.grids:
            if name not in quant:
                raise RunError(f"verification failed: {name} is not packed in the written folder")
            got, want = quant[name], output.grids[name]
            if not (torch.equal(got.codes.long(), want.codes.long()) and torch.equal(got.scales, want.scales)):
                raise RunError(f"verification failed: {name}'s codes or scales on disk differ from the run's")
            save.check_tensor(name, got.dequantize(torch.float32), record)
        elif f"{name}.weight" in tensors:
            save.check_tensor(name, tensors[f"{name}.weight"], record)
        else:
            raise RunError(f"verification failed: {name} is missing from the written folder")
    save.check_widths(folder, output.widths)


def linears(folder: Path) -> Iterator[StoredLinear]:
    """Float tensors as stored, packed linears as ``….weight`` dequantized in float32 with their grid."""
    _, tensors, quant = read_folder(folder)
    for key, tensor in tensors.items():
        yield StoredLinear(key, tuple(tensor.shape), STORED_DTYPES.get(tensor.dtype, str(tensor.dtype)),
                           lambda t=tensor: t)
    for name, q in quant.items():
        grid = {"wbits": q.wbits, "group_size": q.group_size, "symmetric": q.symmetric,
                "scale_dtype": str(q.scales.dtype).removeprefix("torch.")}
        yield StoredLinear(f"{name}.weight", tuple(q.codes.shape), f"int{q.wbits}",
                           lambda q=q: q.dequantize(torch.float32), grid)


COMPRESSED_TENSORS = Format(METHOD, "pack-quantized int codes in int32 words with scales (vLLM; transformers with "
                            "the compressed-tensors package, CPU too); needs --quantize",
                            Holds(codes=True, needs_grid=True, grid=refuse_grid), write, verify, save.folder_bytes,
                            lambda folder: quantization_method(folder) == METHOD, linears)
