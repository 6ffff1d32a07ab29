"""The run: options resolved into a plan, the layer-by-layer engine, evaluation, and the report.

``plan`` (RunOptions → Plan), ``components`` (method, update and statistics with typed options), ``engine``
(block after block: statistics → score → mask → update → propagate), ``flow`` (load → … → save), ``evaluation``.
"""

from taylorprune.pipeline.components import Components, resolve
from taylorprune.pipeline.evaluation import evaluate_model
from taylorprune.pipeline.flow import Pruned, build_report, load_calibration, prune, run, versions, write
from taylorprune.pipeline.hooks import Hooks
from taylorprune.pipeline.plan import Plan, RunOptions, check_placement, resolve_device, resolve_seqlen, validate

__all__ = ["Components", "Hooks", "Plan", "Pruned", "RunOptions", "build_report", "check_placement", "evaluate_model",
           "load_calibration", "prune", "resolve", "resolve_device", "resolve_seqlen", "run", "validate", "versions",
           "write"]
