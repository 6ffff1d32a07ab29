"""What each (linear, configuration) of ``--bits-budget`` costs in loss, predicted and measured, on the dense model.

For a candidate the ΔW is the one the run's quantizer actually makes of the dense weight: RTN, or GPTQ with the
dense model's H = 2XXᵀ/N (one forward with hooks on every target; all H are held at once, in² floats per target).
The engine later quantizes each block on the outputs of the blocks already quantized before it (GPTQ's
sequential order), so its ΔW can differ from the candidate's in the last bits; the allocation is a plan on the
dense model, as HAWQ's and OWL's are.

Predicted loss change (mean calibration loss per window) of one linear's ΔW alone, to second order:

    ΔL ≈ (gᵀΔw + ½ ΔwᵀHΔw) / n,   g = Σ_windows ∇L_w (the ``gradients`` pass),   HΔw = Σ_windows ∇²L_w Δw

with HΔw an exact Hessian-vector product of the model's loss along Δw (``stats.hvp_reference.model_hvp``:
reverse-over-reverse through the whole model, attention eager for double backward), never a trace or diagonal
approximation; a curvature along ΔW is what separates configurations whose errors have equal norm. The diagonal
block of the Hessian is what a separable knapsack can use: each linear's term is taken with the others dense, so
cross-linear curvature is left out (the measured whole-model change is the run's perplexity).

Cost: one HVP per candidate and window chunk (≈ 3-4 forward passes each), i.e. linears × configurations of them,
and with ``--bits-measure`` one forward per candidate and chunk more: the measured loss change with that linear
alone quantized; ``--bits-windows N`` probes on the first N calibration windows only, ``--bits-tokens T`` on
their first T tokens (the gradient g, a per-window mean, and the quantizer's statistics still come from every
calibration window). Fisher-trace scores need only the gradient pass: ½·tr(F)/n_w·‖ΔW‖²/n with
F = Σ_windows g_w g_wᵀ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from taylorprune.modeling.attention import eager_attention
from taylorprune.modeling.layout import Layout
from taylorprune.modeling.streaming import moved
from taylorprune.quantize.bits import BIT_ALLOCATIONS, Menu, check_budget, name_of, parse_choices
from taylorprune.quantize.grid import GridSpec
from taylorprune.stats.collect import linear_statistics
from taylorprune.stats.hvp_reference import model_hvp

CHUNK = 8  # windows per forward / HVP call
# reverse-over-reverse: on stories260K's CPU runs 0.4 s per HVP of 8 windows against 1.2-2.4 s for jvp-of-grad
# (``fwd-rev``), equal to 1e-6 relative; only the target weight takes gradients, so the graph is one linear's
HVP_MODE = "double-backward"
GRAD_NEEDS = frozenset({"grad_sum", "grad_l2"})  # the dense gradient pass: g and Σg² (scaled by --grad-scale)

# (dense fp32 weight, {"hessian": dense H} or {}, spec, path) -> quantized fp32 weight
QuantizeFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], GridSpec, str], torch.Tensor]


@dataclass
class Assignment:
    """A target's chosen grid and its report record (configuration, bits, predicted and measured change)."""

    spec: GridSpec
    record: dict


def window_losses(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean over windows of each window's mean next-token loss (windows of equal length)."""
    total = 0.0
    with torch.no_grad():
        for chunk in ids.split(CHUNK):
            total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * chunk.shape[0]
    return total / ids.shape[0]


def predicted_change(model: torch.nn.Module, target, ids: torch.Tensor, g: torch.Tensor,
                     delta: torch.Tensor) -> tuple[float, float]:
    """(first-order, second-order) terms of the mean-per-window loss change of ``target``'s weight + ``delta``:
    gᵀΔw and ½ΔwᵀHΔw/n over the n windows of ``ids``, HΔw by exact HVPs (``g``: the mean per-window gradient, which
    may come from more windows than ``ids``)."""
    delta = delta.to(target.module.weight.device, target.module.weight.dtype)
    quad = 0.0
    for chunk in ids.split(CHUNK):
        _, (hv,) = model_hvp(model, [target], chunk, HVP_MODE, tangents=(delta,))
        quad += float((delta * hv).sum()) * chunk.shape[0]  # the chunk's loss is the mean of its windows
    n = ids.shape[0]
    return float((g.to(delta) * delta).sum()), 0.5 * quad / n


class Probe:
    """Losses of candidates on demand, cached per (target index, choice index); runs inside ``plan_bits``."""

    def __init__(self, model, layout: Layout, menu: Menu, ids: torch.Tensor, quantize: QuantizeFn,
                 dense: Mapping[str, Mapping[str, torch.Tensor]], grad_scale: float, needs: frozenset[str],
                 measure: bool, calib_ids: torch.Tensor) -> None:
        """``ids``: the probe's windows; ``calib_ids``: every calibration window, those the gradient pass summed
        ``dense`` over and those the quantizer's statistics (``needs``: H for GPTQ, Σx² for RTN's imatrix) are
        taken on, as the engine takes them."""
        self.model, self.menu, self.ids, self.quantize, self.measure = model, menu, ids, quantize, measure
        self.targets = {t.path: t for t in layout.all_targets}
        scale = grad_scale * calib_ids.shape[0]  # per-window means of the gradient pass's sums
        self.g = {p: dense[p]["grad_sum"] / scale for p in menu.paths}
        self.fisher_trace = {p: float((dense[p]["grad_l2"].double() / grad_scale).square().sum()) / calib_ids.shape[0]
                             for p in menu.paths}
        self.needs, self.calib_ids, self._h = needs, calib_ids, None
        self.base = window_losses(model, ids) if measure else None
        self.results: dict[tuple[int, int], dict] = {}
        self.tick: Callable[[int], None] = lambda done: None  # progress: candidates probed in full so far

    def _statistics(self) -> Mapping[str, Mapping[str, torch.Tensor]]:
        if self._h is None:
            modules = {p: self.targets[p].module for p in self.menu.paths}
            self._h = linear_statistics(lambda: window_losses(self.model, self.calib_ids), (modules, self.needs))
        return self._h

    def evaluate(self, i: int, j: int, full: bool = True) -> dict:
        """The Fisher-trace score of target ``i`` at choice ``j`` and, when ``full``, its predicted (first and
        second order) and measured loss changes; what is known is kept, so nothing is computed twice."""
        out = self.results.setdefault((i, j), {})
        if "fisher" in out and (not full or "predicted" in out):
            return out
        path, spec = self.menu.paths[i], self.menu.specs[j]
        target = self.targets[path]
        weight = target.module.weight
        dense = weight.detach().to(torch.float32).clone()
        stats = self._statistics()[path] if self.needs else {}
        delta = (self.quantize(dense, stats, spec, path) - dense).to(weight.dtype)
        out["fisher"] = 0.5 * self.fisher_trace[path] / weight.numel() * float(delta.double().square().sum())
        if not full:
            return out
        out["first_order"], out["second_order"] = predicted_change(self.model, target, self.ids, self.g[path], delta)
        out["predicted"] = out["first_order"] + out["second_order"]
        self.tick(sum("predicted" in r for r in self.results.values()))
        if self.measure:
            with torch.no_grad():
                weight.add_(delta)
                try:
                    out["measured"] = window_losses(self.model, self.ids) - self.base
                finally:
                    weight.copy_(dense.to(weight.dtype))
        return out

    def losses(self, what: str) -> list[list[float]]:
        """Every candidate's ``what`` (``predicted``: HVPs for all; ``fisher``: ΔW norms only), per target per
        choice."""
        full = what != "fisher"
        return [[self.evaluate(i, j, full)[what] for j in range(len(self.menu.specs))]
                for i in range(len(self.menu.paths))]


def menu_of(layout: Layout, options) -> Menu:
    """The targets and the configurations of ``--bits-choices`` (grid kind from the run's grid options)."""
    targets = [(b, t) for b, ts in enumerate(layout.targets) for t in ts]
    return Menu([t.path for _, t in targets], [b for b, _ in targets],
                [tuple(t.module.weight.shape) for _, t in targets], parse_choices(options.bits_choices, options.spec()))


def plan_bits(ctx, options, quantize: QuantizeFn, dense: Mapping[str, Mapping[str, torch.Tensor]],
              grad_scale: float, needs: frozenset[str]) -> tuple[dict[str, Assignment], dict]:
    """({target path: Assignment}, the run-level record) for ``options.bits_budget`` on the dense model of ``ctx``.

    Runs with the model on ``ctx.device`` in fp32 and eager attention (both restored afterwards)."""
    menu = menu_of(ctx.layout, options)
    check_budget(menu, options.bits_budget)
    budget = menu.budget_bits(options.bits_budget)
    allocation = BIT_ALLOCATIONS[options.bits_allocation]
    model = ctx.model
    upcast = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    movable = not getattr(model, "hf_device_map", None)
    with moved(model, ctx.device if movable else None, torch.float32 if upcast else None), eager_attention(model):
        ids = ctx.calib_ids[:options.bits_windows, :options.bits_tokens]
        ids = ids.to(model.get_input_embeddings().weight.device)
        probe = Probe(model, ctx.layout, menu, ids, quantize, dense, grad_scale, needs, options.bits_measure,
                      ctx.calib_ids.to(ids.device))
        full = len(menu.paths) * (len(menu.specs) if allocation.probes == "predicted" else 1)
        probe.tick = ctx.progress(f"--bits-budget {allocation.name}: candidates probed (HVPs)", full)
        chosen, info = allocation.choose(menu, budget, probe, options)
        records = [probe.evaluate(i, j) for i, j in enumerate(chosen)]
    assignments = {}
    for i, (path, j) in enumerate(zip(menu.paths, chosen, strict=True)):
        rec = {"choice": name_of(menu.specs[j]), "predicted_loss_change": records[i]["predicted"],
               "first_order": records[i]["first_order"], "second_order": records[i]["second_order"],
               "fisher_trace_score": records[i]["fisher"]}
        if "measured" in records[i]:
            rec["measured_loss_change"] = records[i]["measured"]
        if allocation.probes:
            rec["ranked_by_choice"] = {name_of(s): probe.results[i, k][allocation.probes]
                                       for k, s in enumerate(menu.specs)}
        assignments[path] = Assignment(menu.specs[j], rec)
    counts: dict[str, int] = {}
    for j in chosen:
        counts[name_of(menu.specs[j])] = counts.get(name_of(menu.specs[j]), 0) + 1
    summary = {"allocation": allocation.name, "budget_bits_per_weight": options.bits_budget,
               "choices": [name_of(s) for s in menu.specs],
               "planned_bits_per_weight": menu.total(chosen) / menu.weights,
               "configurations": counts, "windows": int(ids.shape[0]),
               "tokens_per_window": int(ids.shape[1]),
               "predicted_loss_change_sum": sum(r["predicted"] for r in records),
               "measured_loss_change_sum": sum(r["measured"] for r in records) if options.bits_measure else None,
               "measured": "per linear: the calibration loss change with that linear alone quantized (its planned "
                           "ΔW on the dense model)", **info}
    return assignments, summary
