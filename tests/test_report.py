"""check / inspect / sweep through the CLI on the real stories260K, plus the per-layer sparsity plot."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.export.plots import plot_layer_sparsity

from .conftest import TEST_TEXT, VALID

runner = CliRunner()
CALIB = ["--calib-file", VALID, "--calib-sampling", "sequential", "--nsamples", "4", "--seqlen", "64"]
EVAL = ["--text-file", TEST_TEXT, "--seqlen", "64", "--max-windows", "3"]  # as `eval` / `check` spell them
RUN_EVAL = ["--eval", "--eval-text-file", TEST_TEXT, "--eval-seqlen", "64", "--max-windows", "3"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res) -> str:
    """The whole output of a refused command: exactly one non-empty line, no traceback."""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, stories_dir) -> dict[str, Path]:
    """Pruned stories260K folders (evaluated with EVAL's settings) and the dense model's eval JSON."""
    base = tmp_path_factory.mktemp("report")
    runs = {"s50": ["--method", "wanda", "--sparsity", "0.5", *CALIB],
            "nm24": ["--method", "magnitude", "--pattern", "2:4"]}
    for name, args in runs.items():
        res = invoke("run", "--model", stories_dir, *args, *RUN_EVAL, "--output", base / name)
        assert res.exit_code == 0, res.output
    res = invoke("eval", "--model", stories_dir, *EVAL, "--json", base / "dense.json")
    assert res.exit_code == 0, res.output
    return {"s50": base / "s50", "nm24": base / "nm24", "dense_json": base / "dense.json", "dense": stories_dir}


def eval_json(path: Path, perplexity: float, **overrides) -> Path:
    data = {"perplexity": perplexity, "dataset": "wikitext2", "seqlen": 128, "windows": 3, "tokens": 384,
            "model": str(path.stem), **overrides}
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------------------------- check


@pytest.mark.parametrize("tolerance", ["5%", "0.05"])
def test_check_passes_within_tolerance(tmp_path, tolerance):
    base, cand = eval_json(tmp_path / "b.json", 10.0), eval_json(tmp_path / "c.json", 10.49)
    res = invoke("check", "--baseline", base, "--candidate", cand, "--max-ppl-increase", tolerance,
                 "--json", tmp_path / "v.json")
    assert res.exit_code == 0, res.output
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["passed"] is True and verdict["mismatch"] == []
    [c] = verdict["checks"]
    assert c["name"] == "ppl_increase" and c["passed"] and c["limit"] == pytest.approx(0.05)
    assert c["value"] == pytest.approx(0.049)
    assert verdict["baseline"]["perplexity"] == 10.0 and verdict["candidate"]["perplexity"] == 10.49


def test_check_regression_exits_1_and_still_writes_json_and_junit(tmp_path):
    base, cand = eval_json(tmp_path / "b.json", 10.0), eval_json(tmp_path / "c.json", 11.0)
    res = invoke("check", "--baseline", base, "--candidate", cand, "--max-ppl-increase", "5%", "--max-ppl", "10.8",
                 "--json", tmp_path / "v.json", "--junit", tmp_path / "j.xml")
    assert res.exit_code == 1, res.output
    assert "regression" in res.output and "Traceback" not in res.output
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["passed"] is False
    assert [(c["name"], c["passed"]) for c in verdict["checks"]] == [("ppl_increase", False), ("max_ppl", False)]
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "2" and suite.get("failures") == "2"
    assert len(suite.findall("testcase/failure")) == 2


def test_check_absolute_limit_alone_needs_no_baseline(tmp_path):
    cand = eval_json(tmp_path / "c.json", 11.0)
    assert invoke("check", "--candidate", cand, "--max-ppl", "12").exit_code == 0
    assert invoke("check", "--candidate", cand, "--max-ppl", "10").exit_code == 1


def test_check_refuses_mismatched_settings_unless_allowed(tmp_path):
    base = eval_json(tmp_path / "b.json", 10.0, seqlen=128, tokens=384)
    cand = eval_json(tmp_path / "c.json", 10.1, seqlen=64, tokens=192)
    line = one_line_error(invoke("check", "--baseline", base, "--candidate", cand, "--max-ppl-increase", "5%"))
    assert "seqlen: 128 vs 64" in line and "tokens: 384 vs 192" in line and "--allow-mismatch" in line
    assert "dataset" not in line and "windows" not in line
    res = invoke("check", "--baseline", base, "--candidate", cand, "--max-ppl-increase", "5%", "--allow-mismatch",
                 "--json", tmp_path / "v.json")
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "v.json").read_text())["mismatch"]) == 2


@pytest.mark.parametrize(
    "content,needle",
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"), ('{"perplexity": 3.0}', "missing"),
     ('{"perplexity": "x", "dataset": "d", "seqlen": 1, "windows": 1, "tokens": 1}', "wrong type"),
     ('{"method": "wanda", "evaluation": null}', "no evaluation")],
)
def test_check_malformed_input_is_one_line_exit_2(tmp_path, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    base = eval_json(tmp_path / "b.json", 10.0)
    line = one_line_error(invoke("check", "--baseline", base, "--candidate", bad, "--max-ppl-increase", "5%"))
    assert needle in line and "--candidate" in line


@pytest.mark.parametrize(
    "args,needle",
    [(["--candidate", "/nonexistent/c.json", "--max-ppl", "5"], "no such file"),
     (["--candidate", "{c}", "--max-ppl-increase", "5%"], "needs --baseline"),
     (["--candidate", "{c}"], "nothing to check"),
     (["--candidate", "{c}", "--baseline", "{c}", "--max-ppl-increase", "lots"], "ratio"),
     (["--candidate", "{c}", "--baseline", "{c}", "--max-ppl-increase", "-5%"], "non-negative"),
     (["--candidate", "{c}", "--min-sparsity", "0.5"], "must be a model folder"),
     (["--candidate", "{c}", "--min-sparsity", "1.5"], "between 0 and 1")],
)
def test_check_usage_errors_are_one_line_exit_2(tmp_path, args, needle):
    cand = eval_json(tmp_path / "c.json", 10.0)
    line = one_line_error(invoke("check", *[a.format(c=cand) for a in args]))
    assert needle in line


def test_check_folder_that_is_not_a_model_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_line_error(invoke("check", "--candidate", tmp_path / "empty", "--max-ppl", "5"))
    assert line.startswith("error: --candidate") and "config.json" in line


def test_check_real_results_and_junit(folders, tmp_path):
    """Report file as candidate: the weights beside it give --min-sparsity; one failing check of three."""
    res = invoke("check", "--baseline", folders["dense_json"], "--candidate",
                 folders["s50"] / "taylorprune_report.json", "--max-ppl-increase", "1%", "--max-ppl", "1e6",
                 "--min-sparsity", "0.5", "--junit", tmp_path / "j.xml", "--json", tmp_path / "v.json")
    assert res.exit_code == 1, res.output
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert (suite.get("tests"), suite.get("failures")) == ("3", "1")
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["ppl_increase"]
    checks = {c["name"]: c for c in json.loads((tmp_path / "v.json").read_text())["checks"]}
    assert checks["min_sparsity"]["value"] == pytest.approx(0.5) and checks["min_sparsity"]["passed"]
    generous = invoke("check", "--baseline", folders["dense_json"], "--candidate",
                      folders["s50"] / "taylorprune_report.json", "--max-ppl-increase", "1000%")
    assert generous.exit_code == 0, generous.output


@pytest.mark.slow
def test_check_min_sparsity_reads_the_weights(folders, tmp_path):
    """Folders are evaluated with the eval options; sparsity comes from the safetensors, not the report."""
    copy = tmp_path / "s50-copy"
    shutil.copytree(folders["s50"], copy)
    report = json.loads((copy / "taylorprune_report.json").read_text())
    report["achieved_sparsity"] = 0.99
    (copy / "taylorprune_report.json").write_text(json.dumps(report))
    ok = invoke("check", "--baseline", folders["dense"], "--candidate", copy, *EVAL, "--max-ppl-increase", "1000%",
                "--min-sparsity", "0.5", "--json", tmp_path / "v.json")
    assert ok.exit_code == 0, ok.output
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["checks"][1]["value"] == pytest.approx(0.5)
    assert verdict["baseline"]["tokenizer"] == verdict["candidate"]["tokenizer"]
    too_high = invoke("check", "--candidate", copy, *EVAL, "--min-sparsity", "0.6")
    assert too_high.exit_code == 1 and "sparsity 0.5000" in too_high.output
    (copy / "taylorprune_report.json").unlink()  # now the block rule picks the linears: same 35 tensors
    assert invoke("check", "--candidate", copy, *EVAL, "--min-sparsity", "0.5").exit_code == 0
    dense = invoke("check", "--candidate", folders["dense"], *EVAL, "--min-sparsity", "0.1")
    assert dense.exit_code == 1 and "sparsity 0.0000" in dense.output


def test_check_refuses_folder_that_cannot_match_a_file_before_evaluating(folders):
    line = one_line_error(invoke("check", "--baseline", folders["dense_json"], "--candidate", folders["s50"],
                                 "--max-ppl-increase", "5%"))  # default --dataset wikitext2 vs the text file
    assert "evaluated differently" in line and "dataset" in line


# ---------------------------------------------------------------------------------------------- inspect


def inspect_json(folder: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{folder.name}.json"
    res = invoke("inspect", folder, "--json", out)
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def test_inspect_unstructured_folder(folders, tmp_path):
    info = inspect_json(folders["s50"], tmp_path)
    assert info["total"]["linears"] == 35 and info["total"]["sparsity"] == 0.5
    assert all(r["sparsity"] == 0.5 for r in info["linears"])
    assert "2:4" not in info["nm_patterns"]
    assert not any(r["name"].startswith(("lm_head", "model.embed")) or "norm" in r["name"] for r in info["linears"])
    rep = info["report"]
    assert rep["method"] == "wanda" and rep["matches_weights"] is True and rep["evaluation"]["windows"] == 3


def test_inspect_nm_folder_detects_2_4(folders, tmp_path):
    info = inspect_json(folders["nm24"], tmp_path)
    assert info["total"]["sparsity"] == 0.5
    assert "2:4" in info["nm_patterns"] and "4:8" in info["nm_patterns"] and "1:2" not in info["nm_patterns"]
    assert all("2:4" in r["nm"] for r in info["linears"])
    res = invoke("inspect", folders["nm24"])
    assert res.exit_code == 0 and "2:4" in res.output and "magnitude" in res.output


def test_inspect_dense_folder_without_report(folders, tmp_path):
    info = inspect_json(folders["dense"], tmp_path)
    assert info["total"]["sparsity"] == 0.0 and info["nm_patterns"] == [] and info["report"] is None


def test_inspect_refuses_missing_or_weightless_folders(tmp_path):
    assert "no such folder" in one_line_error(invoke("inspect", tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    assert "no weights of any output format" in one_line_error(invoke("inspect", tmp_path))


# ------------------------------------------------------------------------------------------------ sweep

SWEEP_EVAL = ["--eval-text-file", TEST_TEXT, "--eval-seqlen", "64", "--max-windows", "2"]


@pytest.mark.slow
def test_sweep_writes_results_table_and_plot(stories_dir, tmp_path):
    import matplotlib.image

    out = tmp_path / "sweep"
    res = invoke("sweep", "--model", stories_dir, "--methods", "magnitude,wanda", "--sparsities", "0.3,0.5", *CALIB,
                 *SWEEP_EVAL, "--out", out)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [("magnitude", 0.3), ("magnitude", 0.5), ("wanda", 0.3),
                                                            ("wanda", 0.5)]
    assert all(r["pattern"] == "unstructured" and r["perplexity"] > 1 and r["model_dir"] is None for r in rows)
    assert [r["achieved_sparsity"] for r in rows if r["sparsity"] == 0.5] == [0.5, 0.5]
    dense = results["dense"]
    assert dense["method"] == "dense" and dense["achieved_sparsity"] == 0.0
    assert all(r["perplexity"] > dense["perplexity"] for r in rows)
    assert results["evaluation"] == {"dataset": TEST_TEXT.name, "seqlen": 64, "windows": 2, "tokens": 128}
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 1 + 4 + 1  # header, separator, four points, dense
    png = out / "ppl_vs_sparsity.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not (out / "models").exists() and not (out / ".sweep-cache").exists()
    again = invoke("sweep", "--model", stories_dir, "--methods", "magnitude", "--sparsities", "0.5", *SWEEP_EVAL,
                   "--out", out)
    assert "--overwrite" in one_line_error(again)


@pytest.mark.slow
def test_sweep_reuses_gradients_and_keeps_models(stories_dir, tmp_path):
    out = tmp_path / "sweep"
    res = invoke("sweep", "--model", stories_dir, "--methods", "gblm", "--sparsities", "0.5",
                 "--patterns", "unstructured,2:4", *CALIB, *SWEEP_EVAL, "--out", out, "--keep-models")
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["name"], r["cache_hits"]) for r in rows] == [("gblm_s0.5", []), ("gblm_2of4", ["grad_cache"])]
    assert not (out / ".sweep-cache").exists()
    kept = out / "models" / "gblm_2of4"
    assert rows[1]["model_dir"] == str(kept)
    info = inspect_json(kept, tmp_path)
    assert "2:4" in info["nm_patterns"] and info["report"]["method"] == "gblm"


@pytest.mark.slow
def test_sweep_keeps_going_when_one_point_fails(stories_dir, tmp_path, monkeypatch):
    import matplotlib.image

    from taylorprune.errors import RunError
    from taylorprune.pipeline import sweep

    real = sweep.prune

    def flaky(opts, hooks=None):
        if opts.target.sparsity == 0.3:
            raise RunError("model.layers.0.mlp.up_proj: 3 non-finite importance scores")
        return real(opts, hooks)

    monkeypatch.setattr(sweep, "prune", flaky)
    out = tmp_path / "sweep"
    res = invoke("sweep", "--model", stories_dir, "--methods", "magnitude", "--sparsities", "0.3,0.5", *SWEEP_EVAL,
                 "--out", out)
    assert res.exit_code == 1 and "1 of 2 grid points failed" in res.output, res.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["perplexity"] is None and "non-finite" in rows[0]["error"]
    assert rows[1]["perplexity"] > 1 and "error" not in rows[1]
    assert "Failed points" in (out / "results.md").read_text()
    assert matplotlib.image.imread(out / "ppl_vs_sparsity.png").ndim == 3


@pytest.mark.slow
def test_interrupted_sweep_keeps_the_points_it_finished(stories_dir, tmp_path, monkeypatch):
    from taylorprune.pipeline import sweep

    real = sweep.prune

    def interrupted(opts, hooks=None):
        if opts.target.sparsity == 0.5:
            raise KeyboardInterrupt
        return real(opts, hooks)

    monkeypatch.setattr(sweep, "prune", interrupted)
    out = tmp_path / "sweep"
    res = invoke("sweep", "--model", stories_dir, "--methods", "magnitude", "--sparsities", "0.3,0.5", *SWEEP_EVAL,
                 "--out", out)
    assert res.exit_code == 130, res.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [("magnitude", 0.3)] and rows[0]["perplexity"] > 1
    assert (out / "ppl_vs_sparsity.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "args,needle",
    [(["--methods", "wanda,nope"], "--methods nope: unknown"), (["--sparsities", "0.5,1.2"], "between 0 and 1"),
     (["--sparsities", "half"], "not a number"), (["--patterns", "4:2"], "--patterns 4:2"),
     (["--patterns", "blocky"], "--patterns blocky"), (["--methods", ","], "comma-separated"),
     (["--calib-file", "/nonexistent.txt"], "--calib-file"), (["--eval-dataset", "nope"], "--eval-dataset")],
)
def test_sweep_validates_everything_up_front(tmp_path, args, needle):
    out = tmp_path / "sweep"
    line = one_line_error(invoke("sweep", "--model", "demo", "--calib", "wikitext2-valid", *args, "--out", out))
    assert needle in line
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ plots


def test_plot_layer_sparsity(folders, tmp_path):
    import matplotlib.image

    report = json.loads((folders["s50"] / "taylorprune_report.json").read_text())
    plot_layer_sparsity(report, tmp_path / "plots" / "layers.png")
    png = tmp_path / "plots" / "layers.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and matplotlib.image.imread(png).ndim == 3
