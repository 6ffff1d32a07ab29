"""The defects a new user found (issue #26), each with the test that failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app

from .conftest import DEMO, TEST_TEXT, VALID

runner = CliRunner()
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "2", "--seqlen", "32"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(res, code: int = 2) -> str:
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == code and len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


def test_help_keeps_the_default_of_seqlen():
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "min(2048, max positions)" in res.output


def test_report_options_name_the_files_not_the_unused_defaults(tmp_path):
    res = invoke("run", "--model", "demo", "--sparsity", "0.5", *CALIB, "--eval", "--eval-text-file", TEST_TEXT,
                 "--eval-seqlen", "32", "--max-windows", "2", "--output", tmp_path / "o")
    assert res.exit_code == 0, res.output
    options = json.loads((tmp_path / "o" / "taylorprune_report.json").read_text())["options"]
    assert options["calib"] is None and options["calib_file"] == str(VALID)
    assert options["eval_dataset"] is None and options["eval_text_file"] == str(TEST_TEXT)


@pytest.mark.parametrize("extra,needle", [
    (["--calib", "wikitext2-valid"], "both name the calibration text"),
    (["--eval", "--eval-dataset", "ptb", "--eval-text-file", str(TEST_TEXT)], "both name the evaluation text"),
    (["--method", "oba", "--oba-steps", "3"], "--oba-steps applies to --oba-mode released"),
    (["--method", "oba", "--hvp-scope", "block"], "--hvp-scope applies to --oba-mode full"),
    (["--method", "oba", "--oba-mode", "released", "--oba-normalize", "max"], "--oba-normalize applies to"),
])
def test_options_that_would_be_ignored_are_errors(tmp_path, extra, needle):
    assert needle in one_line(invoke("run", "--model", "demo", "--sparsity", "0.5", *CALIB, *extra, "--output",
                                     tmp_path / "o"))


def test_published_folders_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        assert invoke("run", "--model", "demo", "--method", "magnitude", "--sparsity", "0.5", "--output",
                      tmp_path / "o").exit_code == 0
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "o").stat().st_mode)
    assert mode == 0o755, oct(mode)


def test_an_output_beside_a_gguf_input_is_allowed(tmp_path):
    shutil.copy(DEMO / "stories260K.gguf", tmp_path / "m.gguf")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(DEMO / name, tmp_path / name)
    res = invoke("run", "--model", tmp_path / "m.gguf", "--method", "magnitude", "--sparsity", "0.5", "--output",
                 tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "overlaps" in one_line(invoke("run", "--model", tmp_path / "m.gguf", "--method", "magnitude",
                                         "--sparsity", "0.5", "--output", tmp_path, "--overwrite"))


def test_unwritable_or_folder_destinations_are_one_line_errors(tmp_path):
    blocker = tmp_path / "a-file"  # a path under a file cannot be written, whoever runs the test
    blocker.write_text("x")
    assert "not a writable folder" in one_line(invoke(
        "run", "--model", "demo", "--method", "gblm", "--sparsity", "0.5", *CALIB, "--grad-cache",
        blocker / "g.safetensors", "--output", tmp_path / "o"))
    assert "not a writable folder" in one_line(invoke(
        "run", "--model", "demo", "--sparsity", "0.5", *CALIB, "--save-scores", blocker / "s.safetensors",
        "--output", tmp_path / "o"))
    assert "--json" in one_line(invoke("eval", "--model", "demo", "--seqlen", "32", "--max-windows", "1",
                                       "--json", blocker / "e.json"))
    assert "--json" in one_line(invoke("eval", "--model", "demo", "--seqlen", "32", "--max-windows", "1", "--json",
                                       tmp_path))
    assert "--json" in one_line(invoke("inspect", DEMO, "--json", tmp_path))
    assert "--json" in one_line(invoke("speed", "--model", "demo", "--baseline", "demo", "--prefill", "8",
                                       "--decode", "2", "--repeats", "1", "--json", tmp_path))


def test_an_os_error_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    from taylorprune.export import save

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(save, "save_model", denied)
    line = one_line(invoke("run", "--model", "demo", "--method", "magnitude", "--sparsity", "0.5", "--output",
                           tmp_path / "o"))
    assert "Permission denied" in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize("variants", ["+", "swap+", "+obs"])
def test_empty_sweep_variants_are_refused(tmp_path, variants):
    assert "empty stage name" in one_line(invoke("sweep", "--model", "demo", "--variants", variants, "--out",
                                                 tmp_path / "s"))


def test_damaged_inputs_are_bad_input_not_unexpected(tmp_path):
    (tmp_path / "short.gguf").write_bytes(os.urandom(100))
    assert "GGUF" in one_line(invoke("eval", "--model", tmp_path / "short.gguf"))
    (tmp_path / "nul.txt").write_bytes(b"\x00" * 4096)
    assert "NUL bytes" in one_line(invoke("run", "--model", "demo", "--sparsity", "0.5", "--calib-file",
                                          tmp_path / "nul.txt", "--output", tmp_path / "o"))


def test_a_cache_with_a_wrong_shaped_tensor_is_bad_input(tmp_path):
    cache = tmp_path / "g.safetensors"
    args = ["run", "--model", "demo", "--method", "taylor", "--sparsity", "0.5", *CALIB, "--grad-cache", cache]
    assert invoke(*args, "--output", tmp_path / "a").exit_code == 0
    from safetensors import safe_open

    with safe_open(str(cache), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(iter(tensors))
    tensors[key] = tensors[key][:1]
    save_file(tensors, str(cache), metadata=meta)
    assert "has shape" in one_line(invoke(*args, "--output", tmp_path / "b"))


def test_a_gradient_cache_of_another_model_state_is_refused(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(DEMO, model)
    cache = tmp_path / "g.safetensors"
    args = ["run", "--model", model, "--method", "taylor", "--sparsity", "0.5", *CALIB, "--grad-cache", cache]
    assert invoke(*args, "--output", tmp_path / "a").exit_code == 0
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5  # no target linear changes
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert "made differently" in one_line(invoke(*args, "--output", tmp_path / "b"))


def test_a_report_whose_linears_is_not_a_list_is_bad_input(tmp_path):
    assert invoke("run", "--model", "demo", "--method", "magnitude", "--sparsity", "0.5", "--eval", "--eval-seqlen",
                  "32", "--max-windows", "2", "--output", tmp_path / "o").exit_code == 0
    report = tmp_path / "o" / "taylorprune_report.json"
    data = json.loads(report.read_text())
    data["linears"] = "all of them"
    report.write_text(json.dumps(data))
    assert "not a list of linears" in one_line(invoke("check", "--candidate", tmp_path / "o", "--min-sparsity",
                                                      "0.4", "--seqlen", "32", "--max-windows", "2"))


def test_owl_never_empties_a_linear_and_reports_the_real_block_sparsity(tmp_path):
    opts = pipeline.RunOptions(model=str(DEMO), output=str(tmp_path / "o"), method="wanda", sparsity=0.9,
                               allocation="owl", calib_file=str(VALID), calib_sampling="sequential", nsamples=2,
                               seqlen=32, method_options={"owl_lambda": 0.45})
    state = pipeline.prune(opts)
    assert max(lin["sparsity"] for lin in state.linears) <= 0.99 + 1e-9
    assert state.achieved_sparsity == pytest.approx(0.9, abs=1e-6)
    for block in state.records["unstructured"]["blocks"]:
        assert block["block_sparsity"] == pytest.approx(block["sparsity"])


def test_speed_names_the_baseline_flag():
    assert "--baseline /nonexistent" in one_line(invoke("speed", "--model", "demo", "--baseline", "/nonexistent"))


def test_check_takes_a_gguf_baseline_as_a_model(tmp_path):
    shutil.copy(DEMO / "stories260K.gguf", tmp_path / "m.gguf")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(DEMO / name, tmp_path / name)
    res = invoke("check", "--baseline", tmp_path / "m.gguf", "--candidate", DEMO, "--max-ppl-increase", "1%",
                 "--seqlen", "32", "--max-windows", "2")
    assert res.exit_code == 0, res.output


def test_off_a_terminal_long_phases_log_lines_and_name_their_stages(tmp_path):
    res = invoke("run", "--model", "demo", "--method", "sparsegpt", "--sparsity", "0.5", "--recon", "block",
                 "--recon-steps", "2", *CALIB, "--output", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "pruning with sparsegpt + recon block" in res.output and "pruning blocks: 5/5" in res.output


def test_structured_summary_gives_the_decoder_share(tmp_path):
    res = invoke("run", "--model", "demo", "--structure", "neurons", "--structure-ratio", "0.2", "--method", "wanda",
                 *CALIB, "--output", tmp_path / "o")
    assert res.exit_code == 0 and "of which in decoder blocks" in res.output and "target linears" not in res.output
    share = json.loads((tmp_path / "o" / "taylorprune_report.json").read_text())["structured"]["decoder_parameters"]
    assert share["removed_fraction"] > json.loads((tmp_path / "o" / "taylorprune_report.json").read_text())[
        "structured"]["parameters"]["removed_fraction"]


def test_gguf_rebuild_makes_non_persistent_buffers_for_real():
    """What broke Gemma-3 GGUF files: a rebuild from meta left embed_scale (and inv_freq) unloaded."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from taylorprune.modeling.gguf import strip_quantizer

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4,
                              max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    plain = strip_quantizer(model, "auto")
    assert not any(b.is_meta for b in plain.buffers())
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits)
