"""The refactor keeps results: twelve runs on stories260K equal what 4b83646 gave (scripts/equivalence.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "equivalence_4b83646.json"


def _script():
    spec = importlib.util.spec_from_file_location("equivalence", ROOT / "scripts" / "equivalence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EQUIV = _script()


@pytest.mark.parametrize("name", list(EQUIV.RUNS))
def test_same_masks_weights_and_perplexity_as_4b83646(name, tmp_path):
    want = json.loads(REFERENCE.read_text())[name]
    got = EQUIV.run_one(name, tmp_path)
    assert EQUIV.compare(name, got, want) == []


def test_the_comparison_sees_a_changed_weight_and_a_changed_mask(tmp_path):
    want = json.loads(REFERENCE.read_text())["magnitude 50%"]
    got = json.loads(json.dumps(want))
    key = next(k for k in got["tensors"] if "mlp" in k)
    got["tensors"][key]["proj"][0] += 1e-3 * want["tensors"][key]["norm"]
    assert EQUIV.compare("x", got, want) == [f"x: {key}: weights differ beyond round-off"]
    got = json.loads(json.dumps(want))
    got["tensors"][key]["mask"] = "0" * 16
    got["perplexity"] *= 1.001
    assert len(EQUIV.compare("x", got, want)) == 2
