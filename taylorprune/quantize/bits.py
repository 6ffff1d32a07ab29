"""``--bits-budget B``: bits placed per linear (issue #36, point 4), each linear at one configuration of a menu.

The budget is the average stored bits per weight over the target linears, scales and zero points counted exactly as
``QuantizedLinear.stored_bits`` counts them (``stored_bits`` below is that formula from shapes, so the plan is
known before anything is quantized). ``--bits-choices`` is the menu: comma-separated ``B`` (``B`` bits at
``--group-size``) or ``BgG`` (group ``G`` ∈ {32, 64, 128, -1}); the default 2,3,4,8 at group 128 is
compressed-tensors' W4A16 grid with its 2/3-bit siblings and W8A16, all of which vLLM serves or transformers loads,
so a mixed folder stays loadable; 5-7 bits are allowed too.

``--bits-allocation`` chooses a configuration per linear (registry ``BIT_ALLOCATIONS``, each entry with typed
options, all within the budget):

- ``sensitivity`` (default): the predicted loss increase of each configuration's actual ΔW (what the chosen
  quantizer makes of the dense weight: RTN, or GPTQ with the dense model's H), gᵀΔw + ½ΔwᵀHΔw with g from a
  gradient pass and HΔw an exact Hessian-vector product of the model loss (``quantize.sensitivity``), then the
  exact multiple-choice knapsack (``quantize.knapsack``);
- ``fisher``: the same knapsack on HAWQ-v2's trace criterion with the empirical Fisher for the Hessian,
  ½·tr(F)/n·‖ΔW‖² (F from the per-window gradients): the ranking without curvature directions or first order;
- ``uniform``: one configuration for every linear, the largest that fits;
- ``llamacpp``: llama.cpp's Q4_K_M rule (``llama-quant.cpp``: attn_v and ffn_down of the blocks where
  ``use_more_bits`` holds, i < n/8 or i ≥ 7n/8 or (i − n/8) % 3 == 2, go from Q4_K up to Q6_K, two bits more),
  mapped onto the menu: a base configuration for every linear and a higher one for those, the pair that uses the
  most of the budget (ties: the higher base).

Budgets below the cheapest configuration for every linear, or above the dearest, are one-line errors before any
pass runs; so are unknown entries of the menu and group sizes a target's width does not take.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from taylorprune.errors import UserError
from taylorprune.options import NoOptions, Options, by_name, option
from taylorprune.quantize.grid import GROUP_SIZES, MAX_BITS, MIN_BITS, GridSpec
from taylorprune.quantize.knapsack import RESOLUTION, solve

_ENTRY = re.compile(r"^([0-9]+)(?:g(-?[0-9]+))?$")


def parse_choices(text: str, base: GridSpec) -> list[GridSpec]:
    """The menu as grids sharing ``base``'s kind (symmetry, zero point, scale dtype), in the order given."""
    specs: list[GridSpec] = []
    for raw in (t.strip() for t in str(text).split(",")):
        m = _ENTRY.match(raw)
        bits = int(m.group(1)) if m else 0
        group = int(m.group(2)) if m and m.group(2) is not None else base.group_size
        if not m or not MIN_BITS <= bits <= MAX_BITS or group not in GROUP_SIZES:
            raise UserError(f"--bits-choices {text}: {raw or 'an empty entry'} is not a configuration; write B or "
                            f"BgG with B from {MIN_BITS} to {MAX_BITS} and G one of 32, 64, 128, -1 (e.g. 2,3,4g128,8)")
        spec = replace(base, wbits=bits, group_size=group)
        if spec in specs:
            raise UserError(f"--bits-choices {text}: {name_of(spec)} is given twice")
        specs.append(spec)
    return specs


def name_of(spec: GridSpec) -> str:
    return f"{spec.wbits}g{spec.group_size}"


def stored_bits(spec: GridSpec, rows: int, cols: int) -> int:
    """Bits of codes, scales and zero points of a [rows, cols] weight: ``QuantizedLinear.stored_bits`` from shapes."""
    scale_bits = torch.finfo(spec.stored_dtype).bits
    zero_bits = 0 if spec.symmetric else (spec.wbits if spec.zero_point == "integer" else scale_bits)
    groups = 1 if spec.group_size == -1 else cols // spec.group_size
    return rows * cols * spec.wbits + rows * groups * (scale_bits + zero_bits)


@dataclass(frozen=True)
class ProbeOptions(Options):
    bits_measure: bool = option(True, "Also measure each candidate's calibration loss change with that linear "
                                "alone quantized (one forward per candidate), reported beside the prediction.")
    bits_windows: int | None = option(None, "Calibration windows the allocation probes on, the first N (its cost "
                                      "grows with them; the quantizer still calibrates on all); default: all.",
                                      minimum=1)
    bits_tokens: int | None = option(None, "Tokens of each probed window, the first T (a window's HVP costs about "
                                     "linearly in them; the quantizer still calibrates on whole windows); "
                                     "default: the whole window.", minimum=2)


@dataclass
class Menu:
    """The targets (path, block, shape) and each one's stored bits under every configuration."""

    paths: list[str]
    blocks: list[int]
    shapes: list[tuple[int, int]]
    specs: list[GridSpec]
    bits: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bits = [[stored_bits(s, r, c) for s in self.specs] for r, c in self.shapes]

    @property
    def weights(self) -> int:
        return sum(r * c for r, c in self.shapes)

    def budget_bits(self, bpw: float) -> int:
        return int(bpw * self.weights)

    def total(self, chosen: list[int]) -> int:
        return sum(row[j] for row, j in zip(self.bits, chosen, strict=True))


def check_budget(menu: Menu, bpw: float) -> None:
    """A one-line error for a budget no assignment meets, or one above every linear's dearest configuration."""
    low, high = sum(min(r) for r in menu.bits), sum(max(r) for r in menu.bits)
    if menu.budget_bits(bpw) < low:
        raise UserError(f"--bits-budget {bpw:g}: below the cheapest configurations, {low / menu.weights:.4f} bits per "
                        "weight over the targets with scales; raise it or add a smaller entry to --bits-choices")
    if bpw * menu.weights > high:
        raise UserError(f"--bits-budget {bpw:g}: above the dearest configurations, {high / menu.weights:.4f} bits per "
                        "weight over the targets with scales; lower it or quantize at one --wbits without a budget")


# ------------------------------------------------------------------------------------------------ allocations
# (menu, budget in bits, probe giving losses on demand, options) -> chosen index per target, and what to report
Choose = Callable[[Menu, int, object, Options], tuple[list[int], dict]]


@dataclass(frozen=True)
class BitAllocation:
    """A choice of ``--bits-allocation``: ``choose(menu, budget bits, probe, options)``; ``probes``: the probe's
    quantity it ranks every candidate by (None: it chooses by rule, and only the chosen ones are probed, for the
    report). ``options``: its typed options, which ``stage.GridOptions`` derives from, so they are flags of the
    quantize stage (a test checks every entry's)."""

    name: str
    summary: str
    choose: Choose
    probes: str | None = None  # "predicted" / "fisher": the probe's loss per candidate it ranks by
    options: type[Options] = NoOptions


def _knapsack(menu: Menu, budget: int, probe, options: Options, what: str) -> tuple[list[int], dict]:
    losses = probe.losses(what)
    chosen = solve(menu.bits, losses, budget)
    return chosen, {"solver": "exact multiple-choice knapsack DP", "resolution": RESOLUTION}


def _uniform(menu: Menu, budget: int, probe, options: Options) -> tuple[list[int], dict]:
    fits = [j for j in range(len(menu.specs)) if menu.total([j] * len(menu.paths)) <= budget]
    if not fits:  # the cheapest configuration differs by linear: no single one fits
        raise UserError(f"--bits-allocation uniform: no single configuration of --bits-choices fits "
                        f"--bits-budget {budget / menu.weights:.4f}; raise the budget")
    best = max(fits, key=lambda j: (menu.total([j] * len(menu.paths)), -j))
    return [best] * len(menu.paths), {}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits`` (C integer division): the first and last eighth of the blocks and every
    third one in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def more_bits_targets(menu: Menu, n_blocks: int) -> list[bool]:
    """Which targets Q4_K_M promotes: attention values and MLP down projections of ``use_more_bits`` blocks."""
    return [path.endswith(("v_proj", "down_proj")) and use_more_bits(b, n_blocks)
            for path, b in zip(menu.paths, menu.blocks, strict=True)]


def _llamacpp(menu: Menu, budget: int, probe, options: Options) -> tuple[list[int], dict]:
    n_blocks = max(menu.blocks) + 1 if menu.blocks else 0
    more = more_bits_targets(menu, n_blocks)
    order = sorted(range(len(menu.specs)), key=lambda j: menu.total([j] * len(menu.paths)))
    best: tuple[int, int, list[int]] | None = None
    for a, base in enumerate(order):
        for up in order[a:]:
            chosen = [up if m else base for m in more]
            total = menu.total(chosen)
            if total <= budget and (best is None or (total, a) > best[:2]):
                best = (total, a, chosen)
    if best is None:
        raise UserError("--bits-allocation llamacpp: no base configuration of --bits-choices fits --bits-budget "
                        f"{budget / menu.weights:.4f}; raise the budget")
    chosen = best[2]
    return chosen, {"promoted": [p for p, m in zip(menu.paths, more, strict=True) if m]}


BIT_ALLOCATIONS: dict[str, BitAllocation] = by_name(
    BitAllocation("sensitivity", "predicted loss gᵀΔw + ½ΔwᵀHΔw of each configuration's ΔW (exact HVPs), exact "
                  "knapsack", lambda m, b, p, o: _knapsack(m, b, p, o, "predicted"), "predicted", ProbeOptions),
    BitAllocation("fisher", "Fisher-trace ½·tr(F)/n·‖ΔW‖², exact knapsack",
                  lambda m, b, p, o: _knapsack(m, b, p, o, "fisher"), "fisher", ProbeOptions),
    BitAllocation("uniform", "one configuration for every linear, the largest that fits", _uniform),
    BitAllocation("llamacpp", "llama.cpp Q4_K_M: attn_v and ffn_down of the first/last eighth and every third "
                  "block one configuration up", _llamacpp),
)


@dataclass(frozen=True)
class BitsOptions(Options):
    bits_budget: float | None = option(None, "Average stored bits per weight over the target linears (scales and "
                                       "zero points counted); each linear gets one configuration of "
                                       "--bits-choices, placed by --bits-allocation.", above=0)
    bits_choices: str = option("2,3,4,8", "Configurations a linear may take with --bits-budget: B (bits at "
                               "--group-size) or BgG (group G: 32, 64, 128 or -1), comma-separated.")
    bits_allocation: str = option("sensitivity", "How --bits-budget is placed: sensitivity (predicted loss "
                                  "gᵀΔw + ½ΔwᵀHΔw with exact HVPs, exact knapsack), fisher (Fisher-trace ranking, "
                                  "same knapsack), uniform (one configuration), llamacpp (Q4_K_M's rule).",
                                  choices=tuple(BIT_ALLOCATIONS))
