"""End to end through the CLI on the real stories260K: outputs load, match memory, keep other tensors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app
from taylorprune.prune.masks import check_nm

from .conftest import TEST_TEXT, VALID

runner = CliRunner()
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "4", "--seqlen", "64"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stories_dir):
    base = tmp_path_factory.mktemp("runs")
    outs = {}
    for name, pat in {"s50": ["--sparsity", "0.5"], "nm24": ["--pattern", "2:4"]}.items():
        res = invoke("run", "--model", stories_dir, "--method", "wanda", *pat, *CALIB, "--output", base / name,
                     "--eval", "--eval-text-file", TEST_TEXT, "--eval-seqlen", "128", "--max-windows", "3")
        assert res.exit_code == 0, res.output
        outs[name] = base / name
    return outs


def test_outputs_load_with_from_pretrained_and_have_the_pattern(runs):
    from transformers import AutoModelForCausalLM

    for name, folder in runs.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        report = json.loads((folder / "taylorprune_report.json").read_text())
        assert "sparsity_config" not in json.loads((folder / "config.json").read_text())
        assert len(report["linears"]) == 35 and report["achieved_sparsity"] == pytest.approx(0.5)
        for lin in report["linears"]:
            w = model.get_submodule(lin["name"]).weight
            if name == "nm24":
                assert check_nm(w, 2, 4)
            else:
                assert ((w == 0).sum(1) == w.shape[1] // 2).all()
        assert report["calibration"]["tokens"] == 256 and report["calibration"]["sampling"] == "sequential"
        assert report["evaluation"]["perplexity"]["windows"] == 3 and report["metrics"]["perplexity"] > 1
        assert set(report["versions"]) >= {"torch", "transformers", "taylorprune"}
        assert (folder / "tokenizer.json").is_file() and (folder / "generation_config.json").is_file()


def test_non_target_tensors_are_byte_identical(runs, stories_dir):
    before = load_file(stories_dir / "model.safetensors")
    after = load_file(runs["s50"] / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    for k in before.keys() - changed:
        assert before[k].dtype == after[k].dtype


def test_saved_folder_gives_same_logits_as_memory(tmp_path, stories_dir):
    from transformers import AutoModelForCausalLM

    opts = pipeline.RunOptions(model=str(stories_dir), output=str(tmp_path / "o"), method="wanda",
                               sparsity=0.5, calib_file=str(VALID), calib_sampling="sequential",
                               nsamples=4, seqlen=64)
    pruned = pipeline.prune(opts)
    pipeline.write(pruned)
    x = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mem = pruned.loaded.model(x).logits
        disk = AutoModelForCausalLM.from_pretrained(tmp_path / "o")(x).logits
    assert torch.equal(mem, disk)


def test_eval_json_and_run_eval_agree(runs, tmp_path):
    out = tmp_path / "e.json"
    res = invoke("eval", "--model", runs["s50"], "--text-file", TEST_TEXT, "--seqlen", "128",
                 "--max-windows", "3", "--json", out)
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert set(got) == {"perplexity", "dataset", "seqlen", "windows", "tokens", "model", "tokenizer", "bos",
                        "evaluation", "metrics"}
    assert got["evaluation"]["perplexity"]["perplexity"] == got["metrics"]["perplexity"] == got["perplexity"]
    report = json.loads((runs["s50"] / "taylorprune_report.json").read_text())
    assert got["perplexity"] == pytest.approx(report["metrics"]["perplexity"], rel=1e-9)
    assert got["tokens"] == 3 * 128


def test_pruning_hurts_but_does_not_destroy(runs, stories_dir, tmp_path):
    res = invoke("eval", "--model", stories_dir, "--text-file", TEST_TEXT, "--seqlen", "128",
                 "--max-windows", "3", "--json", tmp_path / "d.json")
    assert res.exit_code == 0, res.output
    dense = json.loads((tmp_path / "d.json").read_text())["perplexity"]
    pruned = json.loads((runs["s50"] / "taylorprune_report.json").read_text())["metrics"]["perplexity"]
    assert dense < pruned < 20 * dense


def test_methods_lists_registry():
    res = invoke("methods")
    assert res.exit_code == 0 and "wanda" in res.output and "magnitude" in res.output


def test_demo_model_runs_with_builtin_calibration(tmp_path):
    res = invoke("run", "--model", "demo", "--method", "magnitude", "--pattern", "2:4", "--output",
                 tmp_path / "m")
    assert res.exit_code == 0, res.output
    assert (Path(tmp_path / "m") / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args,needle",
    [(["--sparsity", "1.5"], "between 0 and 1"), (["--pattern", "4:2"], "0 < N < M"),
     (["--sparsity", "0.5", "--method", "nope"], "unknown"), (["--sparsity", "0.5", "--nsamples", "0"], "at least 1")],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    res = invoke("run", "--model", "demo", *args, "--output", tmp_path / "x")
    assert res.exit_code == 2
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


def test_gguf_input_is_dequantized_and_saved_as_plain_folder(tmp_path, stories_dir):
    from transformers import AutoModelForCausalLM

    gguf = stories_dir / "stories260K.gguf"
    if not gguf.is_file():
        pytest.skip("stories260K.gguf absent")
    res = invoke("run", "--model", gguf, "--method", "magnitude", "--sparsity", "0.5", "--output", tmp_path / "g")
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    w = model.model.layers[0].mlp.up_proj.weight
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()


def test_accelerate_device_map_path(tmp_path, stories_dir):
    res = invoke("run", "--model", stories_dir, "--method", "wanda", "--sparsity", "0.5", *CALIB, "--device-map", "cpu",
                 "--output", tmp_path / "dm")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "dm" / "taylorprune_report.json").read_text())
    assert rep["achieved_sparsity"] == pytest.approx(0.5)


def test_run_plots_writes_layer_sparsity_png(tmp_path, stories_dir):
    res = invoke("run", "--model", stories_dir, "--method", "magnitude", "--sparsity", "0.5", "--plots",
                 "--output", tmp_path / "p")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p" / "layer_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_docs_keep_their_bullets_on_separate_lines():
    from taylorprune.cli.methods import reflow

    doc = """Intro wrapped
    over two lines:

    - first item
      continued
    - second item
    """
    assert reflow(doc) == "Intro wrapped over two lines:\n\n- first item continued\n- second item"
