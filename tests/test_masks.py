"""Masks: exact per-row / per-layer counts, N:M compliance, determinism, pattern parsing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taylorprune.errors import RunError, UserError
from taylorprune.prune.masks import Pattern, build_mask, check_nm, nm_mask, parse_pattern

shapes = st.tuples(st.integers(1, 12), st.integers(1, 40))


def scores_for(shape, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g)
    return s.round() if ties else s


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sparsity=st.floats(0.01, 0.99), seed=st.integers(0, 10_000), ties=st.booleans())
def test_row_mask_prunes_exactly_k_lowest_per_row(shape, sparsity, seed, ties):
    s = scores_for(shape, seed, ties)
    keep = build_mask(s, Pattern(sparsity, "row"))
    k = int(shape[1] * sparsity)
    assert ((~keep).sum(1) == k).all()
    for r in range(shape[0]):  # every pruned score <= every kept score in its row
        if 0 < k < shape[1]:
            assert s[r][~keep[r]].max() <= s[r][keep[r]].min()


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sparsity=st.floats(0.01, 0.99), seed=st.integers(0, 10_000))
def test_layer_mask_prunes_exactly_k_lowest_overall(shape, sparsity, seed):
    s = scores_for(shape, seed)
    keep = build_mask(s, Pattern(sparsity, "layer"))
    k = int(s.numel() * sparsity)
    assert int((~keep).sum()) == k
    if 0 < k < s.numel():
        assert s[~keep].max() <= s[keep].min()


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 50), m=st.integers(2, 8), data=st.data(),
       seed=st.integers(0, 10_000), ties=st.booleans())
def test_nm_mask_keeps_n_largest_of_every_m(rows, cols, m, data, seed, ties):
    n = data.draw(st.integers(1, m - 1))
    s = scores_for((rows, cols), seed, ties)
    keep = nm_mask(s, n, m)
    full = cols - cols % m
    if full:
        kept_per_block = keep[:, :full].reshape(rows, -1, m).sum(-1)
        assert (kept_per_block == n).all()
    assert ((keep[:, full:]).sum(-1) == min(n, cols - full)).all()
    assert check_nm(s.abs().add(1) * keep, n, m)


def test_masks_are_deterministic_under_ties():
    s = torch.zeros(4, 16)
    a = build_mask(s, Pattern(0.5, "row"))
    b = build_mask(s.clone(), Pattern(0.5, "row"))
    assert torch.equal(a, b)
    assert torch.equal(a[0], torch.tensor([False] * 8 + [True] * 8))  # stable: first indices pruned


def test_check_nm_detects_violation():
    w = torch.ones(2, 8)
    assert not check_nm(w, 2, 4)
    w[:, [0, 1, 4, 5]] = 0
    assert check_nm(w, 2, 4)


def test_non_finite_scores_are_an_error_naming_the_layer():
    s = torch.ones(2, 4)
    s[1, 2] = float("nan")
    with pytest.raises(RunError, match="model.layers.0.mlp.up_proj"):
        build_mask(s, Pattern(0.5), "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize(
    "sparsity,pattern,expected",
    [(0.5, None, (0.5, None, None)), (None, "2:4", (0.5, 2, 4)), (None, "1:4", (0.75, 1, 4)),
     (0.5, "4:8", (0.5, 4, 8))],
)
def test_parse_pattern(sparsity, pattern, expected):
    p = parse_pattern(sparsity, pattern)
    assert (p.sparsity, p.n, p.m) == expected


@pytest.mark.parametrize(
    "sparsity,pattern", [(None, None), (0.0, None), (1.0, None), (-0.1, None), (None, "4:4"),
                         (None, "0:4"), (None, "2-4"), (None, "a:b"), (0.6, "2:4"), (None, "5:4")],
)
def test_parse_pattern_rejects(sparsity, pattern):
    with pytest.raises(UserError):
        parse_pattern(sparsity, pattern)
