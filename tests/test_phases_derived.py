"""A run's phases are derived, not assembled: every phase of the one ordered registry (``plan.PHASES``) declares
whether a run wants it over the run's facts, and the kind of run (run, recover, export) is declared by the command
that builds the options, never inferred from which option keys are present."""

from __future__ import annotations

import pytest

from taylorprune import pipeline
from taylorprune.errors import UserError
from taylorprune.pipeline.plan import PHASES, WRITE, derive_phases
from taylorprune.pipeline.run_options import RunKind
from taylorprune.pipeline.state import Phase, RunFacts

from .conftest import DEMO, VALID

CALIB = dict(calib_file=str(VALID), calib_sampling="sequential", nsamples=4, seqlen=32)
EVAL = dict(eval=True, eval_text_file=str(VALID), eval_seqlen=32)
NEURONS = dict(structure="neurons", method_options={"structure_ratio": 0.25})
TEACHER = {"recover_teacher": str(DEMO)}


def opts(tmp_path, kind: RunKind = RunKind.RUN, **kw) -> pipeline.RunOptions:
    return pipeline.RunOptions(model=str(DEMO), output=str(tmp_path / "o"), kind=kind, **CALIB, **kw)


def names(plan: pipeline.Plan) -> list[str]:
    return [p.name for p in plan.phases]


CASES = {
    "unstructured": (RunKind.RUN, dict(method="wanda", sparsity=0.5),
                     ["source", "calibration", "unstructured", "write"]),
    "quantize alone": (RunKind.RUN, dict(quantize="gptq", group_size=-1),
                       ["source", "calibration", "unstructured", "write"]),
    "structured": (RunKind.RUN, NEURONS, ["source", "calibration", "structured", "write"]),
    "structured + 2:4": (RunKind.RUN, {**NEURONS, "pattern": "2:4"},
                         ["source", "calibration", "structured", "unstructured", "write"]),
    "structured + recover": (RunKind.RUN, {**NEURONS, "recover": "distill"},
                             ["source", "calibration", "structured", "recover", "write"]),
    "unstructured + recover + eval": (RunKind.RUN, dict(method="wanda", sparsity=0.5, recover="distill", **EVAL),
                                      ["source", "calibration", "unstructured", "recover", "evaluation", "write"]),
    "recover kind": (RunKind.RECOVER, dict(recover="distill", method_options=TEACHER),
                     ["source", "calibration", "recover", "write"]),
    "recover kind + eval": (RunKind.RECOVER, dict(recover="distill", method_options=TEACHER, **EVAL),
                            ["source", "calibration", "recover", "evaluation", "write"]),
    "export kind": (RunKind.EXPORT, {}, ["source", "write"]),
    "export kind + eval": (RunKind.EXPORT, EVAL, ["source", "evaluation", "write"]),
}


@pytest.mark.parametrize("case", CASES)
def test_the_phases_of_each_kind_of_run(case, tmp_path):
    kind, kw, expected = CASES[case]
    assert names(pipeline.validate(opts(tmp_path, kind, **kw))) == expected


def test_every_registered_phase_declares_its_predicate():
    assert [p.name for p in PHASES] == ["source", "calibration", "structured", "unstructured", "recover",
                                        "evaluation", "write"]
    undeclared = [type(p).__name__ for p in PHASES if type(p).wanted is Phase.wanted]
    assert undeclared == [] and WRITE in PHASES
    with pytest.raises(NotImplementedError, match="must declare wanted"):
        Phase().wanted(RunFacts(RunKind.RUN, False, True, False, False))


def test_the_registry_is_filtered_in_order_by_the_facts():
    everything = RunFacts(RunKind.RUN, structured=True, unstructured=True, recovers=True, evaluators=True)
    assert derive_phases(everything) == PHASES
    bare = RunFacts(RunKind.EXPORT, structured=False, unstructured=False, recovers=False, evaluators=False)
    assert [p.name for p in derive_phases(bare)] == ["source", "write"]


def test_the_former_convert_call_is_the_export_kind(tmp_path):
    plan = pipeline.validate(opts(tmp_path, **EVAL), convert=True)
    assert names(plan) == ["source", "evaluation", "write"] and plan.opts.kind == RunKind.EXPORT
    assert plan.describe() == "written as it is"


def test_a_teacher_option_does_not_make_a_run_recover_only(tmp_path):
    """Only the declared kind does: ``run`` with a teacher and nothing to prune asks for the amount as before."""
    with pytest.raises(UserError, match="give --sparsity"):
        pipeline.validate(opts(tmp_path, recover="distill", method_options=TEACHER))
    plan = pipeline.validate(opts(tmp_path, method="wanda", sparsity=0.5, recover="distill", method_options=TEACHER))
    assert names(plan) == ["source", "calibration", "unstructured", "recover", "write"]
    assert plan.parts.stage("recover").options.recover_teacher == str(DEMO)


@pytest.mark.parametrize("kind,kw,needle", [
    (RunKind.EXPORT, dict(sparsity=0.5), "export writes the model as it is"),
    (RunKind.EXPORT, dict(recover="distill"), "export writes the model as it is"),
    (RunKind.RECOVER, dict(sparsity=0.5, recover="distill"), "recover trains the model as it is"),
    (RunKind.RECOVER, {}, "recover trains the model as it is"),
])
def test_what_a_kind_does_not_do_is_refused(tmp_path, kind, kw, needle):
    with pytest.raises(UserError, match=needle):
        pipeline.validate(opts(tmp_path, kind, **kw))


def test_the_kind_is_kept_by_flat_and_replace(tmp_path):
    recover = opts(tmp_path, RunKind.RECOVER, recover="distill", method_options=TEACHER)
    assert recover.flat()["kind"] == "recover" and pipeline.RunOptions(**recover.flat()).kind == RunKind.RECOVER
    assert recover.replace(nsamples=2).kind == RunKind.RECOVER and opts(tmp_path).kind == RunKind.RUN
    with pytest.raises(ValueError, match="run kind 'prune'"):
        pipeline.RunOptions(model=str(DEMO), output=str(tmp_path / "o"), kind="prune")
