"""Evaluation phase: every evaluator the run turns on, on the pruned model in memory (no write and reload).

Each evaluator's record goes under its name (``evaluation.perplexity``, ``evaluation.speed``); a comparison with
the dense model (speed) reloads the dense source on demand.
"""

from __future__ import annotations

from taylorprune.modeling import loading
from taylorprune.pipeline.evaluation import context, prepare, run_evaluators
from taylorprune.pipeline.state import Phase, RunFacts, RunState


def dense_loader(state: RunState):
    """A function that loads the run's dense source model again (for evaluators that compare with it)."""
    lo, config = state.opts.load, state.plan.config

    def load():
        return loading.load(lo.model, lo.dtype, lo.device_map, lo.offload_folder, lo.trust_remote_code,
                            config=config).model

    return load


class Evaluation(Phase):
    name = "evaluation"

    def wanted(self, facts: RunFacts) -> bool:
        """At least one evaluator is on."""
        return facts.evaluators

    def check(self, plan) -> None:
        for evaluator, options in plan.evaluators:
            if evaluator.check is not None:
                evaluator.check(options, plan.config)

    def prepare(self, state: RunState) -> None:
        state.prepared.update(prepare(_context(state), list(state.plan.evaluators)))

    def run(self, state: RunState) -> dict:
        return run_evaluators(_context(state), list(state.plan.evaluators), state.hooks, state.prepared,
                              state.phases_s)


def _context(state: RunState):
    opts = state.opts
    return context(state.model, state.loaded.tokenizer, opts.output, state.plan.device, state.hooks,
                   state.placement, opts.placement.stream_batch, opts.calib.batch_size, dense_loader(state))
