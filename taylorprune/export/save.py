"""Write the pruned model as a plain Hugging Face folder (safetensors) and verify what was written.

The folder loads with ``AutoModelForCausalLM.from_pretrained`` (and vLLM) as is: no ``sparsity_config`` or
quantization entries in config.json, tokenizer files alongside.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from taylorprune.errors import RunError

REPORT_NAME = "taylorprune_report.json"
# The report's layout (assets/report.schema.json describes it); raised when a field is removed or changes meaning,
# so scripts can tell layouts apart. 1: before versioning, evaluation.perplexity a number; 2: one record per
# evaluator under evaluation, their numbers flat under metrics.
SCHEMA_VERSION = 2


def save_model(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` of model and tokenizer into ``folder``."""
    for key in ("sparsity_config", "quantization_config"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_report(folder: Path, report: dict) -> None:
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")


def verify(folder: Path, linears: list[dict], widths: dict[str, int] | None = None) -> None:
    """Re-read the written folder: every linear has the shape and the sparsity the model in memory has, and
    config.json carries ``widths`` when given (a structured run: ``from_pretrained`` then builds these tensors)."""
    wanted = {f"{r['name']}.weight": r for r in linears}
    found: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in wanted:
                    check_tensor(key, f.get_tensor(key), wanted[key])
                    found.add(key)
    missing = sorted(set(wanted) - found)
    if missing:
        raise RunError(f"verification failed: {missing[0]} is missing from the written folder")
    check_widths(folder, widths)


def check_widths(folder: Path, widths: dict[str, int] | None) -> None:
    """config.json carries ``widths`` (a structured run's: ``from_pretrained`` builds the tensors from them)."""
    if not widths:
        return
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    for key, value in widths.items():
        if config.get(key) != value:
            raise RunError(f"verification failed: config.json has {key}={config.get(key)}, the weights need {value}")


def check_tensor(key: str, tensor: torch.Tensor, record: dict) -> None:
    """One written linear against its record: shape and sparsity (to 1e-9)."""
    if "shape" in record and list(tensor.shape) != list(record["shape"]):
        raise RunError(f"verification failed: {key} has shape {list(tensor.shape)} on disk, {record['shape']} in "
                       "memory")
    got = float((tensor == 0).sum().item()) / tensor.numel()
    if abs(got - record["sparsity"]) > 1e-9:
        raise RunError(f"verification failed: {record['name']} has sparsity {got:.6f} on disk, "
                       f"{record['sparsity']:.6f} in memory")


def folder_bytes(folder: Path) -> int:
    """Size of the weight files (safetensors) of a folder."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (temporary file beside it, then rename)."""
    import os
    import tempfile

    from safetensors.torch import save_file

    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def estimate_bytes(model) -> int:
    """Size of the model's tensors as written (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def peak_memory() -> dict[str, float]:
    """Peak RSS of this process (and peak CUDA allocation when a GPU is used), in MiB."""
    import resource

    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak
