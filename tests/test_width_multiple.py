"""``--width-multiple``: structured runs keep every row width a quantization group or GGUF block must divide.

Without it a 20% neuron cut of stories260K leaves an FFN width of 138, which no group of 32 divides (GPTQ g32
would refuse down_proj, and llama.cpp would silently store it as another type); by default the width follows what
the output needs, and an explicit value wins.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.errors import UserError
from taylorprune.prune.structures import Shape, aligned_counts

from .conftest import VALID

RUN = ["--calib-file", str(VALID), "--nsamples", "4", "--seqlen", "64", "--method", "wanda"]


def _run(out: Path, *args: str):
    return CliRunner().invoke(app, ["run", "--model", "demo", *RUN, *args, "--output", str(out)])


@given(inter=st.integers(2, 400), removed=st.integers(1, 399), multiple=st.sampled_from([1, 2, 8, 32, 64]))
def test_aligned_neuron_counts_remove_the_fewest_extra_that_reach_a_multiple(inter, removed, multiple):
    shape = Shape(layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=inter)
    removed = min(removed, inter - 1)
    if (inter - removed) < multiple:
        with pytest.raises(UserError, match="--width-multiple"):
            aligned_counts({"neurons": removed}, shape, "kv-groups", multiple)
        return
    kept = inter - aligned_counts({"neurons": removed}, shape, "kv-groups", multiple)["neurons"]
    assert kept % multiple == 0 and 0 <= (inter - removed) - kept < multiple


def test_aligned_head_counts_step_by_whole_groups():
    shape = Shape(layers=2, heads=8, kv_heads=4, head_dim=8, intermediate=64)
    # kv-groups: 2 query heads per group; 6 heads × 8 = 48 is no multiple of 32, 4 heads × 8 = 32 is
    assert aligned_counts({"heads": 2, "blocks": 1}, shape, "kv-groups", 32) == {"heads": 4, "blocks": 1}
    assert aligned_counts({"heads": 4}, shape, "query-heads", 32) == {"heads": 4}
    with pytest.raises(UserError, match="no head count"):
        aligned_counts({"heads": 2}, shape, "kv-groups", 128)


def _tensor_types(path: Path) -> dict[str, str]:
    return {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.slow
def test_default_width_follows_the_gguf_type_and_the_grid(tmp_path):
    # GPTQ g32 on every linear (down_proj included) written as Q4_0: the FFN width must be a multiple of 32
    out = tmp_path / "gg"
    result = _run(out, "--structure", "neurons", "--structure-ratio", "0.2", "--quantize", "gptq", "--wbits", "4",
                  "--group-size", "32", "--format", "gguf")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "taylorprune_report.json").read_text())
    width = report["structured"]["config"]["intermediate_size"]
    assert report["structured"]["width_multiple"] == 32 and width % 32 == 0 and width == 128  # 172 - 34 = 138 → 128
    types = _tensor_types(out / "model.gguf")
    assert all(types[f"blk.{i}.ffn_down.weight"] == "Q4_0" for i in range(5))
    assert not [w for w in report["warnings"] if "falls back" in w or "fall back" in w]


@pytest.mark.slow
def test_an_explicit_multiple_wins_and_a_target_still_reaches_its_fraction(tmp_path):
    out = tmp_path / "st"
    result = _run(out, "--structure", "neurons", "--target-params", "0.1", "--width-multiple", "16")
    assert result.exit_code == 0, result.output
    st_ = json.loads((out / "taylorprune_report.json").read_text())["structured"]
    assert st_["config"]["intermediate_size"] % 16 == 0 and st_["parameters"]["removed_fraction"] >= 0.1
    assert st_["width_multiple"] == 16
