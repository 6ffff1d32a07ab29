"""Data-parallel calibration (torchrun, gloo on the CPU): two processes give what one gives.

Every configuration of scripts/equivalence.py (whose one-process references tests/test_equivalence.py keeps) runs
under ``torchrun --nproc-per-node 2`` on stories260K and matches its reference as a one-process run must: masks
equal up to the reference's near-ties, weights and perplexity within round-off (the references may come from another
CPU, so their tolerance is the one a one-process run gets; see scripts/equivalence.py). The configurations compared
with a one-process run made here, on the same CPU, must also agree to 1e-5 relative in perplexity. One configuration is
left out and replaced: SparseGPT followed by ``--recon block`` is chaotic at this tiny scale (two runs whose Adam
fits differ in round-off flip two of SparseGPT's near-tie mask choices in the last block), so reconstruction is
checked on Wanda's masks against a one-process run made here, and so is recovery by distillation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.distributed import World

from .test_equivalence import EQUIV, references

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
PPL_RTOL = 1e-5
CHAOTIC = "sparsegpt recon 50%"
STREAMED = "gblm 50% streamed"


EXTRA = {"wanda recon 50%": ["--method", "wanda", "--sparsity", "0.5", "--recon", "block"],
         "wanda recon span 2 50%": ["--method", "wanda", "--sparsity", "0.5", "--recon", "block", "--recon-span", "2"],
         "wanda recover 50%": ["--method", "wanda", "--sparsity", "0.5", "--recover", "distill", "--recover-windows",
                               "24", "--recover-steps", "8", "--recover-heldout", "4", "--recover-eval-every", "4"]}


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("%", "").replace(":", "-")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _compare(name: str, got: dict, want: dict) -> list[str]:
    """Against a one-process run made on this CPU: the reference comparison and perplexity within 1e-5."""
    bad = EQUIV.compare(name, got, want)
    if abs(got["perplexity"] - want["perplexity"]) > PPL_RTOL * abs(want["perplexity"]):
        bad.append(f"{name}: perplexity {got['perplexity']!r} vs {want['perplexity']!r} (beyond {PPL_RTOL:g})")
    return bad


def one_process(name: str, args: list[str], work: Path) -> dict:
    res = CliRunner().invoke(app, ["run", *args, "--output", str(work / _slug(name)), "--overwrite"])
    assert res.exit_code == 0, res.output[-2000:]
    return EQUIV.fingerprint(work / _slug(name))


def test_shares_are_contiguous_disjoint_and_cover_every_window():
    for size in (1, 2, 3, 5):
        for count in (size, 7, 16, 129):
            shares = [World(r, size).share(count) for r in range(size)]
            assert [i for s in shares for i in s] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.slow
def test_two_processes_give_what_one_gives_for_every_method_and_stage(tmp_path):
    runs = {_slug(n): [*EQUIV.COMMON, *a] for n, a in {**EQUIV.RUNS, **EXTRA}.items() if n != CHAOTIC}
    runs[_slug(STREAMED)] = [*EQUIV.COMMON, *EQUIV.RUNS["gblm 50%"], "--stream"]  # block by block, every pass
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    res = torchrun(str(WORKER), str(spec), str(tmp_path / "dp"))
    assert res.returncode == 0, res.stderr[-3000:]
    want = references()
    want[STREAMED] = want["gblm 50%"]  # streaming equals the in-memory passes to round-off (test_streamed_passes)
    bad = [line for name in want if name != CHAOTIC for line in
           EQUIV.compare(name, EQUIV.fingerprint(tmp_path / "dp" / _slug(name)), want[name])]
    for name, args in EXTRA.items():
        here = one_process(name, [*EQUIV.COMMON, *args], tmp_path / "one")
        bad += _compare(name, EQUIV.fingerprint(tmp_path / "dp" / _slug(name)), here)
    assert bad == []
    report = json.loads((tmp_path / "dp" / _slug("gblm 50%") / "taylorprune_report.json").read_text())
    assert report["world_size"] == 2
    assert report["calibration"]["distributed"] == {"world_size": 2, "backend": "gloo", "windows_per_rank": [8, 8]}


@pytest.mark.slow
def test_torchrun_of_the_cli_writes_once_and_refuses_what_is_not_data_parallel(tmp_path):
    args = [*EQUIV.COMMON, "--method", "wanda", "--sparsity", "0.5"]
    res = torchrun("-m", "taylorprune", "run", *args, "--output", str(tmp_path / "dp"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("achieved sparsity") == 1  # rank 0 alone prints the summary
    want = one_process("wanda 50%", args, tmp_path / "one")
    assert _compare("wanda 50%", EQUIV.fingerprint(tmp_path / "dp"), want) == []
    res = torchrun("-m", "taylorprune", "run", *EQUIV.COMMON, "--method", "oba", "--oba-mode", "released",
                   "--sparsity", "0.5", "--output", str(tmp_path / "r"))
    assert res.returncode != 0
    assert "error: --method oba with these options (a whole-model procedure): not data-parallel yet" in res.stderr
    assert "[rank 1] error: --method oba" in res.stderr
    assert "taylorprune/" not in res.stderr.split("Traceback", 1)[-1]  # torchrun's own traceback names no frame of ours
    assert not (tmp_path / "r").exists()
    few = [*EQUIV.COMMON[:EQUIV.COMMON.index("--nsamples")], "--nsamples", "1", "--seqlen", "128", "--method", "wanda",
           "--sparsity", "0.5"]
    res = torchrun("-m", "taylorprune", "run", *few, "--output", str(tmp_path / "r"))
    assert res.returncode != 0
    assert "--nsamples 1: fewer calibration windows than the 2 processes" in res.stderr
    assert not (tmp_path / "r").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_killed_rank_makes_the_others_fail_and_nothing_is_written(tmp_path):
    port, out = str(_free_port()), tmp_path / "out"
    args = [*EQUIV.COMMON, "--method", "wanda", "--sparsity", "0.5", "--recon", "block", "--recon-steps", "5000",
            "--recon-patience", "1000", "--output", str(out)]
    ranks = [subprocess.Popen([sys.executable, "-m", "taylorprune", "run", *args], stderr=subprocess.PIPE, text=True,
                              stdout=subprocess.DEVNULL,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(r),
                                       LOCAL_RANK=str(r), TAYLORPRUNE_DIST_TIMEOUT="120"))
             for r in range(2)]
    try:
        for line in ranks[0].stderr:  # rank 0 reports progress; wait until both ranks are pruning
            if "pruning with" in line:
                break
        time.sleep(2)
        ranks[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        rest = ranks[0].communicate(timeout=180)[1]
        waited = time.monotonic() - t0
    finally:
        for p in ranks:
            p.kill()
    assert ranks[0].returncode not in (0, None)
    assert waited < 150
    assert "data-parallel run failed or stopped" in rest, rest[-2000:]
    assert "Traceback" not in rest
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary folder left beside it


@pytest.mark.slow
def test_a_run_whose_other_ranks_never_come_fails_in_one_line(tmp_path):
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0",
               TAYLORPRUNE_DIST_TIMEOUT="3")
    res = subprocess.run([sys.executable, "-m", "taylorprune", "run", "--model", "demo", "--method", "magnitude",
                          "--sparsity", "0.5", "--output", str(tmp_path / "out")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 1
    assert "error: could not join the data-parallel run (WORLD_SIZE=2)" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
