"""Structured pruning: compact models equal dense models with the same structures zeroed, compensation lowers the
consumer's reconstruction error, group scores compute what their docs say, bad requests fail before any work, and
outputs load with plain transformers."""

import json

import pytest
import torch
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app
from taylorprune.errors import UserError
from taylorprune.modeling import loading
from taylorprune.modeling.blocks import patched_forwards
from taylorprune.modeling.layout import find_layout
from taylorprune.prune.structures import (
    Shape,
    all_groups,
    choose,
    compensate,
    depth,
    groups_of,
    groups_to_remove,
    removal_counts,
    remove,
    update_config,
    zero,
)
from taylorprune.scoring import oba_structured, taylor
from taylorprune.scoring.oba_structured import removal_cost
from taylorprune.scoring.registry import METHODS
from taylorprune.scoring.sparsegpt import obs_cost

from .conftest import VALID

runner = CliRunner()
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "4", "--seqlen", "32"]
ARCHS = ("llama", "mistral", "qwen2")
KINDS = (("neurons", "kv-groups"), ("heads", "kv-groups"), ("heads", "query-heads"))


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 500, (n, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _drop_some(groups, seed: int) -> torch.Tensor:
    scores = torch.rand(groups.size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    count = 1 if groups.chunk is None else groups.size // groups.chunk  # one per KV group in query-heads mode
    return choose(scores, count if groups.kind == "heads" else groups.size // 4, groups.chunk)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind,mode", KINDS)
def test_compact_model_equals_the_dense_model_with_the_structures_zeroed(tiny_dirs, tmp_path, arch, kind, mode):
    zeroed, compact = _load(tiny_dirs[arch]), _load(tiny_dirs[arch])
    lz, lc = find_layout(zeroed), find_layout(compact)
    for i in range(len(lc.blocks)):
        gz = groups_of(kind, lz.blocks[i], f"{lz.blocks_path}.{i}", i, mode)
        gc = groups_of(kind, lc.blocks[i], f"{lc.blocks_path}.{i}", i, mode)
        drop = _drop_some(gc, i)
        zero(gz, drop)
        remove(gc, drop, lc.blocks[i])
    widths = update_config(compact.config, lc.blocks)
    ids = _ids()
    expected = _logits(zeroed, ids)
    torch.testing.assert_close(_logits(compact, ids), expected, rtol=1e-5, atol=1e-5)
    if kind == "heads" and mode == "kv-groups":
        assert widths["num_key_value_heads"] == 1 and widths["num_attention_heads"] == 2
    compact.save_pretrained(tmp_path / "out")
    reloaded = _load(tmp_path / "out")  # plain transformers, no custom code
    assert reloaded.config.intermediate_size == widths["intermediate_size"]
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
    generated = reloaded.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropped_blocks_equal_skipped_blocks(tiny_dirs, tmp_path, arch):
    skipped, compact = _load(tiny_dirs[arch]), _load(tiny_dirs[arch])
    blocks = find_layout(skipped).blocks
    ids = _ids()
    with patched_forwards([blocks[1]], [lambda hidden_states, *a, **k: hidden_states]):
        expected = _logits(skipped, ids)
    layout = find_layout(compact)
    depth.drop_blocks(compact, layout.blocks, [1])
    assert compact.config.num_hidden_layers == 2 and layout.blocks[1].self_attn.layer_idx == 1
    if hasattr(compact.config, "layer_types"):
        assert len(compact.config.layer_types) == 2
    torch.testing.assert_close(_logits(compact, ids), expected, rtol=1e-5, atol=1e-5)
    compact.save_pretrained(tmp_path / "out")
    reloaded = _load(tmp_path / "out")
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
    assert reloaded.generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


def _down_inputs(model, ids) -> torch.Tensor:
    seen = []
    down = find_layout(model).blocks[0].mlp.down_proj
    handle = down.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    _logits(model, ids)
    handle.remove()
    return torch.cat(seen).to(torch.float64)


@pytest.mark.parametrize("kind,mode", KINDS)
def test_compensation_lowers_the_consumers_reconstruction_error(tiny_dirs, kind, mode):
    model = _load(tiny_dirs["llama"])
    layout = find_layout(model)
    block = layout.blocks[0]
    groups = groups_of(kind, block, f"{layout.blocks_path}.0", 0, mode)
    consumer = groups.consumer.module
    seen = []
    handle = consumer.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    _logits(model, _ids(4, 32))
    handle.remove()
    x = torch.cat(seen).to(torch.float64)
    dense = x @ consumer.weight.detach().double().T
    drop = _drop_some(groups, 0)
    kept = groups.consumer.index[[g for g in range(groups.size) if g not in drop.tolist()]].flatten()
    plain_err = (x[:, kept] @ consumer.weight.detach().double()[:, kept].T - dense).pow(2).sum()
    compensate(groups, drop, 2 * x.T @ x / 4, percdamp=1e-6)
    refit_err = (x[:, kept] @ consumer.weight.detach().double()[:, kept].T - dense).pow(2).sum()
    assert refit_err < 0.9 * plain_err
    remove(groups, drop, block)
    assert consumer.in_features == len(kept)


def test_removal_cost_is_the_exact_error_of_removing_one_group(tiny_dirs):
    model = _load(tiny_dirs["llama"])
    layout = find_layout(model)
    groups = groups_of("neurons", layout.blocks[0], f"{layout.blocks_path}.0", 0)
    x = _down_inputs(model, _ids(4, 32))
    w = groups.consumer.module.weight.detach().double()
    cost = removal_cost(groups, 2 * x.T @ x / 4)
    for j in (0, 5, 63):
        direct = (x[:, j:j + 1] @ w[:, j:j + 1].T).pow(2).sum() * 2 / 4  # ‖ΔW·X‖² with the scale of H = 2XXᵀ/N
        torch.testing.assert_close(cost[j], direct)


def test_group_reductions_match_their_definitions(tiny_dirs):
    model = _load(tiny_dirs["llama"])
    layout = find_layout(model)
    groups = groups_of("heads", layout.blocks[0], f"{layout.blocks_path}.0", 0, "kv-groups")
    grads = {m.path: torch.randn(m.module.weight.shape, generator=torch.Generator().manual_seed(3))
             for m in groups.members}
    stats = {p: {"grad_sum": g} for p, g in grads.items()}
    options = taylor.TaylorOptions()
    vector = taylor.GROUPS["vector"].score(groups, stats, options)
    element = taylor.GROUPS["element"].score(groups, stats, taylor.TaylorOptions("element"))
    q = groups.members[0]
    hd = 8
    g0 = sum((m.module.weight.double() * grads[m.path].double()).index_select(
        m.dim, m.index[0]).sum() for m in groups.members)
    torch.testing.assert_close(vector[0], g0.abs())
    assert (element >= vector - 1e-9).all()  # Σ|x| ≥ |Σx|
    assert q.index.shape == (2, 2 * hd)  # a KV group = its 2 query heads' rows of q_proj
    norms = METHODS["magnitude"].group_score(None).score(groups, {}, None)
    w0 = torch.cat([m.module.weight.double().index_select(m.dim, m.index[0]).flatten() for m in groups.members])
    torch.testing.assert_close(norms[0], w0.norm())
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5])
    assert choose(scores, 2).tolist() == [1, 3] and choose(scores, 2, chunk=2).tolist() == [1, 3]


def test_removal_counts_and_gqa_rules():
    shape = Shape(layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536)
    assert removal_counts(("neurons",), 0.25, shape, "kv-groups") == {"neurons": 384}
    assert removal_counts(("heads",), 0.34, shape, "kv-groups") == {"heads": 3}  # one KV group of 3 heads
    assert removal_counts(("heads",), 0.34, shape, "query-heads") == {"heads": 3}  # one query head per group
    assert removal_counts(("blocks",), 0.2, shape, "kv-groups") == {"blocks": 6}
    with pytest.raises(UserError, match="not a multiple of the 3 KV groups"):
        removal_counts(("heads",), 0.2, shape, "query-heads")
    with pytest.raises(UserError, match="leaves no head"):
        removal_counts(("heads",), 0.9, shape, "kv-groups")
    with pytest.raises(UserError, match="drops every block"):
        removal_counts(("blocks",), 0.99, shape, "kv-groups")
    with pytest.raises(UserError, match="removes none"):
        removal_counts(("neurons",), 0.0001, shape, "kv-groups")


def test_oba_released_selection_prunes_in_steps_and_restores_the_model(tiny_dirs):
    from taylorprune.stats.source import ModelContext

    model = _load(tiny_dirs["llama"])
    layout = find_layout(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = {"neurons": all_groups(layout, "neurons", "kv-groups"), "heads": all_groups(layout, "heads", "kv-groups")}
    options = METHODS["oba"].options.build({"oba_mode": "released", "oba_steps": 3})
    ctx = ModelContext(model, layout, _ids(2, 16), torch.device("cpu"))
    chosen = oba_structured.released_select(ctx, {"neurons": 16, "heads": 2}, blocks, options)
    assert {len(v) for k, v in chosen.items() if k[0] == "neurons"} == {16}
    assert {len(v) for k, v in chosen.items() if k[0] == "heads"} == {groups_to_remove(blocks["heads"][0], 2)}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert oba_structured.schedule(16, 0.25, 3)[-1] == 16 and oba_structured.schedule(16, 0.25, 3)[0] < 16


@pytest.mark.parametrize("extra,needle", [
    (["--structure", "heads", "--structure-ratio", "0.9"], "leaves no head"),
    (["--structure", "heads", "--head-mode", "query-heads", "--structure-ratio", "0.25"], "not a multiple of the 4 KV"),
    (["--structure", "heads", "--structure-ratio", "0.25"], "LlamaConfig refuses"),
    (["--structure", "blocks", "--structure-ratio", "0.95"], "drops every block"),
    (["--structure", "neurons", "--pattern", "2:4"], "give --structure-ratio R"),
    (["--structure", "neurons"], "give --structure-ratio R"),
    (["--structure", "neurons", "--sparsity", "0.2"], "is --structure-ratio 0.2 (--sparsity is the unstructured"),
    (["--structure", "neurons", "--structure-ratio", "0.2", "--target-params", "0.1"], "not both"),
    (["--structure", "nodes", "--structure-ratio", "0.2"], "choose from neurons, heads, blocks"),
    (["--structure", "neurons", "--structure-ratio", "0.2", "--method", "oba", "--oba-mode", "full"],
     "has no structured score"),
    (["--structure", "neurons", "--structure-ratio", "0.2", "--update", "obs"], "applies to unstructured"),
    (["--structure", "neurons,heads", "--target-params", "0.2"], "takes one --structure"),
    (["--sparsity", "0.5", "--target-params", "0.2"], "applies to structured"),
    (["--structure", "blocks", "--structure-ratio", "0.4", "--head-mode", "query-heads"], "does not apply"),
])
def test_bad_structured_requests_fail_before_loading(stories_dir, tmp_path, monkeypatch, extra, needle):
    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load", never)
    res = runner.invoke(app, ["run", "--model", str(stories_dir), *CALIB, "--output", str(tmp_path / "o"), *extra])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_target_params_removes_the_fewest_neurons_that_reach_it(tiny_dirs, tmp_path):
    opts = pipeline.RunOptions(model=str(tiny_dirs["llama"]), output=str(tmp_path / "o"), method="magnitude",
                               structure="neurons", target_params=0.1, method_options={"compensate": False})
    report = pipeline.run(opts)
    st = report["structured"]
    per_neuron = 3 * 32 * 3  # gate row + up row + down column, 3 blocks
    assert st["parameters"]["removed_fraction"] >= 0.1
    assert (st["parameters"]["before"] - st["parameters"]["after"] - per_neuron) / st["parameters"]["before"] < 0.1
    assert st["config"]["intermediate_size"] == 64 - st["counts"]["neurons"]
    assert st["file_bytes"]["after"] < st["file_bytes"]["before"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--structure", "neurons", "--structure-ratio", "0.3", "--method", "wanda"],
    ["--structure", "heads", "--structure-ratio", "0.5", "--method", "taylor"],
    ["--structure", "heads", "--head-mode", "query-heads", "--structure-ratio", "0.5", "--method", "oba"],
    ["--structure", "blocks", "--structure-ratio", "0.2", "--block-score", "loss"],
    ["--structure", "blocks,heads,neurons", "--structure-ratio", "0.4", "--method", "fisher", "--no-compensate"],
])
def test_structured_runs_end_to_end_on_stories260k(stories_dir, tmp_path, extra):
    out = tmp_path / "o"
    res = runner.invoke(app, ["run", "--model", str(stories_dir), *CALIB, "--output", str(out), "--eval",
                              "--eval-seqlen", "64", "--max-windows", "2", "--speed", *extra])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "taylorprune_report.json").read_text())
    st = report["structured"]
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in st["config"]} == st["config"]
    assert st["parameters"]["after"] < st["parameters"]["before"] and st["file_bytes"]["after"] < st["file_bytes"][
        "before"]
    assert report["evaluation"]["speed"]["decode_ratio"] > 0 and len(st["per_block"]) == config["num_hidden_layers"] * (
        extra[1] != "blocks")
    model = _load(out)
    assert model.generate(_ids(1, 4), max_new_tokens=3, do_sample=False).shape == (1, 7)
    evaluated = runner.invoke(app, ["eval", "--model", str(out), "--seqlen", "64", "--max-windows", "2"])
    assert evaluated.exit_code == 0 and "perplexity" in evaluated.output
    inspected = runner.invoke(app, ["inspect", str(out), "--json", str(tmp_path / "i.json")])
    assert inspected.exit_code == 0
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["report"]["structured"]["config"] == st["config"] and "before → after" in inspected.output
    shapes = {r["name"]: r["shape"] for r in info["linears"]}
    assert shapes["model.layers.0.mlp.down_proj.weight"] == [64, config["intermediate_size"]]
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == [config["num_attention_heads"] * 8, 64]
    assert len({k.split(".")[2] for k in shapes}) == config["num_hidden_layers"]


def test_speed_command_times_both_models(tiny_dirs, tmp_path):
    res = runner.invoke(app, ["speed", "--model", str(tiny_dirs["qwen2"]), "--baseline", str(tiny_dirs["llama"]),
                              "--prefill", "32", "--decode", "8", "--repeats", "1", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["dense"]["decode_tok_s"] > 0 and result["decode_ratio"] > 0 and "ratio" in res.output
    bad = runner.invoke(app, ["speed", "--model", str(tiny_dirs["llama"]), "--baseline", str(tiny_dirs["llama"]),
                              "--prefill", "1000"])
    assert bad.exit_code == 2 and "positions" in bad.output


def test_methods_document_each_structured_score():
    res = runner.invoke(app, ["methods", "--json"])
    listed = {r["name"]: r for r in json.loads(res.output)}
    assert "|Σ_G W·Σg|" in listed["taylor"]["structured"][""]
    assert "--oba-mode released" in listed["oba"]["structured"] and "tr(W_G" in listed["sparsegpt"]["structured"][""]
    detail = runner.invoke(app, ["methods", "wanda"], terminal_width=200)
    assert "structured score" in detail.output and "Wanda-sp" in detail.output


@pytest.mark.slow
@pytest.mark.smollm2
def test_all_three_structures_on_smollm2(smollm2_gguf, tmp_path):
    """SmolLM2-135M (9 heads / 3 KV, 30 blocks): one KV group, a third of the blocks and of the neurons go."""
    out = tmp_path / "o"
    res = runner.invoke(app, ["run", "--model", str(smollm2_gguf), *CALIB, "--structure", "blocks,heads,neurons",
                              "--structure-ratio", "0.34", "--method", "wanda", "--output", str(out)])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["intermediate_size"]) == (20, 6, 2, 64, 1014)
    model = _load(out)
    assert model.generate(_ids(1, 4), max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_obs_cost_is_the_error_left_after_the_optimal_refit(tiny_dirs):

    model = _load(tiny_dirs["llama"])
    layout = find_layout(model)
    groups = groups_of("neurons", layout.blocks[0], f"{layout.blocks_path}.0", 0)
    x = _down_inputs(model, _ids(8, 32))
    h = 2 * x.T @ x / 8
    w = groups.consumer.module.weight.detach().double()
    cost = obs_cost(groups, h, 0.0)
    j = 7
    keep = [c for c in range(w.shape[1]) if c != j]
    refit = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T  # best weights on the kept inputs
    left = (x[:, keep] @ refit.T - x @ w.T).pow(2).sum() * 2 / 8
    torch.testing.assert_close(cost[j], left, rtol=1e-6, atol=1e-9)
    assert (cost <= removal_cost(groups, h) + 1e-9).all()  # refitting never costs more than not refitting
