"""Gradient pass, gradient cache and the gradient-based scores (gblm, taylor, fisher)."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app
from taylorprune.errors import UserError
from taylorprune.modeling import loading
from taylorprune.modeling.layout import find_layout
from taylorprune.pipeline.phases.calibration import load_calibration
from taylorprune.stats import gradients
from taylorprune.stats.gradients import gradient_pass

from .conftest import VALID


def ids(n=3, seqlen=16, seed=0):
    return torch.randint(3, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_l1_l2_sum_equal_direct_per_sample_autograd(tiny_dirs):
    model = loading.load(str(tiny_dirs["llama"])).model
    layout = find_layout(model)
    x = ids()
    got = gradient_pass(model, layout, x, frozenset(gradients.GRAD_STATS), scale=100.0)
    params = [t.module.weight for t in layout.all_targets]
    per_sample = []
    for row in x:
        for p in params:
            p.requires_grad_(True)
        loss = model(input_ids=row[None], labels=row[None]).loss
        per_sample.append([g * 100 for g in torch.autograd.grad(loss, params)])
        for p in params:
            p.requires_grad_(False)
    for k, t in enumerate(layout.all_targets):
        gs = torch.stack([s[k] for s in per_sample])
        torch.testing.assert_close(got[t.path]["grad_l1"], gs.abs().sum(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[t.path]["grad_l2"], gs.pow(2).sum(0).sqrt(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[t.path]["grad_sum"], gs.sum(0), rtol=1e-5, atol=1e-6)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_checkpointing_gives_the_same_statistics(tiny_dirs):
    model = loading.load(str(tiny_dirs["qwen2"])).model
    layout = find_layout(model)
    a = gradient_pass(model, layout, ids(), frozenset({"grad_l2"}))
    b = gradient_pass(model, layout, ids(), frozenset({"grad_l2"}), checkpointing=True)
    for path in a:
        torch.testing.assert_close(a[path]["grad_l2"], b[path]["grad_l2"], rtol=1e-5, atol=1e-6)
    assert not model.training


def test_at_most_one_target_grad_alive(tiny_dirs, monkeypatch):
    model = loading.load(str(tiny_dirs["llama"])).model
    layout = find_layout(model)
    weights = [t.module.weight for t in layout.all_targets]
    alive = []
    original = gradients._Accumulator.__call__

    def counting(self, param):
        alive.append(sum(w.grad is not None for w in weights))
        original(self, param)

    monkeypatch.setattr(gradients._Accumulator, "__call__", counting)
    gradient_pass(model, layout, ids(2), frozenset({"grad_l1"}))
    assert len(alive) == 2 * len(weights) and max(alive) == 1
    assert all(p.grad is None for p in model.parameters())


def opts(tmp_path, **kw):
    base = dict(model=str(kw.pop("model")), output=str(tmp_path / kw.pop("out", "o")), calib_file=str(VALID),
                calib_sampling="sequential", nsamples=4, seqlen=32)
    base.update(kw)
    return pipeline.RunOptions(**base)


def masks_of(pruned):
    return {t["name"]: pruned.loaded.model.get_submodule(t["name"]).weight.ne(0) for t in pruned.linears}


def test_gblm_with_alpha_zero_is_exactly_wanda(tmp_path, tiny_dirs):
    m = tiny_dirs["llama"]
    wanda = pipeline.prune(opts(tmp_path, model=m, method="wanda", sparsity=0.5))
    gblm = pipeline.prune(opts(tmp_path, model=m, method="gblm", sparsity=0.5, method_options={"alpha": 0.0}))
    a, b = masks_of(wanda), masks_of(gblm)
    assert all(torch.equal(a[k], b[k]) for k in a)
    gblm1 = pipeline.prune(opts(tmp_path, model=m, method="gblm", sparsity=0.5, method_options={"alpha": 1.0}))
    assert any(not torch.equal(a[k], masks_of(gblm1)[k]) for k in a)


def test_gradients_are_taken_on_the_dense_model(tmp_path, tiny_dirs):
    m = tiny_dirs["mistral"]
    cache = tmp_path / "g.safetensors"
    pipeline.prune(opts(tmp_path, model=m, method="fisher", pattern="2:4", method_options={"grad_cache": str(cache)}))
    dense = loading.load(str(m)).model
    layout = find_layout(dense)
    calib = load_calibration(opts(tmp_path, model=m).calib, loading.load(str(m)).tokenizer, 32)[0]
    direct = gradient_pass(dense, layout, calib, frozenset({"grad_l2"}))
    with safe_open(str(cache), "pt") as f:
        for t in layout.all_targets:
            torch.testing.assert_close(f.get_tensor(f"{t.path}.grad_l2"), direct[t.path]["grad_l2"])


def test_cache_hit_skips_backward_and_gives_identical_masks(tmp_path, tiny_dirs, monkeypatch):
    m = tiny_dirs["llama_tied"]
    cache = str(tmp_path / "g.safetensors")
    first = pipeline.prune(opts(tmp_path, model=m, method="gblm", sparsity=0.5, method_options={"grad_cache": cache}))
    hooks = pipeline.Hooks()
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("backward ran on a cache hit"))
    second = pipeline.prune(opts(tmp_path, model=m, method="gblm", sparsity=0.5,
                                 method_options={"grad_cache": cache, "grad_norm": "l2"}), hooks)
    assert hooks.events == ["grad_cache_hit"]
    a, b = masks_of(first), masks_of(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_mismatch_is_an_error_naming_the_difference(tmp_path, tiny_dirs):
    m = tiny_dirs["llama"]
    cache = str(tmp_path / "g.safetensors")
    pipeline.prune(opts(tmp_path, model=m, method="gblm", sparsity=0.5, method_options={"grad_cache": cache}))
    with pytest.raises(UserError, match="calibration"):
        pipeline.prune(opts(tmp_path, model=m, method="gblm", sparsity=0.5, nsamples=3,
                            method_options={"grad_cache": cache}))
    with pytest.raises(UserError, match="grad_scale"):
        pipeline.prune(opts(tmp_path, model=m, method="gblm", sparsity=0.5,
                            method_options={"grad_cache": cache, "grad_scale": 10.0}))
    with pytest.raises(UserError, match="model"):
        pipeline.prune(opts(tmp_path, model=tiny_dirs["qwen2"], method="gblm", sparsity=0.5,
                            method_options={"grad_cache": cache}))


def test_cache_adds_missing_statistics(tmp_path, tiny_dirs):
    m = tiny_dirs["llama"]
    cache = tmp_path / "g.safetensors"
    pipeline.prune(opts(tmp_path, model=m, method="fisher", sparsity=0.5, method_options={"grad_cache": str(cache)}))
    hooks = pipeline.Hooks()
    pipeline.prune(opts(tmp_path, model=m, method="taylor", sparsity=0.5, method_options={"grad_cache": str(cache)}),
                   hooks)
    assert hooks.events == ["gradient_pass"]
    with safe_open(str(cache), "pt") as f:  # fisher's l2 came with its sibling l1 (the cache serves gblm l1 too)
        assert set(f.metadata()["stats"].split(",")) == {"grad_l1", "grad_l2", "grad_sum"}


def test_taylor_and_fisher_formulas():
    from taylorprune.scoring.registry import get_method

    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    g = {"grad_sum": torch.tensor([[-1.0, 1.0], [2.0, 0.0]]), "grad_l2": torch.tensor([[1.0, 2.0], [0.0, 1.0]])}
    assert torch.equal(get_method("taylor").score(w, g, {}), torch.tensor([[1.0, 2.0], [1.0, 0.0]]))
    assert torch.equal(get_method("fisher").score(w, g, {}), torch.tensor([[0.5, 8.0], [0.0, 4.5]]))


def test_cli_acceptance_gblm_cache_written_then_reused(tmp_path, stories_dir):
    runner = CliRunner()
    cache = tmp_path / "g.safetensors"
    common = ["--model", str(stories_dir), "--method", "gblm", "--grad-norm", "l2", "--calib-file", str(VALID),
              "--calib-sampling", "sequential", "--nsamples", "4", "--seqlen", "64", "--grad-cache", str(cache)]
    r1 = runner.invoke(app, ["run", *common, "--sparsity", "0.5", "--output", str(tmp_path / "a")])
    assert r1.exit_code == 0, r1.output
    with safe_open(str(cache), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.grad_l1" in keys and "model.layers.4.mlp.down_proj.grad_l2" in keys
    assert len(keys) == 2 * 35
    mtime = cache.stat().st_mtime_ns
    r2 = runner.invoke(app, ["run", *common, "--sparsity", "0.6", "--output", str(tmp_path / "b")])
    assert r2.exit_code == 0, r2.output
    assert cache.stat().st_mtime_ns == mtime
    rep = json.loads((tmp_path / "b" / "taylorprune_report.json").read_text())
    assert rep["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    r3 = runner.invoke(app, ["run", *common, "--nsamples", "3", "--sparsity", "0.5", "--output", str(tmp_path / "c")])
    assert r3.exit_code == 2 and "calibration" in r3.output and not (tmp_path / "c").exists()


def test_statistics_registry_knows_the_gradients_scope():
    from taylorprune.stats.registry import STATISTICS
    from taylorprune.stats.source import Scope

    assert all(STATISTICS[s].scope is Scope.MODEL for s in ("grad_l1", "grad_l2", "grad_sum"))
    assert STATISTICS["act_norm_sq"].scope is Scope.LINEAR and STATISTICS["block_hvp"].scope is Scope.BLOCK


def test_fp16_models_accumulate_in_fp32_with_loss_scaling(tiny_dirs):
    x = ids(2)
    ref_model = loading.load(str(tiny_dirs["llama"])).model
    ref = gradient_pass(ref_model, find_layout(ref_model), x, frozenset({"grad_l2"}))
    half = loading.load(str(tiny_dirs["llama"]), dtype="float16").model
    got = gradient_pass(half, find_layout(half), x, frozenset({"grad_l2"}))
    for path, d in got.items():
        assert d["grad_l2"].dtype == torch.float32 and torch.isfinite(d["grad_l2"]).all()
        expected = ref[path]["grad_l2"]
        torch.testing.assert_close(d["grad_l2"], expected, rtol=0.05, atol=1e-3 * expected.max())


def test_gblm_collects_only_the_chosen_norm_without_a_cache(tmp_path, tiny_dirs, monkeypatch):
    seen = []
    real = gradients.gradient_pass

    def spy(model, layout, calib, stats, *a, **k):
        seen.append(set(stats))
        return real(model, layout, calib, stats, *a, **k)

    monkeypatch.setattr(gradients, "gradient_pass", spy)
    pipeline.prune(opts(tmp_path, model=tiny_dirs["llama"], method="gblm", sparsity=0.5,
                        method_options={"grad_norm": "l1"}))
    pipeline.prune(opts(tmp_path, model=tiny_dirs["llama"], method="gblm", sparsity=0.5,
                        method_options={"grad_cache": str(tmp_path / "g.safetensors")}))
    assert seen == [{"grad_l1"}, {"grad_l1", "grad_l2"}]
