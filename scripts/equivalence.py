"""Same results as before a refactor: twelve runs on the bundled stories260K, fingerprinted, round-off-proof.

The runs go through the CLI (the stable interface), so the script works on any revision. Each output folder
is reduced to a fingerprint: per tensor its shape, the sha256 of its zero pattern (the mask), its norm and
four projections on fixed random unit vectors; plus the run's perplexity.

Why references need more than one run: another CPU's kernels sum floats in another order (~1e-7 relative), and
a score that close to its threshold lands on the other side (on an AMD EPYC, Fisher 50% moves 2 of 113,280
zeros of ``model.layers.0.mlp.down_proj`` against an Intel recording, and the 0.29M model's PPL 0.16%). So
``--record`` also makes ``--simulate K`` pairs of runs whose statistics (every accumulator's and every pass's
result, ``perturbed_statistics``) are multiplied by 1 ± ε·N(0, 1), the same noise with both signs, ε = ``--eps``.
That stories260K tie lies 9.4e-7 apart (relative), so another CPU's statistics differ by about 1e-6, more than the
~1e-7 of one float sum (the gradients cross every block). ε = 2e-6 moves a Fisher score pair (∝ g²) by ~6e-6 σ,
and of a pair of mirrored runs one crosses any tie closer than that, so four pairs miss that tie with odds ~3e-4
(the recorded near-ties hold it: tests/test_equivalence.py). A larger ε flips ties no CPU would and makes the
chaotic runs (OBA's swap searches, whose flips cascade through the later blocks) look far noisier than they are:
at 1e-5, OBA + 2 OBS swaps moved the PPL by 4%.

Per tensor the reference keeps the positions whose zero/non-zero state moved in any simulated run (``loose``,
near-ties), the hash of the mask with those positions cleared, and how far norm and projections moved
(``spread``); per run how far the PPL moved. ``compare`` accepts a mask that differs only at loose positions,
weights within max(``WEIGHT_RTOL``·norm, ``SLACK``·spread) and a PPL within max(``PPL_RTOL``, ``SLACK``·its
spread): a flip far from its threshold (a position no simulated run moved) or a changed weight still fails, as the
tests prove.

    python scripts/equivalence.py --record tests/data/equivalence.json [--simulate 4 --eps 2e-6]
    python scripts/equivalence.py --check tests/data/equivalence.json [--only NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

WEIGHT_RTOL = 1e-5
PPL_RTOL = 1e-4
SLACK = 2.0  # another CPU may move a near-tie result further than one simulated run did
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


def _hash(zeros: torch.Tensor) -> str:
    return hashlib.sha256(zeros.numpy().tobytes()).hexdigest()[:16]


def fingerprint(folder: Path) -> dict:
    """Per tensor of the folder's safetensors files: shape, mask hash, norm and projections; plus the PPL.

    ``zeros`` (the flat zero pattern) stays in memory for ``compare`` and is never written to a reference."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(name).to(torch.float64).flatten()
                zeros = t == 0
                tensors[name] = {"shape": list(f.get_slice(name).get_shape()), "mask": _hash(zeros),
                                 "norm": t.norm().item(), "proj": (_directions(t.numel()) @ t).tolist(),
                                 "zeros": zeros}
    report = json.loads((folder / "taylorprune_report.json").read_text())
    return {"perplexity": _perplexity(report), "tensors": tensors}


def _perplexity(report: dict) -> float:
    """The run's perplexity, wherever the report of this revision keeps it."""
    if isinstance(report.get("metrics"), dict) and "perplexity" in report["metrics"]:
        return report["metrics"]["perplexity"]
    ev = report.get("evaluation") or {}
    if "perplexity" in ev and isinstance(ev["perplexity"], dict):
        return ev["perplexity"]["perplexity"]
    return ev["perplexity"]


def _perturb(stats: dict, eps: float, gen: torch.Generator) -> dict:
    """Every floating tensor of a statistics mapping × (1 + eps·N(0,1)); square ones with symmetric noise."""
    def one(t: object) -> object:
        if isinstance(t, dict):
            return {k: one(v) for k, v in t.items()}
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        if t.dim() == 2 and t.shape[0] == t.shape[1]:
            noise = (noise + noise.T) / 2**0.5
        return (t.double() * (1 + eps * noise)).to(t.dtype)
    return one(stats)


class _Perturbed:
    """An accumulator whose result is perturbed (what another CPU's sums would give)."""

    def __init__(self, inner: object, eps: float, gen: torch.Generator) -> None:
        self.inner, self.eps, self.gen = inner, eps, gen

    def add(self, x: torch.Tensor) -> None:
        self.inner.add(x)

    def reduce(self) -> None:
        self.inner.reduce()

    def result(self) -> torch.Tensor:
        return _perturb({"r": self.inner.result()}, self.eps, self.gen)["r"]


@contextlib.contextmanager
def perturbed_statistics(eps: float, seed: int) -> Iterator[None]:
    """Within the block, every registered statistic comes out × (1 + eps·N(0,1)): another CPU, simulated."""
    from taylorprune.stats import registry

    gen = torch.Generator().manual_seed(seed)  # a negative eps mirrors the noise of the same seed

    def wrap(source):
        if source.accumulator is not None:
            return dataclasses.replace(source, accumulator=lambda lin, f=source.accumulator: _Perturbed(f(lin), eps,
                                                                                                     gen))
        return dataclasses.replace(source, compute=lambda *a, f=source.compute: _perturb(f(*a), eps, gen))

    saved = registry.SOURCES, registry.STATISTICS
    registry.SOURCES = tuple(wrap(s) for s in saved[0])
    registry.STATISTICS = registry._index(registry.SOURCES)
    try:
        yield
    finally:
        registry.SOURCES, registry.STATISTICS = saved


def run_one(name: str, work: Path, eps: float = 0.0, seed: int = 0) -> dict:
    """Run ``name`` through the CLI (statistics perturbed when ``eps``) and fingerprint its output."""
    from typer.testing import CliRunner

    from taylorprune.cli import app

    out = work / f"{name.replace(' ', '_').replace('%', '').replace(':', '-')}{f'-sim{seed}{eps:+g}' if eps else ''}"
    with perturbed_statistics(eps, seed) if eps else contextlib.nullcontext():
        res = CliRunner().invoke(app, ["run", *COMMON, *RUNS[name], "--output", str(out), "--overwrite"])
    if res.exit_code != 0:
        raise SystemExit(f"{name}: exit {res.exit_code}: {res.output[-2000:]}")
    return fingerprint(out)


def reference(clean: dict, simulated: list[dict]) -> dict:
    """The stored reference of one run: the clean fingerprint with what the simulated CPUs moved."""
    out = {"perplexity": clean["perplexity"], "tensors": {}, "perplexity_spread": max(
        (abs(s["perplexity"] - clean["perplexity"]) / clean["perplexity"] for s in simulated), default=0.0)}
    for key, c in clean["tensors"].items():
        entry = {k: v for k, v in c.items() if k != "zeros"}
        loose = torch.zeros_like(c["zeros"])
        spread = 0.0
        for s in simulated:
            t = s["tensors"][key]
            if t["shape"] != c["shape"]:
                raise SystemExit(f"{key}: a simulated CPU changes its shape; structure scores tie")
            loose |= t["zeros"] != c["zeros"]
            spread = max(spread, *(abs(a - b) for a, b in zip([t["norm"], *t["proj"]], [c["norm"], *c["proj"]],
                                                              strict=True)))
        if loose.any():
            entry["loose"] = loose.nonzero().flatten().tolist()
            entry["loose_mask"] = _hash(c["zeros"] & ~loose)
        if spread > WEIGHT_RTOL * c["norm"]:
            entry["spread"] = spread
        out["tensors"][key] = entry
    return out


def _mask_ok(g: dict, w: dict) -> bool:
    if g["mask"] == w["mask"]:
        return True
    if "loose" not in w or "zeros" not in g:
        return False
    zeros = g["zeros"].clone()
    zeros[torch.tensor(w["loose"], dtype=torch.long)] = False
    return _hash(zeros) == w["loose_mask"]


def compare(name: str, got: dict, want: dict) -> list[str]:
    """What differs between a fingerprint and a reference beyond round-off (empty: the same results)."""
    bad = []
    ppl_tol = max(PPL_RTOL, SLACK * want.get("perplexity_spread", 0.0))
    if abs(got["perplexity"] - want["perplexity"]) > ppl_tol * abs(want["perplexity"]):
        bad.append(f"{name}: perplexity {got['perplexity']:.6f} != {want['perplexity']:.6f}")
    if set(got["tensors"]) != set(want["tensors"]):
        bad.append(f"{name}: tensors differ: {sorted(set(got['tensors']) ^ set(want['tensors']))[:5]}")
    for key in sorted(set(got["tensors"]) & set(want["tensors"])):
        g, w = got["tensors"][key], want["tensors"][key]
        tol = max(WEIGHT_RTOL * w["norm"], SLACK * w.get("spread", 0.0)) + 1e-9
        if g["shape"] != w["shape"]:
            bad.append(f"{name}: {key}: shape differs")
        elif not _mask_ok(g, w):
            bad.append(f"{name}: {key}: mask differs beyond round-off near-ties")
        elif any(abs(a - b) > tol for a, b in zip([g["norm"], *g["proj"]], [w["norm"], *w["proj"]], strict=True)):
            bad.append(f"{name}: {key}: weights differ beyond round-off")
    return bad


def dumps(reference: dict) -> str:
    """The reference as JSON, one line per near-tie list (thousands of positions for the chaotic runs)."""
    text = json.dumps(reference, indent=1)
    return re.sub(r'"(loose|proj)": \[([^\]]*)\]', lambda m: f'"{m[1]}": [{" ".join(m[2].split())}]', text) + "\n"


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _meta(simulate: int, eps: float) -> dict:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    return {"revision": head, "cpu": _cpu(), "torch": torch.__version__,
            "simulate": simulate, "eps": eps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path)
    group.add_argument("--check", type=Path)
    ap.add_argument("--only", action="append", help="run only this run (repeatable)")
    ap.add_argument("--work", type=Path, help="keep the output folders here")
    ap.add_argument("--simulate", type=int, default=4, help="mirrored pairs of simulated CPUs per recorded run")
    ap.add_argument("--eps", type=float, default=2e-6, help="relative perturbation of the simulated statistics")
    args = ap.parse_args()
    names = args.only or list(RUNS)
    os.environ.setdefault("TAYLORPRUNE_CACHE", tempfile.mkdtemp(prefix="tp-equiv-cache-"))
    work = args.work or Path(tempfile.mkdtemp(prefix="tp-equiv-"))
    if args.record:
        old = json.loads(args.record.read_text()) if args.record.is_file() and args.only else {}
        out = {**old, "_meta": _meta(args.simulate, args.eps)}
        for name in names:
            clean = run_one(name, work)
            sims = [run_one(name, work, sign * args.eps, seed) for seed in range(1, args.simulate + 1)
                    for sign in (1, -1)]
            out[name] = reference(clean, sims)
            moved = sum(len(t.get("loose", [])) for t in out[name]["tensors"].values())
            print(f"{name}: perplexity {clean['perplexity']:.6f}, spread {out[name]['perplexity_spread']:.2e}, "
                  f"{moved} near-tie positions", flush=True)
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(dumps(out))
        return
    want = json.loads(args.check.read_text())
    bad = []
    for name in names:
        got = run_one(name, work)
        print(f"{name}: perplexity {got['perplexity']:.6f}", flush=True)
        bad += compare(name, got, want[name])
    print("\n".join(bad) if bad else f"same results as {args.check.name}: {len(names)} runs")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
