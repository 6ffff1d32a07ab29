"""The ``run`` data flow end to end: load → calibrate → statistics → score → mask → update → save → evaluate.

The CLI only parses options into ``RunOptions`` and renders progress; everything else happens here so
tests and benchmark scripts drive exactly what users run.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import taylorprune
from taylorprune.calib import sampling, text
from taylorprune.errors import UserError
from taylorprune.export import atomic, save
from taylorprune.modeling import loading
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import find_layout
from taylorprune.pipeline.engine import PruneResult, linear_record, prune_layers
from taylorprune.pipeline.evaluation import eval_windows, evaluate_windows
from taylorprune.pipeline.hooks import Hooks
from taylorprune.pipeline.plan import Plan, RunOptions, validate
from taylorprune.stats.collect import BlockCache, model_statistics
from taylorprune.stats.registry import of_scope
from taylorprune.stats.source import ModelContext, Scope


def load_calibration(opts: RunOptions, tokenizer, seqlen: int):
    corpus = text.read_file(opts.calib_file) if opts.calib_file else text.calibration_corpus(opts.calib)
    return sampling.sample(tokenizer, corpus, opts.nsamples, seqlen, opts.seed, opts.calib_sampling)


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
    phases: dict[str, float] = {}
    calib_ids, spec, windows, dense_stats = None, None, None, {}
    loaded, layout = _load(plan, hooks, phases)
    with hooks.timed(phases, "calibration_data", "tokenizing calibration and evaluation text"):
        if plan.calibrated:
            calib_ids, spec = load_calibration(opts, loaded.tokenizer, plan.seqlen)
        if opts.eval:  # before any heavy work: a too-short evaluation text fails now, not after pruning
            windows = eval_windows(loaded.tokenizer, opts.eval_dataset, opts.eval_text_file, plan.eval_seqlen,
                                   opts.max_windows)
    if of_scope(plan.needs, Scope.MODEL):
        with hooks.timed(phases, "model_statistics", "model-scope statistics on the dense model"):
            ctx = ModelContext(loaded.model, layout, calib_ids, plan.device, hooks.task, hooks.events)
            dense_stats = model_statistics(plan.needs, ctx, spec, plan.parts.options_of)
    with hooks.timed(phases, "prune", f"pruning with {plan.parts.method.name} ({plan.pattern.describe()})"):
        scores: dict[str, torch.Tensor] | None = {} if opts.save_scores else None
        result = _prune(plan, loaded.model, layout, calib_ids, spec, dense_stats, scores, hooks)
        if scores is not None:
            save.write_tensors(Path(opts.save_scores), scores,
                               {"method": plan.parts.method.name, "pattern": plan.pattern.describe()})
    phases.update({f"prune.{k}": v for k, v in result.timings.items()})
    pruned = Pruned(plan, loaded, spec, result, phases)
    if windows is not None:
        with hooks.timed(phases, "eval", "evaluating perplexity"):
            pruned.evaluation = evaluate_windows(loaded.model, loaded.tokenizer, *windows, opts.output, plan.device,
                                                 hooks.windows).to_dict()
    return pruned


def _prune(plan: Plan, model, layout, calib_ids, spec, dense_stats, scores, hooks: Hooks) -> PruneResult:
    """The layer-by-layer engine, or the method's own whole-model procedure when it has one."""
    whole = plan.whole_model
    if whole is not None:
        ctx = ModelContext(model, layout, calib_ids, plan.device, hooks.task, hooks.events)
        t0 = time.perf_counter()
        chosen = whole(ctx, plan.pattern, plan.parts.method_options)
        if scores is not None:
            scores.update({k: v.detach().to(torch.float32).cpu().contiguous() for k, v in chosen.items()})
        return PruneResult([linear_record(t.path, t.module.weight, i) for i, ts in enumerate(layout.targets)
                            for t in ts],
                           {"whole_model": time.perf_counter() - t0})
    runner = BlockRunner(model, layout, plan.device, plan.opts.batch_size)
    block_cache = BlockCache(plan.needs, plan.parts.options_of, model, layout, spec, plan.recipe(), hooks.events)
    patterns, allocated = plan.parts.allocation.allocate(layout, dense_stats, plan.pattern,
                                                         plan.parts.allocation_options)
    result = prune_layers(runner, layout, plan.parts, plan.pattern, calib_ids, dense_stats,
                          on_block=hooks.task("pruning blocks", len(layout.blocks)), scores=scores,
                          block_cache=block_cache.stats, patterns=patterns, seed=plan.opts.seed)
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
        "peak_memory_mib": save.peak_memory(),
        "versions": versions(),
    }
