"""Atomic output folders: write beside the target, verify, then rename into place.

An interrupted or failed run leaves no folder at the target path (the temporary folder is removed where the
process can still do so), and an existing output is only replaced when the caller asked for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from taylorprune.errors import UserError


def check_output(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse outputs that are an input, inside an input folder, contain one, or exist without ``--overwrite``
    (an input file, a GGUF, may have an output beside it)."""
    out = output.expanduser().resolve()
    for src in inputs:
        src = src.resolve()
        inside = src.is_dir() and src in out.parents
        if out == src or inside or out in src.parents:
            raise UserError(f"--output {output} overlaps the input {src}; choose a separate folder")
    if out.exists() and not overwrite:
        raise UserError(f"--output {output} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {output} exists and is not a folder")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--output {output}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--output {output}: {parent} is not writable")


def check_free_space(output: Path, needed_bytes: int) -> None:
    """Refuse to start when the output's file system cannot hold the estimated output."""
    parent = output.expanduser().resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise UserError(
            f"--output {output}: needs about {needed_bytes / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB free"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; on success it replaces ``output`` in one rename."""
    out = output.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would keep a published checkpoint from other users
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise UserError(f"--output {output} appeared during the run; pass --overwrite to replace it")
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
