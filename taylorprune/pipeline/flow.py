"""A run end to end: its plan's phases, in order, over one state.

The CLI only parses options into ``RunOptions`` and renders progress; everything else happens here so tests and
benchmark scripts drive exactly what users run. ``prune`` runs every phase but the write (the sweep evaluates
points in memory), ``write`` the write phase on the result, ``run`` both.
"""

from __future__ import annotations

import torch

from taylorprune import distributed
from taylorprune.modeling.placement import memory_cap
from taylorprune.pipeline.hooks import Hooks
from taylorprune.pipeline.plan import WRITE, Plan, validate
from taylorprune.pipeline.run_options import RunOptions
from taylorprune.pipeline.state import Phase, RunState, process_seconds


def execute(plan: Plan, hooks: Hooks, phases: tuple[Phase, ...]) -> RunState:
    """Run ``phases`` of ``plan`` in order on a fresh state; each phase's record is kept under its name."""
    state = RunState(plan, hooks, phases_s={"startup": process_seconds()})
    torch.manual_seed(plan.opts.calib.seed)
    hooks.memory_hints = plan.parts.memory_hints()
    with memory_cap(plan.device, plan.opts.placement.max_gpu_memory):
        for phase in phases:
            record = phase.run(state)
            if record is not None:
                state.records[phase.name] = record
    distributed.barrier()  # a data-parallel run ends together: a rank that failed fails the others' barrier
    return state


def prune(opts: RunOptions | Plan, hooks: Hooks | None = None) -> RunState:
    """Load, calibrate, prune and evaluate in memory (no output written)."""
    plan = opts if isinstance(opts, Plan) else validate(opts)
    return execute(plan, hooks or Hooks(), tuple(p for p in plan.phases if p is not WRITE))


def write(state: RunState, hooks: Hooks | None = None) -> dict:
    """Write the pruned model atomically, verify it on disk, and return the report written with it."""
    if hooks is not None:
        state.hooks = hooks
    WRITE.run(state)
    return state.report


def run(opts: RunOptions, hooks: Hooks | None = None, convert: bool = False) -> dict:
    """Prune ``opts.model`` and write ``opts.output`` (``convert``: write it as it is); returns the report that was
    written."""
    plan = validate(opts, convert)
    return execute(plan, hooks or Hooks(), plan.phases).report
