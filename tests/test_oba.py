"""OBA statistics against brute-force Hessians; HVP modes agree; scores saved for every method."""

import pytest
import torch
from safetensors import safe_open
from torch.func import functional_call
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app
from taylorprune.modeling.attention import eager_attention
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import find_layout
from taylorprune.modeling.sweep import next_token_loss
from taylorprune.stats.hvp import model_hvp_pass
from taylorprune.stats.hvp_block import block_hvp_stats

from .conftest import VALID


@pytest.fixture(scope="module")
def micro():
    """A model whose target weights number about a thousand: full Hessians are cheap."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
    model.requires_grad_(False)
    layout = find_layout(model)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    return model, layout, ids


def flat_fn(model, layout, fn):
    targets = layout.all_targets
    names = [f"{t.path}.weight" for t in targets]
    shapes = [t.module.weight.shape for t in targets]
    sizes = [s.numel() for s in shapes]

    def f(flat):
        parts = [p.view(s) for p, s in zip(flat.split(sizes), shapes, strict=True)]
        return fn(dict(zip(names, parts, strict=True)))

    theta = torch.cat([t.module.weight.detach().flatten() for t in targets])
    return f, theta, sizes, names


@pytest.mark.slow
def test_model_scope_g_and_h_terms_equal_the_full_hessian(micro):
    model, layout, ids = micro
    f, theta, sizes, _ = flat_fn(model, layout, lambda p: sum(
        functional_call(model, p, (row[None],), {"labels": row[None]}).loss for row in ids))
    assert 500 < theta.numel() < 5000
    H = torch.autograd.functional.hessian(f, theta)
    g = torch.autograd.functional.jacobian(f, theta)
    hv_ref = H @ (-theta)
    for mode in ("blockwise", "fwd-rev", "double-backward"):
        got = model_hvp_pass(model, layout, ids, mode)
        hv = torch.cat([got[t.path]["hvp"].flatten() for t in layout.all_targets]).double()
        gg = torch.cat([got[t.path]["loss_grad"].flatten() for t in layout.all_targets]).double()
        torch.testing.assert_close(hv, hv_ref, rtol=1e-5, atol=1e-5 * hv_ref.abs().max().item())
        torch.testing.assert_close(gg, g, rtol=1e-5, atol=1e-5 * g.abs().max().item())


@pytest.mark.parametrize("arch,targets", [("qwen2", None), ("mistral", None), ("llama_tied", r"layers\.1\.mlp")])
def test_hvp_modes_agree_in_fp32(tiny_dirs, arch, targets):
    from taylorprune.modeling import loading

    model = loading.load(str(tiny_dirs[arch])).model
    layout = find_layout(model, targets)  # a target subset leaves blocks without targets: still exact
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model_hvp_pass(model, layout, ids, "double-backward")
    for mode in ("blockwise", "fwd-rev"):
        got = model_hvp_pass(model, layout, ids, mode)
        for path in ref:
            for k in ("loss_grad", "hvp"):
                torch.testing.assert_close(got[path][k], ref[path][k], rtol=1e-4, atol=1e-6)


def test_block_scope_equals_gauss_newton_from_the_full_jacobian(micro):
    model, layout, ids = micro
    runner = BlockRunner(model, layout, torch.device("cpu"), batch_size=2)
    with eager_attention(model):
        hidden = runner.capture(ids)
        got = block_hvp_stats(runner, 1, hidden, layout.targets[1], {})
    block = layout.blocks[1]
    targets = layout.targets[1]
    inside = {id(m): n for n, m in block.named_modules()}
    names = [f"{inside[id(t.module)]}.weight" for t in targets]
    shapes = [t.module.weight.shape for t in targets]
    sizes = [s.numel() for s in shapes]

    def outputs(flat):
        parts = [p.view(s) for p, s in zip(flat.split(sizes), shapes, strict=True)]
        return functional_call(block, dict(zip(names, parts, strict=True)), (hidden,), runner.block_kwargs[1]).flatten()

    theta = torch.cat([t.module.weight.detach().flatten() for t in targets])
    J = torch.autograd.functional.jacobian(outputs, theta)
    ref = J.T @ (J @ (-theta))
    hv = torch.cat([got[t.path]["block_hvp"].flatten() for t in targets]).double()
    torch.testing.assert_close(hv, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("method,extra", [("oba", {"oba_mode": "full", "hvp_scope": "model"}),
                                          ("oba", {"oba_mode": "full", "hvp_scope": "block"}), ("oba", {}),
                                          ("oba", {"oba_mode": "released", "oba_steps": 2}),
                                          ("sparsegpt", {}), ("wanda", {}), ("magnitude", {})])
def test_save_scores_one_fp32_tensor_per_target(tmp_path, tiny_dirs, method, extra):
    out = tmp_path / "scores.safetensors"
    opts = pipeline.RunOptions(model=str(tiny_dirs["llama"]), output=str(tmp_path / "o"), method=method,
                               sparsity=0.5, calib_file=str(VALID), calib_sampling="sequential", nsamples=2,
                               seqlen=16, save_scores=str(out), method_options=extra)
    pruned = pipeline.prune(opts)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert keys == {lin["name"] for lin in pruned.linears}
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == torch.float32 and t.shape == pruned.loaded.model.get_submodule(k).weight.shape


def test_cli_oba_model_scope_with_hvp_cache(tmp_path, stories_dir):
    runner = CliRunner()
    cache = tmp_path / "h.safetensors"
    common = ["--model", str(stories_dir), "--method", "oba", "--oba-mode", "full", "--calib-file", str(VALID),
              "--calib-sampling",
              "sequential", "--nsamples", "2", "--seqlen", "32", "--hvp-cache", str(cache)]
    r = runner.invoke(app, ["run", *common, "--sparsity", "0.5", "--output", str(tmp_path / "a"),
                            "--save-scores", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0, r.output
    with safe_open(str(cache), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.hvp" in set(f.keys())
        assert f.metadata()["kind"] == "hvp"
    mtime = cache.stat().st_mtime_ns
    r = runner.invoke(app, ["run", *common, "--pattern", "2:4", "--output", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert cache.stat().st_mtime_ns == mtime
    r = runner.invoke(app, ["run", *common, "--seed", "3", "--calib-sampling", "random", "--sparsity", "0.5",
                            "--output", str(tmp_path / "c")])
    assert r.exit_code == 2 and "calibration" in r.output


def test_block_scope_hvp_cache_reused_only_for_the_same_recipe(tmp_path, tiny_dirs, monkeypatch):
    from taylorprune.errors import UserError
    from taylorprune.stats import hvp_block as hvp

    cache = tmp_path / "hb.safetensors"

    def opts(sparsity):
        return pipeline.RunOptions(model=str(tiny_dirs["llama"]), output=str(tmp_path / "o"), method="oba",
                                   sparsity=sparsity, calib_file=str(VALID), calib_sampling="sequential",
                                   nsamples=2, seqlen=16,
                                   method_options={"oba_mode": "full", "hvp_scope": "block", "hvp_cache": str(cache)})

    first = pipeline.prune(opts(0.5))
    with safe_open(str(cache), "pt") as f:
        assert f.metadata()["kind"] == "hvp-block"
        assert {k.rsplit(".", 1)[1] for k in f.keys()} == {"block_hvp"}
    monkeypatch.setattr(hvp, "block_hvp", lambda *a: pytest.fail("block HVP recomputed on a cache hit"))
    hooks = pipeline.Hooks()
    second = pipeline.prune(opts(0.5), hooks)
    assert hooks.events == ["hvp_cache_hit"]
    for lin in first.linears:
        a = first.loaded.model.get_submodule(lin["name"]).weight
        assert torch.equal(a, second.loaded.model.get_submodule(lin["name"]).weight)
    with pytest.raises(UserError, match="recipe"):
        pipeline.prune(opts(0.6))


def test_oba_normalize_max_is_the_reference_recipe():
    from taylorprune.scoring.oba import ObaOptions
    from taylorprune.scoring.registry import get_method

    weight = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    hv = torch.tensor([[4.0, 1.0], [-2.0, 3.0]])
    oba = get_method("oba").score
    plain = oba(weight, {"hvp": hv}, ObaOptions(oba_mode="full"))
    torch.testing.assert_close(plain, torch.tensor([[2.0, 1.0], [0.5, 0.0]]))  # |½·(−W)·Hv|
    normed = oba(weight, {"hvp": hv}, ObaOptions(oba_mode="full", oba_normalize="max"))
    torch.testing.assert_close(normed, plain / 2.0 + weight.abs())


# ------------------------------------------------------------------- the authors' released recipe (residual R)

def authors_importance(ws, x, labels):
    """OBA's released importance on a bias-free ReLU MLP, from their formulas (NEU-REAL/OBA oba_importance.py):
    upward terms (backward of Σ_l ⟨g_l, X_l·W_lᵀ⟩ with g_l and W_l held fixed), downward terms (a tangent pushed
    forward as T ← Y + W·T at each linear, ReLU masking by the tangent's sign, d_W = g_lᵀ·T_l), I = θ⊙(u + d)."""
    import torch.nn.functional as F

    ws = [w.detach().clone().requires_grad_(True) for w in ws]
    xs, ys, h = [], [], x
    for k, w in enumerate(ws):
        xs.append(h)
        y = h @ w.T
        y.retain_grad()
        ys.append(y)
        h = torch.relu(y) if k < len(ws) - 1 else y
    loss = F.cross_entropy(h, labels)
    loss.backward(retain_graph=True)
    gs = [y.grad.detach() for y in ys]
    for w in ws:
        w.grad = None
    surrogate = sum((g * (xi @ w.detach().T)).sum() for g, xi, w in zip(gs, xs, ws, strict=True))
    up = torch.autograd.grad(surrogate, ws, allow_unused=True)
    up = [torch.zeros_like(w) if u is None else u for u, w in zip(up, ws, strict=True)]
    tangent, down = torch.zeros_like(x), []
    for k, (w, xi, g) in enumerate(zip(ws, xs, gs, strict=True)):
        down.append(g.T @ tangent)
        tangent = xi.detach() @ w.detach().T + tangent @ w.detach().T
        if k < len(ws) - 1:
            tangent = tangent * (tangent > 0)
    return [w.detach() * (u + d) for w, u, d in zip(ws, up, down, strict=True)]


def test_residual_hessian_reproduces_the_authors_importance_on_a_relu_mlp():
    import torch.nn.functional as F

    from taylorprune.stats.hvp_reference import residual_hvp

    g = torch.Generator().manual_seed(0)
    ws = (torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randn(10, 12, generator=g, dtype=torch.float64),
          torch.randn(5, 10, generator=g, dtype=torch.float64))
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (16,), generator=g)

    def logits(*p):
        h = x
        for k, w in enumerate(p):
            h = h @ w.T
            if k < len(p) - 1:
                h = torch.relu(h)
        return h

    rv = residual_hvp(logits, ws, ws, lambda z: F.cross_entropy(z, labels))
    ours = [w * r for w, r in zip(ws, rv, strict=True)]
    theirs = authors_importance(ws, x, labels)
    for a, b in zip(ours, theirs, strict=True):
        assert b.abs().max() > 1e-3  # the cross-layer terms are really there
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


def test_blockwise_gauss_newton_part_matches_the_one_piece_residual(micro):
    from taylorprune.stats.hvp_reference import residual_hvp

    model, layout, ids = micro
    targets = layout.all_targets
    names = [f"{t.path}.weight" for t in targets]
    ws = tuple(t.module.weight.detach() for t in targets)
    got = model_hvp_pass(model, layout, ids, "blockwise", stats=frozenset({"hvp", "hvp_gn"}))
    ref = [torch.zeros_like(w) for w in ws]
    for row in ids:
        def logits(*p, row=row):
            return functional_call(model, dict(zip(names, p, strict=True)), (row[None],), strict=False).logits

        for acc, r in zip(ref, residual_hvp(logits, ws, tuple(-w for w in ws),
                                            lambda z, row=row: next_token_loss(z, row[None])), strict=True):
            acc += r
    for t, r in zip(targets, ref, strict=True):
        mine = got[t.path]["hvp"].double() - got[t.path]["hvp_gn"].double()
        torch.testing.assert_close(mine, r, rtol=1e-6, atol=1e-6 * max(r.abs().max().item(), 1e-12))


def test_released_recipe_schedule_score_and_global_threshold():
    from taylorprune.scoring.oba_released import densities, global_keep, normalized_score

    plan = densities(0.5, 49)
    assert len(plan) == 49 and plan[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(plan, plan[1:], strict=False))
    assert plan[0] == pytest.approx(0.5 ** (1 / 49))
    s = normalized_score(torch.tensor([[-4.0, 2.0]], dtype=torch.float64), 2, torch.tensor([[1.0, -3.0]]))
    torch.testing.assert_close(s, torch.tensor([[2.0 / (2.0 + 1e-6) + 1.0, 1.0 / (2.0 + 1e-6) + 3.0]]))
    keeps = global_keep([torch.tensor([3.0, 1.0, 1.0]), torch.tensor([[1.0, 5.0]])], 3)
    assert [k.tolist() for k in keeps] == [[True, True, False], [False, True]]  # ties: first in order


def test_released_mode_prunes_globally_in_steps_on_the_masked_model(tmp_path, tiny_dirs, monkeypatch):
    from taylorprune.scoring import oba_released

    seen = []
    real = oba_released.model_hvp_pass

    def spy(model, layout, windows, *a, **k):
        seen.append((len(windows), sum(int((t.module.weight == 0).sum()) for t in layout.all_targets)))
        return real(model, layout, windows, *a, **k)

    monkeypatch.setattr(oba_released, "model_hvp_pass", spy)
    opts = pipeline.RunOptions(model=str(tiny_dirs["llama"]), output=str(tmp_path / "o"), method="oba",
                               sparsity=0.6, calib_file=str(VALID), calib_sampling="sequential", nsamples=4,
                               seqlen=16, save_scores=str(tmp_path / "s.safetensors"),
                               method_options={"oba_mode": "released", "oba_steps": 3, "oba_step_windows": 2})
    pruned = pipeline.prune(opts)
    assert [n for n, _ in seen] == [2, 2, 2]
    assert seen[0][1] == 0 and 0 < seen[1][1] < seen[2][1]  # importance recomputed on the masked model
    total = sum(lin["numel"] for lin in pruned.linears)
    assert sum(lin["zeros"] for lin in pruned.linears) == total - int(0.4 * total)
    assert len({round(lin["sparsity"], 3) for lin in pruned.linears}) > 3  # one global threshold
    with pytest.raises(Exception, match="whole model"):
        pipeline.prune(opts.replace(update="obs"))


def test_hvps_of_a_bf16_model_run_in_fp32_and_leave_its_weights_untouched(tiny_dirs):
    from taylorprune.modeling import loading

    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    half = loading.load(str(tiny_dirs["llama"]), dtype="bfloat16").model
    layout = find_layout(half)
    before = {k: v.clone() for k, v in half.state_dict().items()}
    got = model_hvp_pass(half, layout, ids, "blockwise", stats=frozenset({"hvp", "hvp_gn"}))
    assert all(torch.equal(v, before[k]) and v.dtype == torch.bfloat16 for k, v in half.state_dict().items())
    ref_model = loading.load(str(tiny_dirs["llama"])).model
    ref_model.load_state_dict({k: v.float() for k, v in before.items()})  # the same bf16 weights, in fp32
    ref = model_hvp_pass(ref_model, find_layout(ref_model), ids, "blockwise", stats=frozenset({"hvp", "hvp_gn"}))
    for path in ref:
        for k in ("hvp", "hvp_gn"):
            torch.testing.assert_close(got[path][k], ref[path][k], rtol=1e-4, atol=1e-6)
