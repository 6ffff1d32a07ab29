"""The README's "Adding a stage", "Adding an evaluator" and "Adding an output format" snippets build, register and
run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from taylorprune import pipeline
from taylorprune.evaluate import registry as evaluators
from taylorprune.modeling import loading
from taylorprune.pipeline import components
from taylorprune.pipeline.evaluation import context, run_evaluators
from taylorprune.prune import update

from .conftest import DEMO, VALID

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def snippet(heading: str) -> dict:
    code = re.search(rf"### {heading}.*?```python\n(.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (our own documentation)
    return scope


@pytest.fixture
def rescale(monkeypatch):
    entry = snippet("Adding a stage")["UPDATE"]
    monkeypatch.setitem(update.UPDATES, entry.name, entry)  # what one line in by_name(...) does
    components.all_options.cache_clear()
    yield entry
    components.all_options.cache_clear()


def test_the_readme_example_stage_runs_as_a_stage(rescale, tmp_path):
    assert update.by_name(*update.UPDATES.values())["rescale"] is rescale
    opts = pipeline.RunOptions(model=str(DEMO), output=str(tmp_path / "o"), method="wanda", sparsity=0.5,
                               calib_file=str(VALID), calib_sampling="sequential", nsamples=4, seqlen=32,
                               update="rescale", method_options={"rescale_max": "1.5"})
    plan = pipeline.validate(opts)
    assert plan.parts.stage("update").options.rescale_max == 1.5
    dense = loading.load(str(DEMO)).model
    pruned = pipeline.prune(plan)
    assert pruned.achieved_sparsity == pytest.approx(0.5)
    for lin in pruned.linears:
        w = pruned.model.get_submodule(lin["name"]).weight
        d = dense.get_submodule(lin["name"]).weight
        ratio = w.norm(dim=1) / d.norm(dim=1)
        assert ((ratio <= 1 + 1e-5) | torch.isclose(ratio, torch.ones_like(ratio))).all()  # never above dense
        kept = (d * (w != 0)).norm(dim=1)
        expected = torch.minimum(d.norm(dim=1) / kept, torch.tensor(1.5)) * kept
        torch.testing.assert_close(w.norm(dim=1), expected)


def test_the_readme_example_evaluator_is_a_valid_evaluator(tmp_path):
    evaluator = snippet("Adding an evaluator")["EVALUATOR"]
    assert "agree" in evaluators._index(*evaluators.EVALUATORS.values(), evaluator)
    demo = loading.load(str(DEMO))
    options = evaluator.options.build({"agree": "true"})
    assert evaluator.enabled(options)
    hooks = pipeline.Hooks()
    ctx = context(demo.model, demo.tokenizer, "demo", torch.device("cpu"), hooks, baseline=lambda: demo.model)
    record = run_evaluators(ctx, [(evaluator, options)], hooks)["agree"]
    assert record["top1_agreement"] == 1.0 and record["tokens"] > 5  # the model agrees with itself
    noisy = loading.load(str(DEMO)).model
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * p.std())
    ctx.model = noisy
    assert run_evaluators(ctx, [(evaluator, options)], hooks)["agree"]["top1_agreement"] < 1.0
    assert evaluator.metrics(record) == {"top1_agreement": 1.0}


def test_the_readme_example_format_writes_verifies_and_is_read(tmp_path, monkeypatch):
    """The format of 'Adding an output format', registered as its one line would, on a run's result: it writes,
    verifies by reading back, and `inspect`'s reader sees the run's sparsity through it."""
    from taylorprune.export import formats
    from taylorprune.pipeline.phases.write import output_of
    from taylorprune.report.weights import scan

    fmt = snippet("Adding an output format")["FORMAT"]
    monkeypatch.setitem(formats.FORMATS, fmt.name, fmt)
    opts = pipeline.RunOptions(model=str(DEMO), output=str(tmp_path / "o"), method="wanda", sparsity=0.5,
                               calib_file=str(VALID), nsamples=4, seqlen=32)
    state = pipeline.prune(pipeline.validate(opts))
    folder = tmp_path / "npz"
    folder.mkdir()
    output = output_of(state, fmt)
    fmt.write(output, folder)
    fmt.verify(folder, output)
    assert formats.format_of(folder) is fmt and fmt.size(folder) > 4 * 250_000
    rows = scan(folder)
    assert len(rows) == 35 and all(abs(r.sparsity - 0.5) < 1e-6 for r in rows)
    state.linears[0]["sparsity"] = 0.75  # a record the file does not match
    with pytest.raises(Exception, match="verification failed"):
        fmt.verify(folder, output)
