"""Every supported family, Gemma 3 included: block-by-block replay equals the model's own forward, and every
method and stage runs on a tiny random Gemma-3 (sliding and global layers, q/k norms, one KV head, tied head)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.modeling import loading
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import find_layout
from taylorprune.prune.masks import check_nm

from .conftest import VALID

runner = CliRunner()
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "4", "--seqlen", "32"]
EVAL = ["--eval", "--eval-seqlen", "32", "--max-windows", "2"]


@pytest.mark.parametrize("family", ["llama", "llama_tied", "mistral", "qwen2", "gemma3"])
def test_block_replay_equals_the_models_own_forward(tiny_dirs, family):
    model = loading.load(str(tiny_dirs[family])).model
    layout = find_layout(model)
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))  # longer than any window
    runner_ = BlockRunner(model, layout, torch.device("cpu"), batch_size=2)
    hidden = runner_.capture(ids)
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)
    for i in range(len(layout.blocks) - 1):
        hidden = runner_.run(i, hidden)
        torch.testing.assert_close(hidden, full.hidden_states[i + 1], rtol=0, atol=1e-6)
    hidden = runner_.run(len(layout.blocks) - 1, hidden)
    torch.testing.assert_close(runner_.head(ids, hidden).logits, full.logits, rtol=0, atol=1e-5)


def test_gemma_windows_start_with_bos_and_llama_windows_keep_the_papers_protocol(tiny_dirs, tmp_path):
    for family, expect in (("gemma3", 1), ("llama", None)):
        out = tmp_path / family
        res = runner.invoke(app, ["run", "--model", str(tiny_dirs[family]), "--method", "wanda", "--sparsity", "0.5",
                                  *CALIB, *EVAL, "--output", str(out)])
        assert res.exit_code == 0, res.output
        report = json.loads((out / "taylorprune_report.json").read_text())
        assert report["calibration"]["bos"] == expect and report["evaluation"]["perplexity"]["bos"] == expect


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--method", "magnitude", "--sparsity", "0.5"],
    ["--method", "wanda", "--pattern", "2:4"],
    ["--method", "sparsegpt", "--sparsity", "0.5", "--recon", "block", "--recon-steps", "5"],
    ["--method", "gblm", "--sparsity", "0.5"],
    ["--method", "taylor", "--sparsity", "0.5"],
    ["--method", "fisher", "--sparsity", "0.5"],
    ["--method", "oba", "--sparsity", "0.5", "--update", "obs", "--obs-swaps", "1"],
    ["--method", "oba", "--oba-mode", "full", "--hvp-scope", "block", "--sparsity", "0.5"],
    ["--method", "oba", "--oba-mode", "released", "--oba-steps", "2", "--sparsity", "0.5"],
    ["--method", "wanda", "--sparsity", "0.6", "--allocation", "owl", "--refine", "swap"],
    ["--method", "wanda", "--sparsity", "0.5", "--recover", "distill", "--recover-steps", "3", "--recover-windows",
     "6", "--recover-heldout", "2", "--recover-eval-every", "1"],
    ["--structure", "heads", "--head-mode", "query-heads", "--structure-ratio", "0.5", "--method", "oba"],
    ["--structure", "neurons", "--structure-ratio", "0.25", "--method", "taylor", "--recon", "block",
     "--recon-steps", "5"],
    ["--structure", "neurons", "--structure-ratio", "0.25", "--method", "wanda", "--recon", "block",
     "--recon-steps", "5", "--recon-span", "2"],
    ["--structure", "blocks", "--structure-ratio", "0.34", "--method", "wanda"],
    ["--structure", "neurons", "--structure-ratio", "0.25", "--method", "wanda", "--pattern", "2:4"],
], ids=lambda a: " ".join(a[:4]))
def test_every_method_and_stage_on_gemma3(tiny_dirs, tmp_path, extra):
    out = tmp_path / "o"
    res = runner.invoke(app, ["run", "--model", str(tiny_dirs["gemma3"]), *CALIB, *EVAL, *extra, "--output",
                              str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "taylorprune_report.json").read_text())
    assert report["metrics"]["perplexity"] > 1
    model = loading.load(str(out)).model  # plain transformers loads it back, and generates
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    if "--recon-span" in extra:  # block i's fit covers block i - 1 too
        assert [b["recon"].get("blocks") for b in report["structured"]["per_block"]][:2] == [None, [0, 1]]
    if "2:4" in extra:
        assert all(check_nm(model.get_submodule(lin["name"]).weight, 2, 4) for lin in report["linears"])


def test_a_one_kv_head_model_is_told_about_query_heads(tiny_dirs, tmp_path):
    res = runner.invoke(app, ["run", "--model", str(tiny_dirs["gemma3"]), *CALIB, "--structure", "heads",
                              "--structure-ratio", "0.5", "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--head-mode query-heads" in res.output, res.output
