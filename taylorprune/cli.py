"""The ``taylorprune`` command line (Typer): run, eval, methods.

Every user-fixable problem ends as one line on stderr and exit code 2 (run failures: 1, interruption:
130), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from taylorprune import cli_options as opt
from taylorprune.calib.text import EVAL_DATASETS
from taylorprune.errors import RunError, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune LLaMA-class causal LMs layer by layer and measure what it costs in perplexity.",
)
out = Console()
err = Console(stderr=True)


def fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _phase_name() -> str:
    from taylorprune.pipeline import CURRENT_PHASE

    return CURRENT_PHASE["name"]


def _sigterm(_signum, _frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Turn known failures into one line and an exit code; SIGTERM behaves like Ctrl-C (cleanup runs)."""
    # Install both explicitly: a process started in the background inherits SIGINT as ignored.
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, _sigterm), (signal.SIGINT, signal.default_int_handler))}
    try:
        yield
    except UserError as exc:
        fail(str(exc), 2)
    except RunError as exc:
        fail(str(exc), 1)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written to the output path", 130)
    except MemoryError:
        fail(f"out of memory while {_phase_name()}; lower --nsamples, --seqlen or --batch-size, use "
             "--grad-checkpointing or --hvp-scope block, or --dtype bfloat16", 1)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            fail(f"disk full while {_phase_name()}; nothing was written to the output path", 1)
        raise
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            fail(f"CUDA out of memory while {_phase_name()}; lower --nsamples, --seqlen or --batch-size, use "
                 "--grad-checkpointing or --hvp-scope block, or --device-map auto", 1)
        if os.environ.get("TAYLORPRUNE_DEBUG"):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fail(f"unexpected {type(exc).__name__} while {_phase_name()}: {detail} (set TAYLORPRUNE_DEBUG=1 for the "
             "traceback)", 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    )


def _progress_hooks(bar: Progress):
    from taylorprune.pipeline import Hooks

    state: dict[str, object] = {}

    def phase(name: str) -> None:
        err.print(f"[dim]•[/] {name}", highlight=False)

    def task(name: str, total: int) -> Callable[[int], None]:
        handle = bar.add_task(name, total=total)
        return lambda i: bar.update(handle, completed=i + 1)

    def windows(i: int, total: int) -> None:
        if "eval" not in state:
            state["eval"] = bar.add_task("evaluating windows", total=total)
        bar.update(state["eval"], completed=i)

    return Hooks(phase=phase, task=task, windows=windows)


def parse_method_options(values: list[str]) -> dict[str, object]:
    parsed: dict[str, object] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--option {item}: expected KEY=VALUE")
        try:
            parsed[key] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key] = raw
    return parsed


@app.command()
def run(
    model: opt.Model,
    output: Path = typer.Option(..., help="Folder to write (created atomically; must not exist)."),
    method: str = typer.Option("wanda", help="Importance score; see `taylorprune methods`."),
    sparsity: float = typer.Option(None, help="Fraction of weights to prune in each target, e.g. 0.5."),
    pattern: str = typer.Option(None, help="N:M semi-structured pattern, e.g. 2:4 (keep N of every M)."),
    group: opt.Group = "row",
    targets: opt.Targets = None,
    calib: opt.Calib = "c4",
    calib_file: opt.CalibFile = None,
    nsamples: opt.NSamples = 128,
    seqlen: opt.SeqLen = None,
    seed: opt.Seed = 0,
    calib_sampling: opt.CalibSampling = "random",
    batch_size: opt.BatchSize = 1,
    dtype: opt.DType = "auto",
    device: opt.Device = "auto",
    device_map: str = typer.Option(None, help="accelerate device map (auto, balanced, sequential, cpu)."),
    offload_folder: str = typer.Option(None, help="Folder for accelerate's disk offload."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    trust_remote_code: opt.TrustRemoteCode = False,
    eval: bool = typer.Option(False, "--eval", help="Evaluate perplexity of the pruned model."),
    eval_dataset: opt.EvalDataset = "wikitext2",
    eval_text_file: opt.EvalTextFile = None,
    eval_seqlen: opt.EvalSeqLen = None,
    max_windows: opt.MaxWindows = None,
    alpha: float = typer.Option(1.0, help="gblm: weight of the gradient term (paper's α = alpha × grad-scale)."),
    grad_norm: str = typer.Option("l2", help="gblm: reduce per-sample gradients over samples with l1 or l2."),
    grad_scale: float = typer.Option(100.0, help="Per-sample gradient scale (GBLM uses 100)."),
    grad_cache: str = typer.Option(None, help="Gradient cache (.safetensors): reused when it matches, else written."),
    grad_checkpointing: bool = typer.Option(False, help="Gradient checkpointing in the gradient pass (long seqs)."),
    update: str = typer.Option("none", help="Weight update after masking: none, or obs (SparseGPT's OBS)."),
    percdamp: float = typer.Option(0.01, help="sparsegpt/obs: damping as a fraction of mean diag(H)."),
    blocksize: int = typer.Option(128, help="sparsegpt/obs: columns per lazy-update block."),
    save_scores: str = typer.Option(None, help="Write each target's fp32 scores (.safetensors, module paths)."),
    hvp_scope: str = typer.Option("model", help="oba: Hessian of the whole model's loss, or per block (large models)."),
    hvp_mode: str = typer.Option("blockwise", help="oba model scope: blockwise (jvp of each block's vjp, one "
                                 "block's graph in memory), fwd-rev (jvp of grad, whole model) or double-backward."),
    hvp_cache: str = typer.Option(None, help="oba (model scope): HVP cache (.safetensors), like --grad-cache."),
    oba_first_order: bool = typer.Option(False, help="oba: add the first-order term g·δθ (off, as OBA)."),
    oba_normalize: str = typer.Option("none", help="oba: none (the paper's score) or max (per-layer |ΔL|/max + "
                                      "|W|, the authors' unstructured recipe)."),
    plots: bool = typer.Option(False, "--plots", help="Also write layer_sparsity.png into the output."),
    option: opt.MethodOption = None,
) -> None:
    """Prune a model and write it as a Hugging Face folder with taylorprune_report.json."""
    from taylorprune.pipeline import RunOptions
    from taylorprune.pipeline import run as run_pipeline

    with guarded():
        opts = RunOptions(
            model=model, output=str(output), method=method, sparsity=sparsity, pattern=pattern, group=group,
            targets=targets, calib=calib, calib_file=calib_file, nsamples=nsamples, seqlen=seqlen, seed=seed,
            calib_sampling=calib_sampling, batch_size=batch_size, dtype=dtype, device=device,
            device_map=device_map, offload_folder=offload_folder, overwrite=overwrite,
            trust_remote_code=trust_remote_code, eval=eval, eval_dataset=eval_dataset,
            eval_text_file=eval_text_file, eval_seqlen=eval_seqlen, max_windows=max_windows, update=update,
            save_scores=save_scores, plots=plots,
            method_options=dict(
                alpha=alpha, grad_norm=grad_norm, grad_scale=grad_scale, grad_cache=grad_cache,
                grad_checkpointing=grad_checkpointing, percdamp=percdamp, blocksize=blocksize, hvp_scope=hvp_scope,
                hvp_mode=hvp_mode, hvp_cache=hvp_cache, oba_first_order=oba_first_order, oba_normalize=oba_normalize,
                **parse_method_options(option or []),
            ),
        )
        with progress() as bar:
            report = run_pipeline(opts, _progress_hooks(bar))
        show_run_summary(report)


def show_run_summary(report: dict) -> None:
    table = Table(title=f"taylorprune {report['method']} · {report['pattern']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("target linears", str(len(report["linears"])))
    table.add_row("achieved sparsity", f"{report['achieved_sparsity']:.4f}")
    for phase, secs in report["phases_s"].items():
        if "." not in phase:
            table.add_row(f"{phase} time", f"{secs:.2f} s")
    table.add_row("peak RSS", f"{report['peak_memory_mib']['rss_mib']:.0f} MiB")
    if report.get("evaluation"):
        ev = report["evaluation"]
        table.add_row(f"perplexity ({ev['dataset']}, {ev['windows']}×{ev['seqlen']})", f"{ev['perplexity']:.3f}")
    table.add_row("output", report["options"]["output"])
    out.print(table)


@app.command("eval")
def eval_cmd(
    model: opt.Model,
    dataset: str = typer.Option("wikitext2", help=f"Test split: {', '.join(EVAL_DATASETS)}."),
    text_file: str = typer.Option(None, help="Evaluate on this text file instead of --dataset."),
    seqlen: int = typer.Option(None, help="Window length [default: min(2048, max positions)]."),
    max_windows: opt.MaxWindows = None,
    json_out: Path = typer.Option(None, "--json", help="Write the result as JSON here."),
    dtype: opt.DType = "auto",
    device: opt.Device = "auto",
    device_map: str = typer.Option(None, help="accelerate device map (auto, balanced, ...)."),
    trust_remote_code: opt.TrustRemoteCode = False,
) -> None:
    """Perplexity with the papers' protocol: text tokenized once, non-overlapping windows."""
    from taylorprune import pipeline
    from taylorprune.modeling import loading

    with guarded():
        if dataset not in EVAL_DATASETS and not text_file:
            raise UserError(f"--dataset {dataset}: choose one of {', '.join(EVAL_DATASETS)} or give --text-file")
        if text_file and not Path(text_file).expanduser().is_file():
            raise UserError(f"--text-file {text_file}: file not found")
        dev = pipeline.resolve_device(device)
        loaded = loading.load(model, dtype, device_map, None, trust_remote_code)
        with progress() as bar:
            result = pipeline.evaluate_model(loaded.model, loaded.tokenizer, model, dataset, text_file, seqlen,
                                             max_windows, dev, _progress_hooks(bar))
        out.print(f"perplexity {result.perplexity:.4f}  ({result.dataset}, {result.windows} windows × "
                  f"{result.seqlen} tokens)", highlight=False)
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


@app.command()
def methods() -> None:
    """List the registered pruning methods and what they need."""
    from taylorprune.scoring import METHODS

    table = Table(title="registered methods")
    for col in ("method", "score", "statistics", "paper"):
        table.add_column(col)
    for m in sorted(METHODS.values(), key=lambda m: m.name):
        table.add_row(m.name, m.summary, ", ".join(sorted(m.needs)) or "-", m.paper)
    out.print(table)


def _register_extra_commands() -> None:
    """check / inspect / sweep live in taylorprune.report; they register themselves on ``app``."""
    from taylorprune.report.commands import register

    register(app)


def main() -> None:
    app()


_register_extra_commands()

if __name__ == "__main__" and sys.argv:
    main()
