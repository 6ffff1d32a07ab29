"""One run's plan and state, and what a phase of the run is.

A run is an ordered list of phases over one ``RunState`` (``Plan.phases``: load → calibration → structured →
unstructured → recover → evaluation → write). A phase declares whether a run wants it (``wanted``, a predicate
over the run's ``RunFacts``: the plan filters its one ordered registry with it, so no list of phases is built by
hand), its checks (run by ``validate`` before any weight is loaded), whether it needs calibration windows, and
what it does; the record its ``run`` returns goes into the report under the phase's name.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

import taylorprune
from taylorprune.calib.sampling import CalibSpec
from taylorprune.evaluate.spec import Evaluator
from taylorprune.modeling.layout import Layout
from taylorprune.modeling.loading import Loaded
from taylorprune.modeling.placement import Placement
from taylorprune.options import Options
from taylorprune.pipeline.components import Components
from taylorprune.pipeline.evaluation import metrics
from taylorprune.pipeline.hooks import Hooks
from taylorprune.pipeline.run_options import RunKind, RunOptions
from taylorprune.prune.masks import Pattern


@dataclass(frozen=True)
class StructuredPlan:
    """What a structured run removes: kinds in processing order, the ratio or the parameter target, and (for a
    ratio) the count of each kind per block, known from the config alone."""

    kinds: tuple[str, ...]
    ratio: float | None
    target_params: float | None
    counts: dict[str, int] | None

    def describe(self) -> str:
        how = f"ratio {self.ratio:g}" if self.ratio is not None else f"{self.target_params:g} of the parameters"
        return f"structured {'+'.join(self.kinds)}, {how}"


@dataclass(frozen=True)
class RunFacts:
    """What decides which phases a run has, settled by ``validate`` from the options: the declared kind of run
    and what it asks for. Phases decide from these alone (``Phase.wanted``), never from raw option keys."""

    kind: RunKind
    structured: bool  # --structure: structures are removed
    unstructured: bool  # masks, or a stage that works without them (--quantize alone)
    recovers: bool  # --recover distill
    evaluators: bool  # at least one evaluator is on


@dataclass(frozen=True)
class Plan:
    """A validated run: components, pattern, device, dtype, calibration length, model config, the evaluators it
    turns on, and its phases in order."""

    opts: RunOptions
    parts: Components
    pattern: Pattern | None  # the unstructured pattern (None: no unstructured phase)
    device: torch.device
    dtype: torch.dtype | str
    config: Any
    seqlen: int
    structured: StructuredPlan | None = None
    evaluators: tuple[tuple[Evaluator, Options], ...] = ()
    phases: tuple[Phase, ...] = ()

    @property
    def needs(self) -> frozenset[str]:
        return self.parts.needs

    @property
    def whole_model(self):
        """The method's whole-model procedure for these options, or None (the layer-by-layer engine; always when the
        method masks nothing)."""
        return self.parts.method.whole_model(self.parts.method_options) if self.parts.masks else None

    @property
    def calibrated(self) -> bool:
        return any(p.calibrated(self) for p in self.phases)

    def describe(self) -> str:
        parts = [x.describe() for x in (self.structured, self.pattern) if x is not None]
        pruned = any(p.name in ("unstructured", "recover") for p in self.phases)
        return " then ".join(parts) or ("no masks" if self.parts.unstructured else "recovery only" if pruned
                                        else "written as it is")

    def recipe(self) -> dict[str, Any]:
        """Everything that decides how the blocks are pruned (block-scope cache identity)."""
        t, c = self.opts.target, self.opts.calib
        run = {"sparsity": t.sparsity, "pattern": t.pattern, "group": t.group, "targets": t.targets,
               "batch_size": c.batch_size, "seed": c.seed}
        return {**run, **self.parts.recipe()}


class Phase:
    """A step of the run: ``name`` (its report key), ``label`` (what progress says), the hooks below."""

    name = ""
    label = ""

    def wanted(self, facts: RunFacts) -> bool:
        """Whether a run with ``facts`` has this phase; every phase declares it (the plan's only selection)."""
        raise NotImplementedError(f"{type(self).__name__} must declare wanted(facts)")

    def check(self, plan: Plan) -> None:
        """Everything that can be refused before any weight is loaded."""

    def calibrated(self, plan: Plan) -> bool:
        """Whether this phase needs the calibration windows."""
        return False

    def prepare(self, state: RunState) -> None:
        """Cheap work that can fail on bad input (tokenizing its text), done right after loading, before any
        phase does heavy work."""

    def run(self, state: RunState) -> dict | None:
        """Do the work on ``state``; the returned record goes into the report under ``name``."""
        return None


@dataclass
class RunState:
    """Everything the phases share: the model once loaded, its layout and placement, the calibration windows,
    what each evaluator prepared, timings, events, the per-linear records and each phase's record."""

    plan: Plan
    hooks: Hooks
    loaded: Loaded | None = None
    layout: Layout | None = None
    placement: Placement | None = None
    spec: CalibSpec | None = None
    calib_ids: torch.Tensor | None = None
    prepared: dict[str, Any] = field(default_factory=dict)
    phases_s: dict[str, float] = field(default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)
    linears: list[dict] = field(default_factory=list)
    quantized: dict[str, Any] = field(default_factory=dict)  # codes and grid of each quantized linear, for the writer
    warnings: list[str] = field(default_factory=list)
    report: dict | None = None  # what the write phase wrote

    @property
    def model(self):
        return self.loaded.model

    @property
    def opts(self):
        return self.plan.opts

    @property
    def events(self) -> list[str]:
        return self.hooks.events

    @property
    def evaluation(self) -> dict | None:
        return self.records.get("evaluation")

    @property
    def metrics(self) -> dict[str, float]:
        """Every evaluator's metrics, flat (``perplexity``, ``prefill_ratio``, ...)."""
        return metrics(self.evaluation or {})

    @property
    def achieved_sparsity(self) -> float | None:
        total = sum(r["numel"] for r in self.linears)
        return sum(r["zeros"] for r in self.linears) / total if total else None


STARTED = taylorprune.IMPORTED_AT


def process_seconds() -> float:
    """Seconds since taylorprune was first imported (the interpreter's start-up and every import after it);
    measured in-process because a shell that execs the command would give its own start as the process's."""
    return max(0.0, time.time() - STARTED)


def versions() -> dict[str, str]:
    return {"taylorprune": taylorprune.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def linear_record(path: str, weight: torch.Tensor, block: int | None = None) -> dict:
    """A pruned linear as the report lists it."""
    zeros = int((weight == 0).sum().item())
    record = {"name": path, "shape": list(weight.shape), "numel": weight.numel(), "zeros": zeros,
              "sparsity": zeros / weight.numel()}
    return record if block is None else record | {"block": block}


def linear_records(layout: Layout) -> list[dict]:
    """Every target of ``layout`` as the report lists it, with its block."""
    return [linear_record(t.path, t.module.weight, i) for i, ts in enumerate(layout.targets) for t in ts]
