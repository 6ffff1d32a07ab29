"""The run: options resolved into a plan of phases, the phases, the engines, evaluation, and the sweep.

``run_options`` (typed option groups → ``RunOptions``), ``stages`` (the stage-kind registry), ``components``
(method + stages + statistics, options resolved once), ``plan`` (``validate`` → ``Plan``: components, pattern,
phases), ``phases/`` (load, calibration, structured, unstructured, evaluation, write), ``engine`` (the
layer-by-layer engine), ``flow`` (the loop over phases), ``evaluation`` (evaluators on a model in memory),
``sweep`` (grids of runs).
"""

from taylorprune.modeling.loading import resolve_seqlen
from taylorprune.pipeline.components import Components, resolve
from taylorprune.pipeline.evaluation import evaluate_model, metrics
from taylorprune.pipeline.flow import prune, run, write
from taylorprune.pipeline.hooks import Hooks
from taylorprune.pipeline.phases.load import check_placement
from taylorprune.pipeline.phases.write import build_report
from taylorprune.pipeline.plan import Plan, resolve_device, validate
from taylorprune.pipeline.run_options import RunOptions
from taylorprune.pipeline.state import RunState, versions

__all__ = ["Components", "Hooks", "Plan", "RunOptions", "RunState", "build_report", "check_placement",
           "evaluate_model", "metrics", "prune", "resolve", "resolve_device", "resolve_seqlen", "run", "validate",
           "versions", "write"]
