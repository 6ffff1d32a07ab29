"""A compressed-tensors folder as ``--model``: a plain model holding the dequantized weights, and every packed
linear's codes and grid kept as the quantize stage would have left them.

Why: transformers loads such a folder with compressed-tensors' own modules (packed weights, no ``.weight``), which
serve a forward (``eval``) but nothing that trains or rewrites weights. Read by our own unpacker instead
(``export.compressed_tensors.read_folder``, which also reads the asymmetric folders transformers cannot load),
``recover`` trains the model on its grids (``--quant-train``'s default for recovery) and writes them again with
``--format compressed-tensors``; ``export`` writes any format from the dequantized values. As for a float folder,
every weight that is exactly 0 stays 0 (on a symmetric grid the zero point's value is exactly 0, so a quantized
weight on it is kept there too). ``run`` refuses such a model: pruning or quantizing it again would start from
weights that are no longer the float model's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from taylorprune.errors import UserError
from taylorprune.export.compressed_tensors import LinearQuant, read_folder
from taylorprune.export.format_spec import GridKind, quantization_method
from taylorprune.modeling import loading
from taylorprune.modeling.gguf import materialize_buffers
from taylorprune.quantize.grid import SCALE_DTYPES, Grid, GridSpec, column_groups
from taylorprune.quantize.stage import QuantizedLinear

METHOD = "compressed-tensors"


def folder_of(model: str) -> Path | None:
    """The folder when ``--model`` is a local compressed-tensors folder, else None."""
    path = Path(model).expanduser()
    return path if path.is_dir() and quantization_method(path) == METHOD else None


def refuse_run(model: str) -> None:
    """``run`` starts from float weights: a quantized folder is refused before any work."""
    if folder_of(model) is not None:
        raise UserError(f"--model {model} is already quantized (compressed-tensors): prune or quantize the float "
                        "model; `taylorprune recover`, `export` and `eval` take this folder")


def grid_kind(config) -> GridKind | None:
    """The first config group's grid of a compressed-tensors config (what the writer must hold again)."""
    qcfg = getattr(config, "quantization_config", None)
    qcfg = qcfg if isinstance(qcfg, dict) else getattr(qcfg, "to_dict", lambda: None)()
    if not qcfg or qcfg.get("quant_method") != METHOD:
        return None
    for group in (qcfg.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w:
            size = int(w["group_size"]) if w.get("strategy") == "group" else -1
            return GridKind(int(w["num_bits"]), size, bool(w.get("symmetric", True)), "integer",
                            w.get("actorder") != "group")
    return None


def _spec(q: LinearQuant) -> GridSpec:
    names = {dtype: name for name, dtype in SCALE_DTYPES.items()}
    if q.scales.dtype not in names:
        raise UserError(f"scales stored as {q.scales.dtype}: only {', '.join(SCALE_DTYPES)} are read")
    return GridSpec(q.wbits, q.group_size, q.symmetric, "integer", names[q.scales.dtype])


def quantized_linear(q: LinearQuant) -> QuantizedLinear:
    """Our record of one packed linear: its codes, grid and group map, and its exact zeros as the kept mask."""
    spec = _spec(q)
    codes = q.codes.to(torch.uint8)
    zero = q.zeros.to(torch.uint8) if q.zeros is not None else torch.full_like(q.scales, 2 ** (q.wbits - 1),
                                                                                 dtype=torch.uint8)
    values = q.dequantize(torch.float32)
    keep = values != 0
    return QuantizedLinear(spec, codes, Grid(q.scales, zero, None), column_groups(codes.shape[1], spec), "loaded",
                           None if bool(keep.all()) else keep)


def load(lo, config) -> tuple[loading.Loaded, dict[str, QuantizedLinear]]:
    """The plain model of folder ``lo.model`` (dequantized linears, ``lo.dtype``) and its packed linears' records."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folder_of(lo.model)
    try:
        _, tensors, packed = read_folder(folder)
    except ValueError as exc:
        raise UserError(f"--model {lo.model}: {exc}") from None
    for name, q in packed.items():
        tensors[f"{name}.weight"] = q.dequantize(torch.float32)
    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config
    dtype = loading.torch_dtype(lo.dtype)
    dtype = next(iter(tensors.values())).dtype if dtype == "auto" else dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    with init_empty_weights(include_buffers=False):
        net = AutoModelForCausalLM.from_config(plain, dtype=dtype)
    missing, unexpected = net.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(plain, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"--model {lo.model}: tensors do not match its config (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    net.tie_weights()
    materialize_buffers(net)
    net.eval()
    net.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return loading.Loaded(net, tokenizer, str(folder.resolve())), {n: quantized_linear(q) for n, q in packed.items()}
