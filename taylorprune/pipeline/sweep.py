"""``taylorprune sweep``: methods × stage variants × sparsities (and N:M patterns) on one model and calibration.

Every grid point is a fresh ``prune`` of the dense model, so points never contaminate each other; gradients and
HVPs are model-scope statistics of the *dense* model, so a shared cache file makes them a one-off cost for the
whole grid. Models stay in memory unless ``--keep-models`` asks for them on disk. Rows are handed to ``on_row``
as they finish (the CLI prints them; ``report.sweep`` writes the results files after each).
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from taylorprune.errors import RunError, UserError
from taylorprune.modeling import loading
from taylorprune.modeling.layout import find_layout
from taylorprune.pipeline.components import Components, StageConflict, check_applies, check_known, resolve
from taylorprune.pipeline.evaluation import evaluate_model, metrics
from taylorprune.pipeline.flow import prune, write
from taylorprune.pipeline.hooks import Hooks
from taylorprune.pipeline.plan import resolve_device, validate
from taylorprune.pipeline.run_options import RunOptions
from taylorprune.pipeline.stages import variant_values
from taylorprune.prune.masks import parse_pattern
from taylorprune.scoring.registry import METHODS
from taylorprune.stats.source import Scope

CACHE_DIR = ".sweep-cache"
RESULTS_JSON = "results.json"


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
        """The stage values this point's variant sets (``--refine swap`` for ``swap`` ...)."""
        return variant_stages(self.variant)


@dataclass
class Sweep:
    """Everything a sweep needs; ``run`` holds the options shared by every grid point (its component options apply
    to each point whose method takes them)."""

    run: RunOptions
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


def variant_stages(variant: str) -> dict[str, str]:
    values = variant_values()
    out: dict[str, str] = {}
    for token in variant.split("+") if variant else ():
        if not token:
            raise UserError(f"--variants {variant}: an empty stage name; join stage values with + (e.g. swap+obs)")
        if token not in values:
            raise UserError(f"--variants {variant}: {token!r} is no stage; use plain or +-joined names of "
                            f"{', '.join(values)}")
        kind, name = values[token]
        if kind in out:
            raise UserError(f"--variants {variant}: two values for --{kind}")
        out[kind] = name
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
    return resolve(point.method, {**sweep.run.stages, **point.stages()}, sweep.run.method_options, strict=False)


def point_options(sweep: Sweep, point: Point) -> RunOptions:
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
    return sweep.run.replace(**point.stages(), method=point.method, sparsity=None if nm else point.sparsity,
                             pattern=point.pattern if nm else None, output=str(sweep.out / "models" / point.name),
                             overwrite=sweep.run.write.overwrite or not sweep.keep_models, eval=True,
                             method_options=values)


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


def check(sweep: Sweep) -> None:
    """Fail before loading anything: every point's options, the eval data, and the --out folder."""
    opts = sweep.run
    out = sweep.out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {sweep.out}: exists and is not a folder")
    if (out / RESULTS_JSON).exists() and not opts.write.overwrite:
        raise UserError(f"--out {sweep.out} already holds {RESULTS_JSON}; pass --overwrite to replace it")
    model = Path(opts.model).expanduser()
    if model.is_dir() and (out == model.resolve() or model.resolve() in out.parents):
        raise UserError(f"--out {sweep.out} is inside the model folder {opts.model}; choose a separate folder")
    _drop_conflicts(sweep)
    _check_options(sweep)
    for point in sweep.points:
        validate(point_options(sweep, point))


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


HooksFor = Callable[[int, str], Hooks]


def _row(point_name: str, method: str, pattern: str, sparsity: float, evaluation: dict | None, **rest) -> dict:
    found = metrics(evaluation or {})
    return {"name": point_name, "method": method, "pattern": pattern, "sparsity": sparsity,
            "perplexity": found.get("perplexity", math.nan), "metrics": found, "evaluation": evaluation, **rest}


def evaluate_dense(sweep: Sweep, hooks: Hooks) -> dict:
    """The reference row: the unpruned model through the same evaluation as every point."""
    opts, lo = sweep.run, sweep.run.load
    hooks.current = "loading model"
    hooks.phase("loading model")
    loaded = loading.load(lo.model, lo.dtype, lo.device_map, lo.offload_folder, lo.trust_remote_code)
    targets = find_layout(loaded.model, opts.target.targets).all_targets
    numel = sum(t.module.weight.numel() for t in targets)
    zeros = sum(int((t.module.weight == 0).sum().item()) for t in targets)
    evaluators = point_options(sweep, sweep.points[0]).evaluators()
    pl = opts.placement
    records = evaluate_model(loaded.model, loaded.tokenizer, lo.model, evaluators, resolve_device(pl.device), hooks,
                             pl.stream, pl.max_gpu_memory, pl.stream_batch, baseline=lambda: loaded.model)
    return _row("dense", "dense", "dense", 0.0, records, achieved_sparsity=zeros / max(numel, 1), prune_s=0.0,
                model_statistics_s=0.0, model_dir=None)


def run_point(sweep: Sweep, point: Point, hooks: Hooks) -> dict:
    """Prune one point from the dense model, evaluate it, and write it only with --keep-models."""
    opts = point_options(sweep, point)
    t0 = time.perf_counter()
    try:
        pruned = prune(opts, hooks)
    except RunError as exc:  # one diverging point (non-finite scores) must not throw away the whole grid
        return failed_row(point, str(exc), time.perf_counter() - t0)
    row = _row(point.name, point.label, point.pattern, point.sparsity, pruned.evaluation,
               achieved_sparsity=pruned.achieved_sparsity, prune_s=pruned.phases_s.get("prune", 0.0),
               model_statistics_s=pruned.phases_s.get("model_statistics", 0.0), model_dir=None,
               calibration=pruned.spec.describe() if pruned.spec else None,
               cache_hits=[e.removesuffix("_hit") for e in hooks.events if e.endswith("_hit")])
    if sweep.keep_models:
        write(pruned, hooks)
        row["model_dir"] = opts.output
    row["total_s"] = time.perf_counter() - t0
    del pruned
    gc.collect()
    return row


def failed_row(point: Point, error: str, seconds: float) -> dict:
    """A grid point that could not be pruned: kept in the table (nan), reported, and excluded from the plot."""
    return _row(point.name, point.label, point.pattern, point.sparsity, None, achieved_sparsity=math.nan,
                prune_s=0.0, model_statistics_s=0.0, model_dir=None, calibration=None, cache_hits=[],
                total_s=seconds, error=error)


def run_sweep(sweep: Sweep, hooks_for: HooksFor, on_row: Callable[[dict, dict, list[dict]], None]) -> list[dict]:
    """Dense reference, then every grid point; ``on_row(row, dense, rows so far)`` after each. Returns the rows."""
    check(sweep)
    out = sweep.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    remove_own_caches(sweep)  # left over by an interrupted sweep: possibly of another model or calibration
    rows: list[dict] = []
    try:
        dense = evaluate_dense(sweep, hooks_for(0, "dense"))
        on_row(dense, dense, rows)
        for i, point in enumerate(sweep.points, start=1):
            rows.append(run_point(sweep, point, hooks_for(i, point.name)))
            on_row(rows[-1], dense, rows)
    finally:
        remove_own_caches(sweep)
    failed = [r for r in rows if r.get("error")]
    if failed:
        raise RunError(f"{len(failed)} of {len(rows)} grid points failed (results written to {out}): "
                       f"{failed[0]['name']}: {failed[0]['error']}")
    return [dense, *rows]
