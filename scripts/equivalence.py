"""Same results as before a refactor: twelve runs on the bundled stories260K, fingerprinted.

The runs go through the CLI (the stable interface), so the script works on any revision. Each output folder
is reduced to a fingerprint: per tensor its shape, the sha256 of its zero pattern (the mask), its norm and
four projections on fixed random unit vectors; plus the run's perplexity. ``--record`` writes the
fingerprints (``tests/data/equivalence_4b83646.json`` was recorded at 4b83646); ``--check`` compares a fresh
run with them: identical masks, weights equal to float round-off (every projection and the norm within
``WEIGHT_RTOL`` of the tensor's norm) and perplexity within ``PPL_RTOL``.

    python scripts/equivalence.py --record tests/data/equivalence_4b83646.json
    python scripts/equivalence.py --check tests/data/equivalence_4b83646.json [--only NAME]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

WEIGHT_RTOL = 1e-5
PPL_RTOL = 1e-4
COMMON = ["--model", "demo", "--calib", "wikitext2-valid", "--calib-sampling", "sequential", "--nsamples", "16",
          "--seqlen", "128", "--eval", "--eval-seqlen", "128", "--max-windows", "20", "--device", "cpu"]
RUNS: dict[str, list[str]] = {
    "magnitude 50%": ["--method", "magnitude", "--sparsity", "0.5"],
    "wanda 2:4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt 50%": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "gblm 50%": ["--method", "gblm", "--sparsity", "0.5"],
    "fisher 50%": ["--method", "fisher", "--sparsity", "0.5"],
    "oba 50%": ["--method", "oba", "--sparsity", "0.5"],
    "oba obs 2 swaps 50%": ["--method", "oba", "--sparsity", "0.5", "--update", "obs", "--obs-swaps", "2"],
    "sparsegpt recon 50%": ["--method", "sparsegpt", "--sparsity", "0.5", "--recon", "block"],
    "wanda owl 70%": ["--method", "wanda", "--sparsity", "0.7", "--allocation", "owl"],
    "neurons 0.3 oba": ["--structure", "neurons", "--structure-ratio", "0.3", "--method", "oba"],
    "heads 0.5 wanda": ["--structure", "heads", "--structure-ratio", "0.5", "--method", "wanda"],
    "blocks 0.4 taylor": ["--structure", "blocks", "--structure-ratio", "0.4", "--method", "taylor"],
}


def _directions(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    r = torch.randn(4, n, generator=g, dtype=torch.float64)
    return r / r.norm(dim=1, keepdim=True)


def fingerprint(folder: Path) -> dict:
    """Per tensor of the folder's safetensors files: shape, mask hash, norm and projections; plus the PPL."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(name).to(torch.float64).flatten()
                zeros = (t == 0).numpy().tobytes()
                tensors[name] = {"shape": list(f.get_slice(name).get_shape()),
                                 "mask": hashlib.sha256(zeros).hexdigest()[:16], "norm": t.norm().item(),
                                 "proj": (_directions(t.numel()) @ t).tolist()}
    report = json.loads((folder / "taylorprune_report.json").read_text())
    return {"perplexity": _perplexity(report), "tensors": tensors}


def _perplexity(report: dict) -> float:
    """The run's perplexity, wherever the report of this revision keeps it."""
    ev = report.get("evaluation") or {}
    if "perplexity" in ev and isinstance(ev["perplexity"], dict):
        return ev["perplexity"]["perplexity"]
    return ev["perplexity"]


def run_one(name: str, work: Path) -> dict:
    from typer.testing import CliRunner

    from taylorprune.cli import app

    out = work / name.replace(" ", "_").replace("%", "").replace(":", "-")
    res = CliRunner().invoke(app, ["run", *COMMON, *RUNS[name], "--output", str(out), "--overwrite"])
    if res.exit_code != 0:
        raise SystemExit(f"{name}: exit {res.exit_code}: {res.output[-2000:]}")
    return fingerprint(out)


def compare(name: str, got: dict, want: dict) -> list[str]:
    """What differs between two fingerprints (empty: the same results)."""
    bad = []
    if abs(got["perplexity"] - want["perplexity"]) > PPL_RTOL * abs(want["perplexity"]):
        bad.append(f"{name}: perplexity {got['perplexity']:.6f} != {want['perplexity']:.6f}")
    if set(got["tensors"]) != set(want["tensors"]):
        bad.append(f"{name}: tensors differ: {sorted(set(got['tensors']) ^ set(want['tensors']))[:5]}")
    for key in sorted(set(got["tensors"]) & set(want["tensors"])):
        g, w = got["tensors"][key], want["tensors"][key]
        tol = WEIGHT_RTOL * w["norm"] + 1e-9
        if g["shape"] != w["shape"] or g["mask"] != w["mask"]:
            bad.append(f"{name}: {key}: shape or mask differs")
        elif any(abs(a - b) > tol for a, b in zip([g["norm"], *g["proj"]], [w["norm"], *w["proj"]], strict=True)):
            bad.append(f"{name}: {key}: weights differ beyond round-off")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path)
    group.add_argument("--check", type=Path)
    ap.add_argument("--only", action="append", help="run only this run (repeatable)")
    ap.add_argument("--work", type=Path, help="keep the output folders here")
    args = ap.parse_args()
    names = args.only or list(RUNS)
    os.environ.setdefault("TAYLORPRUNE_CACHE", tempfile.mkdtemp(prefix="tp-equiv-cache-"))
    work = args.work or Path(tempfile.mkdtemp(prefix="tp-equiv-"))
    got = {}
    for name in names:
        got[name] = run_one(name, work)
        print(f"{name}: perplexity {got[name]['perplexity']:.6f}", flush=True)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(got, indent=1) + "\n")
        return
    want = json.loads(args.check.read_text())
    bad = [line for name in names for line in compare(name, got[name], want[name])]
    print("\n".join(bad) if bad else f"same results as {args.check.name}: {len(names)} runs")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
