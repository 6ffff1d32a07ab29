"""GGUF inputs as a user meets them: every registered method runs real forwards on the bundled stories260K GGUF,
and ``eval`` of the GGUF equals ``eval`` of the same model's Hugging Face folder."""

import json

import pytest
import torch
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.modeling import loading
from taylorprune.scoring.registry import METHODS

from .conftest import DEMO, TEST_TEXT, VALID

runner = CliRunner()
GGUF = DEMO / "stories260K.gguf"
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "2", "--seqlen", "32"]
EVAL = ["--eval-text-file", str(TEST_TEXT), "--eval-seqlen", "64", "--max-windows", "2"]


def test_gguf_load_recomputes_the_rotary_buffers_left_on_meta():
    model = loading.load(str(GGUF)).model
    assert not any(b.is_meta for b in model.buffers())
    folder = loading.load(str(DEMO)).model
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, folder.model.rotary_emb.inv_freq)
    x = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, folder(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_prunes_and_evaluates_a_gguf_input(tmp_path, method):
    res = runner.invoke(app, ["run", "--model", str(GGUF), "--method", method, "--sparsity", "0.5", *CALIB, *EVAL,
                              "--eval", "--output", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "taylorprune_report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5) and report["source"]["gguf_file"] == GGUF.name
    assert 1 < report["metrics"]["perplexity"] < 1e4
    assert "quantization_config" not in json.loads((tmp_path / "o" / "config.json").read_text())


def test_gguf_calibration_method_equals_the_folder_run(tmp_path):
    reports = {}
    for name, model in {"gguf": GGUF, "folder": DEMO}.items():
        res = runner.invoke(app, ["run", "--model", str(model), "--method", "wanda", "--sparsity", "0.5", *CALIB,
                                  *EVAL, "--eval", "--output", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        reports[name] = json.loads((tmp_path / name / "taylorprune_report.json").read_text())
    assert [r["zeros"] for r in reports["gguf"]["linears"]] == [r["zeros"] for r in reports["folder"]["linears"]]
    assert reports["gguf"]["metrics"]["perplexity"] == pytest.approx(reports["folder"]["metrics"]["perplexity"],
                                                                        rel=1e-4)


def test_eval_of_the_gguf_equals_eval_of_its_folder(tmp_path):
    got = {}
    for name, model in {"gguf": GGUF, "folder": DEMO}.items():
        res = runner.invoke(app, ["eval", "--model", str(model), "--text-file", str(TEST_TEXT), "--seqlen", "128",
                                  "--max-windows", "4", "--json", str(tmp_path / f"{name}.json")])
        assert res.exit_code == 0, res.output
        got[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert got["gguf"]["perplexity"] == pytest.approx(got["folder"]["perplexity"], rel=1e-5)
    assert got["gguf"]["tokens"] == got["folder"]["tokens"] == 512
