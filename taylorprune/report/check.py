"""``taylorprune check``: a CI gate comparing a candidate's perplexity (and sparsity) with a baseline.

Results come from ``taylorprune eval --json`` files, from a folder's ``taylorprune_report.json`` (its
``evaluation`` field), or from a model folder evaluated on the spot. Two perplexities are only comparable
when they were measured the same way, so differing eval settings are refused unless explicitly allowed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from taylorprune.errors import UserError
from taylorprune.export.save import REPORT_NAME
from taylorprune.report import jsonio, weights

# Fields that must agree for two perplexities to be comparable; ``tokenizer`` only when both sides have it.
SETTINGS = ("dataset", "seqlen", "windows", "tokens", "tokenizer")
REQUIRED = {"perplexity": (int, float), "dataset": (str,), "seqlen": (int,), "windows": (int,), "tokens": (int,)}


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate a side given as a model folder (the options of ``taylorprune eval``)."""

    dataset: str = "wikitext2"
    text_file: str | None = None
    seqlen: int | None = None
    max_windows: int | None = None
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class Limits:
    """The tolerances a candidate must meet; None means that check is not run."""

    max_ppl_increase: float | None = None
    max_ppl: float | None = None
    min_sparsity: float | None = None


@dataclass(frozen=True)
class Check:
    """One gate: ``value`` compared with ``limit``; ``detail`` is the human sentence behind it."""

    name: str
    value: float | None
    limit: float
    passed: bool
    detail: str


@dataclass
class Verdict:
    """The outcome of one ``check`` run, as ``--json`` and ``--junit`` write it."""

    passed: bool
    checks: list[Check]
    baseline: dict | None
    candidate: dict
    mismatch: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return jsonio.strict({"passed": self.passed, "checks": [asdict(c) for c in self.checks],
                             "baseline": self.baseline, "candidate": self.candidate, "mismatch": self.mismatch})


def parse_increase(text: str) -> float:
    """'5%' -> 0.05 and '0.05' -> 0.05 (a ratio: candidate ppl <= baseline × (1 + x))."""
    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        raise UserError(f"--max-ppl-increase {text}: expected a ratio (0.05) or a percentage (5%)") from None
    value = value / 100 if percent else value
    if not math.isfinite(value) or value < 0:
        raise UserError(f"--max-ppl-increase {text}: must be a finite, non-negative increase")
    return value


def validate_limits(limits: Limits, has_baseline: bool) -> None:
    """A gate without any limit would pass everything; a relative limit needs something to be relative to."""
    if limits.max_ppl_increase is None and limits.max_ppl is None and limits.min_sparsity is None:
        raise UserError("nothing to check: give --max-ppl-increase, --max-ppl and/or --min-sparsity")
    if limits.max_ppl_increase is not None and not has_baseline:
        raise UserError("--max-ppl-increase needs --baseline")
    if limits.max_ppl is not None and not (math.isfinite(limits.max_ppl) and limits.max_ppl > 0):
        raise UserError(f"--max-ppl {limits.max_ppl}: must be a positive number")
    if limits.min_sparsity is not None and not 0.0 <= limits.min_sparsity <= 1.0:
        raise UserError(f"--min-sparsity {limits.min_sparsity}: must be between 0 and 1")


def existing(text: str, flag: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {text}: no such file or folder")
    return path


def read_result(path: Path, flag: str) -> dict:
    """An eval result from an ``eval --json`` file or a report's ``evaluation`` field, validated."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{flag} {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path}: cannot read it ({exc})") from None
    if isinstance(data, dict) and "perplexity" not in data and "evaluation" in data:
        if not data["evaluation"]:
            raise UserError(f"{flag} {path}: the report has no evaluation; prune with --eval, or pass the model "
                            "folder to evaluate it now")
        data = data["evaluation"]
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: expected a JSON object as written by `taylorprune eval --json`")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UserError(f"{flag} {path}: not an eval result (missing {', '.join(missing)}); write one with "
                        "`taylorprune eval --json`")
    for key, types in REQUIRED.items():
        if isinstance(data[key], bool) or not isinstance(data[key], types):
            raise UserError(f"{flag} {path}: field {key!r} has the wrong type ({type(data[key]).__name__})")
    return dict(data, source=str(path))


def evaluate_folder(path: Path, settings: EvalSettings, hooks=None, flag: str = "--candidate") -> dict:
    """Load the folder and measure its perplexity exactly as ``taylorprune eval`` would."""
    from taylorprune import pipeline
    from taylorprune.modeling import loading

    device = pipeline.resolve_device(settings.device)
    hooks = hooks or pipeline.Hooks()
    hooks.current = f"loading {flag} {path}"
    try:
        loaded = loading.load(str(path), settings.dtype)
    except UserError as exc:  # loading speaks of --model; here the folder came in as --baseline/--candidate
        raise UserError(str(exc).replace(f"--model {path}", f"{flag} {path}", 1)) from None
    hooks.current = f"evaluating {flag} {path}"
    result = pipeline.evaluate_model(loaded.model, loaded.tokenizer, str(path), settings.dataset,
                                     settings.text_file, settings.seqlen, settings.max_windows, device,
                                     hooks.windows)
    return dict(result.to_dict(), source=str(path))


def load_sides(base_path: Path | None, cand_path: Path, settings: EvalSettings, allow_mismatch: bool,
               make_hooks: Callable[[], object] | None = None) -> tuple[dict | None, dict]:
    """(baseline, candidate): files are read first, so a folder whose evaluation could never match is refused
    before minutes of evaluation rather than after."""
    sides = {"--baseline": base_path, "--candidate": cand_path}
    loaded = {flag: read_result(p, flag) for flag, p in sides.items() if p is not None and not p.is_dir()}
    folders = [flag for flag, p in sides.items() if p is not None and p.is_dir()]
    if folders and loaded and not allow_mismatch:
        planned = {"dataset": Path(settings.text_file).name if settings.text_file else settings.dataset}
        if settings.seqlen is not None:
            planned["seqlen"] = settings.seqlen
        known = next(iter(loaded.values()))
        diffs = [f"{k}: {known[k]!r} in the file vs {v!r} from the eval options" for k, v in planned.items()
                 if known[k] != v]
        if diffs:
            raise UserError(f"{folders[0]} would be evaluated differently from the result it is compared with "
                            f"({'; '.join(diffs)}); set --dataset/--text-file/--seqlen/--max-windows to match, "
                            "or pass --allow-mismatch")
    for flag in folders:
        loaded[flag] = evaluate_folder(sides[flag], settings, make_hooks() if make_hooks else None, flag)
    return loaded.get("--baseline"), loaded["--candidate"]


def validate_eval_settings(settings: EvalSettings) -> None:
    from taylorprune import pipeline
    from taylorprune.calib.text import EVAL_DATASETS
    from taylorprune.modeling import loading

    if settings.text_file is None and settings.dataset not in EVAL_DATASETS:
        raise UserError(f"--dataset {settings.dataset}: choose one of {', '.join(EVAL_DATASETS)} or give --text-file")
    if settings.text_file and not Path(settings.text_file).expanduser().is_file():
        raise UserError(f"--text-file {settings.text_file}: file not found")
    pipeline.resolve_device(settings.device)
    loading.torch_dtype(settings.dtype)


def mismatches(baseline: dict, candidate: dict) -> list[str]:
    """'field: baseline vs candidate' for every eval setting that differs."""
    return [f"{k}: {baseline[k]!r} vs {candidate[k]!r}" for k in SETTINGS
            if k in baseline and k in candidate and baseline[k] != candidate[k]]


def weights_folder(path: Path) -> Path:
    """Where ``--min-sparsity`` reads weights: the candidate folder, or the folder around its report file."""
    if path.is_dir():
        return path
    if path.name == REPORT_NAME and any(path.parent.glob("*.safetensors")):
        return path.parent
    raise UserError(f"--min-sparsity reads the candidate's weights: --candidate {path} must be a model folder "
                    f"(or the {REPORT_NAME} inside one)")


def candidate_sparsity(folder: Path) -> tuple[float, int, str]:
    """(sparsity, linears, rule) over the report's linears when the folder has a report, else the block rule."""
    from taylorprune.report.inspect_folder import read_report

    report = read_report(folder)
    names = [f"{lin['name']}.weight" for lin in (report or {}).get("linears") or []]
    rows = weights.scan(folder, names or None, candidates=(), flag="--candidate")
    rule = "linears listed in its report" if names else "2-D weights inside decoder blocks"
    return weights.total(rows)[2], len(rows), rule


def run_checks(baseline: dict | None, candidate: dict, limits: Limits, sparsity: tuple[float, int, str] | None
               ) -> list[Check]:
    checks = []
    ppl = float(candidate["perplexity"])
    if limits.max_ppl_increase is not None and baseline is not None:
        base = float(baseline["perplexity"])
        if not (math.isfinite(base) and base > 0):
            raise UserError(f"--baseline perplexity is {base}; a relative limit needs a finite baseline")
        bound = base * (1 + limits.max_ppl_increase)
        rel = ppl / base - 1 if base > 0 and math.isfinite(ppl) else math.inf
        checks.append(Check("ppl_increase", rel, limits.max_ppl_increase, ppl <= bound,
                            f"perplexity {ppl:.4f} vs baseline {base:.4f} ({rel:+.2%}); limit {bound:.4f} "
                            f"({limits.max_ppl_increase:+.2%})"))
    if limits.max_ppl is not None:
        checks.append(Check("max_ppl", ppl, limits.max_ppl, ppl <= limits.max_ppl,
                            f"perplexity {ppl:.4f}; limit {limits.max_ppl:g}"))
    if limits.min_sparsity is not None and sparsity is not None:
        value, count, rule = sparsity
        checks.append(Check("min_sparsity", value, limits.min_sparsity, value >= limits.min_sparsity - 1e-12,
                            f"sparsity {value:.4f} over {count} {rule}; minimum {limits.min_sparsity:g}"))
    return checks


def verdict(baseline: dict | None, candidate: dict, limits: Limits, sparsity: tuple[float, int, str] | None,
            allow_mismatch: bool) -> Verdict:
    """Refuse incomparable results (unless allowed), then run every requested check."""
    diffs = mismatches(baseline, candidate) if baseline is not None else []
    if diffs and not allow_mismatch:
        raise UserError(f"baseline and candidate were evaluated differently ({'; '.join(diffs)}); evaluate both "
                        "with the same settings, or pass --allow-mismatch")
    checks = run_checks(baseline, candidate, limits, sparsity)
    return Verdict(all(c.passed for c in checks), checks, baseline, candidate, diffs)


def write_json(v: Verdict, path: Path) -> None:
    jsonio.dump(v.to_dict(), path)
