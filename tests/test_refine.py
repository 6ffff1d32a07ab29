"""Swap search on the exact layer reconstruction error: never worse, exact sparsity and N:M, locally optimal."""

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.prune.masks import Pattern, build_mask, check_nm
from taylorprune.prune.swap import _prefix_changes, row_errors, swap_refine

from .conftest import VALID


def layer(rows=6, cols=16, tokens=64, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g)
    if correlated:  # real activations are correlated: that is where the cross terms matter
        X = X @ (torch.eye(cols) + 0.6 * torch.randn(cols, cols, generator=g))
    return W, X, X.T @ X


def wanda_keep(W, X, pattern):
    return build_mask(W.abs() * X.norm(dim=0), pattern)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["0.5", "0.7", "2:4", "1:4", "4:8"]), st.integers(1, 6),
       st.integers(9, 40))
def test_never_raises_a_rows_error_and_keeps_exact_counts(seed, spec, rounds, cols):
    pattern = Pattern(float(spec)) if ":" not in spec else Pattern(0.5, "row", *map(int, spec.split(":")))
    if pattern.is_nm:
        pattern = Pattern(1 - pattern.n / pattern.m, "row", pattern.n, pattern.m)
    W, X, H = layer(cols=cols, seed=seed)
    keep = wanda_keep(W, X, pattern)
    new, info = swap_refine(W, H, keep, pattern, rounds=rounds, fraction=0.1)
    before, after = row_errors(W, ~keep, H), row_errors(W, ~new, H)
    assert (after <= before * (1 + 1e-5) + 1e-6).all()
    assert torch.equal(new.sum(1), keep.sum(1))
    if pattern.is_nm:
        assert check_nm(W * new, pattern.n, pattern.m)
        full = cols - cols % pattern.m
        assert torch.equal(new[:, full:], keep[:, full:])  # a partial trailing group is never touched
    assert info.error_after == pytest.approx(float(after.sum()), rel=1e-4, abs=1e-5)


def test_prefix_changes_are_the_exact_error_changes_of_every_prefix():
    torch.manual_seed(3)
    rows, cols, k = 5, 16, 4
    x = torch.randn(64, cols)
    H = x.T @ x
    W = torch.randn(rows, cols)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    pruned[:, ::2] = True
    A, B = W * 0.8, W  # kept values after some update; restored weights come back at their dense value
    U = W - A * ~pruned
    V = U @ H
    kept_cols, pruned_cols = torch.arange(1, cols, 2), torch.arange(0, cols, 2)
    i = torch.stack([kept_cols[torch.randperm(8)[:k]] for _ in range(rows)])
    j = torch.stack([pruned_cols[torch.randperm(8)[:k]] for _ in range(rows)])
    valid = torch.arange(k) < torch.tensor([4, 3, 1, 0, 2])[:, None]
    got = _prefix_changes(H, V, A, B, i, j, valid, budget=40)  # small budget: several row chunks
    for r in range(rows):
        for s in range(1, k + 1):
            u = U[r].clone()
            for t in range(s):
                if valid[r, t]:
                    u[i[r, t]] += A[r, i[r, t]]
                    u[j[r, t]] -= B[r, j[r, t]]
            want = u @ H @ u - U[r] @ H @ U[r]
            assert float(got[r, s - 1]) == pytest.approx(float(want), rel=1e-4, abs=1e-3)


def test_ends_in_a_swap_local_optimum_and_beats_the_wanda_mask():
    W, X, H = layer(rows=4, cols=24, seed=3)
    keep = wanda_keep(W, X, Pattern(0.5))
    new, info = swap_refine(W, H, keep, Pattern(0.5), rounds=200, fraction=0.5)  # all pairs
    assert info.error_after < 0.9 * info.error_before and info.swaps > 0
    errors = row_errors(W, ~new, H)
    for r in range(W.shape[0]):  # no single swap of a kept and a pruned weight lowers any row further
        kept, pruned = new[r].nonzero().flatten(), (~new[r]).nonzero().flatten()
        for i, j in itertools.product(kept.tolist(), pruned.tolist()):
            trial = new[r].clone()
            trial[i], trial[j] = False, True
            assert row_errors(W[r : r + 1], ~trial[None], H)[0] >= errors[r] * (1 - 1e-5)


def test_reaches_the_exhaustive_optimum_on_small_rows_more_often_than_not():
    hits = 0
    for seed in range(10):
        W, X, H = layer(rows=1, cols=10, seed=seed)
        keep = wanda_keep(W, X, Pattern(0.5))
        new, _ = swap_refine(W, H, keep, Pattern(0.5), rounds=100, fraction=0.2)
        best = min(float(row_errors(W, ~torch.tensor([[c in k for c in range(10)]]), H)[0])
                   for k in itertools.combinations(range(10), 5))
        hits += float(row_errors(W, ~new, H)[0]) <= best * (1 + 1e-5)
        assert float(row_errors(W, ~new, H)[0]) <= float(row_errors(W, ~keep, H)[0]) * (1 + 1e-6)
    assert hits >= 6


def test_refine_swap_through_the_cli_records_what_it_did(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["run", "--model", "demo", "--method", "wanda", "--refine", "swap", "--pattern", "2:4",
                              "--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "4",
                              "--seqlen", "64", "--output", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "taylorprune_report.json").read_text())
    assert report["refine"] == "swap" and report["components"]["refine"]["swap_rounds"] == 10
    assert all(lin["refine"]["error_after"] <= lin["refine"]["error_before"] * (1 + 1e-5) for lin in report["linears"])
    assert sum(lin["refine"]["swaps"] for lin in report["linears"]) > 0
    bad = runner.invoke(app, ["run", "--model", "demo", "--method", "sparsegpt", "--refine", "swap", "--sparsity",
                              "0.5", "--output", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "chooses its mask itself" in bad.output
