"""Zero-shot (or few-shot) accuracy through lm-evaluation-harness on the model in memory (``--tasks``).

lm-eval's ``HFLM`` wraps our model and tokenizer as they are (no write and reload) and ``simple_evaluate`` runs
the tasks. Task names are lm-eval's (``boolq``, ``arc_easy``...), a preset names a paper's set, ``--tasks-path DIR``
adds local task YAMLs (offline use: their ``data_files`` point at local files), and the bundled
``wikitext_lastword`` task (LAMBADA-style last-word accuracy on WikiText-2 test paragraphs, ``assets/tasks``)
needs no download. Papers report acc or acc_norm per task inconsistently (a 7-task average moves by ~4.5 points
between the two), so every task here has one fixed metric, recorded beside its value: a preset's own, else
``acc`` (a task can name another: ``--tasks piqa:acc_norm``). lm-eval is an optional dependency
(``pip install "taylorprune[eval]"``); asking for tasks without it is a one-line error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from taylorprune.errors import UserError
from taylorprune.evaluate.spec import EvalContext, Evaluator
from taylorprune.options import Options, option

INSTALL = 'pip install "taylorprune[eval]"'
# The papers' 7 tasks with the metric each is reported by here: Wanda / SparseGPT / GBLM-Pruner (with RTE) and
# the LLM-Pruner family (PIQA instead of RTE); acc_norm where length normalisation is the tasks' usual reading.
PRESETS = {
    "paper7": {"boolq": "acc", "rte": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
               "arc_challenge": "acc_norm", "openbookqa": "acc_norm"},
    "llmpruner7": {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
                   "arc_challenge": "acc_norm", "openbookqa": "acc_norm"},
}
LASTWORD = "wikitext_lastword"


@dataclass(frozen=True)
class ZeroShotOptions(Options):
    tasks: str | None = option(None, f"Zero-shot tasks through lm-eval, comma-separated (TASK or TASK:METRIC), or a "
                               f"preset: {', '.join(PRESETS)} (the papers' 7 tasks); {LASTWORD} is bundled and "
                               f"offline. Needs {INSTALL}.")
    num_fewshot: int = option(0, "Few-shot examples per task prompt (0: zero-shot).", minimum=0)
    limit: int | None = option(None, "Evaluate at most this many examples per task.", minimum=1)
    tasks_batch_size: int = option(1, "Requests per forward in lm-eval.", minimum=1, identity=False)
    tasks_path: str | None = option(None, "Folder of local lm-eval task YAMLs (offline data files).")

    def check(self) -> None:
        if self.tasks_path and not Path(self.tasks_path).expanduser().is_dir():
            raise UserError(f"--tasks-path {self.tasks_path}: no such folder")


def requested(text: str) -> dict[str, str]:
    """{task: metric} of ``--tasks`` (presets expanded; a task's own metric after a colon, else acc)."""
    out: dict[str, str] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in PRESETS:
            out.update(PRESETS[item])
            continue
        task, _, metric = item.partition(":")
        out[task.strip()] = metric.strip() or "acc"
    if not out:
        raise UserError(f"--tasks {text!r}: name at least one task or a preset ({', '.join(PRESETS)})")
    return out


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"--tasks needs lm-evaluation-harness, an optional dependency: {INSTALL}") from None
    return lm_eval, HFLM, TaskManager


def _check(options: ZeroShotOptions, config) -> None:
    if options.tasks:
        requested(options.tasks)
        _lm_eval()


def bundled_tasks(folder: Path) -> Path:
    """The bundled task YAMLs written into ``folder`` with absolute paths to their data (lm-eval reads a task's
    ``data_files`` relative to the working directory, not to the YAML)."""
    assets = resources.files("taylorprune") / "assets" / "tasks"
    for entry in assets.iterdir():
        if entry.name.endswith(".yaml"):
            data = str(Path(str(assets / entry.name.replace(".yaml", ".jsonl"))))
            (folder / entry.name).write_text(entry.read_text().replace("{data}", data))
    return folder


def _manager(task_manager, names: list[str], paths: list[str]):
    """A TaskManager over the local folders alone when they hold every task (no 7 s index of lm-eval's own)."""
    with _quiet():
        local = task_manager(include_path=paths, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
        full = task_manager(include_path=paths)
    unknown = [n for n in names if n not in full.all_tasks]
    if unknown:
        raise UserError(f"--tasks {unknown[0]}: lm-eval knows no such task (nor does --tasks-path); see `lm-eval ls "
                        "tasks`")
    return full


@contextlib.contextmanager
def _quiet():
    """lm-eval logs every task it indexes and draws progress bars of its own; the run's progress says enough."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def run(ctx: EvalContext, options: ZeroShotOptions, prepared) -> dict:
    lm_eval, hflm, task_manager = _lm_eval()
    wanted = requested(options.tasks)
    if ctx.placement is not None and ctx.placement.stream:
        ctx.events.append("zeroshot:cpu")  # lm-eval runs the whole model: a streamed one stays where it is
    elif not getattr(ctx.model, "hf_device_map", None):
        ctx.model.to(ctx.device)
    with tempfile.TemporaryDirectory(prefix="taylorprune-tasks-") as tmp:
        paths = [str(bundled_tasks(Path(tmp)))] + ([str(Path(options.tasks_path).expanduser())]
                                                    if options.tasks_path else [])
        manager = _manager(task_manager, list(wanted), paths)
        with _quiet():
            lm = hflm(pretrained=ctx.model, tokenizer=ctx.tokenizer, batch_size=options.tasks_batch_size)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(wanted), num_fewshot=options.num_fewshot,
                                          limit=options.limit, task_manager=manager, bootstrap_iters=1000,
                                          log_samples=False, random_seed=0, numpy_random_seed=0,
                                          torch_random_seed=0, fewshot_random_seed=0)
    return record(out, wanted, options, lm_eval.__version__)


def record(out: dict, wanted: dict[str, str], options: ZeroShotOptions, version: str) -> dict:
    """The report's record: per task the fixed metric, its value and stderr and the examples counted."""
    tasks = {}
    for task, metric in wanted.items():
        result = out["results"].get(task, {})
        if f"{metric},none" not in result:
            have = sorted({k.split(",")[0] for k in result if "_stderr" not in k and k != "alias"})
            raise UserError(f"--tasks {task}: lm-eval reports no {metric} for it (it has: {', '.join(have)}); "
                            f"name one as {task}:METRIC")
        samples = (out.get("n-samples") or {}).get(task, {})
        stderr = result.get(f"{metric}_stderr,none")
        tasks[task] = {"metric": metric, "value": float(result[f"{metric},none"]),
                       "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                       "examples": samples.get("effective")}
    average = sum(t["value"] for t in tasks.values()) / len(tasks)
    return {"tasks": tasks, "average": average, "task_list": ",".join(f"{t}:{m}" for t, m in wanted.items()),
            "num_fewshot": options.num_fewshot, "limit": options.limit, "lm_eval": version}


def _metrics(r: dict) -> dict[str, float]:
    return {"zeroshot_average": r["average"], **{f"zeroshot.{t}": v["value"] for t, v in r["tasks"].items()}}


def _rows(r: dict) -> list[tuple[str, str]]:
    rows = []
    for task, v in r["tasks"].items():
        spread = f" ± {v['stderr']:.4f}" if v["stderr"] is not None else ""
        rows.append((f"{task} ({v['metric']}, {v['examples']} examples)", f"{v['value']:.4f}{spread}"))
    if len(r["tasks"]) > 1:
        rows.append((f"zero-shot average ({len(r['tasks'])} tasks)", f"{r['average']:.4f}"))
    return rows


EVALUATOR = Evaluator("zeroshot", "accuracy on lm-eval tasks (zero- or few-shot)", run, metrics=_metrics,
                      options=ZeroShotOptions, switch="tasks", check=_check, higher_is_better=True,
                      settings=("task_list", "num_fewshot", "limit"), label="zero-shot tasks (lm-eval)", rows=_rows)
