"""Collecting statistics by scope, with the caches every cacheable source gets from the registry.

- ``linear_hooks``: accumulators on the target linears of one block (linear scope); ``linear_statistics``
  attaches them for one forward and returns their results;
- ``model_statistics``: model-scope passes on the dense model, each read from / written to its cache file;
- ``BlockCache``: block-scope statistics already known (from a cache file) and what the engine adds.

A cache file's identity is the source's name, the dense model's fingerprint, the calibration windows, the
dtype and the source's result-changing options; block-scope statistics also depend on how the blocks before
were pruned, so their identity holds the run's pruning recipe too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from taylorprune.calib.sampling import CalibSpec
from taylorprune.options import Options
from taylorprune.stats import cache
from taylorprune.stats.registry import sources_for
from taylorprune.stats.source import ModelContext, Scope, Source, Stats

OptionsOf = Callable[[Source], Options]


def linear_hooks(linears: Mapping[str, nn.Linear], needs: frozenset[str]) -> tuple[dict, list]:
    """Attach accumulators for the linear-scope ``needs`` to each linear: ({path: {stat: acc}}, handles).

    Linears that read the very same input tensor (q/k/v, gate/up: called one after the other on one object)
    share one accumulator: it is fed once, so XXᵀ of a shared input is computed and held once.
    """
    sources = [s for s in sources_for(needs) if s.scope is Scope.LINEAR]
    accs: dict[str, dict[str, object]] = {}
    handles = []
    last: dict[str, object] = {"input": None, "path": None}

    for path, linear in linears.items():
        accs[path] = {s.outputs[0]: s.accumulator(linear) for s in sources}
        if not accs[path]:
            continue

        def hook(_mod, args, _out, path=path):
            x = args[0]
            previous = last["path"]
            if x is last["input"] and previous is not None and previous != path:
                if accs[path] is not accs[previous]:  # first batch: alias this linear's accumulators
                    accs[path] = accs[previous]
            else:
                for a in accs[path].values():
                    a.add(x)
            last["input"], last["path"] = x, path

        handles.append(linear.register_forward_hook(hook))
    return accs, handles


Request = tuple[Mapping[str, nn.Linear], frozenset[str]]


def linear_statistics(run: Callable[[], object], *requests: Request) -> Stats:
    """Run ``run()`` once with accumulators for every (linears, needs) request: {path: {stat: value}}.

    Separate requests keep separate accumulators (e.g. XXᵀ of one consumer beside norms of many members).
    """
    collected, handles = [], []
    for linears, needs in requests:
        if needs:
            accs, more = linear_hooks(linears, needs)
            collected.append(accs)
            handles += more
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    reduced: set[int] = set()
    for accs in collected:  # every rank reduces the same accumulators in the same order (shared ones once)
        for d in accs.values():
            for a in d.values():
                if id(a) not in reduced:
                    reduced.add(id(a))
                    a.reduce()
    stats: Stats = {}
    for accs in collected:
        for path, d in accs.items():
            stats.setdefault(path, {}).update({k: a.result() for k, a in d.items()})
    return stats


def identity(source: Source, options: Options, model: nn.Module, layout, spec: CalibSpec | None,
             recipe: Mapping[str, object] | None = None) -> dict[str, str]:
    """What a cache file of ``source`` must have been made with to be reused."""
    calibration = {k: v for k, v in spec.describe().items() if k != "source"} if spec else {}
    out = {"kind": source.name, "model": cache.model_fingerprint(model),
           # the text's sha256 identifies the calibration text; its path may differ between runs
           "calibration": json.dumps(calibration, sort_keys=True), "dtype": str(next(model.parameters()).dtype),
           "revision": str(source.revision)}
    out.update(options.identity())
    if recipe is not None:
        out["recipe"] = json.dumps(recipe, sort_keys=True, default=str)
    return out


def cache_path(source: Source, options: Options) -> str | None:
    return getattr(options, source.cache_option) if source.cache_option else None


def model_statistics(needs: frozenset[str], ctx: ModelContext, spec: CalibSpec | None, options_of: OptionsOf) -> Stats:
    """Every model-scope statistic in ``needs``: {target path: {stat: tensor}}, cached where asked."""
    out: Stats = {}
    targets = [t.path for t in ctx.layout.all_targets]
    for source in sources_for(needs):
        if source.scope is not Scope.MODEL:
            continue
        wanted = frozenset(n for n in needs if n in source.outputs)
        opts = options_of(source)
        path = cache_path(source, opts)
        ident = identity(source, opts, ctx.model, ctx.layout, spec) if path else {}

        def compute(missing: frozenset[str], source=source, opts=opts, path=path) -> Stats:
            if path and missing & set(source.cache_together):  # a cache serves the sibling statistics later
                missing = missing | frozenset(source.cache_together)
            return source.compute(ctx, missing, opts)

        shapes = {t.path: tuple(t.module.weight.shape) for t in ctx.layout.all_targets}
        stats = cache.cached(path, ident, wanted, targets, compute,
                             on_hit=lambda source=source: ctx.event(f"{source.cache_option}_hit"), shapes=shapes)
        for t, d in stats.items():
            out.setdefault(t, {}).update(d)
    return out


@dataclass
class _File:
    path: str
    identity: dict[str, str]
    outputs: tuple[str, ...]
    known: dict[str, set[str]]


class BlockCache:
    """Block-scope statistics for targets, read from the sources' cache files and added to as computed."""

    def __init__(self, needs: frozenset[str], options_of: OptionsOf, model: nn.Module, layout,
                 spec: CalibSpec | None, recipe: Mapping[str, object], events: list[str] | None = None) -> None:
        self.stats: Stats = {}
        self.files: list[_File] = []
        for source in sources_for(needs):
            path = cache_path(source, options_of(source)) if source.scope is Scope.BLOCK else None
            if not path:
                continue
            ident = identity(source, options_of(source), model, layout, spec, recipe)
            have = cache.load_matching(path, ident, {t.path: tuple(t.module.weight.shape) for t in layout.all_targets})
            for t, d in have.items():
                self.stats.setdefault(t, {}).update({k: v for k, v in d.items() if k in source.outputs})
            self.files.append(_File(path, ident, source.outputs, {t: set(d) for t, d in have.items()}))
            if have and events is not None:
                events.append(f"{source.cache_option}_hit")

    def save(self) -> None:
        """Rewrite the cache files that gained statistics."""
        for f in self.files:
            mine = {t: {k: v for k, v in d.items() if k in f.outputs} for t, d in self.stats.items()}
            mine = {t: d for t, d in mine.items() if d}
            if {t: set(d) for t, d in mine.items()} != f.known:
                cache.store(f.path, f.identity, mine)

