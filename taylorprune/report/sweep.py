"""``taylorprune sweep``: methods × sparsities (and N:M patterns) on one model and one calibration set.

Every grid point is a fresh ``pipeline.prune`` of the dense model, so points never contaminate each other;
gradients and HVPs are model-scope statistics of the *dense* model, so a shared cache file makes them a
one-off cost for the whole grid. Models stay in memory unless ``--keep-models`` asks for them on disk.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from taylorprune import pipeline
from taylorprune.calib.text import EVAL_DATASETS
from taylorprune.errors import RunError, UserError
from taylorprune.export import plots
from taylorprune.pipeline.components import Components, StageConflict, check_applies, check_known, resolve
from taylorprune.prune.masks import parse_pattern
from taylorprune.report import jsonio
from taylorprune.stats.source import Scope

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT = "ppl_vs_sparsity.png"
CACHE_DIR = ".sweep-cache"


@dataclass(frozen=True)
class Point:
    """One grid point: a method (with a variant of its stages, e.g. swap+obs) and a sparsity or N:M pattern."""

    method: str
    pattern: str
    sparsity: float
    variant: str = ""

    @property
    def label(self) -> str:
        return f"{self.method}+{self.variant}" if self.variant else self.method

    @property
    def name(self) -> str:
        if self.pattern == "unstructured":
            return f"{self.label}_s{self.sparsity:g}"
        n, m = self.pattern.split(":")
        return f"{self.label}_{n}of{m}"

    def stages(self) -> dict[str, str]:
        """The run options this point's variant sets (``--refine swap`` for ``swap`` ...)."""
        return variant_stages(self.variant)


@dataclass
class Sweep:
    """Everything a sweep needs; ``run`` holds the options shared by every grid point (its ``method_options``
    apply to each point whose method takes them)."""

    run: pipeline.RunOptions
    out: Path
    points: list[Point]
    keep_models: bool = False
    skipped: list[str] = field(default_factory=list)  # grid points whose method excludes their variant


def split(text: str, flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UserError(f"{flag} {text!r}: give a comma-separated list")
    return list(dict.fromkeys(items))


def parse_methods(text: str) -> list[str]:
    from taylorprune.scoring.registry import METHODS

    methods = split(text, "--methods")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods {','.join(unknown)}: unknown; registered methods: {', '.join(sorted(METHODS))}")
    return methods


def parse_sparsities(text: str) -> list[float]:
    values = []
    for item in split(text, "--sparsities"):
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"--sparsities {item}: not a number (e.g. 0.3,0.5,0.7)") from None
        if not 0.0 < value < 1.0:
            raise UserError(f"--sparsities {item}: must be between 0 and 1 (exclusive)")
        values.append(value)
    return sorted(set(values))


def parse_patterns(text: str) -> list[str]:
    patterns = split(text, "--patterns")
    for p in patterns:
        if p != "unstructured":
            try:
                parse_pattern(None, p)
            except UserError:
                raise UserError(f"--patterns {p}: expected unstructured or N:M with 0 < N < M, e.g. 2:4") from None
    return patterns


def _stage_values() -> dict[str, tuple[str, str]]:
    """{stage value: (run option, value)} for every non-default value of every stage (``obs``: update obs)."""
    from taylorprune.pipeline.components import STAGES

    found: dict[str, tuple[str, str]] = {}
    for stage, registry in STAGES.items():
        for name in registry:
            if name not in ("none", "uniform"):
                if name in found:
                    raise TypeError(f"stage value {name!r} is ambiguous ({found[name][0]} and {stage})")
                found[name] = (stage, name)
    return found


def variant_stages(variant: str) -> dict[str, str]:
    values = _stage_values()
    out: dict[str, str] = {}
    for token in filter(None, variant.split("+")):
        if token not in values:
            raise UserError(f"--variants {variant}: {token!r} is no stage; use plain or +-joined names of "
                            f"{', '.join(values)}")
        stage, name = values[token]
        if stage in out:
            raise UserError(f"--variants {variant}: two values for --{stage}")
        out[stage] = name
    return out


def parse_variants(text: str) -> list[str]:
    variants = ["" if v == "plain" else v for v in split(text, "--variants")]
    for v in variants:
        variant_stages(v)
    return variants


def grid(methods: list[str], sparsities: list[float], patterns: list[str], variants: list[str] = ("",)
         ) -> list[Point]:
    """method × variant × (each sparsity for unstructured, the pattern once for N:M), in the order given."""
    if "unstructured" in patterns and not sparsities:
        raise UserError("--patterns unstructured needs --sparsities")
    points = []
    for method in methods:
        for variant in variants:
            for p in patterns:
                if p == "unstructured":
                    points.extend(Point(method, p, s, variant) for s in sparsities)
                else:
                    n, m = (int(x) for x in p.split(":"))
                    points.append(Point(method, p, 1.0 - n / m, variant))
    return points


def components(sweep: Sweep, point: Point) -> Components:
    run = replace(sweep.run, **point.stages())
    return resolve(point.method, run.update, run.method_options, strict=False, refine=run.refine,
                   allocation=run.allocation, recon=run.recon)


def point_options(sweep: Sweep, point: Point) -> pipeline.RunOptions:
    """The ``run`` options of one point; its output folder is only written with --keep-models.

    Model-scope statistics are statistics of the dense model, the same at every point: unless the user named a
    cache file, each source the point uses gets one in ``OUT/.sweep-cache``, so it is computed once per sweep.
    """
    nm = point.pattern != "unstructured"
    parts = components(sweep, point)
    values = {k: v for k, v in sweep.run.method_options.items() if k in parts.option_names()}
    for source, _ in parts.sources:
        if source.scope is Scope.MODEL and source.cache_option and source.cache_option not in values:
            values[source.cache_option] = str(sweep.out.expanduser() / CACHE_DIR / f"{source.name}.safetensors")
    return replace(sweep.run, **point.stages(), method=point.method, sparsity=None if nm else point.sparsity,
                   pattern=point.pattern if nm else None, output=str(sweep.out / "models" / point.name),
                   overwrite=sweep.run.overwrite or not sweep.keep_models, eval=True, method_options=values)


def _check_options(sweep: Sweep) -> None:
    """Every option applies to some point; a block-scope cache file cannot serve several points."""
    given = sweep.run.method_options
    check_known(given)
    runs = [components(sweep, p) for p in sweep.points]
    check_applies(given, runs)
    block_files = [s.cache_option for parts in runs for s, _ in parts.sources
                   if s.scope is Scope.BLOCK and s.cache_option in given]
    if len(block_files) > 1:
        raise UserError(f"--{block_files[0].replace('_', '-')}: block-scope statistics depend on how each grid "
                        "point prunes, so one cache file cannot serve a sweep; drop it")


def validate(sweep: Sweep) -> None:
    """Fail before loading anything: every point's options, the eval data, and the --out folder."""
    opts = sweep.run
    if opts.eval_text_file is None and opts.eval_dataset not in EVAL_DATASETS:
        raise UserError(f"--eval-dataset {opts.eval_dataset}: choose one of {', '.join(EVAL_DATASETS)} "
                        "or give --eval-text-file")
    out = sweep.out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {sweep.out}: exists and is not a folder")
    if (out / RESULTS_JSON).exists() and not opts.overwrite:
        raise UserError(f"--out {sweep.out} already holds {RESULTS_JSON}; pass --overwrite to replace it")
    model = Path(opts.model).expanduser()
    if model.is_dir() and (out == model.resolve() or model.resolve() in out.parents):
        raise UserError(f"--out {sweep.out} is inside the model folder {opts.model}; choose a separate folder")
    _drop_conflicts(sweep)
    _check_options(sweep)
    for point in sweep.points:
        pipeline.validate(point_options(sweep, point))


def _drop_conflicts(sweep: Sweep) -> None:
    """Leave out grid points whose method excludes a stage of their variant (a solver with +obs), saying so."""
    kept = []
    for point in sweep.points:
        try:
            components(sweep, point)
            kept.append(point)
        except StageConflict as exc:
            sweep.skipped.append(f"{point.name}: {exc}")
    if not kept:
        raise UserError(f"no grid point can run: {sweep.skipped[0]}")
    sweep.points = kept


def remove_own_caches(sweep: Sweep) -> None:
    """Delete the caches the sweep made for itself (``OUT/.sweep-cache``); caches the user named stay."""
    shutil.rmtree(sweep.out.expanduser() / CACHE_DIR, ignore_errors=True)


HooksFor = Callable[[int, str], pipeline.Hooks]


def evaluate_dense(sweep: Sweep, hooks: pipeline.Hooks) -> dict:
    """The reference row: the unpruned model through the same evaluation as every point."""
    from taylorprune.modeling import loading
    from taylorprune.modeling.layout import find_layout

    opts = sweep.run
    hooks.current = "loading model"
    hooks.phase("loading model")
    loaded = loading.load(opts.model, opts.dtype, opts.device_map, opts.offload_folder, opts.trust_remote_code)
    targets = find_layout(loaded.model, opts.targets).all_targets
    numel = sum(t.module.weight.numel() for t in targets)
    zeros = sum(int((t.module.weight == 0).sum().item()) for t in targets)
    hooks.current = "evaluating perplexity"
    hooks.phase("evaluating perplexity")
    result = pipeline.evaluate_model(loaded.model, loaded.tokenizer, opts.model, opts.eval_dataset,
                                     opts.eval_text_file, opts.eval_seqlen, opts.max_windows,
                                     pipeline.resolve_device(opts.device), hooks.windows, opts.stream,
                                     opts.max_gpu_memory, opts.stream_batch)
    return {"name": "dense", "method": "dense", "pattern": "dense", "sparsity": 0.0,
            "achieved_sparsity": zeros / max(numel, 1), "perplexity": result.perplexity, "prune_s": 0.0,
            "model_statistics_s": 0.0, "model_dir": None, "evaluation": result.to_dict()}


def run_point(sweep: Sweep, point: Point, hooks: pipeline.Hooks) -> dict:
    """Prune one point from the dense model, evaluate it, and write it only with --keep-models."""
    opts = point_options(sweep, point)
    t0 = time.perf_counter()
    try:
        pruned = pipeline.prune(opts, hooks)
    except RunError as exc:  # one diverging point (non-finite scores) must not throw away the whole grid
        return failed_row(point, str(exc), time.perf_counter() - t0)
    row = {"name": point.name, "method": point.label, "pattern": point.pattern, "sparsity": point.sparsity,
           "achieved_sparsity": pruned.result.sparsity, "perplexity": pruned.evaluation["perplexity"],
           "prune_s": pruned.phases.get("prune", 0.0),
           "model_statistics_s": pruned.phases.get("model_statistics", 0.0), "model_dir": None,
           "calibration": pruned.spec.describe() if pruned.spec else None, "evaluation": pruned.evaluation,
           "cache_hits": [e.removesuffix("_hit") for e in hooks.events if e.endswith("_hit")]}
    if sweep.keep_models:
        pipeline.write(pruned, hooks)
        row["model_dir"] = opts.output
    row["total_s"] = time.perf_counter() - t0
    del pruned
    gc.collect()
    return row


def failed_row(point: Point, error: str, seconds: float) -> dict:
    """A grid point that could not be pruned: kept in the table (nan), reported, and excluded from the plot."""
    return {"name": point.name, "method": point.label, "pattern": point.pattern, "sparsity": point.sparsity,
            "achieved_sparsity": math.nan, "perplexity": math.nan, "prune_s": 0.0, "model_statistics_s": 0.0,
            "model_dir": None, "calibration": None, "evaluation": None, "cache_hits": [], "total_s": seconds,
            "error": error}


def run_sweep(sweep: Sweep, hooks_for: HooksFor, on_row: Callable[[dict], None] = lambda row: None) -> dict:
    """Dense reference, then every grid point; returns (and writes) the results."""
    validate(sweep)
    out = sweep.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    remove_own_caches(sweep)  # left over by an interrupted sweep: possibly of another model or calibration
    try:
        dense = evaluate_dense(sweep, hooks_for(0, "dense"))
        on_row(dense)
        rows = []
        for i, point in enumerate(sweep.points, start=1):
            rows.append(run_point(sweep, point, hooks_for(i, point.name)))
            on_row(rows[-1])
            # rewritten after every point: an interrupted long sweep still leaves the rows it finished
            write_results(build_results(sweep, dense, rows), out)
    finally:
        remove_own_caches(sweep)
    results = build_results(sweep, dense, rows)
    write_results(results, out)
    failed = [r for r in rows if r.get("error")]
    if failed:
        raise RunError(f"{len(failed)} of {len(rows)} grid points failed (results written to {out}): "
                       f"{failed[0]['name']}: {failed[0]['error']}")
    return results


def build_results(sweep: Sweep, dense: dict, rows: list[dict]) -> dict:
    ev = dense["evaluation"]
    return {
        "model": sweep.run.model,
        "evaluation": {k: ev[k] for k in ("dataset", "seqlen", "windows", "tokens")},
        "calibration": next((r["calibration"] for r in rows if r.get("calibration")), None),
        "dense": dense,
        "rows": rows,
        "versions": pipeline.versions(),
    }


def write_results(results: dict, out: Path) -> None:
    """results.json (strict JSON: a collapsed model's inf perplexity is null), results.md, the plot."""
    jsonio.dump(results, out / RESULTS_JSON)
    (out / RESULTS_MD).write_text(markdown(results))
    ev = results["evaluation"]
    plots.plot_sweep(results["rows"], results["dense"], model_label(results["model"]), out / PLOT,
                     f"{ev['dataset']}, {ev['windows']}×{ev['seqlen']}")


def model_label(model: str) -> str:
    """'stories260K' for a folder path, the hub id as given otherwise."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def markdown(results: dict) -> str:
    ev = results["evaluation"]
    dense = results["dense"]["perplexity"]
    lines = [
        f"# Sweep: {model_label(results['model'])}",
        "",
        f"Perplexity on {ev['dataset']} ({ev['windows']} windows × {ev['seqlen']} tokens); dense {_fmt(dense)}.",
        "",
        "| method | pattern | sparsity | achieved | perplexity | vs dense | prune s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in [results["dense"], *results["rows"]]:
        ratio = r["perplexity"] / dense if math.isfinite(dense) and dense > 0 else math.nan
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.2f} | {r['achieved_sparsity']:.4f} | "
                     f"{_fmt(r['perplexity'])} | {_fmt(ratio, '×')} | {r['prune_s'] + r['model_statistics_s']:.2f} |")
    failed = [r for r in results["rows"] if r.get("error")]
    if failed:
        lines += ["", "Failed points:", ""] + [f"- {r['name']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _fmt(value: float, suffix: str = "") -> str:
    return f"{value:.3f}{suffix}" if math.isfinite(value) else str(value)

