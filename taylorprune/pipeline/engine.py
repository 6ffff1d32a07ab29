"""The layer-by-layer engine (SparseGPT / Wanda style).

Block inputs are captured once; then for each block in turn: collect the statistics the method needs from
forward hooks on its linears, score, mask (and optionally update) each linear, and re-run the now-pruned
block to produce the next block's inputs. So every block is calibrated on the outputs of the already
pruned blocks before it. A method that needs no calibration statistics skips the forwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from taylorprune.errors import RunError
from taylorprune.modeling.attention import eager_attention
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import Layout
from taylorprune.pipeline.components import Components
from taylorprune.prune.masks import Pattern, build_mask
from taylorprune.prune.obs import CholeskyFailed
from taylorprune.stats.collect import linear_statistics
from taylorprune.stats.registry import of_scope, sources_for
from taylorprune.stats.source import Scope, Stats


@dataclass
class PruneResult:
    """Per-linear outcome and timings of the engine."""

    linears: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)  # per-block stages (reconstruction)
    allocation: dict = field(default_factory=dict)  # per-block numbers of a layer-wise allocation

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
    """What the engine does to every target: components, patterns, and where statistics come from."""

    parts: Components
    pattern: Pattern
    model_stats: Mapping[str, Mapping[str, torch.Tensor]]
    block_cache: Stats
    scores: dict[str, torch.Tensor] | None
    linear_needs: frozenset[str] = frozenset()
    block_needs: frozenset[str] = frozenset()
    patterns: Mapping[str, Pattern] = field(default_factory=dict)
    seed: int = 0

    def pattern_of(self, path: str) -> Pattern:
        return self.patterns.get(path, self.pattern)

    @property
    def recon(self) -> bool:
        return self.parts.recon.apply is not None

    @property
    def dense_stream(self) -> bool:
        return self.parts.recon.dense_stream(self.parts.recon_options)


def prune_layers(
    runner: BlockRunner,
    layout: Layout,
    parts: Components,
    pattern: Pattern,
    calib_ids: torch.Tensor | None,
    model_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    on_block: Callable[[int], None] | None = None,
    scores: dict[str, torch.Tensor] | None = None,
    block_cache: Stats | None = None,
    patterns: Mapping[str, Pattern] | None = None,
    seed: int = 0,
) -> PruneResult:
    """Prune every target linear of ``layout`` in place, block after block.

    ``model_stats`` holds the model-scope statistics (computed on the dense model before); ``scores``, when a
    dict, receives each linear's fp32 importance scores (CPU) under its module path; ``block_cache`` holds
    block-scope statistics already known for a target: they are used instead of computed, and what is
    computed is added to it. ``patterns`` overrides ``pattern`` per target (layer-wise allocations); ``seed``
    seeds the block reconstruction.
    """
    needs = parts.needs
    job = Job(parts, pattern, model_stats or {}, {} if block_cache is None else block_cache, scores,
              of_scope(needs, Scope.LINEAR), of_scope(needs, Scope.BLOCK), patterns or {}, seed)
    # Block-scope statistics differentiate through attention: capture and run everything with eager attention.
    with eager_attention(runner.model) if job.block_needs else contextlib.nullcontext():
        return _prune_blocks(runner, layout, calib_ids, job, on_block)


def _prune_blocks(runner: BlockRunner, layout: Layout, calib_ids, job: Job, on_block) -> PruneResult:
    result = PruneResult()
    t = time.perf_counter()
    calibrated = job.linear_needs or job.block_needs or job.recon
    hidden = runner.capture(calib_ids) if calibrated else None
    dense = hidden if job.dense_stream else None  # the dense model's activations, for dense recon targets
    t = _tick(result.timings, "capture", t)
    last = len(layout.blocks) - 1
    for i, targets in enumerate(layout.targets):
        with runner.on_device(i):
            dense_out = runner.run(i, dense) if dense is not None else None  # before block i is pruned
            same_out = runner.run(i, hidden) if job.recon and not job.dense_stream and targets else None
            stats = _block_statistics(runner, i, hidden, targets, job) if targets else {}
            t = _tick(result.timings, "statistics", t)
            for tg in targets:
                merged = {**job.model_stats.get(tg.path, {}), **stats.get(tg.path, {})}
                result.linears.append(_prune_linear(tg.path, tg.module, merged, job, result) | {"block": i})
            t = time.perf_counter()  # the linears' steps are timed inside
            if job.recon and targets:
                goal = dense_out if dense_out is not None else same_out
                info = job.parts.recon.apply(runner, i, hidden, goal, [tg.module for tg in targets],
                                             job.parts.recon_options, job.seed)
                result.blocks.append({"block": i, **info})
                t = _tick(result.timings, "recon", t)
            if hidden is not None and i < last:
                hidden = runner.run(i, hidden)
            dense = dense_out
            t = _tick(result.timings, "propagate", t)
        if on_block:
            on_block(i)
    return result


def _block_statistics(runner: BlockRunner, i: int, hidden, targets, job: Job) -> Stats:
    """Linear-scope statistics of block ``i``'s targets, plus block-scope ones (cached or computed)."""
    stats: Stats = {}
    if job.linear_needs:
        stats = linear_statistics(lambda: runner.run(i, hidden), ({tg.path: tg.module for tg in targets},
                                                                   job.linear_needs))
    for source in sources_for(job.block_needs):
        wanted = [n for n in source.outputs if n in job.block_needs]
        if any(n not in job.block_cache.get(tg.path, {}) for tg in targets for n in wanted):
            fresh = source.compute(runner, i, hidden, targets, job.parts.options_of(source))
            for path, d in fresh.items():
                job.block_cache.setdefault(path, {}).update(d)
        for tg in targets:
            stats.setdefault(tg.path, {}).update({n: job.block_cache[tg.path][n] for n in wanted})
    return stats


@torch.no_grad()
def _prune_linear(path: str, linear, stats, job: Job, result: PruneResult) -> dict:
    """Score → mask → refine → update one linear (or the method's own solver); each step timed as a phase."""
    weight = linear.weight
    w32 = weight.detach().to(torch.float32)
    parts = job.parts
    pattern = job.pattern_of(path)
    refined: dict = {}
    keep = None
    t = time.perf_counter()
    try:
        if parts.method.solve is not None:
            new, score = parts.method.solve(w32, stats, pattern, parts.method_options, path)
            what = parts.method.name
            t = _tick(result.timings, "solve", t)
        else:
            score = parts.method.score(w32, stats, parts.method_options)
            keep = build_mask(score, pattern, path)
            t = _tick(result.timings, "score_and_mask", t)
            keep, refined = parts.refine.apply(w32, keep, pattern, stats, parts.refine_options)
            t = _tick(result.timings, "refine", t)
            new = parts.update.apply(w32, keep, pattern, stats, parts.update_options, path)
            what = f"--update {parts.update.name}"
            t = _tick(result.timings, "update", t)
    except CholeskyFailed as exc:  # keep going on a long run: plain masking for this one linear, recorded
        if keep is None:
            score = w32.abs() if parts.method.solve is not None else score
            keep = build_mask(score, pattern, path)
        new = w32 * keep
        what = "fallback masking"
        result.warnings.append(f"{exc}; fell back to masking without weight update (by |W| for a solver method)")
    if not torch.isfinite(new).all():
        raise RunError(f"{path}: {what} produced non-finite weights; try --dtype float32 or more --nsamples")
    weight.copy_(new.to(weight.dtype))
    if job.scores is not None:
        job.scores[path] = score.detach().to(torch.float32).cpu().contiguous()
    record = linear_record(path, weight)
    if refined:
        record["refine"] = refined
    return record


def linear_record(path: str, weight: torch.Tensor, block: int | None = None) -> dict:
    """A pruned linear as the report lists it."""
    zeros = int((weight == 0).sum().item())
    record = {"name": path, "shape": list(weight.shape), "numel": weight.numel(), "zeros": zeros,
              "sparsity": zeros / weight.numel()}
    return record if block is None else record | {"block": block}
