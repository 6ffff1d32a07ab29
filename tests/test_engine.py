"""The layer-by-layer engine: exact dense replay, Wanda scores, calibration on pruned outputs, patterns."""

import pytest
import torch

from taylorprune.modeling import loading
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import find_layout
from taylorprune.pipeline.components import resolve
from taylorprune.pipeline.engine import prune_layers
from taylorprune.prune.masks import check_nm, parse_pattern
from taylorprune.scoring.registry import get_method
from taylorprune.stats.collect import linear_hooks

ARCHS = ["llama", "llama_tied", "mistral", "qwen2"]


def ids(n=4, seqlen=24, seed=0):
    return torch.randint(3, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def setup(path, targets=None, batch_size=2):
    model = loading.load(str(path)).model
    layout = find_layout(model, targets)
    return model, layout, BlockRunner(model, layout, torch.device("cpu"), batch_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_replay_reproduces_dense_hidden_states_exactly(tiny_dirs, arch):
    model, layout, runner = setup(tiny_dirs[arch])
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    hidden = runner.capture(x)
    assert torch.equal(hidden, ref[0])
    for i in range(len(layout.blocks) - 1):  # the last entry of hidden_states is after the final norm
        hidden = runner.run(i, hidden)
        assert torch.equal(hidden, ref[i + 1]), f"block {i} differs"


def test_block_replay_on_stories260k(stories_dir):
    model, layout, runner = setup(stories_dir, batch_size=3)
    x = ids(5, 64)
    with torch.no_grad():
        ref = model(input_ids=x, output_hidden_states=True).hidden_states  # use_cache from config: True
    hidden = runner.capture(x)
    for i in range(len(layout.blocks) - 1):
        hidden = runner.run(i, hidden)
        torch.testing.assert_close(hidden, ref[i + 1], rtol=0, atol=1e-6)
    assert all("cache" not in kw and kw["use_cache"] is False for kw in runner.block_kwargs)


def test_layout_finds_all_projections_and_never_lm_head(tiny_dirs):
    model, layout, _ = setup(tiny_dirs["llama"])
    names = {t.path.split(".", 3)[-1] for t in layout.all_targets}
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert len(layout.all_targets) == 7 * 3
    _, only_mlp, _ = setup(tiny_dirs["llama"], targets=r"mlp\.(up|down)_proj")
    assert {t.path.rsplit(".", 1)[-1] for t in only_mlp.all_targets} == {"up_proj", "down_proj"}


def test_wanda_scores_equal_direct_computation(tiny_dirs):
    model, layout, runner = setup(tiny_dirs["llama"])
    x = ids()
    hidden = runner.capture(x)
    target = layout.targets[0][6]  # mlp.down_proj of block 0
    accs, handles = linear_hooks({target.path: target.module}, frozenset({"act_norm_sq"}))
    inputs = []
    h2 = target.module.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()))
    runner.run(0, hidden)
    for h in handles + [h2]:
        h.remove()
    X = torch.cat(inputs).reshape(-1, target.module.in_features)  # all tokens × features
    direct = target.module.weight.abs() * (X.norm(dim=0) / len(x) ** 0.5)
    got = get_method("wanda").score(target.module.weight, {"act_norm_sq": accs[target.path]["act_norm_sq"]
                                                            .result()}, {})
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pattern", ["0.5", "2:4", "1:4"])
def test_every_target_gets_exact_pattern_and_others_untouched(tiny_dirs, arch, pattern):
    model, layout, runner = setup(tiny_dirs[arch])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pat = parse_pattern(float(pattern), None) if ":" not in pattern else parse_pattern(None, pattern)
    res = prune_layers(runner, layout, resolve("wanda"), pat, ids())
    target_keys = {f"{t.path}.weight" for t in layout.all_targets}
    for t in layout.all_targets:
        w = t.module.weight
        if pat.is_nm:
            assert check_nm(w, pat.n, pat.m)
            assert (w != 0).sum().item() == w.numel() * pat.n // pat.m
        else:
            assert ((w == 0).sum(1) == int(w.shape[1] * 0.5)).all()
    for k, v in model.state_dict().items():
        if k not in target_keys:
            assert torch.equal(v, before[k]), k
    assert len(res.linears) == len(target_keys)


def test_later_blocks_are_calibrated_on_pruned_outputs(tiny_dirs):
    """Block 1's Wanda statistics must come from block 0's *pruned* outputs, not its dense ones."""
    x = ids()
    seen: dict[str, list[torch.Tensor]] = {"engine": []}
    model, layout, runner = setup(tiny_dirs["llama"])
    dense_runner_model, dense_layout, dense_runner = setup(tiny_dirs["llama"])
    probe = layout.targets[1][0].module  # block 1 q_proj
    handle = probe.register_forward_hook(lambda m, a, o: seen["engine"].append(a[0].detach()))
    prune_layers(runner, layout, resolve("wanda"), parse_pattern(0.5, None), x)
    handle.remove()
    engine_input = torch.cat(seen["engine"][: len(x) // 2])  # first run over block 1 (statistics pass)

    # Recompute what block 1's q_proj sees when block 0 is pruned vs dense.
    grab: list[torch.Tensor] = []
    h = dense_layout.targets[1][0].module.register_forward_hook(lambda m, a, o: grab.append(a[0].detach()))
    hidden = dense_runner.capture(x)
    dense_runner.run(1, dense_runner.run(0, hidden))
    h.remove()
    dense_input = torch.cat(grab[: len(x) // 2])
    assert not torch.allclose(engine_input, dense_input, atol=1e-4)

    for name, p in dense_runner_model.named_parameters():  # now prune block 0 like the engine did
        if name.startswith("model.layers.0.") and name.endswith("proj.weight"):
            p.data.copy_(dict(model.named_parameters())[name])
    grab.clear()
    h = dense_layout.targets[1][0].module.register_forward_hook(lambda m, a, o: grab.append(a[0].detach()))
    dense_runner.run(1, dense_runner.run(0, dense_runner.capture(x)))
    h.remove()
    torch.testing.assert_close(torch.cat(grab[: len(x) // 2]), engine_input, rtol=0, atol=1e-6)


def test_magnitude_needs_no_calibration(tiny_dirs):
    model, layout, runner = setup(tiny_dirs["llama"])
    res = prune_layers(runner, layout, resolve("magnitude"), parse_pattern(0.5, None), None)
    assert "capture" in res.timings and res.sparsity == pytest.approx(0.5)
    w = layout.targets[0][0].module.weight
    kept = w[0][w[0] != 0].abs().min()
    assert kept > 0


def test_linears_reading_one_input_share_one_exact_hessian(tiny_dirs):
    model, layout, runner = setup(tiny_dirs["llama"])
    x = ids()
    hidden = runner.capture(x)
    targets = {t.path.rsplit(".", 1)[-1]: t for t in layout.targets[0]}
    accs, handles = linear_hooks({t.path: t.module for t in layout.targets[0]}, frozenset({"hessian"}))
    seen: dict[str, list[torch.Tensor]] = {}
    probes = [t.module.register_forward_hook(lambda m, a, o, k=k: seen.setdefault(k, []).append(a[0].detach()))
              for k, t in targets.items()]
    runner.run(0, hidden)
    for h in handles + probes:
        h.remove()
    assert accs[targets["q_proj"].path] is accs[targets["v_proj"].path]  # fed once, held once
    assert accs[targets["gate_proj"].path] is accs[targets["up_proj"].path]
    assert accs[targets["q_proj"].path] is not accs[targets["o_proj"].path]
    for name, t in targets.items():
        X = torch.cat(seen[name]).reshape(-1, t.module.in_features)
        torch.testing.assert_close(accs[t.path]["hessian"].result(), 2 * X.T @ X / len(x), rtol=1e-5, atol=1e-5)
