"""Results are kept: twelve runs on stories260K equal the recorded references (scripts/equivalence.py), on any CPU.

The references (tests/data/equivalence.json) hold, besides each run's fingerprint, what simulated other CPUs moved:
the mask positions within round-off of their threshold and how far weights and PPL moved (see the script's
docstring). These tests prove both sides of that tolerance: a run whose statistics are perturbed as another CPU's
kernels would perturb them still matches, while a moved mask entry far from its threshold, a changed weight or a
changed perplexity does not.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "equivalence.json"


def _script():
    spec = importlib.util.spec_from_file_location("equivalence", ROOT / "scripts" / "equivalence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EQUIV = _script()


def references() -> dict:
    return {k: v for k, v in json.loads(REFERENCE.read_text()).items() if not k.startswith("_")}


@pytest.mark.parametrize("name", list(EQUIV.RUNS))
def test_same_masks_weights_and_perplexity_as_recorded(name, tmp_path):
    got = EQUIV.run_one(name, tmp_path)
    assert EQUIV.compare(name, got, references()[name]) == []


@pytest.fixture(scope="module")
def other_cpu(tmp_path_factory) -> dict:
    """Fisher 50% (the run whose mask moved between an Intel and an AMD CPU) with every statistic × (1 + 1e-6·N),
    a seed no recording used: what another CPU's kernels do to the gradient sums."""
    return EQUIV.run_one("fisher 50%", tmp_path_factory.mktemp("cpu"), eps=1e-6, seed=1234)


def test_another_cpu_still_matches(other_cpu):
    assert EQUIV.compare("fisher 50%", other_cpu, references()["fisher 50%"]) == []


def _far_from_threshold(want: dict, got: dict) -> tuple[str, int]:
    """A masked linear and a kept position of it that no simulated CPU moved."""
    key = next(k for k, t in want["tensors"].items() if "mlp.down_proj" in k and t.get("loose"))
    kept = (~got["tensors"][key]["zeros"]).nonzero().flatten().tolist()
    loose = set(want["tensors"][key]["loose"])
    return key, next(i for i in kept if i not in loose)


def test_a_moved_mask_entry_far_from_its_threshold_fails(other_cpu):
    want = references()["fisher 50%"]
    key, position = _far_from_threshold(want, other_cpu)
    zeros = other_cpu["tensors"][key]["zeros"].clone()
    zeros[position] = True
    moved = {**other_cpu, "tensors": {**other_cpu["tensors"], key: {**other_cpu["tensors"][key], "zeros": zeros,
                                                                      "mask": EQUIV._hash(zeros)}}}
    assert EQUIV.compare("x", moved, want) == [f"x: {key}: mask differs beyond round-off near-ties"]


def test_a_changed_weight_or_perplexity_fails(other_cpu):
    want = references()["fisher 50%"]
    key = next(k for k, t in want["tensors"].items() if "self_attn.q_proj" in k and "spread" not in t)
    got = {**other_cpu, "tensors": {**other_cpu["tensors"], key: dict(other_cpu["tensors"][key])}}
    got["tensors"][key]["proj"] = [got["tensors"][key]["proj"][0] + 1e-3 * want["tensors"][key]["norm"],
                                   *got["tensors"][key]["proj"][1:]]
    assert EQUIV.compare("x", got, want) == [f"x: {key}: weights differ beyond round-off"]
    got = {**other_cpu, "perplexity": want["perplexity"] * 1.05}
    assert EQUIV.compare("x", got, want) == [f"x: perplexity {got['perplexity']:.6f} != {want['perplexity']:.6f}"]


def test_the_near_ties_of_the_reference_cover_the_mask_another_cpu_gave():
    """Recorded on an AMD EPYC, the Fisher 50% mask of layer 0's down_proj differs from an Intel CPU's (its sha256,
    stored at 4b83646) exactly by toggling flat positions 9612 and 9623 (found by toggling the reference's near-ties
    and hashing): both must be near-ties of the reference, so an Intel CPU's run passes too."""
    want = references()["fisher 50%"]["tensors"]["model.layers.0.mlp.down_proj.weight"]
    assert {9612, 9623} <= set(want["loose"])
    assert len(want["loose"]) <= 64  # near-ties, not a licence for any mask
