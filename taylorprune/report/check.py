"""``taylorprune check``: a CI gate comparing a candidate's metrics (and sparsity) with a baseline.

Results come from ``taylorprune eval --json`` files, from a folder's ``taylorprune_report.json`` (its
``evaluation``), or from a model folder or GGUF file evaluated on the spot. Each side becomes its evaluators'
records and their flat metrics (``perplexity``, ``prefill_ratio``, ...), so any metric an evaluator declares can
be gated: ``--max-increase METRIC=V`` (lower is better) and ``--max-drop METRIC=V`` (higher is better), V a
percentage of the baseline (``5%``) or an absolute amount (``0.01``); ``--max-ppl-increase`` and ``--max-ppl`` are
the perplexity forms. Two results are only comparable when their evaluators measured them the same way (each
evaluator names the settings that must agree), so differing settings are refused unless explicitly allowed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from taylorprune.errors import UserError
from taylorprune.evaluate.registry import EVALUATORS
from taylorprune.report import jsonio, schema

REQUIRED = {"perplexity": (int, float), "dataset": (str,), "seqlen": (int,), "windows": (int,), "tokens": (int,)}
KINDS = ("increase", "drop", "max")
Note = Callable[[str], None]


@dataclass(frozen=True)
class Gate:
    """One limit on a metric: ``increase``/``drop`` against the baseline (``relative``: a fraction of it, else an
    absolute amount), or ``max``, an absolute ceiling on the candidate."""

    name: str
    metric: str
    kind: str
    limit: float
    relative: bool = True

    @property
    def needs_baseline(self) -> bool:
        return self.kind != "max"


@dataclass(frozen=True)
class Check:
    """One gate's outcome: ``value`` compared with ``limit``; ``detail`` is the human sentence behind it."""

    name: str
    value: float | None
    limit: float
    passed: bool
    detail: str
    relative: bool = False  # value and limit are fractions of the baseline


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


def parse_amount(text: str, flag: str) -> tuple[float, bool]:
    """'5%' → (0.05, relative) and '0.05' → (0.05, absolute); finite and non-negative."""
    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        raise UserError(f"{flag} {text}: expected a percentage (5%) or an amount (0.05)") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{flag} {text}: must be a finite, non-negative amount")
    return (value / 100 if percent else value), percent


def parse_increase(text: str) -> float:
    """``--max-ppl-increase``: '5%' -> 0.05 and '0.05' -> 0.05 (a ratio: candidate ppl <= baseline × (1 + x))."""
    try:
        return parse_amount(text, "--max-ppl-increase")[0]
    except UserError as exc:
        raise UserError(str(exc).replace("a percentage (5%) or an amount (0.05)",
                                         "a ratio (0.05) or a percentage (5%)")) from None


def parse_gate(text: str, kind: str, flag: str) -> Gate:
    """``METRIC=V`` of ``--max-increase`` / ``--max-drop``."""
    metric, sep, amount = text.partition("=")
    if not sep or not metric.strip():
        raise UserError(f"{flag} {text}: expected METRIC=AMOUNT, e.g. perplexity=5% or zeroshot_average=0.01")
    value, relative = parse_amount(amount, flag)
    return Gate(f"{metric.strip()}_{kind}", metric.strip(), kind, value, relative)


def legacy_gates(max_ppl_increase: str | None, max_ppl: float | None) -> list[Gate]:
    gates = []
    if max_ppl_increase is not None:
        gates.append(Gate("ppl_increase", "perplexity", "increase", parse_increase(max_ppl_increase)))
    if max_ppl is not None:
        if not (math.isfinite(max_ppl) and max_ppl > 0):
            raise UserError(f"--max-ppl {max_ppl}: must be a positive number")
        gates.append(Gate("max_ppl", "perplexity", "max", max_ppl, relative=False))
    return gates


def validate_gates(gates: list[Gate], min_sparsity: float | None, has_baseline: bool) -> None:
    """A gate without any limit would pass everything; a relative limit needs something to be relative to."""
    if not gates and min_sparsity is None:
        raise UserError("nothing to check: give --max-ppl-increase, --max-ppl, --max-increase, --max-drop and/or "
                        "--min-sparsity")
    for gate in gates:
        if gate.needs_baseline and not has_baseline:
            flag = "--max-ppl-increase" if gate.name == "ppl_increase" else f"--max-{gate.kind}"
            raise UserError(f"{flag} needs --baseline")
    if min_sparsity is not None and not 0.0 <= min_sparsity <= 1.0:
        raise UserError(f"--min-sparsity {min_sparsity}: must be between 0 and 1")


def side(records: dict[str, dict], source: str) -> dict:
    """One side of a comparison: the perplexity record's fields (as ``eval --json`` writes them), every
    evaluator's record and the flat metrics."""
    found = {}
    for name, record in records.items():
        if name in EVALUATORS:
            found.update(EVALUATORS[name].metrics(record))
    return {**records.get("perplexity", {}), "evaluation": records, "metrics": found, "source": source}


def _records(data: dict, flag: str, path: Path, note: Note | None = None) -> dict[str, dict]:
    """The evaluator records of an ``eval --json`` file or a report (layout 1: one perplexity record)."""
    if "perplexity" not in data and "evaluation" in data:  # a report
        if schema.layout(data, f"{flag} {path}") == schema.LEGACY and note is not None:
            note(f"{flag} {path} is a report of layout {schema.LEGACY} (before schema_version); read as such")
        evaluation = data["evaluation"]
        if not evaluation:
            raise UserError(f"{flag} {path}: the report has no evaluation; prune with --eval, or pass the model "
                            "folder to evaluate it now")
        if not isinstance(evaluation, dict):
            raise UserError(f"{flag} {path}: the report's evaluation is not a JSON object")
        return evaluation if "perplexity" not in evaluation or isinstance(evaluation["perplexity"], dict) else {
            "perplexity": evaluation}
    return data.get("evaluation") if isinstance(data.get("evaluation"), dict) else {"perplexity": data}


def read_result(path: Path, flag: str, note: Note | None = None) -> dict:
    """An evaluation from an ``eval --json`` file or a report, validated; ``note`` hears how an older report was
    read (the caller decides where such lines go)."""
    what = (f"a {flag} is an `eval --json` file, a taylorprune_report.json, a model folder or a .gguf file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{flag} {path}: not valid JSON ({exc.msg} at line {exc.lineno}); {what}") from None
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path}: not a JSON text file; {what}") from None
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: expected a JSON object as written by `taylorprune eval --json`")
    records = _records(data, flag, path, note)
    if "perplexity" in records:
        _check_perplexity(records["perplexity"], flag, path)
    return side(records, str(path))


def _check_perplexity(record: dict, flag: str, path: Path) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{flag} {path}: its perplexity record is not a JSON object")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise UserError(f"{flag} {path}: not an eval result (missing {', '.join(missing)}); write one with "
                        "`taylorprune eval --json`")
    for key, types in REQUIRED.items():
        if isinstance(record[key], bool) or not isinstance(record[key], types):
            raise UserError(f"{flag} {path}: field {key!r} has the wrong type ({type(record[key]).__name__})")


def mismatches(baseline: dict, candidate: dict) -> list[str]:
    """'field: baseline vs candidate' for every setting of an evaluator both sides have that differs."""
    diffs = []
    for name, record in baseline["evaluation"].items():
        other = candidate["evaluation"].get(name)
        if name in EVALUATORS and isinstance(other, dict):
            diffs += EVALUATORS[name].comparable(record, other)
    return diffs


def _metric(result: dict, metric: str, flag: str) -> float:
    value = result["metrics"].get(metric)
    if not isinstance(value, int | float) or isinstance(value, bool):
        have = ", ".join(sorted(result["metrics"])) or "none"
        raise UserError(f"{flag} {result['source']} has no metric {metric} (it has: {have})")
    return float(value) if value is not None else math.nan


def _shown(value: float, relative: bool) -> str:
    return f"{value:+.2%}" if relative else f"{value:+.4g}"


def run_gate(gate: Gate, baseline: dict | None, candidate: dict) -> Check:
    cand = _metric(candidate, gate.metric, "--candidate")
    if gate.kind == "max":
        return Check(gate.name, cand, gate.limit, cand <= gate.limit,
                     f"{gate.metric} {cand:.4f}; limit {gate.limit:g}")
    base = _metric(baseline, gate.metric, "--baseline")
    if gate.relative and not (math.isfinite(base) and base > 0):
        raise UserError(f"--baseline {gate.metric} is {base}; a relative limit needs a finite, positive baseline")
    sign = 1.0 if gate.kind == "increase" else -1.0
    change = sign * (cand - base) / (base if gate.relative else 1.0)
    change = change if math.isfinite(change) else math.inf
    bound = base + sign * gate.limit * (base if gate.relative else 1.0)
    passed = change <= gate.limit
    word = "rise" if gate.kind == "increase" else "drop"
    return Check(gate.name, change, gate.limit, passed,
                 f"{gate.metric} {cand:.4f} vs baseline {base:.4f} ({word} {_shown(change, gate.relative)}); limit "
                 f"{bound:.4f} ({_shown(gate.limit, gate.relative)})", gate.relative)


def sparsity_check(sparsity: tuple[float, int, str], minimum: float) -> Check:
    value, count, rule = sparsity
    return Check("min_sparsity", value, minimum, value >= minimum - 1e-12,
                 f"sparsity {value:.4f} over {count} {rule}; minimum {minimum:g}")


def verdict(baseline: dict | None, candidate: dict, gates: list[Gate], sparsity: tuple[float, int, str] | None,
            min_sparsity: float | None, allow_mismatch: bool) -> Verdict:
    """Refuse incomparable results (unless allowed), then run every requested check."""
    diffs = mismatches(baseline, candidate) if baseline is not None else []
    if diffs and not allow_mismatch:
        raise UserError(f"baseline and candidate were evaluated differently ({'; '.join(diffs)}); evaluate both "
                        "with the same settings, or pass --allow-mismatch")
    checks = [run_gate(g, baseline, candidate) for g in gates]
    if min_sparsity is not None and sparsity is not None:
        checks.append(sparsity_check(sparsity, min_sparsity))
    return Verdict(all(c.passed for c in checks), checks, baseline, candidate, diffs)


def write_json(v: Verdict, path: Path) -> None:
    jsonio.dump(v.to_dict(), path)
