"""The report's layout: which version a report is, and the JSON Schema (``assets/report.schema.json``) of the
current one.

The report changed shape once without saying so (``evaluation.perplexity`` went from a number to a record), and
scripts reading it broke silently; ``schema_version`` lets a reader tell layouts apart instead of guessing:

* ``2`` (``SCHEMA_VERSION``): one record per evaluator under ``evaluation``, their numbers flat under ``metrics``;
* ``1``: before versioning, the perplexity record was the whole ``evaluation`` (``evaluation.perplexity`` a number);
* no ``schema_version`` and no numeric ``evaluation.perplexity``: written between the two (the current layout
  without the field), or too little to tell; read as it is.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from taylorprune.errors import UserError
from taylorprune.export.save import SCHEMA_VERSION

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "assets" / "report.schema.json"
LEGACY = 1  # evaluation.perplexity a number, no metrics
__all__ = ["LEGACY", "SCHEMA_FILE", "SCHEMA_VERSION", "layout", "load_schema", "problems", "validate"]


def layout(report: dict, where: str = "the report") -> int | None:
    """The report's layout version; None for an unversioned report that is not layout 1 (see the module doc).

    A version this taylorprune does not know is refused: reading it as the current one is the silent misreading
    versioning exists to prevent."""
    version = report.get("schema_version")
    if version is None:
        evaluation = report.get("evaluation")
        numeric = isinstance(evaluation, dict) and _is_number(evaluation.get("perplexity"))
        return LEGACY if numeric else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{where}: schema_version {version!r} is not a layout version (a positive integer)")
    if version > SCHEMA_VERSION:
        raise UserError(f"{where}: a report of layout {version}, newer than this taylorprune reads (layouts 1 to "
                        f"{SCHEMA_VERSION}); upgrade taylorprune to read it")
    return version


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@functools.cache
def load_schema() -> dict:
    """The JSON Schema of the current layout, as shipped in the package."""
    return json.loads(SCHEMA_FILE.read_text())


def problems(report: object) -> list[str]:
    """Every way ``report`` departs from the current layout's schema, as 'where: what' lines (none: valid)."""
    from jsonschema import Draft202012Validator  # only readers that validate pay for the import

    validator = Draft202012Validator(load_schema())
    found = sorted(validator.iter_errors(report), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in found]


def validate(report: object, where: str = "the report") -> None:
    """Refuse a report that does not follow the current layout's schema, naming the first problem."""
    found = problems(report)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"{where}: not a layout-{SCHEMA_VERSION} taylorprune report: {found[0]}{more}")
