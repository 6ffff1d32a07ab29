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
from taylorprune.stats.hvp import block_hvp_stats, model_hvp_pass

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
        hv = torch.cat([got[t.path]["oba_hvp"].flatten() for t in layout.all_targets]).double()
        gg = torch.cat([got[t.path]["oba_g"].flatten() for t in layout.all_targets]).double()
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
            for k in ("oba_g", "oba_hvp"):
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
    hv = torch.cat([got[t.path]["oba_block_hvp"].flatten() for t in targets]).double()
    torch.testing.assert_close(hv, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("method,extra", [("oba", {"hvp_scope": "model"}), ("oba", {"hvp_scope": "block"}),
                                          ("sparsegpt", {}), ("wanda", {}), ("magnitude", {})])
def test_save_scores_one_fp32_tensor_per_target(tmp_path, tiny_dirs, method, extra):
    out = tmp_path / "scores.safetensors"
    opts = pipeline.RunOptions(model=str(tiny_dirs["llama"]), output=str(tmp_path / "o"), method=method,
                               sparsity=0.5, calib_file=str(VALID), calib_sampling="sequential", nsamples=2,
                               seqlen=16, save_scores=str(out), method_options=extra)
    pruned = pipeline.prune(opts)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert keys == {lin["name"] for lin in pruned.result.linears}
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == torch.float32 and t.shape == pruned.loaded.model.get_submodule(k).weight.shape


def test_cli_oba_model_scope_with_hvp_cache(tmp_path, stories_dir):
    runner = CliRunner()
    cache = tmp_path / "h.safetensors"
    common = ["--model", str(stories_dir), "--method", "oba", "--calib-file", str(VALID), "--calib-sampling",
              "sequential", "--nsamples", "2", "--seqlen", "32", "--hvp-cache", str(cache)]
    r = runner.invoke(app, ["run", *common, "--sparsity", "0.5", "--output", str(tmp_path / "a"),
                            "--save-scores", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0, r.output
    with safe_open(str(cache), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.oba_hvp" in set(f.keys())
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
    from taylorprune.stats import hvp

    cache = tmp_path / "hb.safetensors"

    def opts(sparsity):
        return pipeline.RunOptions(model=str(tiny_dirs["llama"]), output=str(tmp_path / "o"), method="oba",
                                   sparsity=sparsity, calib_file=str(VALID), calib_sampling="sequential",
                                   nsamples=2, seqlen=16,
                                   method_options={"hvp_scope": "block", "hvp_cache": str(cache)})

    first = pipeline.prune(opts(0.5))
    with safe_open(str(cache), "pt") as f:
        assert f.metadata()["kind"] == "hvp-block"
        assert {k.rsplit(".", 1)[1] for k in f.keys()} == {"oba_block_hvp"}
    monkeypatch.setattr(hvp, "block_hvp", lambda *a: pytest.fail("block HVP recomputed on a cache hit"))
    hooks = pipeline.Hooks()
    second = pipeline.prune(opts(0.5), hooks)
    assert hooks.events == ["hvp_cache_hit"]
    for lin in first.result.linears:
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
    plain = oba(weight, {"oba_hvp": hv}, ObaOptions())
    torch.testing.assert_close(plain, torch.tensor([[2.0, 1.0], [0.5, 0.0]]))  # |½·(−W)·Hv|
    normed = oba(weight, {"oba_hvp": hv}, ObaOptions(oba_normalize="max"))
    torch.testing.assert_close(normed, plain / 2.0 + weight.abs())
