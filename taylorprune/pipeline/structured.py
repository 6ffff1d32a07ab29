"""Structured runs (``--structure``): remove blocks, heads and neurons for real, block after block.

Order: blocks are ranked on the dense model and deleted first (``prune.depth``); model-scope statistics (the
gradient pass) are then taken on that model; then for each remaining block in turn, on the calibration
activations of the already-pruned blocks before it: its heads (statistics from one forward of the block →
group scores → the lowest go → the consumer o_proj is refit → tensors sliced), then its neurons the same way
on the outputs of the head-pruned attention, then the block's new outputs feed the next. A method whose group
score selects on the whole model (a multi-step recipe) chooses every block's removals first; the
engine then applies them with the same compensation. The config gets the new uniform widths.
"""

from __future__ import annotations

from pathlib import Path

import torch

from taylorprune.errors import RunError
from taylorprune.evaluate import speed
from taylorprune.export import save
from taylorprune.modeling import loading
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import Layout, find_layout
from taylorprune.pipeline.components import Components
from taylorprune.pipeline.engine import PruneResult, linear_record
from taylorprune.pipeline.hooks import Hooks
from taylorprune.prune.structures import (
    CONSUMER_STATS,
    WIDTH_KINDS,
    Groups,
    all_groups,
    choose,
    compensate,
    count_parameters,
    counts_for_target,
    groups_of,
    groups_to_remove,
    remove,
    update_config,
)
from taylorprune.prune.structures.depth import prune_depth
from taylorprune.stats.collect import linear_statistics, model_statistics
from taylorprune.stats.registry import of_scope
from taylorprune.stats.source import ModelContext, Scope


def _head_mode(parts: Components) -> str:
    heads = parts.structure_options("heads")
    return heads.head_mode if heads is not None else "kv-groups"


# ------------------------------------------------------------------------------------------- counts


# ------------------------------------------------------------------------------------------- blocks


# ------------------------------------------------------------------------------------------- widths


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
    groups = groups_of(kind, block, f"{runner.layout.blocks_path}.{i}", i, _head_mode(parts))
    options = parts.structure_options(kind)
    linear = of_scope(parts.needs, Scope.LINEAR)
    stats = _statistics(runner, i, hidden, groups, linear if preset is None else linear & CONSUMER_STATS)
    for m in groups.members:
        stats.setdefault(m.path, {}).update({k: v for k, v in model_stats.get(m.path, {}).items()
                                             if k not in stats[m.path]})
    if preset is not None:
        drop = preset[(kind, i)]
    else:
        drop = choose(_scores(parts, groups, stats), groups_to_remove(groups, count), groups.chunk)
    if options.compensate:
        compensate(groups, drop, stats[groups.consumer.path]["hessian"], options.compensate_damp)
    remove(groups, drop, block)
    return {"removed": drop.tolist(), "kept": groups.size - len(drop), "of": groups.size}


def prune_widths(model, layout: Layout, parts: Components, plan, counts: dict[str, int], calib_ids, model_stats,
                 preset, hooks: Hooks) -> list[dict]:
    """Heads then neurons of every block, block after block, each calibrated on the pruned blocks' outputs."""
    kinds = [k for k in WIDTH_KINDS if k in counts]
    runner = BlockRunner(model, layout, plan.device, plan.opts.batch_size)
    hidden = runner.capture(calib_ids) if calib_ids is not None else None
    tick = hooks.task("pruning blocks (structured)", len(layout.blocks))
    per_block = []
    for i in range(len(layout.blocks)):
        info: dict = {"block": i}
        with runner.on_device(i):
            for kind in kinds:
                info[kind] = _prune_kind(runner, i, hidden, kind, parts, counts[kind], model_stats, preset)
            if hidden is not None and i < len(layout.blocks) - 1:
                hidden = runner.run(i, hidden)
        per_block.append(info)
        tick(i)
    return per_block


# ------------------------------------------------------------------------------------------- the run


def _widths_phase(plan, loaded, layout, counts, calib_ids, spec, hooks: Hooks, phases) -> list[dict]:
    parts = plan.parts
    model_stats = {}
    if of_scope(plan.needs, Scope.MODEL):
        with hooks.timed(phases, "model_statistics", "model-scope statistics"):
            ctx = ModelContext(loaded.model, layout, calib_ids, plan.device, hooks.task, hooks.events)
            model_stats = model_statistics(plan.needs, ctx, spec, parts.options_of)
    preset = None
    if parts.group.select is not None:
        with hooks.timed(phases, "select", f"choosing structures ({parts.method.name})"):
            ctx = ModelContext(loaded.model, layout, calib_ids, plan.device, hooks.task, hooks.events)
            widths = {k: all_groups(layout, k, _head_mode(parts)) for k in WIDTH_KINDS if k in counts}
            preset = parts.group.select(ctx, counts, widths, parts.method_options)
    with hooks.timed(phases, "prune", f"removing {', '.join(k for k in WIDTH_KINDS if k in counts)}"):
        return prune_widths(loaded.model, layout, parts, plan, counts, calib_ids, model_stats, preset, hooks)


def prune_structured(plan, hooks: Hooks):
    """Load, calibrate and remove structures in memory; returns a ``flow.Pruned`` with a ``structured`` record."""
    from taylorprune.pipeline.evaluation import eval_windows, evaluate_windows
    from taylorprune.pipeline.flow import Pruned, _load, load_calibration

    opts, sp = plan.opts, plan.structured
    torch.manual_seed(opts.seed)
    phases: dict[str, float] = {}
    loaded, layout = _load(plan, hooks, phases)
    model = loaded.model
    before = {"parameters": count_parameters(model), "bytes": loading.input_bytes(opts.model)
              or save.estimate_bytes(model)}
    counts = sp.counts or counts_for_target(sp.kinds[0], sp.target_params, model, layout, _head_mode(plan.parts))
    calib_ids, spec, windows = None, None, None
    with hooks.timed(phases, "calibration_data", "tokenizing calibration and evaluation text"):
        if plan.calibrated:
            calib_ids, spec = load_calibration(opts, loaded.tokenizer, plan.seqlen)
        if opts.eval:
            windows = eval_windows(loaded.tokenizer, opts.eval_dataset, opts.eval_text_file, plan.eval_seqlen,
                                   opts.max_windows)
    record: dict = {"kinds": list(sp.kinds), "ratio": sp.ratio, "target_params": sp.target_params, "counts": counts,
                    "group_score": plan.parts.group.summary if plan.parts.group else None,
                    "ranking": "within each block (uniform widths)"}
    if "blocks" in counts:
        with hooks.timed(phases, "blocks", "ranking and removing decoder blocks"):
            options = plan.parts.structure_options("blocks")
            runner = BlockRunner(model, layout, plan.device, opts.batch_size)
            tick = hooks.task(f"block scores ({options.block_score})", len(layout.blocks))
            record["depth"] = prune_depth(runner, calib_ids, options, counts["blocks"], tick)
        layout = find_layout(model)
    per_block = []
    if any(k in counts for k in WIDTH_KINDS):
        per_block = _widths_phase(plan, loaded, layout, counts, calib_ids, spec, hooks, phases)
    record["per_block"] = per_block
    record["config"] = update_config(model.config, layout.blocks)
    after = count_parameters(model)
    record["parameters"] = {"before": before["parameters"], "after": after,
                            "removed_fraction": 1 - after / before["parameters"]}
    record["file_bytes"] = {"before": before["bytes"], "after": None}
    linears = [linear_record(t.path, t.module.weight, i) for i, ts in enumerate(layout.targets) for t in ts]
    result = PruneResult(linears, {})
    pruned = Pruned(plan, loaded, spec, result, phases, structured=record)
    if windows is not None:
        with hooks.timed(phases, "eval", "evaluating perplexity"):
            pruned.evaluation = evaluate_windows(model, loaded.tokenizer, *windows, opts.output, plan.device,
                                                 hooks.windows).to_dict()
    if opts.speed:
        with hooks.timed(phases, "speed", "timing prefill and decode (dense, then pruned)"):
            dense = loading.load(opts.model, opts.dtype, opts.device_map, opts.offload_folder, opts.trust_remote_code,
                                 config=plan.config).model
            record["speed"] = speed.compare(dense, model, plan.device)
            del dense
    return pruned


def check_written(folder: Path, pruned) -> None:
    """Shapes and config of the written folder are those of the pruned model in memory."""
    save.verify_structured(folder, {r["name"]: r["shape"] for r in pruned.result.linears},
                           pruned.structured["config"])
    pruned.structured["file_bytes"]["after"] = save.folder_bytes(folder)

