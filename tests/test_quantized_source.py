"""A compressed-tensors folder as ``--model`` (``pipeline.quantized_source``): ``recover`` trains it on its own grids
and writes them again, ``export`` writes its dequantized values, ``run`` refuses it in one line.

The folder is what a user has after ``run --quantize gptq --format compressed-tensors``: stories260K, SparseGPT 50%
+ GPTQ 3-bit per channel (a sparse quantized model, so the kept zeros are checked too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app
from taylorprune.export.compressed_tensors import read_dequantized, read_folder

SMALL = dict(model="demo", calib="wikitext2-valid", nsamples=8, seqlen=64, device="cpu")
RECOVER = ["--recover-windows", "24", "--recover-steps", "12", "--recover-heldout", "4", "--recover-eval-every", "4",
           "--recover-lr", "2e-3"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    pytest.importorskip("compressed_tensors")
    out = tmp_path_factory.mktemp("ct") / "q"
    state = pipeline.prune(pipeline.RunOptions(**SMALL, method="sparsegpt", sparsity=0.5, quantize="gptq", wbits=3,
                                               group_size=-1, format="compressed-tensors", output=str(out)))
    pipeline.write(state)
    return out


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_recover_keeps_the_folders_grids_and_zeros_and_lowers_the_kl(packed, tmp_path):
    out = tmp_path / "r"
    res = _cli("recover", "--model", packed, "--teacher", "demo", "--calib", "wikitext2-valid", "--seqlen", "64",
               *RECOVER, "--device", "cpu", "--format", "compressed-tensors", "--output", out)
    assert res.exit_code == 0, res.output
    _, _, before = read_folder(packed)
    _, _, after = read_folder(out)
    assert before.keys() == after.keys() and len(after) == 35
    moved = 0
    for name, q in after.items():
        old, new = before[name].dequantize(torch.float32), q.dequantize(torch.float32)
        assert torch.equal(q.scales, before[name].scales), name  # trained through rounding: codes move, scales stay
        assert bool((new[old == 0] == 0).all()), name  # every zero of the folder stays 0
        moved += int((q.codes != before[name].codes).sum())
    assert moved > 0
    record = json.loads((out / "taylorprune_report.json").read_text())["recover"]
    assert record["kl_after"] < record["kl_before"]
    assert record["on_grid"]["quant_train"] == "ste"


def test_export_writes_the_dequantized_values(packed, tmp_path):
    out = tmp_path / "f"
    res = _cli("export", "--model", packed, "--format", "safetensors", "--device", "cpu", "--output", out)
    assert res.exit_code == 0, res.output
    want = read_dequantized(packed, torch.float32)
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    for name in [k for k in want if k.endswith("proj.weight")]:
        assert torch.equal(got[name].float(), want[name]), name


def test_run_refuses_a_quantized_folder_in_one_line(packed, tmp_path):
    out = tmp_path / "o"
    res = _cli("run", "--model", packed, "--method", "wanda", "--sparsity", "0.5", "--calib", "wikitext2-valid",
               "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--output", out)
    assert res.exit_code != 0
    assert "already quantized" in res.output and "Traceback" not in res.output
    assert not out.exists()
