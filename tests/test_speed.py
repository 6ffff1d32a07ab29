"""Speed in interleaved rounds; the report's start-up time counts from the interpreter, not from a shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from taylorprune.evaluate.speed import compare
from taylorprune.modeling import loading

from .conftest import DEMO, ROOT


def test_a_model_against_itself_is_1_within_the_reported_spread():
    model = loading.load(str(DEMO)).model
    result = compare(model, model, torch.device("cpu"), prefill=64, decode=8, rounds=11)
    for kind in ("prefill", "decode"):
        low, high = result[f"{kind}_ratio_spread"]
        assert low <= result[f"{kind}_ratio"] <= high
        assert low <= 1.0 <= high, (kind, low, high)
    assert result["rounds"] == 11 and result["dense"]["prefill_tok_s"] > 0 and "AB / BA" in result["order"]


def test_rounds_alternate_the_order_of_the_two_models(monkeypatch):
    from taylorprune.evaluate import speed

    class Named(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

    seen = []
    monkeypatch.setattr(speed, "_round", lambda model, *a: seen.append(model.name) or (1.0, 1.0))
    compare(Named("a"), Named("b"), torch.device("cpu"), rounds=3)
    assert seen == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up each, then AB, BA, AB


@pytest.mark.slow
def test_startup_is_measured_from_the_interpreter_not_the_shell_that_execs_it(tmp_path):
    out = tmp_path / "o"
    command = (f"sleep 3; exec {sys.executable} -m taylorprune run --model demo --method magnitude --sparsity 0.5 "
               f"--output {out}")
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", command], check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "TAYLORPRUNE_CACHE": "off"})
    elapsed = time.perf_counter() - t0
    report = json.loads((out / "taylorprune_report.json").read_text())
    assert report["phases_s"]["startup"] < elapsed - 3  # the 3 s the shell slept before exec are not in it
    assert report["wall_s"] < elapsed - 3
