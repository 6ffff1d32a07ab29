"""Structured phase (``--structure``): remove blocks, heads and neurons for real, block after block.

Order: blocks are ranked on the dense model and deleted first (``structures.depth``); model-scope statistics
(the gradient pass) are then taken on that model; then for each remaining block in turn, on the calibration
activations of the already-pruned blocks before it: its heads (statistics from one forward of the block →
group scores → the lowest go → the consumer o_proj is refit → tensors sliced), then its neurons the same way
on the outputs of the head-pruned attention, then the block's new outputs feed the next. A method whose group
score selects on the whole model (a multi-step recipe) chooses every block's removals first; the engine then
applies them with the same compensation. The config gets the new uniform widths.
"""

from __future__ import annotations

import torch
from torch import nn

from taylorprune import distributed
from taylorprune.errors import RunError, UserError
from taylorprune.export import save
from taylorprune.modeling import loading
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import find_layout
from taylorprune.modeling.sweep import forward
from taylorprune.pipeline.components import Components
from taylorprune.pipeline.phases.unstructured import model_context
from taylorprune.pipeline.phases.write import width_unit
from taylorprune.pipeline.stages import STRUCTURED
from taylorprune.pipeline.state import Phase, RunFacts, RunState, linear_records
from taylorprune.prune.recon import Trail, recon_summary
from taylorprune.prune.structures import (
    CONSUMER_STATS,
    WIDTH_KINDS,
    Groups,
    Shape,
    aligned_counts,
    all_groups,
    check_config,
    choose,
    count_parameters,
    counts_for_target,
    groups_of,
    groups_to_remove,
    take_out,
    update_config,
)
from taylorprune.prune.structures.depth import prune_depth
from taylorprune.stats.collect import linear_statistics, model_statistics
from taylorprune.stats.registry import of_scope
from taylorprune.stats.source import Scope


def head_mode(parts: Components) -> str:
    heads = parts.structure_options("heads")
    return heads.head_mode if heads is not None else "kv-groups"


def width_multiple(plan) -> int:
    """``--width-multiple``, or what the output needs (the grid's group, the format's blocks)."""
    given = plan.parts.structures[0][1].width_multiple
    return given if given is not None else width_unit(plan)


def ratio_counts(plan) -> dict[str, int] | None:
    """A ``--structure-ratio`` run's counts with widths aligned (None: counts come from ``--target-params``)."""
    sp = plan.structured
    if not sp.counts:
        return None
    shape, mode = Shape.of(plan.config), head_mode(plan.parts)
    counts = aligned_counts(sp.counts, shape, mode, width_multiple(plan))
    if counts != sp.counts:
        check_config(plan.config, counts, shape, mode, f"--structure-ratio {sp.ratio:g} with --width-multiple")
    return counts


def _statistics(runner: BlockRunner, i: int, hidden, groups: Groups, needs: frozenset[str]) -> dict:
    """Linear-scope statistics of the groups' members on one forward of block ``i`` (XXᵀ: the consumer's only)."""
    if hidden is None or not needs:
        return {}
    plain = needs - CONSUMER_STATS
    consumer = CONSUMER_STATS & needs
    return linear_statistics(lambda: runner.run(i, hidden), ({m.path: m.module for m in groups.members}, plain),
                             ({groups.consumer.path: groups.consumer.module}, consumer))


def _scores(parts: Components, groups: Groups, stats: dict) -> torch.Tensor:
    scores = parts.group.score(groups, stats, parts.method_options)
    if not torch.isfinite(scores).all():
        raise RunError(f"block {groups.block}: non-finite {groups.kind} scores (NaN/Inf, e.g. fp16 overflow); try "
                       "--dtype float32")
    return scores


def _prune_kind(runner, i: int, hidden, kind: str, parts: Components, count: int, model_stats, preset) -> dict:
    block = runner.layout.blocks[i]
    groups = groups_of(kind, block, f"{runner.layout.blocks_path}.{i}", i, head_mode(parts))
    linear = of_scope(parts.structured_needs, Scope.LINEAR)
    stats = _statistics(runner, i, hidden, groups, linear if preset is None else linear & CONSUMER_STATS)
    for m in groups.members:
        stats.setdefault(m.path, {}).update({k: v for k, v in model_stats.get(m.path, {}).items()
                                             if k not in stats[m.path]})
    if preset is not None:
        drop = preset[(kind, i)]
    else:
        drop = choose(_scores(parts, groups, stats), groups_to_remove(groups, count), groups.chunk)
    take_out(groups, drop, stats, parts.structure_options(kind), block)
    return {"removed": drop.tolist(), "kept": groups.size - len(drop), "of": groups.size}


def prune_widths(state: RunState, counts: dict[str, int], model_stats, preset) -> list[dict]:
    """Heads then neurons of every block, block after block, each calibrated on the pruned blocks' outputs; then
    the block stages (``--recon block``: re-fit the compact block to the dense block's outputs) when no masks
    follow in this run."""
    plan, layout = state.plan, state.layout
    kinds = [k for k in WIDTH_KINDS if k in counts]
    runner = BlockRunner(state.model, layout, plan.device, plan.opts.calib.batch_size)
    hidden = runner.capture(state.calib_ids) if state.calib_ids is not None else None
    stages = plan.parts.active("block", STRUCTURED) if plan.pattern is None else []
    dense_stream = any(s.choice.dense_stream(s.options) for s in stages)
    dense = [hidden if dense_stream else None]  # the dense model's activations, for dense block targets
    per_block = []
    trail = Trail.of(runner, stages, state.calib_ids, compact=True)

    def compact(j: int) -> list[nn.Linear]:
        return [m for m in layout.blocks[j].modules() if isinstance(m, nn.Linear)]

    def visit(i: int, inputs):
        dense_out = runner.run(i, dense[0]) if dense[0] is not None else None  # before block i is pruned
        same_out = runner.run(i, inputs) if stages and not dense_stream else None
        info: dict = {"block": i}
        for kind in kinds:
            info[kind] = _prune_kind(runner, i, inputs, kind, plan.parts, counts[kind], model_stats, preset)
        trail.add(i, inputs)
        out = None
        for stage in stages:
            goal = dense_out if dense_out is not None else same_out
            info[stage.kind.name], out = trail.fit(i, inputs, lambda first, x, lins, stage=stage, goal=goal: (
                stage.kind.step(stage, runner, i, x, goal, lins, plan.opts.calib.seed, first=first)), compact)
        distributed.sync_module(layout.blocks[i])  # data-parallel ranks go on from rank 0's identical block
        dense[0] = dense_out
        per_block.append(info)
        return out

    forward(runner, hidden, visit=visit, last=False,
            on_block=state.hooks.task("pruning blocks (structured)", len(layout.blocks)))
    return per_block


def _widths(state: RunState, counts: dict[str, int]) -> list[dict]:
    plan, hooks = state.plan, state.hooks
    parts = plan.parts
    model_stats = {}
    needs = parts.structured_needs
    if of_scope(needs, Scope.MODEL):
        with hooks.timed(state.phases_s, "model_statistics", "model-scope statistics"):
            model_stats = model_statistics(needs, model_context(state), state.spec, parts.options_of)
    preset = None
    if parts.group.select is not None:
        with hooks.timed(state.phases_s, "select", f"choosing structures ({parts.method.name})"):
            widths = {k: all_groups(state.layout, k, head_mode(parts)) for k in WIDTH_KINDS if k in counts}
            preset = parts.group.select(model_context(state), counts, widths, parts.method_options)
    with hooks.timed(state.phases_s, "prune", f"removing {', '.join(k for k in WIDTH_KINDS if k in counts)}"):
        return prune_widths(state, counts, model_stats, preset)


class Structured(Phase):
    name = "structured"

    def wanted(self, facts: RunFacts) -> bool:
        """``--structure``: blocks, heads or neurons are removed."""
        return facts.structured

    def check(self, plan) -> None:
        ratio_counts(plan)  # aligned widths the config refuses: one line before loading
        if plan.pattern is None and plan.parts.active("block", STRUCTURED) and plan.structured.kinds == ("blocks",):
            stage = plan.parts.active("block", STRUCTURED)[0]
            raise UserError(f"{stage.kind.flag} {stage.name} re-fits blocks whose heads or neurons were removed (or "
                            "masked); --structure blocks alone leaves none")

    def calibrated(self, plan) -> bool:
        sp = plan.structured
        return bool(plan.parts.structured_needs) or "blocks" in sp.kinds or plan.parts.group.select is not None

    def run(self, state: RunState) -> dict:
        plan, hooks = state.plan, state.hooks
        sp, model = plan.structured, state.model
        before = {"parameters": count_parameters(model), "decoder": count_parameters(state.layout.blocks),
                  "bytes": loading.input_bytes(plan.opts.model) or save.estimate_bytes(model)}
        counts = ratio_counts(plan) or counts_for_target(sp.kinds[0], sp.target_params, model, state.layout,
                                                         head_mode(plan.parts), width_multiple(plan))
        record: dict = {"kinds": list(sp.kinds), "ratio": sp.ratio, "target_params": sp.target_params,
                        "counts": counts, "width_multiple": width_multiple(plan),
                        "group_score": plan.parts.group.summary if plan.parts.group else None,
                        "ranking": "within each block (uniform widths)"}
        if "blocks" in counts:
            with hooks.timed(state.phases_s, "blocks", "ranking and removing decoder blocks"):
                options = plan.parts.structure_options("blocks")
                runner = BlockRunner(model, state.layout, plan.device, plan.opts.calib.batch_size)
                tick = hooks.task(f"block scores ({options.block_score})", len(state.layout.blocks))
                record["depth"] = prune_depth(runner, state.calib_ids, options, counts["blocks"], tick)
            state.layout = find_layout(model)
        record["per_block"] = _widths(state, counts) if any(k in counts for k in WIDTH_KINDS) else []
        record.update(recon_summary({"block": b["block"], **b["recon"]} for b in record["per_block"] if "recon" in b))
        record["config"] = update_config(model.config, state.layout.blocks)
        after = count_parameters(model)
        record["parameters"] = {"before": before["parameters"], "after": after,
                                "removed_fraction": 1 - after / before["parameters"]}
        decoder = count_parameters(state.layout.blocks)  # the share that pruning can touch (not the embeddings)
        record["decoder_parameters"] = {"before": before["decoder"], "after": decoder,
                                        "removed_fraction": 1 - decoder / before["decoder"]}
        record["file_bytes"] = {"before": before["bytes"], "after": None}
        state.linears = linear_records(state.layout)
        return record
