"""The report's layout: every kind of run writes a report its shipped JSON Schema accepts, the schema can fail,
and ``check`` reads reports of the layout before versioning (1) with a note instead of misreading them.

Runs use stories260K with tiny settings; the data-parallel one (torchrun, two gloo processes) is slow.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.errors import UserError
from taylorprune.export.save import REPORT_NAME
from taylorprune.report import schema

runner = CliRunner()
COMMON = ["--model", "demo", "--calib", "wikitext2-valid", "--nsamples", "16", "--seqlen", "128", "--eval",
          "--eval-seqlen", "128", "--max-windows", "4", "--device", "cpu"]
RECOVER = ["--recover-windows", "24", "--recover-steps", "4", "--recover-heldout", "4", "--recover-eval-every", "2"]
KINDS = {"structured": ["--structure", "neurons", "--structure-ratio", "0.3"],
         "unstructured": ["--method", "wanda", "--sparsity", "0.5"],
         "run --recover": ["--method", "wanda", "--sparsity", "0.5", "--recover", "distill", *RECOVER]}


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def report_of(folder: Path) -> dict:
    return json.loads((folder / REPORT_NAME).read_text())


def assert_valid(folder: Path) -> dict:
    report = report_of(folder)
    assert report["schema_version"] == schema.SCHEMA_VERSION == 2
    assert schema.problems(report) == []
    assert schema.layout(report) == 2
    return report


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """One unstructured run, shared: its report is checked, broken on purpose, and recovered from."""
    out = tmp_path_factory.mktemp("pruned") / "wanda"
    res = invoke("run", *COMMON, *KINDS["unstructured"], "--output", out)
    assert res.exit_code == 0, res.output
    return out


# ------------------------------------------------------------------------------------------- every kind of run


def test_the_shipped_schema_is_a_draft_2020_12_schema():
    from jsonschema import Draft202012Validator

    document = schema.load_schema()
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(document)
    assert schema.SCHEMA_FILE.is_relative_to(Path(schema.__file__).resolve().parents[1] / "assets")


def test_an_unstructured_report_follows_the_schema(pruned):
    report = assert_valid(pruned)
    assert isinstance(report["evaluation"]["perplexity"], dict) and report["metrics"]["perplexity"] > 0
    assert next(iter(report)) == "schema_version"


@pytest.mark.parametrize("kind", ["structured", "run --recover"])
def test_a_run_report_follows_the_schema(kind, tmp_path):
    res = invoke("run", *COMMON, *KINDS[kind], "--output", tmp_path / "o")
    assert res.exit_code == 0, res.output
    report = assert_valid(tmp_path / "o")
    assert ("structured" in report) == (kind == "structured")
    assert isinstance(report["recover"], dict) == (kind == "run --recover")


def test_a_recover_command_report_follows_the_schema(pruned, tmp_path):
    res = invoke("recover", *COMMON, "--model", pruned, "--teacher", "demo", *RECOVER, "--output", tmp_path / "r")
    assert res.exit_code == 0, res.output
    report = assert_valid(tmp_path / "r")
    assert report["recover"]["teacher"] == "demo" and report["pattern"] == "recovery only"


def test_a_zero_shot_report_follows_the_schema(tmp_path):
    pytest.importorskip("lm_eval")
    from .test_zeroshot import write_tasks

    tasks = write_tasks(tmp_path / "tasks")
    res = invoke("run", *COMMON, *KINDS["unstructured"], "--tasks", "stories_mc", "--tasks-path", tasks, "--output",
                 tmp_path / "z")
    assert res.exit_code == 0, res.output
    report = assert_valid(tmp_path / "z")
    assert "stories_mc" in report["evaluation"]["zeroshot"]["tasks"] and "zeroshot_average" in report["metrics"]


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Two gloo processes on the CPU, as tests/test_distributed.py launches them."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**env, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_a_data_parallel_report_follows_the_schema(tmp_path):
    res = torchrun("-m", "taylorprune", "run", *COMMON, *KINDS["unstructured"], "--output", str(tmp_path / "dp"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert assert_valid(tmp_path / "dp")["world_size"] == 2


# ------------------------------------------------------------------------------------------- the schema can fail


@pytest.mark.parametrize("path", [("linears",), ("schema_version",), ("metrics",), ("source", "model"),
                                  ("unstructured", "blocks"), ("evaluation", "perplexity", "windows")])
def test_a_report_missing_a_required_field_fails(pruned, path):
    report = copy.deepcopy(report_of(pruned))
    report["schema_version"] = 2
    record = report
    for key in path[:-1]:
        record = record[key]
    del record[path[-1]]
    found = schema.problems(report)
    assert found and any(f"'{path[-1]}' is a required property" in line for line in found), found
    with pytest.raises(UserError, match="not a layout-2 taylorprune report"):
        schema.validate(report, "r.json")


def test_wrong_types_and_the_older_layout_fail(pruned):
    report = copy.deepcopy(report_of(pruned))
    report["world_size"] = "2"
    assert any(line.startswith("world_size:") for line in schema.problems(report))
    older = legacy(report_of(pruned))
    assert schema.problems(older)  # a layout-1 report is not the current layout


def test_stage_records_may_carry_more_fields(pruned):
    """Other stages add fields as they grow (tokens_per_s, kept blocks): the schema names required keys only."""
    report = copy.deepcopy(report_of(pruned))
    report["unstructured"]["blocks"][0]["recon"] = {"steps": 3, "kept": True, "steps_per_s": 9.5}
    report["unstructured"]["new_field"] = [1, 2]
    report["evaluation"]["perplexity"]["new_field"] = "x"
    report["evaluation"]["other_evaluator"] = {"value": 1.0}
    report["recover"] = {"method": "distill", "teacher": "demo", "teacher_placement": "resident", "steps": 4,
                         "tokens_seen": 2048, "kl_before": 1.5, "kl_after": 1.4, "passes": 0.8, "tokens_per_s": 1e3}
    assert schema.problems(report) == []
    del report["recover"]["kl_after"]
    assert any("'kl_after' is a required property" in line for line in schema.problems(report))


# ------------------------------------------------------------------------------------------- layouts


def legacy(report: dict) -> dict:
    """``report`` as taylorprune wrote it before versioning: the perplexity record as the whole evaluation, no
    metrics and no schema_version (top-level blocks and placement, as then)."""
    old = {k: v for k, v in copy.deepcopy(report).items() if k not in ("schema_version", "metrics", "world_size")}
    old["evaluation"] = old["evaluation"]["perplexity"]
    old["blocks"] = old.pop("unstructured")["blocks"]
    old["placement"] = old["source"].pop("placement", None)
    return old


def test_layout_of_each_kind_of_report(pruned):
    report = report_of(pruned)
    assert schema.layout(report) == 2
    assert schema.layout(legacy(report)) == schema.LEGACY == 1
    unversioned = {k: v for k, v in report.items() if k != "schema_version"}
    assert schema.layout(unversioned) is None  # between the record change and versioning: read as it is
    assert schema.layout({"method": "wanda"}) is None
    with pytest.raises(UserError, match="layout 3, newer than this taylorprune reads"):
        schema.layout({**report, "schema_version": 3}, "r.json")
    with pytest.raises(UserError, match="not a layout version"):
        schema.layout({**report, "schema_version": "2"}, "r.json")


def test_check_reads_a_layout_1_report_with_a_note(pruned, tmp_path):
    report = report_of(pruned)
    ppl = report["metrics"]["perplexity"]
    old = tmp_path / "old" / REPORT_NAME
    old.parent.mkdir()
    old.write_text(json.dumps({**legacy(report), "evaluation": {**legacy(report)["evaluation"],
                                                                "perplexity": ppl * 1.02}}))
    res = invoke("check", "--candidate", pruned / REPORT_NAME, "--baseline", old, "--max-ppl-increase", "1%",
                 "--json", tmp_path / "v.json")
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"--baseline {old} is a report of layout 1 (before schema_version)" in notes[0]
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["baseline"]["metrics"]["perplexity"] == pytest.approx(ppl * 1.02)
    assert verdict["baseline"]["dataset"] == "wikitext2" and verdict["checks"][0]["value"] < 0
    res = invoke("check", "--candidate", old, "--max-ppl", str(ppl))  # the older number is read, and gated
    assert res.exit_code == 1 and "note: --candidate" in res.output, res.output
    res = invoke("check", "--candidate", pruned / REPORT_NAME, "--max-ppl", "1e9")
    assert res.exit_code == 0 and "note:" not in res.output, res.output


def test_check_refuses_a_report_of_a_newer_layout(pruned, tmp_path):
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**report_of(pruned), "schema_version": 3}))
    res = invoke("check", "--candidate", newer, "--max-ppl", "1e9")
    assert res.exit_code == 2 and "report of layout 3, newer than this taylorprune reads" in res.output, res.output
    assert "Traceback" not in res.output
