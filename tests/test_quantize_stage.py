"""``--quantize rtn|gptq`` as a stage of a run and ``--format`` as the output seam, on stories260K.

Quantize-only runs land every weight on its grid; with masks every masked weight stays exactly 0 (for a scoring
method and for a solver); a compressed-tensors folder reads back (our reader) to the in-run weights, ``inspect``
shows its grids, and with the compressed-tensors package installed transformers loads it with the in-run
perplexity; bad input is a one-line error with nothing written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app
from taylorprune.export.compressed_tensors import read_dequantized
from taylorprune.export.save import REPORT_NAME
from taylorprune.modeling import loading
from taylorprune.pipeline import components
from taylorprune.pipeline.stages import KINDS
from taylorprune.prune.masks import Pattern, build_mask
from taylorprune.quantize.grid import dequantize_weight
from taylorprune.report import schema
from taylorprune.scoring.registry import get_method

from .conftest import DEMO

runner = CliRunner()
SMALL = dict(model="demo", calib="wikitext2-valid", nsamples=8, seqlen=64, device="cpu")
CLI = ["--model", "demo", "--calib", "wikitext2-valid", "--nsamples", "8", "--seqlen", "64", "--device", "cpu"]
EVAL = ["--eval", "--eval-seqlen", "128", "--max-windows", "4"]
ATTENTION_AND_UP = "self_attn|gate_proj|up_proj"  # input width 64 (down_proj's 172 takes no group of 32)


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def quantized_run(tmp_path: Path, **kw) -> tuple[pipeline.RunState, dict]:
    """Prune (and quantize) in memory, then write: the state holds the codes the folder must hold."""
    state = pipeline.prune(pipeline.RunOptions(**{**SMALL, "output": str(tmp_path / "o"), **kw}))
    return state, pipeline.write(state)


def assert_on_grid(state: pipeline.RunState, weights: dict[str, torch.Tensor]) -> None:
    """Every quantized linear's weight is scale·(code − zero) of its own group, codes in range, bit for bit."""
    assert state.quantized
    for name, q in state.quantized.items():
        assert int(q.codes.max()) <= q.spec.maxq
        want = dequantize_weight(q.codes, q.grid, q.spec, q.group_index)
        assert torch.equal(weights[f"{name}.weight"], want), name


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantize_alone_writes_safetensors_on_the_grid(tmp_path, method):
    state, report = quantized_run(tmp_path, quantize=method, wbits=4, group_size=32, targets=ATTENTION_AND_UP)
    assert_on_grid(state, load_file(str(tmp_path / "o" / "model.safetensors")))
    assert len(state.quantized) == 5 * 6 and report["pattern"] == "no masks" and report["sparsity"] is None
    q = report["quantize"]
    assert q["method"] == method and q["linears"] == 30 and q["off_grid_in_model_dtype"] == 0
    assert q["bits_per_weight"] == pytest.approx(4 + 16 / 32)  # one fp16 scale per 32 weights, no zero point
    assert report["write"] == {"format": "safetensors", "file_bytes": (tmp_path / "o" / "model.safetensors")
                               .stat().st_size}
    assert schema.problems(report) == []
    lin = report["linears"][0]["quantize"]
    assert (lin["wbits"], lin["group_size"], lin["symmetric"]) == (4, 32, True)


def test_masked_weights_stay_exactly_zero_and_kept_ones_land_on_the_grid(tmp_path):
    """Magnitude's mask comes from the dense weights alone, so it is known here exactly."""
    dense = loading.load("demo").model
    state, _ = quantized_run(tmp_path, method="magnitude", sparsity=0.5, quantize="gptq", group_size=-1)
    written = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert_on_grid(state, written)
    for name in state.quantized:
        keep = build_mask(dense.get_submodule(name).weight.abs(), Pattern(0.5))
        assert bool((written[f"{name}.weight"][~keep] == 0).all()), name


def test_a_solvers_mask_is_kept_when_its_output_is_quantized(tmp_path):
    """SparseGPT chooses its own mask; quantizing its output keeps it: block 0 sees the same inputs either way."""
    plain = pipeline.prune(pipeline.RunOptions(**SMALL, output=str(tmp_path / "p"), method="sparsegpt",
                                               sparsity=0.5))
    state, report = quantized_run(tmp_path, method="sparsegpt", sparsity=0.5, quantize="gptq", group_size=-1)
    for t in plain.layout.targets[0]:
        pruned = t.module.weight == 0
        assert bool((state.model.get_submodule(t.path).weight[pruned] == 0).all()), t.path
    assert_on_grid(state, {f"{n}.weight": state.model.get_submodule(n).weight for n in state.quantized})
    assert report["achieved_sparsity"] >= 0.5 and report["quantize"]["linears"] == 35


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, pipeline.RunState]:
    """One compressed-tensors run (4-bit per channel, symmetric), with its in-run perplexity."""
    folder = tmp_path_factory.mktemp("ct")
    opts = pipeline.RunOptions(**SMALL, output=str(folder / "o"), quantize="gptq", group_size=-1,
                               format="compressed-tensors", eval=True, eval_seqlen=128, max_windows=4)
    state = pipeline.prune(opts)
    pipeline.write(state)
    return folder / "o", state


def test_a_compressed_tensors_folder_reads_back_to_the_in_run_weights(packed):
    folder, state = packed
    dense = read_dequantized(folder, torch.float32)
    assert {f"{name}.weight" for name in state.quantized} <= set(dense) and len(state.quantized) == 35
    for key, value in state.model.state_dict().items():
        if key in dense:  # a tied head is written once, as its embedding
            assert torch.equal(dense[key], value), key
    report = json.loads((folder / REPORT_NAME).read_text())
    assert report["write"] == {"format": "compressed-tensors",
                               "file_bytes": (folder / "model.safetensors").stat().st_size}
    assert report["write"]["file_bytes"] < 0.5 * (DEMO / "model.safetensors").stat().st_size
    assert schema.problems(report) == []
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]


def test_inspect_shows_each_packed_linears_grid(packed, tmp_path):
    folder, state = packed
    res = invoke("inspect", folder, "--json", tmp_path / "i.json")
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "i.json").read_text())
    rows = {r["name"].removesuffix(".weight"): r for r in info["linears"]}
    assert set(rows) == set(state.quantized)
    for name, row in rows.items():
        assert row["dtype"] == "int4" and row["grid"]["wbits"] == 4 and row["grid"]["group_size"] == -1
        assert row["zeros"] == int((state.model.get_submodule(name).weight == 0).sum())
    assert info["report"]["quantize"]["bits_per_weight"] > 4 and info["report"]["write"]["file_bytes"] > 0


def test_transformers_loads_the_folder_with_the_in_run_perplexity(packed, tmp_path):
    pytest.importorskip("compressed_tensors")
    folder, state = packed
    res = invoke("eval", "--model", folder, "--seqlen", "128", "--max-windows", "4", "--device", "cpu", "--dtype",
                 "float32", "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    loaded = json.loads((tmp_path / "e.json").read_text())["perplexity"]
    assert loaded == pytest.approx(state.metrics["perplexity"], rel=1e-4)


@pytest.mark.parametrize("args, says", [
    (["--quantize", "gptq", "--wbits", "1"], "--wbits 1"),
    (["--quantize", "gptq", "--wbits", "9"], "--wbits 9"),
    (["--quantize", "gptq", "--group-size", "48"], "--group-size 48"),
    (["--quantize", "rtn", "--group-size", "128"], "model.layers.0.self_attn.q_proj: input width 64"),
    (["--quantize", "rtn", "--format", "bogus"], "--format bogus"),
    (["--sparsity", "0.5", "--quantize", "rtn", "--no-symmetric", "--zero-point", "float"], "exact 0"),
    (["--sparsity", "0.5", "--format", "compressed-tensors"], "add --quantize"),
    (["--quantize", "rtn", "--group-size", "-1", "--no-symmetric", "--format", "compressed-tensors"], "asymmetric"),
    (["--quantize", "rtn", "--group-size", "-1", "--no-symmetric", "--zero-point", "float", "--format",
      "compressed-tensors"], "float minima"),
    (["--quantize", "gptq", "--no-static-groups", "--group-size", "32", "--format", "compressed-tensors"], "g_idx"),
    (["--sparsity", "0.5", "--quantize", "gptq", "--recover", "distill", "--recover-weights", "lora"],
     "cannot keep a quantized model on its grid"),
    (["--sparsity", "0.5", "--quantize", "gptq", "--quant-train", "bogus"], "--quant-train"),
    (["--quantize", "gptq", "--update", "obs"], "works on masks"),
    (["--wbits", "4", "--sparsity", "0.5"], "--wbits does not apply"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, says):
    out = tmp_path / "o"
    res = invoke("run", *CLI, *args, "--output", out)
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert says in lines[0], lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_linear_kind_that_would_not_follow_a_solver_is_refused_not_skipped():
    """The engine runs only ``final`` linear kinds after a solver; any other is refused up front, even one that
    declares no refusal of its own (the seam that used to skip such stages silently)."""
    sparsegpt = get_method("sparsegpt")
    options = sparsegpt.options.build({})
    silent = dataclasses.replace(KINDS["update"], refuse=lambda method, opts, value: None)
    assert "does not run after it" in components._refusal(silent, sparsegpt, options, "obs", True)
    assert components._refusal(silent, sparsegpt, options, "obs", False) is None  # no masks: no method runs
    assert components._refusal(KINDS["quantize"], sparsegpt, options, "gptq", True) is None
    assert components.resolve("sparsegpt", {"quantize": "gptq"}).stage("quantize").name == "gptq"
