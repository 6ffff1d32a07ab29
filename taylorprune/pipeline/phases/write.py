"""Write phase: the pruned model as a Hugging Face folder in the chosen format with its report, atomically,
verified on disk.

The phase is blind to the format (``--format``, ``export.formats``): the format writes, reads its folder back and
checks it against the model in memory (shapes, sparsity, widths in config.json, quantization codes), and measures
its size; what a format cannot hold (``Contents``: the run's grid, masks, compact shapes) is refused before any
work. The folder is written beside the target and renamed into place at the end, so an interrupted run leaves no
half checkpoint. The report holds the run-level facts plus every phase's record under its name (this one's:
format and file bytes).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from taylorprune import distributed
from taylorprune.errors import UserError
from taylorprune.export import atomic, save, targets
from taylorprune.export.format_spec import Contents, Output
from taylorprune.export.formats import get_format
from taylorprune.export.plots import plot_layer_sparsity
from taylorprune.modeling import loading
from taylorprune.pipeline import quantized_source
from taylorprune.pipeline.evaluation import metrics
from taylorprune.pipeline.state import Phase, RunFacts, RunState, process_seconds, versions
from taylorprune.stats.collect import cache_path


def files_written(plan) -> list[tuple[str, str]]:
    """(flag, path) of every file besides the output folder that this run may write."""
    save_scores = plan.opts.write.save_scores
    files = [("--save-scores", save_scores)] if save_scores else []
    for source, source_opts in plan.parts.sources:
        path = cache_path(source, source_opts)
        if path:
            files.append(("--" + source.cache_option.replace("_", "-"), path))
    return files


def check_files(plan, inputs: list[Path]) -> None:
    """Every file this run writes besides its folder, checked before any work (caches may exist read-only)."""
    written = files_written(plan)
    caches = [flag for flag, _ in written if flag != "--save-scores"]
    targets.check_files(written, inputs, ".safetensors file", reused=caches)


def contents(plan) -> Contents:
    """What the run will write besides float weights, known from the plan (the grid a stage stores, masks, shapes)."""
    stored = [s.kind.stores(s) for s in plan.parts.stages if not s.off and s.kind.stores is not None]
    stored.append(quantized_source.grid_kind(plan.config))  # a compressed-tensors --model keeps its grids
    return Contents(next((g for g in stored if g is not None), None), plan.pattern is not None,
                    plan.structured is not None, getattr(plan.config, "model_type", None), plan.config)


def width_unit(plan) -> int:
    """Weights along a row every linear's input width must be a multiple of for the output to hold it as asked:
    the stored grid's group and the format's blocks (structured runs keep their widths multiples of it)."""
    fmt = get_format(plan.opts.write.format)
    grid = contents(plan).grid
    units = [fmt.width_unit(plan.opts.groups.get(fmt.name) or fmt.options())]
    return math.lcm(*units, *([grid.group_size] if grid is not None and grid.group_size > 0 else []))


def output_of(state: RunState, fmt) -> Output:
    """What the format writes and verifies against; codes and grids only for a format that stores them."""
    quantized = state.quantized
    grids = {name: q.stored() for name, q in quantized.items()} if fmt.holds.codes else {}
    widths = (state.records.get("structured") or {}).get("config")
    return Output(state.model, state.loaded.tokenizer, state.linears, widths, frozenset(quantized), grids,
                  options=state.opts.groups.get(fmt.name), source_gguf=state.loaded.tokenizer_gguf)


def build_report(state: RunState) -> dict:
    plan, records = state.plan, state.records
    parts = plan.parts
    unstructured = records.get("unstructured") or {}
    return {
        "schema_version": save.SCHEMA_VERSION,  # first, so a reader sees the layout before anything else
        "method": parts.method.name,
        **parts.names(),
        "paper": parts.method.paper,
        "pattern": plan.describe(),
        "sparsity": plan.pattern.sparsity if plan.pattern else (plan.structured.ratio if plan.structured else None),
        "achieved_sparsity": unstructured.get("achieved_sparsity"),
        "options": plan.opts.flat(),
        "components": parts.describe(),
        "calibration": None,
        **records,
        "linears": state.linears,
        "warnings": state.warnings,
        "metrics": metrics(records.get("evaluation") or {}),
        "phases_s": state.phases_s,
        "wall_s": process_seconds(),
        "streamed_passes": [e.split(":", 1)[1] for e in state.events if e.startswith("streamed:")],
        "peak_memory_mib": save.peak_memory(),
        "versions": versions(),
        "world_size": distributed.world().size,  # processes of a data-parallel run (shares: calibration record)
    }


class Write(Phase):
    name = "write"

    def wanted(self, facts: RunFacts) -> bool:
        """Every run ends with its folder (``pipeline.prune`` leaves this phase out to keep the model in memory)."""
        return True

    def check(self, plan) -> None:
        opts = plan.opts
        source, gguf = loading.resolve_source(opts.model)
        inputs = [Path(source) / gguf] if gguf else ([Path(source)] if Path(source).exists() else [])
        atomic.check_output(Path(opts.output), inputs, opts.write.overwrite)
        check_files(plan, inputs)
        size = loading.input_bytes(opts.model)
        if size is not None:
            atomic.check_free_space(Path(opts.output), size)
        fmt = get_format(opts.write.format)
        reason = fmt.refusal(contents(plan), opts.groups.get(fmt.name))
        if reason:
            raise UserError(f"--format {fmt.name}: {reason}")

    def run(self, state: RunState) -> None:
        opts, hooks = state.opts, state.hooks
        t0 = time.perf_counter()
        hooks.current = "writing the output"
        hooks.phase(f"writing {opts.output}")
        report = build_report(state)
        if not distributed.world().writer:  # rank 0 writes the folder of a data-parallel run
            state.report = report
            return
        fmt = get_format(opts.write.format)
        output = output_of(state, fmt)
        with atomic.atomic_dir(Path(opts.output), opts.write.overwrite) as tmp:
            fmt.write(output, tmp)
            fmt.verify(tmp, output)
            size = fmt.size(tmp)
            for record in report.values():
                if isinstance(record, dict) and isinstance(record.get("file_bytes"), dict):
                    record["file_bytes"]["after"] = size
            report["write"] = {"format": fmt.name, "file_bytes": size}
            report["warnings"] = report["warnings"] + output.warnings
            report["phases_s"]["save"] = time.perf_counter() - t0
            report["peak_memory_mib"] = save.peak_memory()
            report["wall_s"] = process_seconds()
            save.write_report(tmp, report)
            if opts.write.plots:
                plot_layer_sparsity(report, tmp / "layer_sparsity.png")
        state.report = report
