"""Multiple-choice knapsack: one configuration per linear, least total predicted loss, stored bits within a budget.

Exact dynamic programming on a discretised budget, not a Lagrangian relaxation. A Lagrangian (one multiplier λ,
each linear picks argmin loss + λ·bits) only reaches the points on the lower convex hull of every linear's
(bits, loss) menu and so leaves budget unused between two hull points, which a greedy repair then fills by a
heuristic; with a handful of choices per linear and tens to hundreds of linears the DP is exact and cheap
(O(linears · choices · units), units ≤ ``resolution``), so there is no reason to accept that gap.

Discretisation: only the bits above each linear's cheapest choice compete for the slack S = budget − Σ cheapest.
The unit u = ceil(S / resolution) bits; every extra cost is rounded *up* to whole units, so any solution of the
discretised problem fits the true budget (Σ bits ≤ budget always). When S ≤ ``resolution`` the unit is one bit and
the DP is exactly optimal on the integer costs (the brute-force test checks this); otherwise it is optimal for
the rounded-up costs, which can leave less than one unit per linear of the budget unused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESOLUTION = 1 << 14  # budget units of the DP table (per linear one row of int8 choices this wide)


def solve(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int,
          resolution: int = RESOLUTION) -> list[int]:
    """The choice index per item minimising Σ losses with Σ costs ≤ ``budget`` (integers, e.g. stored bits).

    Raises ``ValueError`` when even the cheapest choices exceed the budget (callers check this first and say it in
    their own words). Ties keep the cheaper choice.
    """
    cheapest = [min(c) for c in costs]
    slack = budget - sum(cheapest)
    if slack < 0:
        raise ValueError(f"the cheapest choices need {sum(cheapest)} bits, more than the budget {budget}")
    unit = max(1, -(-slack // resolution))
    width = slack // unit
    extra = [[-(-(c - low) // unit) for c in row] for row, low in zip(costs, cheapest, strict=True)]
    best = np.zeros(width + 1)  # best[k]: least loss of the items so far using at most k units
    picks = np.zeros((len(costs), width + 1), dtype=np.int16)
    for i, (row, loss) in enumerate(zip(extra, losses, strict=True)):
        new = np.full(width + 1, np.inf)
        choice = np.zeros(width + 1, dtype=np.int16)
        for j in sorted(range(len(row)), key=lambda j: (row[j], j)):  # cheaper first: ties keep the cheaper one
            e = row[j]
            if e > width:
                continue
            cand = np.full(width + 1, np.inf)
            cand[e:] = best[: width + 1 - e] + float(loss[j])
            better = cand < new
            new[better], choice[better] = cand[better], j
        best, picks[i] = new, choice
    chosen, k = [0] * len(costs), width
    for i in range(len(costs) - 1, -1, -1):
        chosen[i] = int(picks[i, k])
        k -= extra[i][chosen[i]]
    return chosen


def brute_force(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int) -> float:
    """The least total loss over every combination within the budget (the tests' reference; tiny inputs only)."""
    from itertools import product

    best = float("inf")
    for combo in product(*(range(len(c)) for c in costs)):
        if sum(c[j] for c, j in zip(costs, combo, strict=True)) <= budget:
            best = min(best, sum(v[j] for v, j in zip(losses, combo, strict=True)))
    return best
