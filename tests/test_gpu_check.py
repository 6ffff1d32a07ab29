"""scripts/gpu_check.py in its CPU smoke mode: every part runs on tiny shapes and the report says what it must."""

import importlib.util
import json
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_gpu_benchmark_smoke_mode_fills_every_part(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "GPU.md"
    gpu_check.main(["--smoke", "--out", str(out)])
    text = out.read_text()
    for heading in ("## (a)", "## (b)", "## (c)", "## (d)"):
        assert heading in text
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert not [name for name, row in rows.items() if "error" in row or "skipped" in row]
    assert rows["a-wanda"]["placement"] == "resident" and rows["a-wanda-stream"]["placement"] == "stream"
    assert all(rows["b"][k] > 0 for k in ("plain_s", "in_memory_s", "blockwise_resident_s", "streamed_from_cpu_s"))
    assert rows["c-gblm"]["placement"] == "stream" and rows["c-gblm"]["streamed"] == ["gradients"]
    assert rows["c-gblm"]["cap_gib"] < rows["c-gblm"]["model_gib"]
    assert {"d-wanda", "d-gblm", "d-sparsegpt"} <= rows.keys()
    assert all(rows[f"d-{m}"]["sparsity"] == pytest.approx(0.5, abs=0.01) for m in ("wanda", "gblm", "sparsegpt"))
    assert "official code: not used" in text  # no checkout given: its rows are skipped with a note
    assert "## (e)" in text and "## (f)" in text
    assert rows["e-sparsegpt"]["world_size"] == 2 and rows["e-gblm-1"]["world_size"] == 1
    assert rows["e-gblm"]["sparsity"] == pytest.approx(rows["e-gblm-1"]["sparsity"])
    assert rows["f-recover-lora"]["kl_after"] <= rows["f-recover-lora"]["kl_before"]
    g = rows["g-gptq"]  # GPTQ alone on the full model: every decoder linear quantized, none off its grid
    assert "## (g)" in text and g["linears"] == 7 * 4 and g["off_grid"] == 0 and g["quantize_s"] > 0
