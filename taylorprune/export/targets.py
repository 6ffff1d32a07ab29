"""Output files named on the command line (``--json``, ``--junit``, ``--save-scores``, cache files), checked before
any work.

A path that cannot be written must fail as one line before the command does anything: not after minutes of
pruning or evaluation, and not after a table was already printed as if the command had succeeded. A missing
parent folder is fine where it can be made (the writers create it); one under a file, or under a folder that is
not writable, is not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from taylorprune.errors import UserError


def check_file(value: str | Path, flag: str, inputs: Iterable[Path] = (), kind: str = "file",
               reused: bool = False) -> Path:
    """The expanded path of output ``value`` (given as ``flag``), or a one-line error if it cannot be written
    there; ``inputs`` are files and folders the command reads, which an output must never overwrite. A ``reused``
    file (a statistics cache) may exist read-only: it is then read, not written."""
    where = Path(value).expanduser()
    if where.is_dir():
        raise UserError(f"{flag} {value}: is a folder; give a {kind} path")
    if where.exists() and not reused and not os.access(where, os.W_OK):
        raise UserError(f"{flag} {value}: exists and is not writable")
    parent = _nearest_existing(where.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {value}: {parent} is not a writable folder")
    _outside_inputs(where, value, flag, inputs)
    return where


def check_files(targets: Iterable[tuple[str, str | Path | None]], inputs: Iterable[Path] = (),
                kind: str = "file", reused: Iterable[str] = ()) -> None:
    """``check_file`` for every (flag, value) given (None: not asked for; flags in ``reused`` name caches), and
    no two flags on one file (the second write would silently replace the first)."""
    inputs, reused = list(inputs), set(reused)
    seen: dict[Path, str] = {}
    for flag, value in targets:
        if value is None:
            continue
        where = check_file(value, flag, inputs, kind, flag in reused).resolve()
        if seen.get(where, flag) != flag:  # one flag listed twice (sources sharing a cache option) is one file
            raise UserError(f"{flag} {value}: the same file as {seen[where]}; give each output its own path")
        seen[where] = flag


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder the writer's ``mkdir`` would start from)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _outside_inputs(where: Path, value: str | Path, flag: str, inputs: Iterable[Path]) -> None:
    resolved = where.resolve()
    for src in inputs:
        src = src.expanduser().resolve()
        if resolved == src:
            raise UserError(f"{flag} {value}: is an input of this command, which taylorprune never overwrites")
        if src.is_dir() and src in resolved.parents:
            raise UserError(f"{flag} {value}: inside the input model folder, which taylorprune never writes to")
