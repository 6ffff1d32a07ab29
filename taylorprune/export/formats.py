"""The output formats a run can write (``--format``), one line each; a format is declared in its own module
(``export.format_spec.Format``). The write phase, ``inspect`` and ``check --min-sparsity`` go through them."""

from __future__ import annotations

from pathlib import Path

from taylorprune.errors import UserError
from taylorprune.export.ct_format import COMPRESSED_TENSORS
from taylorprune.export.format_spec import Format
from taylorprune.export.gguf_format import GGUF
from taylorprune.export.hf_format import SAFETENSORS
from taylorprune.options import by_name

FORMATS: dict[str, Format] = by_name(
    SAFETENSORS,
    COMPRESSED_TENSORS,
    GGUF,
)
DEFAULT = SAFETENSORS.name


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"--format {name}: choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_groups() -> dict[str, type]:
    """The formats' own option groups, by format name (the CLI gives each its flags)."""
    return {f.name: f.options for f in FORMATS.values() if f.options.specs()}


def format_of(folder: Path) -> Format:
    """The format a folder was written in (the first that recognises it; plain safetensors otherwise)."""
    return next((f for f in FORMATS.values() if f.detect(folder)), SAFETENSORS)
