"""SparseGPT / OBS reconstruction on single layers and through the engine."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taylorprune import pipeline
from taylorprune.prune.masks import Pattern, build_mask, check_nm, parse_pattern
from taylorprune.prune.obs import obs_prune

from .conftest import VALID


def layer(rows=24, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3  # correlated inputs
    H = 2 * X.T @ X / 4
    return W, X, H


def recon_error(W, Wh, X):
    return (X @ W.T - X @ Wh.T).pow(2).sum().item()


@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(0.5, n=2, m=4), Pattern(0.75, n=1, m=4)])
def test_obs_update_beats_plain_masking_with_the_same_mask(pattern):
    W, X, H = layer()
    keep = build_mask(W.abs() * X.norm(dim=0), pattern)
    masked = W * keep
    updated, _, _ = obs_prune(W, H, pattern, keep=keep, blocksize=16)
    assert torch.equal(updated != 0, keep)  # the mask never changes
    assert recon_error(W, updated, X) < 0.95 * recon_error(W, masked, X)


def test_obs_removing_one_column_is_the_exact_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(6, 32, generator=g), torch.randn(400, 32, generator=g)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[:, 0] = False
    optimum = torch.zeros_like(W)
    for r in range(W.shape[0]):
        optimum[r, 1:] = torch.linalg.lstsq(X[:, 1:], X @ W[r]).solution
    updated, _, _ = obs_prune(W, 2 * X.T @ X / 4, Pattern(0.5), keep=keep, blocksize=8, percdamp=1e-6)
    torch.testing.assert_close(updated, optimum, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(0.5, n=2, m=4), Pattern(0.5, n=4, m=8)])
def test_sparsegpt_adaptive_mask_and_pattern(pattern):
    W, X, H = layer()
    pruned, saliency, info = obs_prune(W, H, pattern, blocksize=32)
    wanda_mask = build_mask(W.abs() * X.norm(dim=0), pattern)
    assert recon_error(W, pruned, X) < recon_error(W, W * wanda_mask, X)
    assert (pruned == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6)
    if pattern.is_nm:
        assert check_nm(pruned, pattern.n, pattern.m)
    assert info["percdamp_used"] == 0.01 and saliency.shape == W.shape


@settings(max_examples=25, deadline=None)
@given(cols=st.integers(4, 40), m=st.integers(2, 7), blocksize=st.integers(1, 20), data=st.data())
def test_sparsegpt_nm_holds_for_any_block_size(cols, m, blocksize, data):
    n = data.draw(st.integers(1, m - 1))
    W, X, H = layer(rows=5, cols=cols, tokens=64, seed=cols)
    pruned, _, _ = obs_prune(W, H, Pattern(1 - n / m, n=n, m=m), blocksize=blocksize)
    assert check_nm(pruned, n, m)


def test_cholesky_failure_escalates_damping_and_dead_inputs_are_handled():
    W, X, _ = layer(cols=16)
    X[:, 3] = 0  # a dead input
    X[:, 5] = X[:, 6]  # rank deficiency
    H = 2 * X.T @ X
    pruned, _, info = obs_prune(W, H, Pattern(0.5), percdamp=0.0, blocksize=8)
    assert info["percdamp_used"] > 0 or info["dead_inputs"] == 1
    assert info["dead_inputs"] == 1 and torch.isfinite(pruned).all()
    assert (pruned[:, 3] == 0).all()


def test_indefinite_hessian_falls_back_to_plain_masking_with_a_warning(tmp_path, tiny_dirs, monkeypatch):
    import taylorprune.prune.obs as obs

    monkeypatch.setattr(obs, "DAMP_RETRIES", ())  # every Cholesky "fails"
    res = pipeline.prune(run_opts(tmp_path, tiny_dirs["llama"], method="sparsegpt", pattern="2:4"))
    assert len(res.warnings) == len(res.linears)
    assert "fell back" in res.warnings[0]
    for lin in res.linears:
        assert check_nm(res.loaded.model.get_submodule(lin["name"]).weight, 2, 4)


def run_opts(tmp_path, model, **kw):
    return pipeline.RunOptions(model=str(model), output=str(tmp_path / "o"), calib_file=str(VALID),
                               calib_sampling="sequential", nsamples=4, seqlen=32, **kw)


def test_update_obs_keeps_the_scorers_mask_in_the_engine(tmp_path, tiny_dirs):
    plain = pipeline.prune(run_opts(tmp_path, tiny_dirs["llama"], method="wanda", sparsity=0.5))
    obs = pipeline.prune(run_opts(tmp_path, tiny_dirs["llama"], method="wanda", sparsity=0.5, update="obs"))
    changed = 0
    for lin in plain.linears:
        a = plain.loaded.model.get_submodule(lin["name"]).weight
        b = obs.loaded.model.get_submodule(lin["name"]).weight
        if lin["name"].endswith("layers.0.self_attn.q_proj"):  # block 0 sees identical inputs in both runs
            assert torch.equal(a != 0, b != 0)
        changed += int(not torch.equal(a, b))
        assert ((b == 0).sum(1) == b.shape[1] // 2).all()
    assert changed == len(plain.linears)


def test_sparsegpt_through_engine_with_2_4(tmp_path, tiny_dirs):
    res = pipeline.prune(run_opts(tmp_path, tiny_dirs["qwen2"], method="sparsegpt", pattern="2:4"))
    for lin in res.linears:
        assert check_nm(res.loaded.model.get_submodule(lin["name"]).weight, 2, 4)


def test_solver_methods_refuse_an_extra_update(tmp_path, tiny_dirs):
    from taylorprune.errors import UserError

    with pytest.raises(UserError, match="updates weights itself"):
        pipeline.validate(run_opts(tmp_path, tiny_dirs["llama"], method="sparsegpt", sparsity=0.5, update="obs"))
    assert parse_pattern(None, "2:4").is_nm
