"""``--format safetensors`` (the default): a plain Hugging Face folder of float tensors, as ``save_pretrained``
writes it (``export.save``).

It holds masks (exact zeros) and compact shapes, and quantized linears as their dequantized values: exactly on the
grid when the model's dtype holds them (float32 always does for 2-8-bit codes times fp16 scales; bfloat16 often
not, which the quantize record reports), with no codes or scales stored, so the folder is no smaller. Reading
back: every linear's shape and sparsity, and every quantized linear's values bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from taylorprune.errors import RunError
from taylorprune.export import save
from taylorprune.export.format_spec import Format, Holds, Output, StoredLinear, quantization_method


def write(output: Output, folder: Path) -> None:
    save.save_model(output.model, output.tokenizer, folder)


def verify(folder: Path, output: Output) -> None:
    """Shapes and sparsity of every linear (``save.verify``), then the quantized linears' values exactly."""
    save.verify(folder, output.linears, output.widths)
    if not output.quantized:
        return
    wanted = {f"{name}.weight": name for name in output.quantized}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in [k for k in f.keys() if k in wanted]:  # noqa: SIM118 (safe_open is not a dict)
                memory = output.model.get_submodule(wanted[key]).weight.detach().cpu()
                if not torch.equal(f.get_tensor(key), memory):
                    raise RunError(f"verification failed: {key} on disk differs from the quantized weight in memory")


def linears(folder: Path) -> Iterator[StoredLinear]:
    """Every tensor of the folder's safetensors files, read only when its ``load`` is called (one at a time)."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                sl = f.get_slice(key)
                yield StoredLinear(key, tuple(sl.get_shape()), str(sl.get_dtype()),
                                   lambda f=f, key=key: f.get_tensor(key))


SAFETENSORS = Format("safetensors", "float tensors as save_pretrained writes them (quantized linears dequantized)",
                     Holds(codes=False), write, verify, save.folder_bytes,
                     lambda folder: any(Path(folder).glob("*.safetensors")) and quantization_method(folder) is None,
                     linears)
