"""Method specs as the single source of truth: typed options, flags and --option derived from them, registry
consistency, and imports that run one way between packages."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app
from taylorprune.errors import UserError
from taylorprune.options import Options, merge_specs, option, parse_assignments
from taylorprune.pipeline.components import all_options, resolve
from taylorprune.scoring.registry import METHODS

from .conftest import DEMO, VALID

runner = CliRunner()
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "2", "--seqlen", "32"]
PACKAGE = Path(__file__).resolve().parents[1] / "taylorprune"


@dataclass(frozen=True)
class Demo(Options):
    ratio: float = option(0.5, "a ratio", above=0, below=1)
    steps: int = option(3, "steps", minimum=1)
    mode: str = option("a", "mode", choices=("a", "b"))
    on: bool = option(False, "switch")
    path: str | None = option(None, "a file", identity=False)


def test_options_convert_text_and_validate():
    got = Demo.build({"ratio": "0.25", "steps": "7", "mode": "b", "on": "true", "path": "x.safetensors", "other": 1})
    assert got == Demo(0.25, 7, "b", True, "x.safetensors")
    assert Demo.build({}) == Demo()
    assert set(Demo().identity()) == {"ratio", "steps", "mode", "on"}  # the path changes no result
    for values, needle in [({"ratio": "1"}, "must be below 1"), ({"steps": "2.5"}, "whole number"),
                           ({"mode": "c"}, "choose one of a, b"), ({"on": "maybe"}, "true or false"),
                           ({"ratio": "nan"}, "finite"), ({"steps": True}, "expected a number")]:
        with pytest.raises(UserError, match=needle):
            Demo.build(values)


@given(st.floats(min_value=1e-6, max_value=1 - 1e-6), st.integers(min_value=1, max_value=10**6))
def test_typed_and_text_values_build_the_same_options(ratio, steps):
    assert Demo.build({"ratio": ratio, "steps": steps}) == Demo.build({"ratio": repr(ratio), "steps": str(steps)})


def test_one_name_one_meaning_across_components():
    @dataclass(frozen=True)
    class Other(Options):
        steps: int = option(4, "other default")

    with pytest.raises(TypeError, match="steps"):
        merge_specs([("a", Demo), ("b", Other)])
    merged = merge_specs([("a", Demo), ("b", Demo)])
    assert merged["steps"][1] == ["a", "b"]


def test_every_registered_component_option_is_a_flag_of_run_and_sweep():
    for command in ("run", "sweep"):
        res = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert res.exit_code == 0
        for info in all_options().values():
            assert info.spec.flag in res.output, (command, info.spec.flag)


def test_methods_lists_each_methods_declared_options_and_statistics():
    res = runner.invoke(app, ["methods"], terminal_width=250)
    assert res.exit_code == 0 and all(m in res.output for m in METHODS)
    listed = {r["name"]: r for r in json.loads(runner.invoke(app, ["methods", "--json"]).output)}
    assert set(listed) == set(METHODS)
    for m in METHODS.values():
        assert listed[m.name]["statistics"].keys() == set(m.statistics)
        names = {o["name"]: o["default"] for o in listed[m.name]["options"]}
        assert all(names[spec.name] == spec.default for spec in m.options.specs())
    detail = runner.invoke(app, ["methods", "gblm"], terminal_width=200)
    assert detail.exit_code == 0 and "--grad-norm" in detail.output and "Das, Ma, Shen" in detail.output
    assert runner.invoke(app, ["methods", "nope"]).exit_code == 2


def test_option_alpha_via_option_and_flag_give_the_same_model(tmp_path):
    """`--option alpha=0.5` used to crash with 'multiple values for keyword argument'."""
    outs = {}
    for name, extra in {"opt": ["--option", "alpha=0.5"], "flag": ["--alpha", "0.5"]}.items():
        res = runner.invoke(app, ["run", "--model", "demo", "--method", "gblm", "--sparsity", "0.5", *CALIB,
                                  "--output", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
        outs[name] = json.loads((tmp_path / name / "taylorprune_report.json").read_text())
    assert outs["opt"]["components"]["method"] == {"name": "gblm", "alpha": 0.5, "grad_norm": "l2"}
    assert outs["opt"]["linears"] == outs["flag"]["linears"]
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("opt", "flag")]
    assert weights[0] == weights[1]


@pytest.mark.parametrize("extra,needle", [
    (["--option", "bogus=1"], "unknown option bogus"),
    (["--option", "alpha"], "expected KEY=VALUE"),
    (["--option", "alpha=x"], "--alpha x: expected a number"),
    (["--option", "grad_norm=l3"], "choose one of l1, l2"),
    (["--alpha", "0.5", "--option", "alpha=0.6"], "given both"),
    (["--percdamp", "0.1"], "does not apply to --method gblm"),
    (["--grad-scale", "-1"], "must be above 0"),
])
def test_bad_component_options_are_one_line_errors(tmp_path, extra, needle):
    res = runner.invoke(app, ["run", "--model", "demo", "--method", "gblm", "--sparsity", "0.5", *CALIB,
                              "--output", str(tmp_path / "o"), *extra])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_statistic_options_belong_to_the_methods_that_use_them():
    assert all_options()["grad_scale"].used_by == ("gblm", "taylor", "fisher")
    assert set(all_options()["percdamp"].used_by) == {"sparsegpt", "--update obs", "--quantize gptq"}
    assert resolve("gblm", values={"grad_scale": "10"}).options_of(
        next(s for s, _ in resolve("gblm").sources if s.name == "gradients")).grad_scale == 10.0
    with pytest.raises(UserError, match="updates weights itself"):
        resolve("sparsegpt", {"update": "obs"})
    assert parse_assignments(["--grad-norm=l1"]) == {"grad_norm": "l1"}


def test_validate_returns_the_plan_prune_follows(tmp_path):
    plan = pipeline.validate(pipeline.RunOptions(model=str(DEMO), output=str(tmp_path / "o"), method="gblm",
                                                 sparsity=0.5, method_options={"alpha": "0.25"}))
    assert plan.parts.method_options.alpha == 0.25 and plan.seqlen == 2048  # min(2048, max positions)
    assert plan.needs == {"act_norm_sq", "grad_l2"} and plan.pattern.sparsity == 0.5


def test_out_of_memory_advice_names_the_runs_own_memory_options(tmp_path, monkeypatch):
    import taylorprune.pipeline.phases.unstructured as flow

    def boom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(flow, "model_statistics", boom)
    res = runner.invoke(app, ["run", "--model", "demo", "--method", "gblm", "--sparsity", "0.5", *CALIB,
                              "--output", str(tmp_path / "o")])
    assert res.exit_code == 1 and "while model-scope statistics" in res.output and "--grad-checkpointing" in res.output
    monkeypatch.setattr(flow, "prune_layers", boom)
    res = runner.invoke(app, ["run", "--model", "demo", "--method", "wanda", "--sparsity", "0.5", *CALIB,
                              "--output", str(tmp_path / "o")])
    assert res.exit_code == 1 and "--grad-checkpointing" not in res.output


# ------------------------------------------------------------------------------------------- package layering

def test_no_method_names_in_the_cli_pipeline_or_report():
    import re

    # the issue's own check (grep "oba\|gblm\|sparsegpt\|hvp", substrings), and every other method as a word
    names = re.compile(r"oba|gblm|sparsegpt|hvp|\b(" + "|".join(METHODS) + r")\b")
    for folder in ("cli", "pipeline", "report"):
        for path in (PACKAGE / folder).rglob("*.py"):
            hits = [ln for ln in path.read_text().splitlines() if names.search(ln)]
            assert not hits, (path.name, hits)


def test_the_readme_example_method_is_a_valid_method():
    """The 'Adding a method' snippet builds, registers and scores as written."""
    import re

    import torch

    from taylorprune.scoring.registry import _index

    readme = (PACKAGE.parent / "README.md").read_text()
    code = re.search(r"### Adding a method.*?```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (our own documentation)
    method = scope["METHOD"]
    assert "mine" in _index(*METHODS.values(), method)
    options = method.options.build({"beta": "0.25"})
    assert method.needs(options) == {"act_norm_sq", "grad_l2"}
    w = torch.tensor([[1.0, -2.0]])
    got = method.score(w, {"act_norm_sq": torch.tensor([4.0, 1.0]), "grad_l2": torch.tensor([[1.0, 1.0]])}, options)
    torch.testing.assert_close(got, torch.tensor([[2.25, 2.5]]))
