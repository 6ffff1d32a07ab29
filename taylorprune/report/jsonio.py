"""Strict JSON for machine-read outputs: Python's ``Infinity``/``NaN`` are not JSON, and CI parsers reject them."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

from taylorprune.errors import UserError


def strict(value):
    """``value`` with every non-finite float replaced by None (a collapsed model's perplexity is inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def dump(data: object, path: Path, flag: str = "--json") -> None:
    """Write ``data`` as indented strict JSON, creating the parent folder; a place that cannot be written (a
    folder, no permission) is a one-line error naming ``flag``."""
    path = Path(path).expanduser()
    text = json.dumps(strict(data), indent=2, allow_nan=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        raise UserError(f"{flag} {path}: cannot write it ({exc.strerror or exc})") from None
