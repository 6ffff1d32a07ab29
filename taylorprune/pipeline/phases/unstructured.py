"""Unstructured phase: masks (unstructured or N:M) on the target linears, with the run's stages.

Model-scope statistics are taken on the dense model first (gradients, model-scope HVPs, dense activations);
the model-scope stages (allocation) turn them into per-linear patterns; then the layer-by-layer engine
(``pipeline.engine``) prunes block after block, or the method's own whole-model procedure runs instead. Without a
pattern (``--quantize`` alone) the engine runs only the stages that need no masks. A stage kind that reports over
all linears (quantization: bits per weight) gets its record in the report under its own name.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from taylorprune import distributed
from taylorprune.export import save
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.pipeline.engine import PruneResult, prune_layers
from taylorprune.pipeline.state import Phase, RunFacts, RunState, linear_records
from taylorprune.prune.recon import recon_summary
from taylorprune.prune.structures import WIDTH_KINDS, all_groups
from taylorprune.stats.collect import BlockCache, model_statistics
from taylorprune.stats.registry import of_scope
from taylorprune.stats.source import ModelContext, Scope


def model_context(state: RunState) -> ModelContext:
    opts = state.opts
    return ModelContext(state.model, state.layout, state.calib_ids, state.plan.device, state.hooks.task,
                        state.hooks.events, state.placement, opts.placement.stream_batch, opts.calib.batch_size)


def pruning_label(state: RunState) -> str:
    """'pruning with M + recon block (unstructured 0.5 per row)': what the progress line says."""
    parts, pattern = state.plan.parts, state.plan.pattern
    stages = "".join(f" + {s.kind.name} {s.name}" for s in parts.stages if not s.off and not s.kind.several)
    if pattern is None:
        return f"no masks{stages}"
    return f"pruning with {parts.method.name}{stages} ({pattern.describe()})"


def _resized(state: RunState) -> frozenset[str]:
    """The linears whose input width a structured phase changes before this one (the consumers of removed heads and
    neurons: o_proj, down_proj), which widths checks skip until the compact model exists."""
    sp = state.plan.structured
    if sp is None:
        return frozenset()
    return frozenset(g.consumer.path for kind in sp.kinds if kind in WIDTH_KINDS
                     for g in all_groups(state.layout, kind, "kv-groups"))


class Unstructured(Phase):
    name = "unstructured"

    def wanted(self, facts: RunFacts) -> bool:
        """Masks, or a stage that needs none (``--quantize`` alone)."""
        return facts.unstructured

    def check(self, plan) -> None:
        for stage in plan.parts.active("model"):
            stage.choice.check(plan.pattern)
        for stage in plan.parts.active("linear"):
            if stage.kind.check is not None:
                stage.kind.check(stage, plan.pattern)

    def prepare(self, state: RunState, after_structures: bool = False) -> None:
        resized = _resized(state) if not after_structures else frozenset()
        for stage in state.plan.parts.active("linear"):
            if stage.kind.prepare is not None:
                stage.kind.prepare(stage, state.layout, resized)

    def calibrated(self, plan) -> bool:
        return bool(plan.parts.unstructured_needs) or plan.whole_model is not None

    def run(self, state: RunState) -> dict:
        plan, hooks, opts = state.plan, state.hooks, state.opts
        if plan.structured is not None:  # the linears the structures resized, now on the compact model
            self.prepare(state, after_structures=True)
        ctx = model_context(state)
        dense_stats = {}
        needs = plan.parts.unstructured_needs
        if of_scope(needs, Scope.MODEL):
            with hooks.timed(state.phases_s, "model_statistics", "model-scope statistics on the dense model"):
                dense_stats = model_statistics(needs, ctx, state.spec, plan.parts.options_of)
        with hooks.timed(state.phases_s, "prune", pruning_label(state)):
            scores: dict[str, torch.Tensor] | None = {} if opts.write.save_scores else None
            result = _prune(state, ctx, dense_stats, scores)
            if scores is not None and distributed.world().writer:
                save.write_tensors(Path(opts.write.save_scores), scores,
                                   {"method": plan.parts.method.name, "pattern": plan.pattern.describe()})
        state.phases_s.update({f"prune.{k}": v for k, v in result.timings.items()})
        state.linears, state.warnings = result.linears, state.warnings + result.warnings
        state.quantized.update(result.quantized)
        for stage in plan.parts.active("linear"):
            if stage.kind.report is not None:
                state.records[stage.kind.name] = stage.kind.report(stage, state.linears)
                if result.planned.get(stage.kind.name):
                    state.records[stage.kind.name]["plan"] = result.planned[stage.kind.name]
        return {"pattern": plan.pattern.describe() if plan.pattern else "no masks",
                "achieved_sparsity": result.sparsity, "allocation": result.allocation, "blocks": block_report(result),
                **recon_summary(result.blocks)}


def _prune(state: RunState, ctx: ModelContext, dense_stats, scores) -> PruneResult:
    """The layer-by-layer engine, or the method's own whole-model procedure when it has one."""
    plan = state.plan
    if plan.whole_model is not None:
        t0 = time.perf_counter()
        chosen = plan.whole_model(ctx, plan.pattern, plan.parts.method_options)
        if scores is not None:
            scores.update({k: v.detach().to(torch.float32).cpu().contiguous() for k, v in chosen.items()})
        return PruneResult(linear_records(state.layout), {"whole_model": time.perf_counter() - t0})
    layout = state.layout
    runner = BlockRunner(state.model, layout, plan.device, plan.opts.calib.batch_size,
                         stream=state.placement.mode != "device_map")
    block_cache = BlockCache(plan.parts.unstructured_needs, plan.parts.options_of, state.model, layout, state.spec,
                             plan.recipe(), state.hooks.events)
    patterns, allocated = {}, {}
    for stage in plan.parts.active("model"):
        patterns, allocated = stage.kind.step(stage, layout, dense_stats, plan.pattern)
    assigned, planned = {}, {}
    for stage in plan.parts.active("linear"):  # a final stage's plan on the dense model (--bits-budget)
        if stage.kind.plan is not None:
            chosen, planned[stage.kind.name] = stage.kind.plan(stage, ctx, dense_stats, plan.parts.options_of)
            assigned.update(chosen)
    try:
        result = prune_layers(runner, layout, plan.parts, plan.pattern, state.calib_ids, dense_stats,
                              on_block=state.hooks.task("pruning blocks", len(layout.blocks)), scores=scores,
                              block_cache=block_cache.stats, patterns=patterns, seed=plan.opts.calib.seed,
                              assigned=assigned)
    finally:
        runner.streamer.close()
    block_cache.save()
    result.allocation, result.planned = allocated, planned
    return result


def block_report(result: PruneResult) -> list[dict]:
    """Per decoder block: sparsity of its targets, the allocation's numbers and the block stages' records."""
    blocks: dict[int, dict] = {}
    for lin in result.linears:
        entry = blocks.setdefault(lin["block"], {"block": lin["block"], "numel": 0, "zeros": 0})
        entry["numel"] += lin["numel"]
        entry["zeros"] += lin["zeros"]
    for entry in blocks.values():
        entry["sparsity"] = entry["zeros"] / max(entry["numel"], 1)
    for name, values in (result.allocation or {}).items():
        for index, value in enumerate(values):
            if index in blocks:
                blocks[index][name] = value
    for info in result.blocks:
        blocks.setdefault(info["block"], {"block": info["block"]}).update(info)
    return [blocks[k] for k in sorted(blocks)]
