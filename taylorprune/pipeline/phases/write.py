"""Write phase: the pruned model as a Hugging Face folder with its report, atomically, verified on disk.

The folder is written beside the target and renamed into place at the end, so an interrupted run leaves no
half checkpoint; the weights are re-read and checked against the model in memory (shapes, sparsity, widths in
config.json) before the rename. The report holds the run-level facts plus every phase's record under its name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from taylorprune import distributed
from taylorprune.errors import UserError
from taylorprune.export import atomic, save
from taylorprune.export.plots import plot_layer_sparsity
from taylorprune.modeling import loading
from taylorprune.pipeline.evaluation import metrics
from taylorprune.pipeline.state import Phase, RunState, process_seconds, versions
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
    for flag, value in files_written(plan):
        where = Path(value).expanduser()
        if where.is_dir():
            raise UserError(f"{flag} {value}: is a folder; give a .safetensors file path")
        parent = where.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UserError(f"{flag} {value}: {parent} is not a writable folder")
        if any(src.resolve() in where.resolve().parents for src in inputs if src.is_dir()):
            raise UserError(f"{flag} {value}: inside the input model folder, which taylorprune never writes to")


def build_report(state: RunState) -> dict:
    plan, records = state.plan, state.records
    parts = plan.parts
    unstructured = records.get("unstructured") or {}
    return {
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

    def check(self, plan) -> None:
        opts = plan.opts
        source, gguf = loading.resolve_source(opts.model)
        inputs = [Path(source) / gguf] if gguf else ([Path(source)] if Path(source).exists() else [])
        atomic.check_output(Path(opts.output), inputs, opts.write.overwrite)
        check_files(plan, inputs)
        size = loading.input_bytes(opts.model)
        if size is not None:
            atomic.check_free_space(Path(opts.output), size)

    def run(self, state: RunState) -> None:
        opts, hooks = state.opts, state.hooks
        t0 = time.perf_counter()
        hooks.current = "writing the output"
        hooks.phase(f"writing {opts.output}")
        report = build_report(state)
        if not distributed.world().writer:  # rank 0 writes the folder of a data-parallel run
            state.report = report
            return
        widths = (state.records.get("structured") or {}).get("config")
        with atomic.atomic_dir(Path(opts.output), opts.write.overwrite) as tmp:
            save.save_model(state.model, state.loaded.tokenizer, tmp)
            save.verify(tmp, state.linears, widths)
            for record in report.values():
                if isinstance(record, dict) and isinstance(record.get("file_bytes"), dict):
                    record["file_bytes"]["after"] = save.folder_bytes(tmp)
            report["phases_s"]["save"] = time.perf_counter() - t0
            report["peak_memory_mib"] = save.peak_memory()
            report["wall_s"] = process_seconds()
            save.write_report(tmp, report)
            if opts.write.plots:
                plot_layer_sparsity(report, tmp / "layer_sparsity.png")
        state.report = report
