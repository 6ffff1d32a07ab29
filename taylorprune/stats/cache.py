"""Statistic caches in safetensors: one fp32 tensor per target linear and statistic, named
``<module path>.<stat>`` (e.g. ``model.layers.0.mlp.up_proj.grad_l2``), with metadata saying how they were made.

A cache is reused only when its metadata matches the current run on every identity key; a mismatch is an
error that names what differs, never a silent reuse. Statistics a matching cache lacks are computed and the
file is rewritten (atomically) with the union.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

import taylorprune
from taylorprune import distributed
from taylorprune.errors import UserError
from taylorprune.export.save import write_tensors
from taylorprune.modeling.fingerprint import model_fingerprint  # noqa: F401 (callers read it here)
from taylorprune.stats.source import Stats


def _read(path: Path) -> tuple[dict[str, str], Stats]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stats: Stats = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                module, _, stat = key.rpartition(".")
                stats.setdefault(module, {})[stat] = f.get_tensor(key)
    except Exception as exc:
        raise UserError(f"cache {path} is not a readable safetensors file ({exc}); delete it") from None
    return meta, stats


def _write(path: Path, meta: dict[str, str], stats: Stats) -> None:
    tensors = {f"{module}.{stat}": t.contiguous() for module, d in stats.items() for stat, t in d.items()}
    write_tensors(path, tensors, meta)


def load_matching(path: str | None, identity: dict[str, str], shapes: dict[str, tuple] | None = None) -> Stats:
    """Statistics of a cache file whose metadata matches ``identity`` ({} when there is no file)."""
    if not path or not Path(path).expanduser().exists():
        return {}
    file = Path(path).expanduser()
    meta, have = _read(file)
    _check_identity(file, meta, identity)
    _check_shapes(file, have, shapes)
    return have


def _check_shapes(file: Path, have: Stats, shapes: dict[str, tuple] | None) -> None:
    """Every cached per-weight tensor has its target's weight shape (a damaged or foreign file otherwise)."""
    for target, stats in have.items():
        want = (shapes or {}).get(target)
        for name, t in stats.items():
            if want is not None and tuple(t.shape) != tuple(want):
                raise UserError(f"cache {file}: {target}.{name} has shape {tuple(t.shape)}, the model's weight "
                                f"{tuple(want)}; delete it")


def store(path: str, identity: dict[str, str], stats: Stats) -> None:
    if not distributed.world().writer:  # rank 0 writes for a data-parallel run (every rank holds the same sums)
        return
    names = sorted({s for d in stats.values() for s in d})
    _write(Path(path).expanduser(), dict(identity, stats=",".join(names), taylorprune=taylorprune.__version__), stats)


def _check_identity(file: Path, meta: dict[str, str], identity: dict[str, str]) -> None:
    diffs = [f"{k}: cache {meta.get(k)!r} vs run {v!r}" for k, v in identity.items() if meta.get(k) != v]
    if diffs:
        raise UserError(f"cache {file} was made differently ({'; '.join(diffs)}); delete it or use another file")


def cached(
    path: str | None,
    identity: dict[str, str],
    needed: frozenset[str],
    targets: list[str],
    compute: Callable[[frozenset[str]], Stats],
    on_hit: Callable[[], None] | None = None,
    shapes: dict[str, tuple] | None = None,
) -> Stats:
    """Return ``needed`` statistics for ``targets``, from the cache at ``path`` when it matches (``shapes``: each
    target's weight shape, which every cached tensor must have)."""
    if not path:
        return compute(needed)
    file = Path(path).expanduser()
    have: Stats = {}
    if file.exists():
        meta, have = _read(file)
        _check_identity(file, meta, identity)
        _check_shapes(file, have, shapes)
    missing = frozenset(s for s in needed if any(s not in have.get(t, {}) for t in targets))
    if not missing:
        if on_hit:
            on_hit()
        return {t: {s: have[t][s] for s in needed} for t in targets}
    fresh = compute(missing)
    for t, d in fresh.items():
        have.setdefault(t, {}).update(d)
    store(str(file), identity, have)
    return {t: {s: have[t][s] for s in needed} for t in targets}
