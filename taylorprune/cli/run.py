"""``taylorprune run``: prune a model and write it as a Hugging Face folder with its report.

Every flag but ``--option`` is generated from a declaration: the run's option groups, the stage kinds, each
evaluator's options, and every component's options (``cli.options``).
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from taylorprune.cli import options as opt
from taylorprune.cli.console import guarded, out, progress
from taylorprune.evaluate.registry import EVALUATORS
from taylorprune.pipeline.run_options import RunKind


@opt.with_component_options
@opt.with_run_options()
def run(
    option: opt.MethodOption = None,
    run_values: dict[str, Any] | None = None,
    component_options: dict[str, Any] | None = None,
) -> None:
    """Prune a model and write it as a Hugging Face folder with taylorprune_report.json."""
    from taylorprune import pipeline

    with guarded() as session:
        opts = pipeline.RunOptions(**run_values, kind=RunKind.RUN,
                                   method_options=opt.component_values(component_options or {}, option))
        with progress() as bar:
            report = pipeline.run(opts, session.hooks(bar))
        show_summary(report)


def show_summary(report: dict) -> None:
    structured, quantized = report.get("structured"), report.get("quantize")
    title = report["pattern"] + (f" ({report['method']} scores)" if structured else "")
    if not structured and isinstance(quantized, dict) and report.get("sparsity") is None:
        title = f"quantize {quantized['method']} · {title}"  # no method ran: it masked nothing
    elif not structured and report["pattern"] not in ("recovery only", "written as it is"):  # no method ran
        title = f"{report['method']} · {title}"
    table = Table(title=f"taylorprune {title}")
    table.add_column("what")
    table.add_column("value", justify="right")
    if structured:
        structured_rows(table, structured)
    if report.get("achieved_sparsity") is not None:
        if not structured:
            table.add_row("target linears", str(len(report["linears"])))
        table.add_row("achieved sparsity", f"{report['achieved_sparsity']:.4f}")
    if isinstance(quantized, dict):
        quantize_rows(table, quantized, report.get("write") or {})
    for phase, secs in report["phases_s"].items():
        if "." not in phase:
            table.add_row(f"{phase} time", f"{secs:.2f} s")
    table.add_row("process wall time", f"{report['wall_s']:.2f} s")
    placement = (report.get("source") or {}).get("placement") or {}
    if placement:
        table.add_row("model placement", f"{placement['mode']} ({placement['reason']})")
    table.add_row("peak RSS", f"{report['peak_memory_mib']['rss_mib']:.0f} MiB")
    for name, record in (report.get("evaluation") or {}).items():
        for what, value in EVALUATORS[name].rows(record):
            table.add_row(what, value)
    table.add_row("output", report["options"]["output"])
    out.print(table)


def structured_rows(table: Table, st: dict) -> None:
    """What a structured run removed, and what it saved."""
    if st.get("depth"):
        table.add_row("blocks removed", ", ".join(map(str, st["depth"]["blocks_removed"])))
    widths = st["config"]
    table.add_row("widths now", f"{widths['num_hidden_layers']} blocks, {widths['num_attention_heads']} heads / "
                  f"{widths['num_key_value_heads']} KV, intermediate {widths['intermediate_size']}")
    params = st["parameters"]
    table.add_row("parameters", f"{params['before']:,} → {params['after']:,} (−{params['removed_fraction']:.1%})")
    decoder = st.get("decoder_parameters")
    if decoder:
        table.add_row("of which in decoder blocks", f"{decoder['before']:,} → {decoder['after']:,} "
                      f"(−{decoder['removed_fraction']:.1%})")
    size = st["file_bytes"]
    if size.get("after"):
        table.add_row("weight files", f"{size['before'] / 2**20:.1f} → {size['after'] / 2**20:.1f} MiB")


def quantize_rows(table: Table, q: dict, written: dict) -> None:
    """The grid, the bits per weight it costs (scales and zero points counted) and what the files weigh."""
    group = "per channel" if q["group_size"] == -1 else f"group {q['group_size']}"
    kind = "symmetric" if q["symmetric"] else "asymmetric"
    table.add_row("quantization", f"{q['method']} {q['wbits']}-bit {group} {kind}, {q['linears']} linears")
    if q.get("bits_per_weight") is not None:
        table.add_row("bits per quantized weight", f"{q['bits_per_weight']:.3f}")
    if written.get("file_bytes") is not None:
        table.add_row(f"weight files ({written['format']})", f"{written['file_bytes'] / 2**20:.2f} MiB")
