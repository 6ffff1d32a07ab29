"""Defaults are the measured best, or the README says why not: the README's table and the declarations agree.

The table "Defaults: the measured best, or why not" names each option, its default and the value measured best;
where those differ, its last column must give the reason. The test fails when a declared default drifts from the
table (someone changed one and not the other), and when scripts/bench_recover.py would measure its rows at other
recovery settings than the defaults (the recommended rows are what a user gets without flags).
"""

from __future__ import annotations

import re
from pathlib import Path

import typer

from taylorprune.cli import app
from taylorprune.pipeline.components import all_options

ROOT = Path(__file__).resolve().parents[1]
HEADING = "### Defaults: the measured best, or why not"


def _table() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    assert HEADING in text, "README lost its defaults table"
    rows = []
    for line in text.split(HEADING, 1)[1].splitlines():
        if line.startswith("### ") or line.startswith("## "):
            break
        if line.startswith("| `--"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _value(cell: str) -> object:
    text = cell.strip("`")
    if text == "none":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def declared_default(flag: str) -> object:
    """The default a user gets for ``flag``: the component declaration, else the CLI parameter of ``run``."""
    name = flag.removeprefix("--").replace("-", "_")
    options = all_options()
    if name in options:
        value = options[name].spec.default
    else:
        params = {p.opts[0]: p for p in typer.main.get_command(app).commands["run"].params}
        value = params[flag].default
    return value if value is None or isinstance(value, str) else float(value)


def drift(rows: list[list[str]], default_of=declared_default) -> list[str]:
    """What disagrees: a README default that is not the declared one, a non-best default without a reason."""
    bad = []
    for option, default, best, why in rows:
        flag = option.strip("`")
        if _value(default) != default_of(flag):
            bad.append(f"{flag}: README says {default}, declared {default_of(flag)!r}")
        if _value(best) != _value(default) and why.strip() in ("", "—"):
            bad.append(f"{flag}: default {default} is not the measured best {best}, and no reason is given")
    return bad


def test_readme_defaults_match_the_declarations_and_every_difference_has_a_reason():
    rows = _table()
    assert len(rows) >= 10
    assert drift(rows) == []


def test_the_recovery_benchmark_runs_at_the_recovery_defaults():
    text = (ROOT / "scripts" / "bench_recover.py").read_text()
    flags = dict(re.findall(r'"(--recover-[a-z-]+)", "([^"]+)"', text.split("RECOVER = ", 1)[1].split("\n", 1)[0]))
    lr = float(re.search(r"^LR = ([0-9.e-]+)", text, re.M).group(1))
    assert lr == declared_default("--recover-lr")
    for flag, value in flags.items():
        if flag == "--recover-windows":  # every window of WikiText-2 validation at 512 tokens: the default, all
            assert declared_default(flag) is None
        else:
            assert float(value) == declared_default(flag), flag


def test_a_drifted_default_and_a_missing_reason_are_seen():
    rows = [["`--recover-lr`", "`5e-4`", "`5e-4`", "—"], ["`--recon-steps`", "`25`", "`100`", "—"]]
    bad = drift(rows, {"--recover-lr": 1e-4, "--recon-steps": 25.0}.get)
    assert bad == ["--recover-lr: README says `5e-4`, declared 0.0001",
                   "--recon-steps: default `25` is not the measured best `100`, and no reason is given"]
