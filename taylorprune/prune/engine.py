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
from taylorprune.prune.obs import CholeskyFailed
from taylorprune.prune.update import UPDATES, Update
from taylorprune.scoring.hvp import eager_attention
from taylorprune.scoring.registry import Method
from taylorprune.scoring.stats import BLOCK_FN_STATS, BLOCK_STATS, collect_hooks


@dataclass
class PruneResult:
    """Per-linear outcome and timings of the engine."""

    linears: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        total = sum(r["numel"] for r in self.linears)
        return sum(r["zeros"] for r in self.linears) / max(total, 1)


def _tick(timings: dict[str, float], key: str, since: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - since
    return now


@dataclass
class Job:
    """What the engine does to every target: method, pattern, update, and where statistics come from."""

    method: Method
    pattern: Pattern
    update: Update
    options: Mapping[str, object]
    model_stats: Mapping[str, Mapping[str, torch.Tensor]]
    scores: dict[str, torch.Tensor] | None
    fn_cache: dict[str, dict[str, torch.Tensor]]
    block_needs: frozenset[str] = frozenset()
    fn_needs: tuple[str, ...] = ()


def prune_layers(
    runner: BlockRunner,
    layout: Layout,
    method: Method,
    pattern: Pattern,
    calib_ids: torch.Tensor | None,
    options: Mapping[str, object] | None = None,
    model_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
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
    update = update or UPDATES["none"]
    needs = method.needs_for(options) | update.needs
    job = Job(method, pattern, update, options, model_stats or {}, scores, {} if fn_cache is None else fn_cache,
              frozenset(n for n in needs if n in BLOCK_STATS), tuple(sorted(n for n in needs if n in BLOCK_FN_STATS)))
    # Block-scope HVPs differentiate through attention: capture and run everything with eager attention.
    with eager_attention(runner.model) if job.fn_needs else contextlib.nullcontext():
        return _prune_blocks(runner, layout, calib_ids, job, on_block)


def _prune_blocks(runner: BlockRunner, layout: Layout, calib_ids, job: Job, on_block) -> PruneResult:
    result = PruneResult()
    t = time.perf_counter()
    hidden = runner.capture(calib_ids) if job.block_needs or job.fn_needs else None
    t = _tick(result.timings, "capture", t)
    last = len(layout.blocks) - 1
    for i, targets in enumerate(layout.targets):
        with runner.on_device(i):
            stats = _block_statistics(runner, i, hidden, targets, job) if targets else {}
            t = _tick(result.timings, "statistics", t)
            for tg in targets:
                merged = {**job.model_stats.get(tg.path, {}), **stats.get(tg.path, {})}
                result.linears.append(_prune_linear(tg.path, tg.module, merged, job, result.warnings))
            t = _tick(result.timings, "score_and_mask", t)
            if hidden is not None and i < last:
                hidden = runner.run(i, hidden)
            t = _tick(result.timings, "propagate", t)
        if on_block:
            on_block(i)
    return result


def _block_statistics(runner: BlockRunner, i: int, hidden, targets, job: Job) -> dict[str, dict[str, torch.Tensor]]:
    """Hook statistics of block ``i``'s linears, plus block-function statistics (cached or computed)."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    if job.block_needs:
        accs, handles = collect_hooks({tg.path: tg.module for tg in targets}, job.block_needs)
        try:
            runner.run(i, hidden)
        finally:
            for h in handles:
                h.remove()
        stats = {p: {k: a.result() for k, a in d.items()} for p, d in accs.items()}
    for name in job.fn_needs:
        if any(name not in job.fn_cache.get(tg.path, {}) for tg in targets):
            for path, d in BLOCK_FN_STATS[name](runner, i, hidden, targets, job.options).items():
                job.fn_cache.setdefault(path, {}).update(d)
        for tg in targets:
            stats.setdefault(tg.path, {})[name] = job.fn_cache[tg.path][name]
    return stats


@torch.no_grad()
def _prune_linear(path: str, linear, stats, job: Job, warnings: list[str]) -> dict:
    weight = linear.weight
    w32 = weight.detach().to(torch.float32)
    try:
        if job.method.solver is not None:
            new, score = job.method.solver(w32, stats, job.pattern, job.options, path)
            what = job.method.name
        else:
            score = job.method.score(w32, stats, job.options)
            keep = build_mask(score, job.pattern, path)
            new = job.update.apply(w32, keep, job.pattern, stats, job.options, path)
            what = f"--update {job.update.name}"
    except CholeskyFailed as exc:  # keep going on a long run: plain masking for this one linear, recorded
        score = w32.abs() if job.method.solver is not None else score
        new = w32 * build_mask(score, job.pattern, path)
        what = "fallback masking"
        warnings.append(f"{exc}; fell back to masking without weight update (by |W| for a solver method)")
    if not torch.isfinite(new).all():
        raise RunError(f"{path}: {what} produced non-finite weights; try --dtype float32 or more --nsamples")
    weight.copy_(new.to(weight.dtype))
    if job.scores is not None:
        job.scores[path] = score.detach().to(torch.float32).cpu().contiguous()
    zeros = int((weight == 0).sum().item())
    return {"name": path, "shape": list(weight.shape), "numel": weight.numel(), "zeros": zeros,
            "sparsity": zeros / weight.numel()}
