"""``--format gguf`` as users meet it: `taylorprune run ... --format gguf` writes ``model.gguf``, which loads back
through transformers' GGUF loader (the route ``--model FILE.gguf`` takes) with the weights of the run: F32 exactly,
linears packed from a GPTQ grid exactly (Q4_0), other tensors as their F16 rounding; what GGUF cannot hold is a
one-line error before any work, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.modeling import loading

from .conftest import VALID, make_tiny

RUN = ["--calib-file", str(VALID), "--nsamples", "4", "--seqlen", "64"]
GRID = ["--quantize", "gptq", "--wbits", "4", "--group-size", "32",
        "--targets", "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj"]


def _run(out: Path, *args: str, model: str = "demo"):
    return CliRunner().invoke(app, ["run", "--model", model, *RUN, *args, "--output", str(out)])


def _params(path: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().float() for n, p in loading.load(path).model.named_parameters()}


def test_an_f32_gguf_loads_back_with_the_runs_weights(tmp_path):
    assert _run(tmp_path / "st", "--method", "wanda", "--sparsity", "0.5").exit_code == 0
    result = _run(tmp_path / "gg", "--method", "wanda", "--sparsity", "0.5", "--format", "gguf", "--gguf-type", "F32")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "gg").iterdir()) == ["model.gguf", "taylorprune_report.json"]
    want, got = _params(str(tmp_path / "st")), _params(str(tmp_path / "gg" / "model.gguf"))
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name  # Q/K rows permuted and back, F32 bytes as they were
    report = json.loads((tmp_path / "gg" / "taylorprune_report.json").read_text())
    assert report["write"] == {"format": "gguf", "file_bytes": (tmp_path / "gg" / "model.gguf").stat().st_size}


def test_gptq_linears_are_packed_from_their_grid_exactly(tmp_path):
    """4-bit symmetric group-32 GPTQ: Q4_0 blocks decode to the run's values bit for bit; embeddings and the
    down projections (width 172: no group of 32 divides it, left out by --targets) are their F16 rounding."""
    common = ["--method", "sparsegpt", "--sparsity", "0.5", *GRID]
    assert _run(tmp_path / "st", *common).exit_code == 0
    result = _run(tmp_path / "gg", *common, "--format", "gguf")
    assert result.exit_code == 0, result.output
    want, got = _params(str(tmp_path / "st")), _params(str(tmp_path / "gg" / "model.gguf"))
    packed = [n for n in want if any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_", "up_"))]
    assert len(packed) == 30
    for name, w in want.items():
        if name in packed:
            assert torch.equal(got[name], w), name
            assert torch.equal(got[name] == 0, w == 0)  # pruned weights stay exactly 0
        elif w.ndim == 2:
            assert torch.equal(got[name], w.half().float()), name
    smaller = (tmp_path / "gg" / "model.gguf").stat().st_size / (tmp_path / "st" / "model.safetensors").stat().st_size
    assert smaller < 0.4


def test_a_compact_model_is_written_with_its_widths(tmp_path):
    result = _run(tmp_path / "gg", "--method", "wanda", "--structure", "neurons", "--structure-ratio", "0.25",
                  "--format", "gguf", "--gguf-type", "F32")
    assert result.exit_code == 0, result.output
    model = loading.load(str(tmp_path / "gg" / "model.gguf")).model
    assert model.config.intermediate_size == 129 and model.model.layers[0].mlp.down_proj.weight.shape == (64, 129)
    inspected = CliRunner().invoke(app, ["inspect", str(tmp_path / "gg"), "--json", str(tmp_path / "i.json")])
    assert inspected.exit_code == 0, inspected.output
    assert "model.layers.0.mlp.down_proj.weight" in (tmp_path / "i.json").read_text()


@pytest.mark.parametrize("args, says", [
    (["--method", "wanda", "--sparsity", "0.5", "--gguf-type", "Q4_1"], "holds no exact 0"),
    (["--method", "sparsegpt", "--sparsity", "0.5", "--quantize", "gptq", "--wbits", "4", "--group-size", "-1"],
     "in no block type"),
    (["--method", "sparsegpt", "--sparsity", "0.5", *GRID, "--gguf-type", "Q8_0"], "is Q4_0 in GGUF"),
])
def test_what_gguf_cannot_hold_is_one_line_and_nothing_is_written(tmp_path, args, says):
    result = _run(tmp_path / "out", *args, "--format", "gguf")
    assert result.exit_code != 0 and says in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_architecture_we_do_not_write_is_refused(tmp_path):
    qwen = make_tiny(tmp_path / "qwen2", "qwen2")
    result = _run(tmp_path / "out", "--method", "magnitude", "--sparsity", "0.5", "--format", "gguf", model=str(qwen))
    assert result.exit_code != 0 and "not qwen2" in result.output and not (tmp_path / "out").exists()


def test_export_writes_a_model_as_it_is_in_any_format_and_back(tmp_path):
    """`taylorprune export`: stories260K to an F32 GGUF and that GGUF back to safetensors, weights unchanged, each
    with a report that follows the schema."""
    from taylorprune.report import schema

    runner = CliRunner()
    first = runner.invoke(app, ["export", "--model", "demo", "--format", "gguf", "--gguf-type", "F32",
                                "--output", str(tmp_path / "gg")])
    assert first.exit_code == 0, first.output
    back = runner.invoke(app, ["export", "--model", str(tmp_path / "gg" / "model.gguf"), "--output",
                               str(tmp_path / "st")])
    assert back.exit_code == 0, back.output
    want = _params("demo")
    for got in (_params(str(tmp_path / "gg" / "model.gguf")), _params(str(tmp_path / "st"))):
        assert set(got) == set(want) and all(torch.equal(got[n], w) for n, w in want.items())
    for folder in ("gg", "st"):
        report = json.loads((tmp_path / folder / "taylorprune_report.json").read_text())
        assert schema.problems(report) == [] and report["pattern"] == "written as it is"
    refused = runner.invoke(app, ["export", "--model", "demo", "--sparsity", "0.5", "--output", str(tmp_path / "x")])
    assert refused.exit_code != 0 and not (tmp_path / "x").exists()
