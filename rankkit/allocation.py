r"""Spend a budget of adapter parameters where it keeps the most of ΔW.

Layer :math:`l` has singular values :math:`\sigma_{l,1} \ge \sigma_{l,2} \ge \dots` and
costs :math:`c_l = m_l + n_l` parameters per unit of LoRA rank. Keeping rank
:math:`r_l` keeps the energy :math:`\sum_{i \le r_l} \sigma_{l,i}^2`. The allocation solves

.. math:: \max_{r} \sum_l \sum_{i \le r_l} \sigma_{l,i}^2
          \quad \text{subject to} \quad \sum_l r_l c_l \le P,

a knapsack with one concave choice per layer: exactly, by dynamic programming over the
budget in units of the costs' greatest common divisor, when that is small enough
(:data:`EXACT_ALLOCATION_MAX_STEPS`), and otherwise greedily by energy per parameter, with
a bound on what the greedy may miss. Why absolute energy: see :mod:`rankkit.extract`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# The exact allocation runs a dynamic programme of about
# sum_l (max rank_l + 1) * (budget / g) steps (and keeps layers * budget / g choices);
# above this many steps it uses the greedy.
EXACT_ALLOCATION_MAX_STEPS = 20_000_000


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Ranks chosen under a parameter budget (see :func:`allocate_budget`).

    Attributes
    ----------
    ranks : list of int
        One rank per layer.
    parameters : int
        ``sum(rank * cost)``; never above the budget.
    kept : float
        Energy kept, ``sum_l sum_{i <= r_l} sigma_{l,i}^2``.
    method : {"exact", "greedy"}
    bound : float
        How much less than the optimum ``kept`` may be: 0 for ``"exact"``; for the
        greedy, the energy of the first unit of rank that did not fit.
    """

    ranks: list[int]
    parameters: int
    kept: float
    method: str
    bound: float


def allocate_budget(
    spectra: Sequence[Any], costs: Sequence[int], budget: int, method: str = "auto"
) -> Allocation:
    r"""Ranks :math:`r_l` that keep the most energy with at most ``budget`` parameters.

    Solves

    .. math:: \max_{r} \sum_l E_l(r_l) \quad\text{s.t.}\quad \sum_l r_l c_l \le P,
              \quad 0 \le r_l \le \operatorname{len}(\sigma_l),
              \qquad E_l(r) = \sum_{i \le r} \sigma_{l,i}^2 .

    ``"exact"``: a dynamic programme over layers (a multiple-choice knapsack), in
    units of :math:`g = \gcd(c_l)`, so a capacity of :math:`\lfloor P/g \rfloor`
    units; :math:`O(\sum_l (R_l+1) \cdot P/g)` steps. Exact for any spectra.

    ``"greedy"``: take units of rank in order of energy per parameter,
    :math:`\sigma_{l,i}^2 / c_l`, skipping a layer once its next unit does not fit.
    Since :math:`\sigma_{l,i}` decreases in :math:`i`, :math:`E_l` is concave, so the
    linear relaxation of the problem is solved by the same order taken fractionally;
    hence the optimum exceeds the greedy's energy by at most the energy of the first
    unit that did not fit (``Allocation.bound``), at most :math:`\max_l \sigma_{l,1}^2`.

    ``"auto"`` is exact when the programme has at most
    :data:`EXACT_ALLOCATION_MAX_STEPS` steps, greedy otherwise.

    Parameters
    ----------
    spectra : sequence of 1-D arrays
        Singular values of each layer, descending.
    costs : sequence of int
        Parameters per unit of rank of each layer (``out + in``).
    budget : int
        Most parameters in total.
    method : {"auto", "exact", "greedy"}

    Returns
    -------
    Allocation
    """
    if method not in ("auto", "exact", "greedy"):
        raise ValueError(f"method must be 'auto', 'exact' or 'greedy', got {method!r}.")
    gains = [
        np.concatenate([[0.0], np.cumsum(np.asarray(s, dtype=np.float64) ** 2)]) for s in spectra
    ]
    costs = [int(c) for c in costs]
    if len(gains) != len(costs) or not costs or min(costs) < 1:
        raise ValueError("allocate_budget: give one positive cost per spectrum.")
    unit = math.gcd(*costs)
    capacity = budget // unit
    steps = sum(min(len(g) - 1, capacity * unit // c) + 1 for g, c in zip(gains, costs)) * (
        capacity + 1
    )
    if method == "exact" or (method == "auto" and steps <= EXACT_ALLOCATION_MAX_STEPS):
        ranks = _allocate_exact(gains, [c // unit for c in costs], capacity)
        bound = 0.0
        method = "exact"
    else:
        ranks, bound = _allocate_greedy(gains, costs, budget)
        method = "greedy"
    kept = float(sum(g[r] for g, r in zip(gains, ranks)))
    return Allocation(ranks, sum(r * c for r, c in zip(ranks, costs)), kept, method, bound)


def _allocate_exact(gains: list[np.ndarray], costs: list[int], capacity: int) -> list[int]:
    """Dynamic programme: best[c] = most energy of the layers so far within c units."""
    best = np.zeros(capacity + 1)
    choices = []
    for gain, cost in zip(gains, costs):
        new = best.copy()  # rank 0 in this layer
        choice = np.zeros(capacity + 1, dtype=np.int32)
        for r in range(1, min(len(gain) - 1, capacity // cost) + 1):
            shift = r * cost
            candidate = best[: capacity + 1 - shift] + gain[r]
            better = candidate > new[shift:]  # ties keep the smaller rank
            new[shift:][better] = candidate[better]
            choice[shift:][better] = r
        best = new
        choices.append(choice)
    ranks, c = [], capacity
    for cost, choice in zip(reversed(costs), reversed(choices)):
        r = int(choice[c])
        ranks.append(r)
        c -= r * cost
    return ranks[::-1]


def _allocate_greedy(
    gains: list[np.ndarray], costs: list[int], budget: int
) -> tuple[list[int], float]:
    """Units of rank by energy per parameter; the bound is the first unit that did not fit."""
    units = [
        (-(gain[i + 1] - gain[i]) / cost, layer, i)
        for layer, (gain, cost) in enumerate(zip(gains, costs))
        for i in range(len(gain) - 1)
    ]
    ranks = [0] * len(gains)
    closed = [False] * len(gains)
    left, bound = budget, None
    for _, layer, i in sorted(units):
        if closed[layer]:
            continue
        if costs[layer] > left:
            closed[layer] = True
            if bound is None:
                bound = float(gains[layer][i + 1] - gains[layer][i])
            continue
        ranks[layer] = i + 1
        left -= costs[layer]
    return ranks, bound or 0.0
