"""``--recon block`` never leaves a model worse than it found it: a fit is kept only where it lowers its blocks'
error and the model's next-token loss on held-out calibration windows, else every weight it changed comes back
(the whole span with ``--recon-span``), the carried stream is the restored blocks' own, and the report says which
fits were kept (issue #35, item 4)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from taylorprune.calib import sampling
from taylorprune.cli import app
from taylorprune.modeling import loading
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import find_layout
from taylorprune.prune.recon import BLOCK, ReconOptions, Trail, recon_summary, reconstruct
from taylorprune.prune.trail import heldout_windows

from .conftest import VALID

runner = CliRunner()


def test_a_few_windows_are_held_out_and_a_lone_window_is_its_own():
    assert heldout_windows(16, 4) == range(14, 16)  # the last eighth, two at least
    assert heldout_windows(128, 4) == range(124, 128)
    assert heldout_windows(6, 4) == range(4, 6)
    assert heldout_windows(2, 4) == range(1, 2)  # one left to train on
    assert heldout_windows(1, 4) == range(0, 1)


def test_the_summary_counts_the_fits_kept_and_names_their_blocks():
    records = [{"block": 0, "kept": False}, {"block": 1, "kept": True}, {"block": 2}, {"block": 3, "kept": True}]
    assert recon_summary(records) == {"recon": {"fits": 3, "kept": 2, "restored": 1, "kept_blocks": [1, 3]}}
    assert recon_summary([{"block": 0}]) == {}


def _stream(stories_dir, windows: int = 8, seqlen: int = 32):
    """stories260K, its block runner and real text windows (a model's loss on random tokens says little)."""
    loaded = loading.load(str(stories_dir))
    layout = find_layout(loaded.model)
    ids = sampling.tokenize(loaded.tokenizer, VALID.read_text())[: windows * seqlen].view(windows, seqlen)
    run = BlockRunner(loaded.model, layout, torch.device("cpu"), batch_size=2)
    return run, layout, ids, run.capture(ids)


def test_a_fit_that_cannot_help_leaves_the_block_bit_for_bit(stories_dir):
    run, layout, _, hidden = _stream(stories_dir, windows=16)
    linears = [t.module for t in layout.targets[0]]
    goal = run.run(0, hidden)  # the block already maps its inputs to its goal: nothing to gain
    before = [lin.weight.clone() for lin in linears]
    info = reconstruct(run, 0, hidden, goal, linears, ReconOptions(recon_steps=10, recon_lr=1e-2), seed=0)
    assert info["kept"] is False and info["heldout_windows"] == 2
    assert all(torch.equal(lin.weight, w) for lin, w in zip(linears, before, strict=True))


def test_the_model_guard_restores_a_whole_span_and_carries_the_restored_stream(stories_dir):
    run, layout, ids, hidden = _stream(stories_dir)
    start = hidden
    originals = [t.module.weight.clone() for ts in layout.targets for t in ts]
    trail, records = Trail(run, 2, ids=ids, heldout=2), []

    def wreck(first: int, inputs: torch.Tensor, linears: list) -> dict:
        """A 'fit' its blocks' error would accept (it says kept) that ruins the model's predictions."""
        with torch.no_grad():
            for lin in linears:
                lin.weight.add_(torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(first)))
        return {"kept": True}

    for i in range(len(layout.blocks)):
        trail.add(i, hidden)
        info, out = trail.fit(i, hidden, wreck, lambda j: [t.module for t in layout.targets[j]])
        records.append(info)
        hidden = run.run(i, hidden) if out is None else out
    assert [r["kept"] for r in records] == [False] * len(layout.blocks)
    assert all(r["heldout_loss_after"] > r["heldout_loss_before"] for r in records)
    now = [t.module.weight for ts in layout.targets for t in ts]
    assert all(torch.equal(a, b) for a, b in zip(now, originals, strict=True))
    for i in range(len(layout.blocks)):  # the carried stream is the restored model's own
        start = run.run(i, start)
    assert torch.equal(hidden, start)


class _Stage:
    """What ``Trail.of`` reads of a block stage."""

    def __init__(self, guard: str) -> None:
        self.options = ReconOptions(recon_guard=guard)
        self.choice = BLOCK


@pytest.mark.parametrize("guard, compact, checked", [("auto", True, "model"), ("auto", False, "last"),
                                                     ("model", False, "model"), ("last", True, "last"),
                                                     ("block", True, None)])
def test_the_guard_checks_every_fit_of_compact_blocks_and_the_last_fit_of_masked_ones(guard, compact, checked):
    ids = torch.zeros(4, 8, dtype=torch.long)
    trail = Trail.of(None, [_Stage(guard)], ids, compact=compact)
    got = None if trail.ids is None else ("last" if trail.last_only else "model")
    assert got == checked


def test_a_fit_its_blocks_reject_skips_the_model_check(stories_dir):
    run, layout, ids, hidden = _stream(stories_dir)
    trail = Trail(run, 1, ids=ids, heldout=2)
    info, out = trail.fit(0, hidden, lambda first, x, lins: {"kept": False}, lambda j: [t.module for t in
                                                                                     layout.targets[j]])
    assert info == {"kept": False} and out is None


CASE = ["run", "--model", "demo", "--method", "wanda", "--structure", "neurons", "--structure-ratio", "0.3",
        "--calib", "wikitext2-valid", "--nsamples", "16", "--seqlen", "128", "--eval", "--eval-seqlen", "128",
        "--device", "cpu", "--overwrite"]


def _run(out, *extra: str) -> dict:
    res = runner.invoke(app, [*CASE, "--output", str(out), *extra])
    assert res.exit_code == 0, res.output[-2000:]
    return json.loads((out / "taylorprune_report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("calib_sampling, windows", [("sequential", 20), ("random", 20), ("sequential", 200)])
def test_recon_block_does_not_raise_the_perplexity_of_a_compact_model(tmp_path, calib_sampling, windows):
    """The issue's case: stories260K, 30% of the neurons by Wanda, 16 × 128 sequential calibration windows, 20 test
    windows: unguarded, 157.48 against 152.02 without reconstruction; guarded, 150.66 (blocks 1–3 keep their fits,
    block 0's fit lowers nothing, block 4's raises the held-out next-token loss), 133.43 against 139.76 over 200
    windows; the default random windows: 149.55 against 155.54. Twenty windows are few to judge by: over 400 every
    one of five --seed values is better than no reconstruction (153.15–160.09 against 163.42), over the first 20
    three of them are not."""
    extra = ["--calib-sampling", calib_sampling, "--max-windows", str(windows)]
    plain = _run(tmp_path / "plain", *extra)
    fitted = _run(tmp_path / "fitted", *extra, "--recon", "block")
    ppl = {name: r["evaluation"]["perplexity"]["perplexity"] for name, r in (("plain", plain), ("fitted", fitted))}
    assert ppl["fitted"] <= ppl["plain"] * (1 + 1e-6), ppl
    per_block = fitted["structured"]["per_block"]
    assert all(isinstance(b["recon"]["kept"], bool) for b in per_block)
    kept = [b["block"] for b in per_block if b["recon"]["kept"]]
    summary = fitted["structured"]["recon"]
    assert summary["kept_blocks"] == kept and summary["fits"] == len(per_block) == summary["kept"] + summary["restored"]
    for b in per_block:
        rec = b["recon"]
        assert rec["heldout_windows"] == 2
        if rec["kept"]:  # kept only where both held-out numbers fell (compact blocks: every fit is checked)
            assert rec["heldout_mse_after"] < rec["heldout_mse_before"]
            assert rec["heldout_loss_after"] < rec["heldout_loss_before"]
    assert "recon" not in plain["structured"]
