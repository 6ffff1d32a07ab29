"""Generated calibration under torchrun (gloo, CPU): two ranks sample and prune what one process does.

Why it can hold exactly: ``calib.generate.sample_ids`` gives each rank a contiguous share of the *batches* of
sequences (``World.share``), seeds each batch's generator from (``--seed``, batch index) with a KV cache of its own,
and sums the rows into place over the ranks (every other rank's rows are zeros, and integer sums are exact), so the
ids depend on model, settings and seed, never on the number of processes. The configurations below make the shares
uneven (3 batches over 2 ranks: 1 and 2) and, for ``taylorprune generate``, start from prompts of different lengths
(the left-padded path). The ids must then be equal exactly; Wanda's masks on them equal too, and the kept weights
within 1e-6 (Wanda never changes a kept weight; its activation norms are summed over the ranks' windows in another
order, ~1e-7 relative, which would only matter for a score within that of its row's threshold; the test proves
no score is that close by perturbing every statistic of the one-process run by ±1e-5 relative, as
scripts/equivalence.py simulates another CPU, and finding the same masks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from taylorprune.cli import app

from .test_distributed import WORKER, torchrun
from .test_equivalence import EQUIV

runner = CliRunner()
SEQLEN = 64
GEN = ["--gen-samples", "6", "--gen-batch", "2", "--gen-top-p", "0.95"]  # 3 batches: rank 0 takes 1, rank 1 takes 2
EPS = 1e-5  # ~100 times what summing the windows in another order moves a statistic by
RUN = ["--model", "demo", "--device", "cpu", "--calib", "generated", "--calib-sampling", "sequential", "--nsamples",
       "4", "--seqlen", str(SEQLEN), "--method", "wanda", "--sparsity", "0.5", "--seed", "5", *GEN]


def _ids(path: Path) -> tuple[torch.Tensor, dict, dict]:
    """(ids, key, record) of a generated-calibration cache file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return f.get_tensor("ids"), json.loads(meta["key"]), json.loads(meta["record"])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _same_generation(dp: Path, one: Path) -> None:
    got, want = _ids(dp), _ids(one)
    assert got[0].dtype == torch.long and torch.equal(got[0], want[0])
    assert got[1] == want[1]  # the same cache identity: either file serves the other kind of run
    assert (got[2]["world_size"], want[2]["world_size"]) == (2, 1)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A token cache of this test's own (torchrun's ranks inherit it through the environment)."""
    monkeypatch.setenv("TAYLORPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.slow
def test_two_ranks_generate_and_prune_what_one_process_does(tmp_path, cache):
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps({"wanda": [*RUN, "--gen-cache", str(tmp_path / "dp.safetensors")]}))
    res = torchrun(str(WORKER), str(spec), str(tmp_path / "dp"))
    assert res.returncode == 0, res.stderr[-3000:]
    one = runner.invoke(app, ["run", *RUN, "--gen-cache", str(tmp_path / "one.safetensors"), "--output",
                              str(tmp_path / "one")])
    assert one.exit_code == 0, one.output[-2000:]
    _same_generation(tmp_path / "dp.safetensors", tmp_path / "one.safetensors")
    ids = _ids(tmp_path / "one.safetensors")[0]
    assert ids.shape == (6, SEQLEN) and len({tuple(r.tolist()) for r in ids}) == 6  # six different sequences
    report = json.loads((tmp_path / "dp" / "wanda" / "taylorprune_report.json").read_text())
    assert report["world_size"] == 2 and report["calibration"]["generated"]["world_size"] == 2
    got, want = _weights(tmp_path / "dp" / "wanda"), _weights(tmp_path / "one")
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert torch.equal(got[name] == 0, w == 0), f"{name}: another mask"
        torch.testing.assert_close(got[name], w, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    for eps in (EPS, -EPS):  # the masks are not within round-off of a tie (the ids are reused from the cache file)
        with EQUIV.perturbed_statistics(eps, seed=0):
            moved = runner.invoke(app, ["run", *RUN, "--gen-cache", str(tmp_path / "one.safetensors"), "--output",
                                        str(tmp_path / f"sim{eps:+g}")])
        assert moved.exit_code == 0, moved.output[-2000:]
        sim = _weights(tmp_path / f"sim{eps:+g}")
        assert [n for n, w in want.items() if not torch.equal(sim[n] == 0, w == 0)] == [], eps


@pytest.mark.slow
def test_generate_command_under_torchrun_writes_what_one_process_writes(tmp_path, cache):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nTom\nThe little bird sang a song\n")  # starts of different lengths
    args = ["--model", "demo", "--device", "cpu", "--gen-samples", "5", "--gen-batch", "2", "--gen-length", "40",
            "--gen-prompts", str(prompts), "--seed", "2"]
    res = torchrun("-m", "taylorprune", "generate", *args, "--gen-cache", str(tmp_path / "dp.safetensors"),
                   "--output", str(tmp_path / "dp.jsonl"))
    assert res.returncode == 0, res.stderr[-3000:]
    one = runner.invoke(app, ["generate", *args, "--gen-cache", str(tmp_path / "one.safetensors"), "--output",
                              str(tmp_path / "one.jsonl")])
    assert one.exit_code == 0, one.output[-2000:]
    _same_generation(tmp_path / "dp.safetensors", tmp_path / "one.safetensors")
    texts = (tmp_path / "dp.jsonl").read_text()
    assert texts == (tmp_path / "one.jsonl").read_text() and len(texts.splitlines()) == 5
