"""``--quantize rtn|gptq``: the choices of the quantize stage kind (``pipeline.stages``), weights only.

The stage runs per target linear inside the layer-by-layer engine, last: after the mask and the other linear
stages, or on a solver's output (SparseGPT), with the mask kept, so every masked weight stays exactly 0 and every
kept one lands on the grid. Statistics are SparseGPT's Hessian H = 2XXᵀ/N taken from each block's calibration
inputs, which come out of the blocks already pruned and quantized before it: GPTQ's sequential order.

Without ``--sparsity``/``--pattern`` it quantizes without pruning (GPTQ itself). A grid that cannot hold an exact 0
(``--zero-point float``) is refused together with masks, and an input width the group size does not divide is a
one-line error naming the linear (use ``--group-size -1``, per output channel): we refuse rather than fall back to
per channel, because a silent fallback changes the bits per weight and the scheme an export declares.

The engine keeps each linear's codes and grid (``QuantizedLinear``, on the CPU) for the writer; the report gets
per linear the grid and its bits per weight, and over the run the bits per weight with scales and zero points
counted (``summarize``). With ``--bits-budget`` (``quantize.bits``) each linear takes its own grid from a menu,
planned on the dense model before the engine (``plan_budget``, ``quantize.sensitivity``) and handed to the step
as ``work.assigned``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from taylorprune import distributed
from taylorprune.errors import UserError
from taylorprune.export.compressed_tensors import LinearQuant
from taylorprune.export.format_spec import GridKind
from taylorprune.options import NoOptions, Options, by_name, option
from taylorprune.quantize.bits import BitsOptions, ProbeOptions, check_budget, parse_choices
from taylorprune.quantize.gptq import GptqOptions, gptq
from taylorprune.quantize.grid import GROUP_SIZES, SCALE_DTYPES, ZERO_POINTS, Grid, GridSpec
from taylorprune.quantize.result import QuantizedWeight
from taylorprune.quantize.rtn import rtn
from taylorprune.quantize.search import search_grid
from taylorprune.quantize.sensitivity import GRAD_NEEDS, Assignment, menu_of, plan_bits

# ``--quant-train`` (declared here with the grid's options; the modes live in ``quantize.train``)
QUANT_TRAIN_MODES = ("auto", "ste", "scales", "round")
QUANT_TRAIN_HELP = ("How --recover distill and --recon block train a quantized model, every weight on its grid: ste "
                    "(latent weights rounded to the fixed grid in the forward, straight-through gradients: codes "
                    "change, scales stay), scales (codes fixed, each group's scale trained at its stored dtype), "
                    "round (a float fit under the mask, rounded to the fixed grid after it), auto: ste for recovery, "
                    "round for block fits (stories260K, SparseGPT 50% + GPTQ W3 per channel, PPL 221.97 without "
                    "training; recovery ste 105.11, scales 129.48, round 209.54; block fits round 142.30, scales "
                    "160.46, ste 168.56; quantize/train.py).")


# ``--observer``: how each group's scale (and zero point) is chosen before rounding (``quantize.search``)
OBSERVERS = ("minmax", "mse", "imatrix")
OBSERVER_HELP = ("How each group's grid is chosen: minmax (the group's range; GPTQ's and llm-compressor's default), "
                 "mse (the scale among 19 shrink/stretch candidates and their least-squares refits with the lowest "
                 "squared rounding error, llama.cpp's search), imatrix (the same search weighted per input by the "
                 "calibration's diag(XX^T): llama.cpp's importance matrix; GPTQ reads it from its H). With gptq each "
                 "group is searched before the loop (--static-groups) or when the loop reaches it, on the updated "
                 "weights (--no-static-groups).")


@dataclass(frozen=True)
class GridOptions(BitsOptions, ProbeOptions):
    wbits: int = option(4, "Bits per quantized weight (2 to 8).", minimum=2, maximum=8)
    group_size: int = option(128, "Input columns sharing one scale: 32, 64, 128, or -1 (one per output channel); "
                             "a width it does not divide is an error naming the linear.")
    symmetric: bool = option(True, "Symmetric grid (zero at 2^(b-1), no stored zero point; compressed-tensors' "
                             "W4A16); off: asymmetric with a zero point.")
    zero_point: str = option("integer", "Asymmetric grids: integer zero point (GPTQ, compressed-tensors) or float "
                             "minimum (llama.cpp's Q4_1 form d·q + m, which holds no exact 0).", choices=ZERO_POINTS)
    scale_dtype: str = option("float16", "Precision scales are stored and rounded to inside the loop.",
                              choices=tuple(SCALE_DTYPES))
    quant_train: str = option("auto", QUANT_TRAIN_HELP, choices=QUANT_TRAIN_MODES)
    observer: str = option("minmax", OBSERVER_HELP, choices=OBSERVERS)

    def check(self) -> None:
        self.spec()  # GridSpec refuses a group size it does not know, and a float minimum on a symmetric grid
        if self.bits_budget is not None:
            specs = parse_choices(self.bits_choices, self.spec())  # an unknown entry: one line, before loading
            low = min(s.wbits for s in specs)
            if self.bits_budget < low:  # the exact bounds, scales counted, are checked on the targets' shapes
                raise UserError(f"--bits-budget {self.bits_budget:g}: below the smallest configuration of "
                                f"--bits-choices ({low} bits per weight before scales)")

    def check_given(self, given: frozenset[str]) -> None:
        budget_only = sorted(given & {"bits_choices", "bits_allocation", "bits_measure", "bits_windows",
                                   "bits_tokens"})
        if self.bits_budget is None and budget_only:
            raise UserError(f"--{budget_only[0].replace('_', '-')} applies with --bits-budget only")
        if self.bits_budget is not None and distributed.launched():
            raise UserError("--bits-budget runs in one process only (its probe is not data-parallel yet: each rank "
                            "would plan on its own windows); run it without a launcher")
        if self.bits_budget is not None and "wbits" in given:
            raise UserError("--wbits and --bits-budget do not go together: the budget picks each linear's bits "
                            "from --bits-choices")

    def spec(self) -> GridSpec:
        return GridSpec(self.wbits, self.group_size, self.symmetric, self.zero_point, self.scale_dtype)


@dataclass(frozen=True)
class GptqStageOptions(GptqOptions, GridOptions):
    """GPTQ's loop options (``percdamp``/``blocksize`` shared with SparseGPT's) and the grid's."""


@dataclass
class QuantizedLinear:
    """One linear's codes and grid as the writer needs them (CPU), without the dequantized values (the model holds
    those)."""

    spec: GridSpec
    codes: torch.Tensor
    grid: Grid
    group_index: torch.Tensor
    method: str
    keep: torch.Tensor | None = None  # the pruning mask (None: none), which training on the grid keeps

    @classmethod
    def of(cls, q: QuantizedWeight, spec: GridSpec, method: str, keep: torch.Tensor | None = None
           ) -> QuantizedLinear:
        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().cpu()

        grid = Grid(cpu(q.grid.scale), cpu(q.grid.zero), cpu(q.grid.minimum))
        return cls(spec, cpu(q.codes), grid, cpu(q.group_index), method, None if keep is None else cpu(keep).bool())

    @property
    def ordered_groups(self) -> bool:
        """Groups are runs of consecutive columns in order (no ``g_idx`` needed)."""
        g = self.group_index
        return g.numel() < 2 or bool((g[1:] >= g[:-1]).all())

    def stored_bits(self) -> int:
        """Bits of codes, scales and zero points (a zero point packed at wbits, a float minimum at the scale's)."""
        scale_bits = torch.finfo(self.spec.stored_dtype).bits
        zero_bits = 0 if self.spec.symmetric else (self.spec.wbits if self.spec.zero_point == "integer"
                                                   else scale_bits)
        return self.codes.numel() * self.spec.wbits + self.grid.scale.numel() * (scale_bits + zero_bits)

    def stored(self) -> LinearQuant:
        """The compressed-tensors form (integer zero points and ordered groups only; the format refuses others
        before any work)."""
        zeros = None if self.spec.symmetric else self.grid.zero
        return LinearQuant(self.codes, self.grid.scale, zeros, self.spec.wbits, self.spec.group_size,
                           self.spec.symmetric)


ApplyFn = Callable[[torch.Tensor, torch.Tensor | None, Mapping[str, torch.Tensor], Any, str, GridSpec],
                   QuantizedWeight]


@dataclass(frozen=True)
class Quantizer:
    """A choice of ``--quantize``: ``quantize(weight fp32, keep mask or None, stats, options, name)``."""

    name: str
    summary: str
    quantize: ApplyFn | None = None
    statistics: frozenset[str] = frozenset()  # what the engine hands each linear (GPTQ: its H)
    options: type[Options] = NoOptions

    def needs(self, options: Options) -> frozenset[str]:
        """The engine's statistics, the inputs' Σx² for ``--observer imatrix`` when it has no H, and with
        ``--bits-budget`` the dense gradient pass the allocation uses."""
        weighted = getattr(options, "observer", "minmax") == "imatrix" and "hessian" not in self.statistics
        return (self.statistics | (frozenset({"act_norm_sq"}) if weighted else frozenset())
                | (GRAD_NEEDS if getattr(options, "bits_budget", None) is not None else frozenset()))

    def grid_kind(self, options: Options) -> GridKind | None:
        """What the output has to hold for this choice, known before any weight is loaded."""
        if self.quantize is None:
            return None
        s = options.spec()
        if getattr(options, "bits_budget", None) is not None:  # a mixed run: the menu's fewest-bits entry, which a
            s = min(parse_choices(options.bits_choices, s), key=lambda c: c.wbits)  # format is likeliest to refuse
        ordered = s.group_size == -1 or getattr(options, "static_groups", True) or not getattr(options, "act_order",
                                                                                                False)
        return GridKind(s.wbits, s.group_size, s.symmetric, s.zero_point, ordered, s.scale_dtype)

    def apply(self, weight: torch.Tensor, keep: torch.Tensor | None, stats, options: Options, name: str,
              dtype: torch.dtype, assigned: Assignment | None = None) -> tuple[torch.Tensor, QuantizedLinear, dict]:
        """(values, what the writer keeps, the linear's report record); ``dtype``: the model's, to say whether the
        values survive being stored in it; ``assigned``: the grid ``--bits-budget`` chose for this linear."""
        spec = options.spec() if assigned is None else assigned.spec
        q = self.quantize(weight, keep, stats, options, name, spec)
        kept = QuantizedLinear.of(q, spec, self.name, keep)
        zero = q.values == 0
        record = {"method": self.name, "wbits": kept.spec.wbits, "group_size": kept.spec.group_size,
                  "symmetric": kept.spec.symmetric, "bits_per_weight": kept.stored_bits() / max(q.codes.numel(), 1),
                  "rounded_to_zero": int((zero if keep is None else zero & keep.to(zero.device)).sum()),
                  "exact_in_model_dtype": bool(torch.equal(q.values.to(dtype).to(q.values.dtype), q.values)),
                  **{k: v for k, v in q.info.items() if isinstance(v, int | float | str | bool)},
                  **(assigned.record if assigned is not None else {})}
        return q.values, kept, record

    def planner(self, options: Options) -> Callable[[torch.Tensor, Mapping[str, torch.Tensor], GridSpec, str],
                                                    torch.Tensor]:
        """What ``--bits-budget``'s probe quantizes candidates with: this choice without a mask, at any grid."""
        return lambda weight, stats, spec, name: self.quantize(weight, None, stats, options, name, spec).values


def _importance(weight: torch.Tensor, stats: Mapping[str, torch.Tensor], observer: str) -> torch.Tensor | None:
    """Per-input weights of the grid search: none (minmax), ones (mse), or the inputs' Σx² (imatrix: diag H)."""
    if observer == "minmax":
        return None
    if observer == "mse":
        return torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
    h = stats.get("hessian")
    return torch.diagonal(h).float() if h is not None else stats["act_norm_sq"].float()


def _rtn(weight, keep, stats, options: GridOptions, name, spec: GridSpec):
    return rtn(weight, spec, importance=_importance(weight, stats, options.observer), keep=keep, name=name)


def _gptq(weight, keep, stats, options: GptqStageOptions, name, spec: GridSpec):
    importance, grid = _importance(weight, stats, options.observer), None
    if importance is not None and options.static_groups and spec.group_size != -1:
        # the searched grid of the weights GPTQ starts from (masked and dead inputs at 0)
        start = weight if keep is None else torch.where(keep.to(weight.device, torch.bool), weight, 0)
        start = torch.where(torch.diagonal(stats["hessian"]).to(weight.device) == 0, 0, start)
        grid, importance = search_grid(start, spec, importance.to(weight.device), name=name), None
    return gptq(weight, stats["hessian"], spec, options, keep=keep, grid=grid, name=name, importance=importance)


def check_widths(options: Options, targets) -> None:
    """Every target's input width takes the group size: else a one-line error naming the linear and its width, and
    the group sizes that would fit every target (before heavy work)."""
    specs = [options.spec()]
    flag = "--group-size"
    if getattr(options, "bits_budget", None) is not None:  # every configuration of the menu must fit every target
        specs, flag = parse_choices(options.bits_choices, options.spec()), "a group of --bits-choices"
    widths = {t.path: t.module.in_features for t in targets}
    for spec in specs:
        bad = next(((path, w) for path, w in widths.items() if spec.group_size != -1 and w % spec.group_size), None)
        if bad is not None:
            fits = [str(g) for g in sorted(GROUP_SIZES, reverse=True)
                    if g > 0 and all(w % g == 0 for w in widths.values())]
            raise UserError(f"{bad[0]}: input width {bad[1]} is not a multiple of {flag} {spec.group_size}; use "
                            f"{', '.join([*fits, ''])}-1 (one group per output channel), which fit every target")


def check_targets(options: Options, layout, resized: frozenset[str] = frozenset()) -> None:
    """On the loaded model, before heavy work: group sizes against widths (but of ``resized``, the linears whose
    input a structured phase shrinks first), and a budget against the menu's bits on the targets' shapes."""
    check_widths(options, [t for t in layout.all_targets if t.path not in resized])
    if getattr(options, "bits_budget", None) is not None:
        check_budget(menu_of(layout, options), options.bits_budget)


def plan_budget(quantizer: Quantizer, options: Options, ctx, dense: Mapping[str, Mapping[str, torch.Tensor]],
                grad_scale: float) -> tuple[dict[str, Assignment], dict]:
    """``--bits-budget``: each target's grid and the run's allocation record, planned on the dense model before
    the engine (nothing without a budget)."""
    if getattr(options, "bits_budget", None) is None:
        return {}, {}
    return plan_bits(ctx, options, quantizer.planner(options), dense, grad_scale,
                     quantizer.needs(options) - GRAD_NEEDS)


def summarize(linears: list[dict], kind: str = "quantize") -> dict:
    """The run's quantization over every quantized linear: bits per weight with scales and zero points counted
    (with ``--bits-budget``: also how many linears took each configuration, and the summed per-linear predicted and
    measured loss changes)."""
    done = [(lin, lin[kind]) for lin in linears if isinstance(lin.get(kind), dict)]
    numel = sum(lin["numel"] for lin, _ in done)
    bits = sum(q["bits_per_weight"] * lin["numel"] for lin, q in done)
    off = [lin["name"] for lin, q in done if not q["exact_in_model_dtype"]]
    schemes = sorted({(q["wbits"], q["group_size"], q["symmetric"]) for _, q in done})
    out = {"linears": len(done), "weights": numel, "bits_per_weight": bits / numel if numel else None,
           "bytes": round(bits / 8), "schemes": [{"wbits": b, "group_size": g, "symmetric": s} for b, g, s in schemes],
           "rounded_to_zero": sum(q["rounded_to_zero"] for _, q in done), "off_grid_in_model_dtype": len(off)}
    placed = [q for _, q in done if "choice" in q]
    if placed:
        counts: dict[str, int] = {}
        for q in placed:
            counts[q["choice"]] = counts.get(q["choice"], 0) + 1
        out["configurations"] = counts
        out["predicted_loss_change_sum"] = sum(q["predicted_loss_change"] for q in placed)
        if all("measured_loss_change" in q for q in placed):
            out["measured_loss_change_sum"] = sum(q["measured_loss_change"] for q in placed)
    return out


NONE = Quantizer("none", "keep float weights")
RTN = Quantizer("rtn", "round each weight to the nearest grid point (min-max grid per group)", _rtn,
                options=GridOptions)
GPTQ = Quantizer("gptq", "GPTQ: OBS error feedback column by column onto the grid (H = 2XXᵀ/N)", _gptq,
                 frozenset({"hessian"}), GptqStageOptions)

QUANTIZERS: dict[str, Quantizer] = by_name(
    NONE,
    RTN,
    GPTQ,
)
