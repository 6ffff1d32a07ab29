"""CLI commands of the report package (registered on the main Typer app by ``taylorprune.cli``)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach check / inspect / sweep to ``app``."""
