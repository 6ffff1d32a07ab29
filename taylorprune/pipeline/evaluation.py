"""Evaluators on a model in memory: a run's pruned model, a folder ``eval``/``check`` loads, a sweep's dense row.

``context`` builds what an evaluator sees; ``evaluate_model`` is ``taylorprune eval``: a model loaded on its own,
placed for the evaluators' working set (resident when it fits, streamed otherwise), every chosen evaluator
prepared and run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from taylorprune import distributed
from taylorprune.evaluate.registry import EVALUATORS
from taylorprune.evaluate.spec import EvalContext, Evaluator
from taylorprune.modeling.placement import Placement, choose_placement, memory_cap
from taylorprune.options import Options
from taylorprune.pipeline.hooks import Hooks

Chosen = list[tuple[Evaluator, Options]]


def working_bytes(evaluators: Chosen, config) -> int:
    """The largest working set beside the weights any of ``evaluators`` needs."""
    return max((e.working_bytes(o, config) for e, o in evaluators if e.working_bytes), default=0)


def context(model: nn.Module, tokenizer: Any, name: str, device: torch.device, hooks: Hooks,
            placement: Placement | None = None, stream_batch: int = 16, batch_size: int = 1,
            baseline: Callable[[], nn.Module] | None = None) -> EvalContext:
    return EvalContext(model, tokenizer, name, device, placement, stream_batch, batch_size, hooks.task,
                       hooks.windows, baseline, hooks.events)


def run_evaluators(ctx: EvalContext, evaluators: Chosen, hooks: Hooks, prepared: dict[str, Any] | None = None,
                   timings: dict[str, float] | None = None) -> dict[str, dict]:
    """{evaluator name: record} of each of ``evaluators`` (``prepared``: what their ``prepare`` gave already)."""
    prepared = prepared if prepared is not None else prepare(ctx, evaluators)
    records = {}
    for evaluator, options in evaluators:
        if not (evaluator.sharded or distributed.world().writer):
            continue  # rank 0 alone runs what is not sharded; only its report is written
        with hooks.timed(timings if timings is not None else {}, evaluator.name, evaluator.label or evaluator.name):
            records[evaluator.name] = evaluator.run(ctx, options, prepared.get(evaluator.name))
    return records


def prepare(ctx: EvalContext, evaluators: Chosen) -> dict[str, Any]:
    """What each evaluator prepares before any heavy work (tokenized evaluation windows)."""
    return {e.name: e.prepare(ctx, o) for e, o in evaluators if e.prepare is not None}


def metrics(records: dict[str, dict]) -> dict[str, float]:
    """Every evaluator's metrics, flat (``perplexity``, ``prefill_ratio``, ...)."""
    out: dict[str, float] = {}
    for name, record in records.items():
        out.update(EVALUATORS[name].metrics(record))
    return out


def evaluate_model(model: nn.Module, tokenizer: Any, name: str, evaluators: Chosen, device: torch.device,
                   hooks: Hooks | None = None, stream: bool = False, max_gpu_memory: float | None = None,
                   stream_batch: int = 16, baseline: Callable[[], nn.Module] | None = None) -> dict[str, dict]:
    """Evaluate a model loaded on its own (``eval``, ``check``, a sweep's dense row): resident on the device when it
    fits with the evaluators' working set (unless ``stream``), streamed block by block otherwise."""
    hooks = hooks or Hooks()
    with memory_cap(device, max_gpu_memory):
        placement = choose_placement(model, device, stream, max_gpu_memory, working_bytes(evaluators, model.config))
        ctx = context(model, tokenizer, name, device, hooks, placement, stream_batch, baseline=baseline)
        return run_evaluators(ctx, evaluators, hooks)
