"""The layer-by-layer engine (SparseGPT / Wanda style).

Block inputs are captured once; then for each block in turn: collect the statistics the method needs from
forward hooks on its linears, score, mask (and optionally update) each linear, and re-run the now-pruned
block to produce the next block's inputs. So every block is calibrated on the outputs of the already
pruned blocks before it. A method that needs no calibration statistics (magnitude) skips the forwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from taylorprune.errors import RunError
from taylorprune.modeling.layout import Layout
from taylorprune.prune.blocks import BlockRunner
from taylorprune.prune.masks import Pattern, build_mask
from taylorprune.prune.update import UPDATES, Update
from taylorprune.scoring.hvp import eager_attention
from taylorprune.scoring.registry import Method
from taylorprune.scoring.stats import BLOCK_FN_STATS, BLOCK_STATS, collect_hooks


@dataclass
class PruneResult:
    """Per-linear outcome and timings of the engine."""

    linears: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        total = sum(r["numel"] for r in self.linears)
        return sum(r["zeros"] for r in self.linears) / max(total, 1)


def _tick(timings: dict[str, float], key: str, since: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - since
    return now


def prune_layers(
    runner: BlockRunner,
    layout: Layout,
    method: Method,
    pattern: Pattern,
    calib_ids: torch.Tensor | None,
    options: Mapping[str, object] | None = None,
    model_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    keep_masks: bool = False,
    on_block: Callable[[int], None] | None = None,
    update: Update | None = None,
    scores: dict[str, torch.Tensor] | None = None,
    fn_cache: dict[str, dict[str, torch.Tensor]] | None = None,
) -> PruneResult:
    """Prune every target linear of ``layout`` in place, block after block.

    ``update`` reconstructs kept weights after masking (default: none); ``scores``, when a dict, receives each
    linear's fp32 importance scores (CPU) under its module path. ``fn_cache`` holds block-function statistics
    (block-scope HVPs) already known for a target: they are used instead of computed, and what is computed is
    added to it.
    """
    options = options or {}
    model_stats = model_stats or {}
    update = update or UPDATES["none"]
    needs = method.needs_for(options) | update.needs
    block_needs = frozenset(n for n in needs if n in BLOCK_STATS)
    fn_needs = sorted(n for n in needs if n in BLOCK_FN_STATS)
    # Block-scope HVPs differentiate through attention: capture and run everything with eager attention.
    with eager_attention(runner.model) if fn_needs else contextlib.nullcontext():
        return _prune_blocks(runner, layout, method, pattern, calib_ids, options, model_stats, keep_masks, on_block,
                             update, scores, block_needs, fn_needs, {} if fn_cache is None else fn_cache)


def _prune_blocks(runner, layout, method, pattern, calib_ids, options, model_stats, keep_masks, on_block, update,
                  scores, block_needs, fn_needs, fn_cache) -> PruneResult:
    result = PruneResult()
    t = time.perf_counter()
    hidden = runner.capture(calib_ids) if block_needs or fn_needs else None
    t = _tick(result.timings, "capture", t)
    last = len(layout.blocks) - 1
    for i, targets in enumerate(layout.targets):
        with runner.on_device(i):
            stats: dict[str, dict[str, torch.Tensor]] = {}
            if block_needs and targets:
                accs, handles = collect_hooks({tg.path: tg.module for tg in targets}, block_needs)
                try:
                    runner.run(i, hidden)
                finally:
                    for h in handles:
                        h.remove()
                stats = {p: {k: a.result() for k, a in d.items()} for p, d in accs.items()}
            for name in fn_needs:
                if targets and any(name not in fn_cache.get(tg.path, {}) for tg in targets):
                    for path, d in BLOCK_FN_STATS[name](runner, i, hidden, targets, options).items():
                        fn_cache.setdefault(path, {}).update(d)
                for tg in targets:
                    stats.setdefault(tg.path, {})[name] = fn_cache[tg.path][name]
            t = _tick(result.timings, "statistics", t)
            for tg in targets:
                merged = {**model_stats.get(tg.path, {}), **stats.get(tg.path, {})}
                result.linears.append(_prune_linear(tg.path, tg.module, method, pattern, merged, options, update,
                                                    scores))
                if keep_masks:
                    result.masks[tg.path] = tg.module.weight.detach().ne(0).cpu()
            t = _tick(result.timings, "score_and_mask", t)
            if hidden is not None and i < last:
                hidden = runner.run(i, hidden)
            t = _tick(result.timings, "propagate", t)
        if on_block:
            on_block(i)
    return result


@torch.no_grad()
def _prune_linear(path, linear, method: Method, pattern: Pattern, stats, options, update: Update, sink) -> dict:
    weight = linear.weight
    w32 = weight.detach().to(torch.float32)
    if method.solver is not None:
        new, score = method.solver(w32, stats, pattern, options, path)
        if not torch.isfinite(new).all():
            raise RunError(f"{path}: {method.name} produced non-finite weights; try --dtype float32 or more --nsamples")
    else:
        score = method.score(w32, stats, options)
        keep = build_mask(score, pattern, path)
        new = update.apply(w32, keep, pattern, stats, options, path)
        if not torch.isfinite(new).all():
            raise RunError(f"{path}: --update {update.name} produced non-finite weights; try more --nsamples")
    weight.copy_(new.to(weight.dtype))
    if sink is not None:
        sink[path] = score.detach().to(torch.float32).cpu().contiguous()
    zeros = int((weight == 0).sum().item())
    return {"name": path, "shape": list(weight.shape), "numel": weight.numel(), "zeros": zeros,
            "sparsity": zeros / weight.numel()}
