"""The layer-by-layer engine (SparseGPT / Wanda style), blind to which method or stages run.

Block inputs are captured once; then for each block in turn (one ``modeling.sweep.forward``): collect the
statistics the components need from forward hooks on its linears (and block-scope ones), then for each linear
score → mask (or the method's own solver) → the run's linear-scope stages in order → the final linear stages
(quantization) on the linear's final weight, whatever chose it (a solver, the stages, a fallback), then the
block-scope stages (reconstruction), and re-run the now-pruned block to produce the next block's inputs. So every
block is calibrated on the outputs of the already pruned (and quantized) blocks before it. Without a pattern no
method runs: only the final stages do (``--quantize`` alone). Nothing runs forward when nothing needs it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from taylorprune import distributed
from taylorprune.errors import RunError
from taylorprune.modeling.attention import eager_attention
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import Layout
from taylorprune.modeling.sweep import forward
from taylorprune.pipeline.components import Components
from taylorprune.pipeline.state import linear_record
from taylorprune.prune.masks import Fallback, Pattern, build_mask
from taylorprune.prune.recon import Trail
from taylorprune.quantize.train import grid_trainer
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
    quantized: dict = field(default_factory=dict)  # codes and grid of each quantized linear (for the writer)
    planned: dict = field(default_factory=dict)  # {stage kind: the record of its dense-model plan} (--bits-budget)

    @property
    def sparsity(self) -> float:
        total = sum(r["numel"] for r in self.linears)
        return sum(r["zeros"] for r in self.linears) / max(total, 1)


def _tick(timings: dict[str, float], key: str, since: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - since
    return now


@dataclass
class LinearWork:
    """What the linear-scope stages of one linear work on: the dense fp32 weight, its keep-mask (None: no masks), the
    new weight (None until a stage sets it: the weight times the mask), what the stages report, the model's dtype,
    and what a final stage keeps for the writer (``quantized``)."""

    path: str
    weight: torch.Tensor
    keep: torch.Tensor | None
    pattern: Pattern | None
    stats: Mapping[str, torch.Tensor]
    new: torch.Tensor | None = None
    record: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    quantized: object | None = None
    assigned: object | None = None  # what a final stage's plan chose for this linear (--bits-budget: its grid)

    @property
    def current(self) -> torch.Tensor:
        """The linear's weight as the stages have left it so far."""
        if self.new is not None:
            return self.new
        return self.weight if self.keep is None else self.weight * self.keep


@dataclass
class Job:
    """What the engine does to every target: components, patterns, and where statistics come from."""

    parts: Components
    pattern: Pattern | None
    model_stats: Mapping[str, Mapping[str, torch.Tensor]]
    block_cache: Stats
    scores: dict[str, torch.Tensor] | None
    linear_needs: frozenset[str] = frozenset()
    block_needs: frozenset[str] = frozenset()
    patterns: Mapping[str, Pattern] = field(default_factory=dict)
    seed: int = 0
    assigned: Mapping[str, object] = field(default_factory=dict)

    def pattern_of(self, path: str) -> Pattern | None:
        return self.patterns.get(path, self.pattern)

    @property
    def linear_stages(self):
        """The linear stages that follow the method's mask (refused up front for solvers)."""
        return [s for s in self.parts.active("linear") if not s.kind.final]

    @property
    def final_stages(self):
        """The linear stages that run last, on the linear's final weight (quantization)."""
        return [s for s in self.parts.active("linear") if s.kind.final]

    @property
    def block_stages(self):
        return self.parts.active("block")

    @property
    def dense_stream(self) -> bool:
        """Whether a block stage fits to the dense model's outputs (carried along beside the pruned ones)."""
        return any(s.choice.dense_stream(s.options) for s in self.block_stages)


def prune_layers(
    runner: BlockRunner,
    layout: Layout,
    parts: Components,
    pattern: Pattern | None,
    calib_ids: torch.Tensor | None,
    model_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    on_block: Callable[[int], None] | None = None,
    scores: dict[str, torch.Tensor] | None = None,
    block_cache: Stats | None = None,
    patterns: Mapping[str, Pattern] | None = None,
    seed: int = 0,
    assigned: Mapping[str, object] | None = None,
) -> PruneResult:
    """Prune every target linear of ``layout`` in place, block after block.

    ``model_stats`` holds the model-scope statistics (computed on the dense model before); ``scores``, when a
    dict, receives each linear's fp32 importance scores (CPU) under its module path; ``block_cache`` holds
    block-scope statistics already known for a target: they are used instead of computed, and what is
    computed is added to it. ``patterns`` overrides ``pattern`` per target (layer-wise allocations); ``seed``
    seeds the block-scope stages; ``assigned`` holds per target what the final stages' plan chose (a grid).
    """
    needs = parts.unstructured_needs
    job = Job(parts, pattern, model_stats or {}, {} if block_cache is None else block_cache, scores,
              of_scope(needs, Scope.LINEAR), of_scope(needs, Scope.BLOCK), patterns or {}, seed, assigned or {})
    # Block-scope statistics differentiate through attention: capture and run everything with eager attention.
    with eager_attention(runner.model) if job.block_needs else contextlib.nullcontext():
        return _prune_blocks(runner, layout, calib_ids, job, on_block)


def _prune_blocks(runner: BlockRunner, layout: Layout, calib_ids, job: Job, on_block) -> PruneResult:
    result = PruneResult()
    t = time.perf_counter()
    calibrated = job.linear_needs or job.block_needs or job.block_stages
    hidden = runner.capture(calib_ids) if calibrated else None
    dense = [hidden if job.dense_stream else None]  # the dense model's activations, for dense block targets
    t = _tick(result.timings, "capture", t)

    trail = Trail.of(runner, job.block_stages, calib_ids)
    linears = {tg.path: tg.module for block in layout.targets for tg in block}
    grid = grid_trainer(result.quantized, linears, job.final_stages) if job.block_stages else None

    def targets_of(j: int) -> list[nn.Linear]:
        return [tg.module for tg in layout.targets[j]]

    def visit(i: int, inputs: torch.Tensor | None) -> torch.Tensor | None:
        targets = layout.targets[i]
        dense_out = runner.run(i, dense[0]) if dense[0] is not None else None  # before block i is pruned
        same = job.block_stages and not job.dense_stream and targets
        same_out = runner.run(i, inputs) if same else None
        t = time.perf_counter()
        stats = _block_statistics(runner, i, inputs, targets, job) if targets else {}
        _tick(result.timings, "statistics", t)
        _prune_targets(targets, stats, job, result, i)
        trail.add(i, inputs)
        out = None
        for stage in job.block_stages if targets else ():
            t = time.perf_counter()
            goal = dense_out if dense_out is not None else same_out
            info, out = trail.fit(i, inputs, lambda first, x, lins, stage=stage, goal=goal: stage.kind.step(
                stage, runner, i, x, goal, lins, job.seed, first=first, trainer=grid), targets_of)
            result.blocks.append({"block": i, **info})
            _tick(result.timings, stage.kind.name, t)
        if job.block_stages and targets:  # the linears are already synced; a block fit may differ in round-off
            distributed.sync_module(layout.blocks[i])
            if grid is not None:  # the writer's codes follow the fitted (or restored) weights of the span
                result.blocks[-1]["on_grid"] = grid.resync([t.path for j in range(trail.first(i), i + 1)
                                                            for t in layout.targets[j]], result.linears)
        dense[0] = dense_out
        return out

    t = time.perf_counter()
    forward(runner, hidden, visit=visit, last=False, on_block=on_block)
    _tick(result.timings, "blocks", t)
    return result


def _prune_targets(targets, stats: Stats, job: Job, result: PruneResult, i: int) -> None:
    """Prune block ``i``'s targets (independent of each other: their statistics are taken before any is pruned).
    In a data-parallel run each rank first solves the linears it owns, then every linear's weight, record, warnings
    and score go from its owner to the others; in one process all of them here, in order."""
    # a solve's time, measured for SparseGPT on a CPU core: ∝ out·in + in²/2 (the column loop, the inverse)
    costs = [float(w.shape[0] * w.shape[1] + w.shape[1] ** 2 / 2) for w in (tg.module.weight for tg in targets)]
    world = distributed.world()
    owners = distributed.owners(costs)
    done: dict[str, tuple] = {}
    for tg, owner in zip(targets, owners, strict=True):
        if owner != world.rank:
            continue
        seen = len(result.warnings)
        merged = {**job.model_stats.get(tg.path, {}), **stats.get(tg.path, {})}
        record, quantized = _prune_linear(tg.path, tg.module, merged, job, result)
        done[tg.path] = (record, result.warnings[seen:], None if job.scores is None else job.scores[tg.path],
                         quantized)
    for tg, owner in zip(targets, owners, strict=True):
        if owner != world.rank:  # only in a data-parallel run
            distributed.sync(tg.module.weight.data, owner)
            done[tg.path] = distributed.share_object(None, owner)
            result.warnings += done[tg.path][1]
            if job.scores is not None:
                job.scores[tg.path] = done[tg.path][2]
        elif world.active:
            distributed.sync(tg.module.weight.data, owner)
            distributed.share_object(done[tg.path], owner)
        result.linears.append(done[tg.path][0] | {"block": i})
        if done[tg.path][3] is not None:
            result.quantized[tg.path] = done[tg.path][3]


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


def _choose(work: LinearWork, job: Job, result: PruneResult) -> tuple[torch.Tensor | None, str]:
    """The method's mask (and weights, for a solver) and the linear stages after it: (score, what ran last).
    Without a pattern nothing: the final stages alone change the weight."""
    parts, t = job.parts, time.perf_counter()
    if work.pattern is None:
        return None, "nothing"
    if parts.method.solve is not None:
        work.new, score = parts.method.solve(work.weight, work.stats, work.pattern, parts.method_options, work.path)
        _tick(result.timings, "solve", t)
        return score, parts.method.name
    score = parts.method.score(work.weight, work.stats, parts.method_options)
    work.keep = build_mask(score, work.pattern, work.path)
    t = _tick(result.timings, "score_and_mask", t)
    what = "the linear stages"
    for stage in job.linear_stages:
        stage.kind.step(stage, work)
        what = f"{stage.kind.flag} {stage.name}"
        t = _tick(result.timings, stage.kind.name, t)
    return score, what


@torch.no_grad()
def _prune_linear(path: str, linear, stats, job: Job, result: PruneResult) -> tuple[dict, object | None]:
    """Score → mask → the linear-scope stages (or the method's own solver) → the final stages, each step timed;
    returns the linear's record and what a final stage keeps for the writer."""
    weight = linear.weight
    work = LinearWork(path, weight.detach().to(torch.float32), None, job.pattern_of(path), stats,
                      dtype=weight.dtype, assigned=job.assigned.get(path))
    try:
        score, what = _choose(work, job, result)
    except Fallback as exc:  # keep going on a long run: plain masking for this one linear, recorded
        work.new, score = exc.weight, exc.score
        result.warnings.append(str(exc))
        what = "fallback masking"
    if job.final_stages and work.pattern is not None and work.keep is None:  # a solver's mask: the zeros it left
        work.keep = work.current != 0
    t = time.perf_counter()
    for stage in job.final_stages:
        stage.kind.step(stage, work)
        what = f"{stage.kind.flag} {stage.name}"
        t = _tick(result.timings, stage.kind.name, t)
    new = work.current
    if not torch.isfinite(new).all():
        raise RunError(f"{path}: {what} produced non-finite weights; try --dtype float32 or more --nsamples")
    weight.copy_(new.to(weight.dtype))
    if job.scores is not None:
        job.scores[path] = score.detach().to(torch.float32).cpu().contiguous()
    return linear_record(path, weight) | work.record, work.quantized
