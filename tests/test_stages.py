"""Stages around the methods: OWL allocation, block reconstruction, and the sweep's grid over stage stacks."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app
from taylorprune.errors import UserError
from taylorprune.modeling import loading
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import find_layout
from taylorprune.prune.allocation import MAX_SPARSITY, block_sparsities, exact_counts
from taylorprune.prune.masks import Pattern, build_mask
from taylorprune.prune.recon import ReconOptions, Trail, reconstruct, settled

from .conftest import VALID

runner = CliRunner()


def opts(tmp_path, model, **kw):
    base = dict(model=str(model), output=str(tmp_path / "o"), calib_file=str(VALID), calib_sampling="sequential",
                nsamples=4, seqlen=32, method="wanda", sparsity=0.5)
    return pipeline.RunOptions(**{**base, **kw})


# --------------------------------------------------------------------------------------------------- OWL


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=12), st.floats(0.05, 0.95), st.integers(0, 10_000))
def test_exact_counts_sum_to_the_requested_total(numels, total, seed):
    g = torch.Generator().manual_seed(seed)
    wanted = [float(x) for x in (total + 0.2 * (torch.rand(len(numels), generator=g) - 0.5)).clamp(0, 1)]
    if sum(int(MAX_SPARSITY * n) for n in numels) < round(total * sum(numels)):  # only by emptying a linear
        with pytest.raises(UserError, match="would empty whole layers"):
            exact_counts(numels, wanted, total)
        return
    counts = exact_counts(numels, wanted, total)
    assert sum(counts) == round(total * sum(numels))
    assert all(0 <= c <= MAX_SPARSITY * n for c, n in zip(counts, numels, strict=True))


def test_owl_mapping_is_the_authors_formula():
    got = block_sparsities([1.0, 3.0, 2.0], 0.6, 0.08)
    assert got == pytest.approx([0.68, 0.52, 0.60])  # densities 0.32 / 0.48 / 0.40 around mean 0.4
    assert block_sparsities([2.0, 2.0], 0.5, 0.08) == pytest.approx([0.5, 0.5])
    counts = [Pattern(0.5, count=7), Pattern(0.5, count=7)]
    masks = [build_mask(torch.rand(4, 5, generator=torch.Generator().manual_seed(i)), p) for i, p in enumerate(counts)]
    assert [int((~m).sum()) for m in masks] == [7, 7] and [int((~masks[0]).sum(1)[r]) for r in range(4)] == [2, 2, 2, 1]


def test_owl_keeps_the_total_exact_and_follows_the_outlier_ratios(tmp_path, tiny_dirs):
    pruned = pipeline.prune(opts(tmp_path, tiny_dirs["llama"], sparsity=0.6, allocation="owl",
                                 method_options={"owl_lambda": 0.1}))
    report = pipeline.build_report(pruned)
    total = sum(lin["numel"] for lin in report["linears"])
    assert sum(lin["zeros"] for lin in report["linears"]) == round(0.6 * total)
    blocks = report["unstructured"]["blocks"]
    ratios = [b["outlier_ratio_pct"] for b in blocks]
    sparsity = [b["sparsity"] for b in blocks]
    assert len(set(sparsity)) == len(blocks)  # not uniform
    order = sorted(range(len(blocks)), key=lambda i: ratios[i])
    assert [sparsity[i] for i in order] == sorted(sparsity, reverse=True)  # more outliers, fewer pruned
    assert max(sparsity) - min(sparsity) <= 0.2 + 1e-3
    with pytest.raises(Exception, match="unstructured"):
        pipeline.prune(opts(tmp_path, tiny_dirs["llama"], sparsity=None, pattern="2:4", allocation="owl"))


# ------------------------------------------------------------------------------------------ reconstruction


def test_recon_lowers_the_block_error_and_never_changes_a_mask(stories_dir):
    model = loading.load(str(stories_dir)).model
    layout = find_layout(model)
    ids = torch.randint(3, 512, (6, 24), generator=torch.Generator().manual_seed(0))
    run = BlockRunner(model, layout, torch.device("cpu"), batch_size=2)
    hidden = run.capture(ids)
    for i, targets in enumerate(layout.targets):
        dense_out = run.run(i, hidden)
        with torch.no_grad():
            for t in targets:  # a crude magnitude mask, so there is error to remove
                t.module.weight.mul_(build_mask(t.module.weight.abs(), Pattern(0.6)))
        masks = [t.module.weight != 0 for t in targets]
        before = torch.nn.functional.mse_loss(run.run(i, hidden), dense_out).item()
        info = reconstruct(run, i, hidden, dense_out, [t.module for t in targets],
                           ReconOptions(recon_steps=60, recon_lr=1e-3, recon_batch=2), seed=1)
        after = torch.nn.functional.mse_loss(run.run(i, hidden), dense_out).item()
        assert after < before and info["heldout_mse_after"] <= info["heldout_mse_before"]
        assert all(torch.equal(t.module.weight != 0, m) for t, m in zip(targets, masks, strict=True))
        assert all(not t.module.weight.requires_grad for t in targets)
        hidden = run.run(i, hidden)


@pytest.mark.parametrize("target", ["dense", "same"])
def test_recon_through_the_engine_is_deterministic_and_keeps_sparsity(tmp_path, stories_dir, target):
    kw = dict(recon="block", method_options={"recon_steps": 20, "recon_lr": 1e-3, "recon_target": target})
    a = pipeline.prune(opts(tmp_path, stories_dir, **kw))
    b = pipeline.prune(opts(tmp_path, stories_dir, **kw))
    plain = pipeline.prune(opts(tmp_path, stories_dir))
    assert a.achieved_sparsity == plain.achieved_sparsity == pytest.approx(0.5)
    for lin in a.linears:
        wa = a.loaded.model.get_submodule(lin["name"]).weight
        assert torch.equal(wa, b.loaded.model.get_submodule(lin["name"]).weight)
        if lin["block"] == 0:  # later blocks see the reconstructed outputs, so their masks may differ
            assert torch.equal(wa != 0, plain.loaded.model.get_submodule(lin["name"]).weight != 0)
    blocks = a.records["unstructured"]["blocks"]
    assert [blk["steps"] for blk in blocks] and "prune.recon" in a.phases_s
    assert sum(b["heldout_mse_after"] for b in blocks) < sum(b["heldout_mse_before"] for b in blocks)


def test_a_spanning_fit_reruns_the_stream_through_every_block_it_changed(stories_dir):
    model = loading.load(str(stories_dir)).model
    layout = find_layout(model)
    ids = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    run = BlockRunner(model, layout, torch.device("cpu"), batch_size=2)
    hidden = start = run.capture(ids)
    trail, seen = Trail(run, 2), []

    def apply(first: int, inputs: torch.Tensor, linears: list) -> dict:
        seen.append((first, len(linears)))
        with torch.no_grad():
            linears[0].weight.mul_(0.5)  # a change in the first block of the span
        return {}

    per_block = len(layout.targets[0])
    for i in range(len(layout.blocks)):
        trail.add(i, hidden)
        _, out = trail.fit(i, hidden, apply, lambda j: [t.module for t in layout.targets[j]])
        assert (out is None) == (i == 0)
        hidden = run.run(i, hidden) if out is None else out
    assert seen == [(0, per_block)] + [(i - 1, 2 * per_block) for i in range(1, len(layout.blocks))]
    for i in range(len(layout.blocks)):  # the carried stream is the changed model's own
        start = run.run(i, start)
    assert torch.equal(hidden, start)


def test_recon_span_fits_pairs_of_blocks_and_keeps_sparsity(tmp_path, stories_dir):
    kw = dict(recon="block", method_options={"recon_steps": 20, "recon_lr": 1e-3, "recon_span": 2})
    pruned = pipeline.prune(opts(tmp_path, stories_dir, **kw))
    assert pruned.achieved_sparsity == pytest.approx(0.5)
    for lin in pruned.linears:
        assert int((pruned.loaded.model.get_submodule(lin["name"]).weight == 0).sum()) == lin["zeros"]
    blocks = pruned.records["unstructured"]["blocks"]
    assert "blocks" not in blocks[0] and [b["blocks"] for b in blocks[1:]] == [[i - 1, i] for i in range(1, 5)]
    assert sum(b["heldout_mse_after"] for b in blocks) < sum(b["heldout_mse_before"] for b in blocks)


# ------------------------------------------------------------------------------------------------ sweeps


@pytest.mark.slow
def test_sweep_grids_over_stage_variants_and_skips_what_a_method_excludes(tmp_path):
    res = runner.invoke(app, ["sweep", "--model", "demo", "--methods", "wanda,sparsegpt", "--variants",
                              "plain,swap+obs", "--sparsities", "0.5", "--calib-file", str(VALID),
                              "--calib-sampling", "sequential", "--nsamples", "2", "--seqlen", "32",
                              "--max-windows", "2", "--eval-seqlen", "64", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "skipped sparsegpt+swap+obs_s0.5" in res.output
    rows = json.loads((tmp_path / "s" / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["wanda_s0.5", "wanda+swap+obs_s0.5", "sparsegpt_s0.5"]
    bad = runner.invoke(app, ["sweep", "--model", "demo", "--variants", "plain,turbo", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "'turbo' is no stage" in bad.output


@pytest.mark.parametrize("family, want", [("gemma3", ("normed", 5e-4)), ("llama", ("mse", 3e-3)),
                                          ("qwen2", ("mse", 3e-3))])
def test_recon_loss_and_rate_follow_the_kind_of_block_unless_given(tiny_dirs, family, want):
    """Gemma's blocks normalise their sublayers' outputs before the residual add: its defaults are the normed loss
    and 5e-4 (docs/BENCHMARKS.md, Gemma-3-270m); pre-norm blocks keep mse and 3e-3; given options always win."""
    block = find_layout(loading.load(str(tiny_dirs[family])).model).blocks[0]
    assert settled(ReconOptions(), block) == want
    assert settled(ReconOptions(recon_loss="mse", recon_lr=1e-3), block) == ("mse", 1e-3)
