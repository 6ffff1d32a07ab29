"""The ``run`` data flow end to end: load → calibrate → statistics → score → mask → update → save → evaluate.

The CLI only parses options into ``RunOptions`` and renders progress; everything else happens here so
tests and benchmark scripts drive exactly what users run.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import taylorprune
from taylorprune.calib import sampling, text
from taylorprune.errors import UserError
from taylorprune.export import atomic, save
from taylorprune.modeling import loading
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import find_layout
from taylorprune.modeling.placement import Placement, choose_placement, memory_cap
from taylorprune.pipeline.engine import PruneResult, linear_record, prune_layers
from taylorprune.pipeline.evaluation import eval_windows, evaluate_windows
from taylorprune.pipeline.hooks import Hooks
from taylorprune.pipeline.plan import Plan, RunOptions, validate
from taylorprune.stats.collect import BlockCache, model_statistics
from taylorprune.stats.registry import of_scope
from taylorprune.stats.source import ModelContext, Scope


def load_calibration(opts: RunOptions, tokenizer, seqlen: int):
    corpus = text.read_file(opts.calib_file) if opts.calib_file else text.calibration_corpus(opts.calib)
    return sampling.sample(tokenizer, corpus, opts.nsamples, seqlen, opts.seed, opts.calib_sampling, cache=True)


def versions() -> dict[str, str]:
    import transformers

    return {"taylorprune": taylorprune.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


@dataclass
class Pruned:
    """A pruned model still in memory, with everything its report needs."""

    plan: Plan
    loaded: loading.Loaded
    spec: sampling.CalibSpec | None
    result: PruneResult
    phases: dict[str, float]
    evaluation: dict | None = None
    placement: Placement | None = None
    events: list[str] = field(default_factory=list)  # what the run did (cache hits, passes streamed)
    structured: dict | None = None  # structured runs: what was removed, parameters, sizes, speed

    @property
    def opts(self) -> RunOptions:
        return self.plan.opts


def _load(plan: Plan, hooks: Hooks, phases: dict[str, float]):
    opts = plan.opts
    with hooks.timed(phases, "load", "loading model"):
        loaded = loading.load(opts.model, opts.dtype, opts.device_map, opts.offload_folder, opts.trust_remote_code,
                              config=plan.config)
        layout = find_layout(loaded.model, opts.targets)
        if any(t.module.weight.device.type == "meta" for t in layout.all_targets):
            raise UserError("--device-map placed decoder blocks on disk (offloaded); they cannot be pruned in place. "
                            "Give the CPU enough memory (--device-map cpu, or no --device-map) and let taylorprune "
                            "stream blocks to the GPU")
        atomic.check_free_space(Path(opts.output), save.estimate_bytes(loaded.model))
    return loaded, layout


def prune(opts: RunOptions | Plan, hooks: Hooks | None = None) -> Pruned:
    """Load, calibrate and prune in memory (no output written)."""
    hooks = hooks or Hooks()
    plan = opts if isinstance(opts, Plan) else validate(opts)
    opts = plan.opts
    hooks.memory_hints = plan.parts.memory_hints()
    if plan.structured is not None:
        from taylorprune.pipeline.structured import prune_structured

        return prune_structured(plan, hooks)
    torch.manual_seed(opts.seed)
    phases: dict[str, float] = {"startup": process_seconds()}
    calib_ids, spec, windows, dense_stats = None, None, None, {}
    loaded, layout = _load(plan, hooks, phases)
    with memory_cap(plan.device, opts.max_gpu_memory):
        with hooks.timed(phases, "load", "placing the model"):
            placement = _place(plan, loaded.model)
        with hooks.timed(phases, "calibration_data", "tokenizing calibration and evaluation text"):
            if plan.calibrated:
                calib_ids, spec = load_calibration(opts, loaded.tokenizer, plan.seqlen)
            if opts.eval:  # before any heavy work: a too-short evaluation text fails now, not after pruning
                windows = eval_windows(loaded.tokenizer, opts.eval_dataset, opts.eval_text_file, plan.eval_seqlen,
                                       opts.max_windows)
        ctx = ModelContext(loaded.model, layout, calib_ids, plan.device, hooks.task, hooks.events, placement,
                           opts.stream_batch, opts.batch_size)
        if of_scope(plan.needs, Scope.MODEL):
            with hooks.timed(phases, "model_statistics", "model-scope statistics on the dense model"):
                dense_stats = model_statistics(plan.needs, ctx, spec, plan.parts.options_of)
        with hooks.timed(phases, "prune", f"pruning with {plan.parts.method.name} ({plan.pattern.describe()})"):
            scores: dict[str, torch.Tensor] | None = {} if opts.save_scores else None
            result = _prune(plan, ctx, spec, dense_stats, scores, hooks)
            if scores is not None:
                save.write_tensors(Path(opts.save_scores), scores,
                                   {"method": plan.parts.method.name, "pattern": plan.pattern.describe()})
        phases.update({f"prune.{k}": v for k, v in result.timings.items()})
        pruned = Pruned(plan, loaded, spec, result, phases, placement=placement)
        if windows is not None:
            if placement.stream:
                hooks.events.append("streamed:evaluation")
            with hooks.timed(phases, "eval", "evaluating perplexity"):
                pruned.evaluation = evaluate_windows(loaded.model, loaded.tokenizer, *windows, opts.output,
                                                     plan.device, hooks.windows, placement, opts.stream_batch,
                                                     opts.batch_size).to_dict()
    pruned.events = list(hooks.events)
    return pruned


def _place(plan: Plan, model) -> Placement:
    """Resident on the device when the weights and the run's working set fit (moved there now), else streamed."""
    opts = plan.opts
    placement = choose_placement(model, plan.device, opts.stream, opts.max_gpu_memory, _working_bytes(plan, model))
    if placement.mode == "resident" and plan.device.type != "cpu":
        model.to(plan.device)
    return placement


def _working_bytes(plan: Plan, model) -> int:
    """Device memory the layer-by-layer engine and the evaluation need beside the weights (a heuristic): block
    inputs and outputs of every calibration window, one linear's fp32 Hessian and its factor, one window's fp32
    logits. Model-scope passes check their own needs against the placement."""
    config, param = model.config, next(model.parameters())
    hidden = 2 * plan.opts.nsamples * plan.seqlen * config.hidden_size * param.element_size()
    widest = max((t.module.in_features for t in find_layout(model, plan.opts.targets).all_targets), default=0)
    logits = 2 * plan.eval_seqlen * config.vocab_size * 4 if plan.opts.eval else 0
    return hidden + 3 * 4 * widest**2 + logits


def process_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def _prune(plan: Plan, ctx: ModelContext, spec, dense_stats, scores, hooks: Hooks) -> PruneResult:
    """The layer-by-layer engine, or the method's own whole-model procedure when it has one."""
    whole = plan.whole_model
    model, layout, calib_ids = ctx.model, ctx.layout, ctx.calib_ids
    if whole is not None:
        t0 = time.perf_counter()
        chosen = whole(ctx, plan.pattern, plan.parts.method_options)
        if scores is not None:
            scores.update({k: v.detach().to(torch.float32).cpu().contiguous() for k, v in chosen.items()})
        return PruneResult([linear_record(t.path, t.module.weight, i) for i, ts in enumerate(layout.targets)
                            for t in ts],
                           {"whole_model": time.perf_counter() - t0})
    runner = BlockRunner(model, layout, plan.device, plan.opts.batch_size, stream=ctx.placement.mode != "device_map")
    block_cache = BlockCache(plan.needs, plan.parts.options_of, model, layout, spec, plan.recipe(), hooks.events)
    patterns, allocated = plan.parts.allocation.allocate(layout, dense_stats, plan.pattern,
                                                         plan.parts.allocation_options)
    try:
        result = prune_layers(runner, layout, plan.parts, plan.pattern, calib_ids, dense_stats,
                              on_block=hooks.task("pruning blocks", len(layout.blocks)), scores=scores,
                              block_cache=block_cache.stats, patterns=patterns, seed=plan.opts.seed)
    finally:
        runner.streamer.close()
    block_cache.save()
    result.allocation = allocated
    return result


def write(pruned: Pruned, hooks: Hooks | None = None) -> dict:
    """Write the pruned model atomically, verify it on disk, and return the report written with it."""
    hooks = hooks or Hooks()
    opts = pruned.opts
    t0 = time.perf_counter()
    hooks.current = "writing the output"
    hooks.phase(f"writing {opts.output}")
    report = build_report(pruned)
    with atomic.atomic_dir(Path(opts.output), opts.overwrite) as tmp:
        save.save_model(pruned.loaded.model, pruned.loaded.tokenizer, tmp)
        save.verify(tmp, pruned.result.linears)
        if pruned.structured is not None:
            from taylorprune.pipeline.structured import check_written

            check_written(tmp, pruned)
            report["structured"] = pruned.structured
        report["phases_s"]["save"] = time.perf_counter() - t0
        report["peak_memory_mib"] = save.peak_memory()
        report["wall_s"] = process_seconds()
        save.write_report(tmp, report)
        if opts.plots:
            from taylorprune.export.plots import plot_layer_sparsity

            plot_layer_sparsity(report, tmp / "layer_sparsity.png")
    return report


def run(opts: RunOptions, hooks: Hooks | None = None) -> dict:
    """Prune ``opts.model`` and write ``opts.output``; returns the report that was written."""
    return write(prune(opts, hooks), hooks)


def _block_report(result: PruneResult, loaded) -> list[dict]:
    """Per decoder block: sparsity of its targets, the allocation's numbers and the reconstruction's."""
    blocks: dict[int, dict] = {}
    for lin in result.linears:
        index = lin["block"]
        entry = blocks.setdefault(index, {"block": index, "numel": 0, "zeros": 0})
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


def build_report(p: Pruned) -> dict:
    plan, result = p.plan, p.result
    return {
        "method": plan.parts.method.name,
        "allocation": plan.parts.allocation.name,
        "refine": plan.parts.refine.name,
        "update": plan.parts.update.name,
        "recon": plan.parts.recon.name,
        "paper": plan.parts.method.paper,
        "pattern": plan.describe(),
        "sparsity": plan.pattern.sparsity,
        "achieved_sparsity": result.sparsity if p.structured is None else None,
        "options": asdict(plan.opts),
        "components": plan.parts.describe(),
        "source": {"model": plan.opts.model, "resolved": p.loaded.source, "gguf_file": p.loaded.gguf_file},
        "calibration": p.spec.describe() if p.spec else None,
        "linears": result.linears,
        "blocks": _block_report(result, p.loaded),
        "warnings": result.warnings,
        "evaluation": p.evaluation,
        **({"structured": p.structured} if p.structured is not None else {}),
        "phases_s": p.phases,
        "wall_s": process_seconds(),
        "placement": p.placement.describe() if p.placement else None,
        "streamed_passes": [e.split(":", 1)[1] for e in p.events if e.startswith("streamed:")],
        "peak_memory_mib": save.peak_memory(),
        "versions": versions(),
    }
