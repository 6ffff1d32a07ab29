"""Where ``check`` gets its two sides: result files read as they are, models (folders, GGUF files) evaluated now.

Files are read first, so a model whose evaluation could never match the file it is compared with is refused
before minutes of evaluation rather than after. ``--min-sparsity`` reads the candidate's weights themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from taylorprune.errors import UserError
from taylorprune.evaluate.perplexity import EVALUATOR, PerplexityOptions, short_options
from taylorprune.export.save import REPORT_NAME
from taylorprune.modeling import loading
from taylorprune.pipeline import Hooks, evaluate_model, resolve_device
from taylorprune.report import weights
from taylorprune.report.check import read_result, side
from taylorprune.report.inspect_folder import read_report


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate a side given as a model (the options of ``taylorprune eval``)."""

    dataset: str | None = None
    text_file: str | None = None
    seqlen: int | None = None
    max_windows: int | None = None
    device: str = "auto"
    dtype: str = "auto"

    def perplexity(self) -> PerplexityOptions:
        return short_options(self.dataset, self.text_file, self.seqlen, self.max_windows)


def is_model(path: Path) -> bool:
    """A side that is evaluated now: a model folder or a GGUF file."""
    return path.is_dir() or path.suffix == ".gguf"


def existing(text: str, flag: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {text}: no such file or folder")
    return path


def validate_eval_settings(settings: EvalSettings) -> None:
    settings.perplexity()
    resolve_device(settings.device)
    loading.torch_dtype(settings.dtype)


def evaluate_folder(path: Path, settings: EvalSettings, hooks: Hooks | None = None, flag: str = "--candidate") -> dict:
    """Load the model and measure it exactly as ``taylorprune eval`` would."""
    device = resolve_device(settings.device)
    hooks = hooks or Hooks()
    hooks.current = f"loading {flag} {path}"
    try:
        loaded = loading.load(str(path), settings.dtype)
    except UserError as exc:  # loading speaks of --model; here the model came in as --baseline/--candidate
        raise UserError(str(exc).replace(f"--model {path}", f"{flag} {path}", 1)) from None
    hooks.current = f"evaluating {flag} {path}"
    records = evaluate_model(loaded.model, loaded.tokenizer, str(path), [(EVALUATOR, settings.perplexity())], device,
                             hooks)
    return side(records, str(path))


def load_sides(base_path: Path | None, cand_path: Path, settings: EvalSettings, allow_mismatch: bool,
               make_hooks: Callable[[], Hooks] | None = None,
               note: Callable[[str], None] | None = None) -> tuple[dict | None, dict]:
    """(baseline, candidate): files are read first (see the module doc); ``note`` hears how older reports were
    read."""
    sides = {"--baseline": base_path, "--candidate": cand_path}
    loaded = {flag: read_result(p, flag, note) for flag, p in sides.items() if p is not None and not is_model(p)}
    models = [flag for flag, p in sides.items() if p is not None and is_model(p)]
    if models and loaded and not allow_mismatch:
        planned = {"dataset": Path(settings.text_file).name if settings.text_file else settings.dataset or "wikitext2"}
        if settings.seqlen is not None:
            planned["seqlen"] = settings.seqlen
        known = next(iter(loaded.values()))
        diffs = [f"{k}: {known.get(k)!r} in the file vs {v!r} from the eval options" for k, v in planned.items()
                 if known.get(k) != v]
        if diffs:
            raise UserError(f"{models[0]} would be evaluated differently from the result it is compared with "
                            f"({'; '.join(diffs)}); set --dataset/--text-file/--seqlen/--max-windows to match, "
                            "or pass --allow-mismatch")
    for flag in models:
        loaded[flag] = evaluate_folder(sides[flag], settings, make_hooks() if make_hooks else None, flag)
    return loaded.get("--baseline"), loaded["--candidate"]


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
    report = read_report(folder)
    listed = (report or {}).get("linears") or []
    if not isinstance(listed, list) or not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in listed):
        raise UserError(f"--candidate {folder / REPORT_NAME}: its 'linears' is not a list of linears; the report is "
                        "damaged (remove it to read the weights by the block rule)")
    names = [f"{lin['name']}.weight" for lin in listed]
    rows = weights.scan(folder, names or None, candidates=(), flag="--candidate")
    rule = "linears listed in its report" if names else "2-D weights inside decoder blocks"
    return weights.total(rows)[2], len(rows), rule
