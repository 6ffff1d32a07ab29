"""Block-by-block (streamed) gradient and HVP passes and evaluation equal the whole-model ones; --stream and a
memory cap below the model make a run take them."""

import pytest
import torch
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app
from taylorprune.evaluate.perplexity import perplexity_of_windows, streamed_perplexity_of_windows
from taylorprune.modeling import loading
from taylorprune.modeling.layout import find_layout
from taylorprune.modeling.placement import GIB, Placement, model_bytes
from taylorprune.stats import gradients
from taylorprune.stats.gradients import GRAD_STATS, gradient_pass, streamed_gradient_pass
from taylorprune.stats.hvp import model_hvp_pass
from taylorprune.stats.source import ModelContext

from .conftest import VALID

ARCHS = ["llama", "llama_tied", "mistral", "qwen2"]
SUBSETS = [("llama", r"layers\.(0\.self_attn\.q|2\.mlp\.down)_proj"), ("mistral", r"layers\.1\.mlp")]
runner = CliRunner()


def ids(n=5, seqlen=24, seed=0):  # 24 tokens: longer than mistral's sliding window of 16
    return torch.randint(3, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_stats(got, ref, rtol=1e-5):
    assert got.keys() == ref.keys()
    for path, d in ref.items():
        assert got[path].keys() == d.keys()
        for name, t in d.items():
            assert got[path][name].dtype == torch.float32 and got[path][name].device.type == "cpu"
            torch.testing.assert_close(got[path][name], t, rtol=rtol, atol=rtol * t.abs().max().item())


@pytest.mark.parametrize("arch,targets", [(a, None) for a in ARCHS] + SUBSETS)
def test_streamed_gradient_pass_equals_the_in_memory_one(tiny_dirs, arch, targets):
    model = loading.load(str(tiny_dirs[arch])).model
    layout = find_layout(model, targets)
    x = ids()
    before = state(model)
    ref = gradient_pass(model, layout, x, frozenset(GRAD_STATS))
    seen = []
    # 5 windows in sweeps of 2 (the last one short), forwards of 2 windows
    got = streamed_gradient_pass(model, layout, x, frozenset(GRAD_STATS), 100.0, "cpu", seen.append, 2, 2)
    assert_same_stats(got, ref)
    assert seen == [0, 1, 2, 3, 4]
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters()) and not model.training


def test_streamed_gradient_pass_scales_fp16_losses_like_the_in_memory_one(tiny_dirs):
    half = loading.load(str(tiny_dirs["llama"]), dtype="float16").model
    layout = find_layout(half)
    x = ids(3)
    ref = gradient_pass(half, layout, x, frozenset({"grad_l2"}))
    got = streamed_gradient_pass(half, layout, x, frozenset({"grad_l2"}), windows_per_sweep=3)
    for path, d in ref.items():
        assert torch.isfinite(got[path]["grad_l2"]).all()
        torch.testing.assert_close(got[path]["grad_l2"], d["grad_l2"], rtol=2e-2, atol=2e-3 * d["grad_l2"].max())


@pytest.mark.parametrize("arch,dtype,targets", [(a, "float32", None) for a in ARCHS]
                         + [("llama_tied", "bfloat16", None), ("qwen2", "bfloat16", r"layers\.1\.")]
                         + [(a, "float32", t) for a, t in SUBSETS])
def test_streamed_hvp_pass_equals_the_in_memory_one(tiny_dirs, arch, dtype, targets):
    model = loading.load(str(tiny_dirs[arch]), dtype=dtype).model
    layout = find_layout(model, targets)
    x = ids()
    before = state(model)
    stats = frozenset({"loss_grad", "hvp", "hvp_gn"})
    ref = model_hvp_pass(model, layout, x, stats=stats)
    got = model_hvp_pass(model, layout, x, stats=stats, stream=True, windows_per_sweep=3, batch_size=2)
    assert_same_stats(got, ref, rtol=1e-4)
    after = state(model)
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in after.items())


def test_hvp_pass_of_a_half_model_leaves_its_fp32_buffers_exactly(tiny_dirs):
    """Casting a bf16 model to fp32 and back used to round the rotary inv_freq (an fp32 buffer) to bf16."""
    model = loading.load(str(tiny_dirs["llama"]), dtype="bfloat16").model
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()
    assert inv_freq.dtype == torch.float32
    model_hvp_pass(model, find_layout(model), ids(1), stats=frozenset({"hvp"}))
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, inv_freq)


@pytest.mark.parametrize("arch", ["llama_tied", "mistral"])
def test_streamed_evaluation_equals_the_whole_model_forward(tiny_dirs, arch):
    model = loading.load(str(tiny_dirs[arch])).model
    windows = ids(5, 32, seed=1)
    ref = perplexity_of_windows(model, windows, "t", "m")
    seen = []
    got = streamed_perplexity_of_windows(model, find_layout(model), windows, "t", "m", "cpu",
                                         lambda i, n: seen.append((i, n)), windows_per_sweep=2, batch_size=2)
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-6)
    assert (got.windows, got.tokens, got.seqlen) == (ref.windows, ref.tokens, ref.seqlen)
    assert seen == [(i, 5) for i in range(1, 6)]


def test_a_resident_model_whose_pass_does_not_fit_goes_block_by_block(tiny_dirs):
    model = loading.load(str(tiny_dirs["llama"])).model
    layout = find_layout(model)
    size = model_bytes(model)
    events: list[str] = []
    tight = Placement("resident", torch.device("cpu"), "test", size, int(size / 0.9) + 1)
    ctx = ModelContext(model, layout, ids(2), torch.device("cpu"), events=events, placement=tight, stream_batch=2)
    options = gradients.GradientOptions()
    got = gradients.SOURCE.compute(ctx, frozenset({"grad_l2"}), options)
    assert events == ["gradient_pass", "streamed:gradients"]
    roomy = Placement("resident", torch.device("cpu"), "test", size, 100 * GIB)
    events.clear()
    ref = gradients.SOURCE.compute(ModelContext(model, layout, ids(2), torch.device("cpu"), events=events,
                                                placement=roomy), frozenset({"grad_l2"}), options)
    assert events == ["gradient_pass"]
    assert_same_stats(got, ref)


def run_options(tmp_path, model, name, **kw):
    return pipeline.RunOptions(model=str(model), output=str(tmp_path / name), calib_file=str(VALID),
                               calib_sampling="sequential", nsamples=4, seqlen=32, eval=True,
                               eval_text_file=str(VALID), eval_seqlen=32, max_windows=4, batch_size=2,
                               stream_batch=3, **kw)


def mask_agreement(a, b):
    same = sum(int((x.module.weight.ne(0) == y.module.weight.ne(0)).sum()) for x, y in zip(
        find_layout(a.loaded.model).all_targets, find_layout(b.loaded.model).all_targets, strict=True))
    return same / sum(t.module.weight.numel() for t in find_layout(a.loaded.model).all_targets)


@pytest.mark.parametrize("method,extra", [("gblm", {}), ("oba", {"oba_mode": "full", "hvp_scope": "model"})])
def test_stream_flag_takes_every_pass_block_by_block_with_the_same_result(tmp_path, tiny_dirs, method, extra):
    model = tiny_dirs["llama_tied"]
    kw = dict(method=method, sparsity=0.5, method_options=extra, save_scores=None)
    plain = pipeline.prune(run_options(tmp_path, model, "a", **kw))
    streamed = pipeline.prune(run_options(tmp_path, model, "b", stream=True, **kw))
    assert plain.placement.mode == "resident" and not any(e.startswith("streamed:") for e in plain.events)
    assert streamed.placement.mode == "stream" and streamed.placement.reason == "--stream"
    passes = [e for e in streamed.events if e.startswith("streamed:")]
    assert passes == ["streamed:" + ("gradients" if method == "gblm" else "hvp"), "streamed:evaluation"]
    assert mask_agreement(plain, streamed) > 0.999
    assert streamed.metrics["perplexity"] == pytest.approx(plain.metrics["perplexity"], rel=1e-4)
    report = pipeline.build_report(streamed)
    assert report["source"]["placement"]["mode"] == "stream" and report["streamed_passes"] == [p[9:] for p in passes]
    assert report["wall_s"] >= report["phases_s"]["startup"] > 0


def test_a_block_fit_spanning_two_blocks_streams_them_with_the_same_result(tmp_path, tiny_dirs):
    kw = dict(method="wanda", sparsity=0.5, recon="block",
              method_options={"recon_steps": 10, "recon_lr": 1e-3, "recon_span": 2})
    plain = pipeline.prune(run_options(tmp_path, tiny_dirs["llama"], "a", **kw))
    streamed = pipeline.prune(run_options(tmp_path, tiny_dirs["llama"], "b", stream=True, **kw))
    assert streamed.placement.mode == "stream"
    pairs = zip(find_layout(plain.loaded.model).all_targets, find_layout(streamed.loaded.model).all_targets,
                strict=True)
    assert all(torch.allclose(x.module.weight, y.module.weight, atol=1e-5) for x, y in pairs)
    assert streamed.records["unstructured"]["blocks"][1]["blocks"] == [0, 1]


def test_a_memory_cap_below_the_model_triggers_streaming(tmp_path, tiny_dirs):
    model = tiny_dirs["llama"]
    size = model_bytes(loading.load(str(model)).model)
    capped = pipeline.prune(run_options(tmp_path, model, "a", method="gblm", sparsity=0.5,
                                        max_gpu_memory=size / 2 / GIB))
    assert capped.placement.mode == "stream" and "--max-gpu-memory" in capped.placement.reason
    assert "streamed:gradients" in capped.events and "streamed:evaluation" in capped.events
    roomy = pipeline.prune(run_options(tmp_path, model, "b", method="gblm", sparsity=0.5, max_gpu_memory=4.0))
    assert roomy.placement.mode == "resident" and not any(e.startswith("streamed:") for e in roomy.events)
    assert mask_agreement(capped, roomy) > 0.999


def test_eval_command_streams_on_request_with_the_same_perplexity(tmp_path, stories_dir):
    common = ["eval", "--model", str(stories_dir), "--text-file", str(VALID), "--seqlen", "64", "--max-windows", "6"]
    outs = {}
    for name, extra in {"plain": [], "stream": ["--stream", "--stream-batch", "4"]}.items():
        res = runner.invoke(app, [*common, *extra, "--json", str(tmp_path / f"{name}.json")])
        assert res.exit_code == 0, res.output
        outs[name] = pipeline_json(tmp_path / f"{name}.json")
    assert outs["stream"]["perplexity"] == pytest.approx(outs["plain"]["perplexity"], rel=1e-6)
    assert outs["stream"]["windows"] == outs["plain"]["windows"] == 6


def pipeline_json(path):
    import json

    return json.loads(path.read_text())


@pytest.mark.parametrize("command,extra,needle", [
    ("run", ["--stream", "--device-map", "auto"], "--stream and --device-map auto both decide"),
    ("run", ["--max-gpu-memory", "0"], "--max-gpu-memory 0: must be above 0"),
    ("run", ["--stream-batch", "0"], "--stream-batch 0: must be at least 1"),
    ("eval", ["--max-gpu-memory", "4", "--device-map", "auto"], "--max-gpu-memory and --device-map auto"),
])
def test_memory_option_errors_are_one_line_before_loading(tmp_path, command, extra, needle):
    args = ["--model", "demo", *extra]
    if command == "run":
        args += ["--method", "wanda", "--sparsity", "0.5", "--output", str(tmp_path / "o")]
    res = runner.invoke(app, [command, *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_the_engine_writes_pruned_copies_back_and_prefetches_each_block_once(tiny_dirs):
    """A runner whose blocks compute in float64 copies (real copies on the CPU): pruning lands in the stored
    float32 weights, every block is staged once (the next one while the current one is held)."""
    from taylorprune.modeling.blocks import BlockRunner
    from taylorprune.pipeline.components import resolve
    from taylorprune.pipeline.engine import prune_layers
    from taylorprune.prune.masks import parse_pattern

    model = loading.load(str(tiny_dirs["qwen2"])).model
    layout = find_layout(model)
    runner = BlockRunner(model, layout, torch.device("cpu"), batch_size=2, stream=True, dtype=torch.float64)
    prune_layers(runner, layout, resolve("wanda"), parse_pattern(0.5, None), ids(4))
    for t in layout.all_targets:
        w = t.module.weight
        assert w.dtype == torch.float32
        assert torch.all((w == 0).sum(dim=1) == w.shape[1] // 2)  # exactly half of every row, written back
    staged = [key for what, key in runner.streamer.log if what == "stage"]
    blocks = [id(b) for b in layout.blocks]
    assert [k for k in staged if k in blocks] == blocks
    held = [key for what, key in runner.streamer.log if what == "hold" and key in blocks]
    assert held == blocks and not runner.streamer._staged
