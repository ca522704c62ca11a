r"""Comparing two measured numbers: the standard error of a difference, and a verdict.

Every comparison in rankkit (the notebooks, the sweep summary) goes through here, so
that there is one rule for "is this difference larger than the noise?":

* :func:`binomial_se` -- the standard error of an accuracy measured on ``n`` examples;
* :func:`difference` -- two numbers with their own standard errors, assumed independent:
  the difference has standard error :math:`\sqrt{se_a^2 + se_b^2}`, which is
  :math:`\sqrt 2` times one of them when they are equal (the common mistake is to
  compare a difference with twice the error of *one* number);
* :func:`compare_accuracies` -- the same for two accuracies, from their test-set sizes;
* :func:`compare_seeds` -- two sets of per-seed values: Welch's t-test, or a paired
  t-test when seed ``i`` of one belongs with seed ``i`` of the other;
* :func:`mean_difference` -- the mean of ``k`` independent differences, and its error;
* :func:`bootstrap_means` -- resampled means of per-seed values (a seed bootstrap).

Each returns plain numbers or a :class:`Comparison`, whose ``verdict`` says in words
whether the difference is resolved at the chosen level (two-sided, 5% by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

__all__ = [
    "LEVEL",
    "Comparison",
    "binomial_se",
    "bootstrap_means",
    "compare_accuracies",
    "compare_seeds",
    "difference",
    "mean_difference",
]

#: The default two-sided significance level of every verdict.
LEVEL = 0.05


@dataclass(frozen=True)
class Comparison:
    r"""The difference ``a - b`` of two measured numbers, its standard error and a verdict.

    Attributes
    ----------
    a, b : float
        The two numbers (means, for per-seed values).
    difference : float
        ``a - b``.
    se : float
        Standard error of the difference (``nan`` when there is no noise estimate).
    statistic : float
        ``difference / se``: a z score (``dof`` infinite) or Welch's / the paired t.
    dof : float
        Degrees of freedom of ``statistic`` (``inf`` for the normal approximation).
    p : float
        Two-sided p-value of "no difference" (``nan`` without a noise estimate).
    level : float
        Significance level of the verdict.
    method : str
        ``"normal"``, ``"welch"`` or ``"paired"``.
    """

    a: float
    b: float
    difference: float
    se: float
    statistic: float
    dof: float
    p: float
    level: float
    method: str

    @property
    def resolved(self) -> bool:
        """True when the difference is larger than the noise: ``p < level``, or a non-zero
        difference with zero standard error (two noiseless numbers)."""
        if self.se == 0:
            return self.difference != 0
        return bool(self.p < self.level)

    @property
    def sign(self) -> int:
        """+1 (``a`` is higher), -1 (``a`` is lower) or 0 (not resolved)."""
        return int(np.sign(self.difference)) if self.resolved else 0

    @property
    def critical(self) -> float:
        """The ``|difference|`` the verdict needs: ``t_(1 - level/2, dof) * se``."""
        return float(_scipy_stats.t.ppf(1 - self.level / 2, self.dof) * self.se)

    @property
    def verdict(self) -> str:
        """``"higher"``, ``"lower"``, ``"within noise"``, or ``"no noise estimate"``."""
        if math.isnan(self.se):
            return "no noise estimate"
        return {1: "higher", -1: "lower", 0: "within noise"}[self.sign]

    def __str__(self) -> str:
        if math.isnan(self.se):
            return f"{self.difference:+.3f} (no noise estimate)"
        kind = "z" if self.method == "normal" else "t"
        return (
            f"{self.difference:+.3f} ± {self.se:.3f} ({kind} = {self.statistic:.1f}, "
            f"p = {self.p:.2f}): {self.verdict}"
        )


def binomial_se(p, n):
    r"""Standard error of an accuracy (a proportion) measured on ``n`` independent examples.

    .. math:: \operatorname{se}(\hat p) = \sqrt{\hat p (1 - \hat p) / n}.

    Parameters
    ----------
    p : float or array_like
        Measured accuracies, in [0, 1].
    n : int or array_like
        Number of examples each was measured on.

    Returns
    -------
    float or numpy.ndarray
    """
    p, n = np.asarray(p, dtype=float), np.asarray(n, dtype=float)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"binomial_se: p must be a proportion in [0, 1], got {p}.")
    if np.any(n < 1):
        raise ValueError(f"binomial_se: n must be a count of examples >= 1, got {n}.")
    se = np.sqrt(p * (1 - p) / n)
    return float(se) if se.ndim == 0 else se


def difference(a: float, b: float, se_a: float, se_b: float, *, level: float = LEVEL) -> Comparison:
    r"""``a - b`` for two independent measurements with standard errors ``se_a``, ``se_b``.

    .. math:: d = a - b, \qquad \operatorname{se}(d) = \sqrt{se_a^2 + se_b^2},
              \qquad z = d / \operatorname{se}(d),

    with the two-sided normal p-value :math:`2(1 - \Phi(|z|))`. The difference is
    resolved at 5% when :math:`|d| \ge 1.96\,\operatorname{se}(d)`; with
    :math:`se_a = se_b = se` that is :math:`|d| \ge 2.77\, se`, not :math:`2\,se`.

    Parameters
    ----------
    a, b : float
        The two measurements.
    se_a, se_b : float
        Their standard errors (for an accuracy: :func:`binomial_se`).
    level : float, default 0.05
        Two-sided significance level of the verdict.

    Returns
    -------
    Comparison
    """
    _check_level(level)
    if min(se_a, se_b) < 0:
        raise ValueError(f"difference: standard errors must be >= 0, got {se_a} and {se_b}.")
    d = float(a - b)
    se = math.hypot(se_a, se_b)
    z = d / se if se > 0 else math.nan
    p = float(2 * _scipy_stats.norm.sf(abs(z))) if se > 0 else math.nan
    return Comparison(float(a), float(b), d, se, z, math.inf, p, level, "normal")


def compare_accuracies(
    a: float, b: float, n_a: int, n_b: int | None = None, *, level: float = LEVEL
) -> Comparison:
    r"""Two accuracies measured on ``n_a`` and ``n_b`` test examples (``n_b`` defaults to ``n_a``).

    :func:`difference` with :func:`binomial_se` for each. This counts only the test-set
    sampling noise, treating the two accuracies as independent. Two models scored on the
    *same* test set usually err on some of the same examples, which makes the true error
    of the difference somewhat smaller (a paired count such as McNemar's test would use
    it); training-seed noise, on the other hand, comes on top. So a difference this
    function calls "within noise" is not resolved by one run each.
    """
    n_b = n_a if n_b is None else n_b
    return difference(a, b, binomial_se(a, n_a), binomial_se(b, n_b), level=level)


def compare_seeds(a, b, *, paired: bool = False, level: float = LEVEL) -> Comparison:
    r"""Per-seed values ``a`` and ``b`` of two configurations: is the mean difference resolved?

    Unpaired (the default; independent runs), Welch's t-test:

    .. math:: d = \bar a - \bar b, \qquad
              \operatorname{se}(d) = \sqrt{s_a^2 / n_a + s_b^2 / n_b},

    with Welch–Satterthwaite degrees of freedom. Paired (``a[i]`` and ``b[i]`` share
    seed ``i``, e.g. two rules applied to the same fine-tune): the one-sample t-test of
    the differences :math:`d_i = a_i - b_i`, :math:`\operatorname{se} = s_d / \sqrt n`,
    :math:`n - 1` degrees of freedom. :math:`s` are sample standard deviations
    (``ddof=1``).

    Parameters
    ----------
    a, b : array_like
        Per-seed values (for example test accuracies).
    paired : bool, default False
        Pair ``a[i]`` with ``b[i]``; they must have the same length.
    level : float, default 0.05
        Two-sided significance level of the verdict.

    Returns
    -------
    Comparison
        With ``se = nan`` ("no noise estimate") when a side has a single seed.
    """
    _check_level(level)
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if len(a) == 0 or len(b) == 0:
        raise ValueError("compare_seeds: both sides need at least one value.")
    if paired and len(a) != len(b):
        raise ValueError(
            f"compare_seeds: paired values need the same number of seeds, got {len(a)} and "
            f"{len(b)}; pass paired=False for independent runs."
        )
    mean_a, mean_b = float(a.mean()), float(b.mean())
    d = mean_a - mean_b
    method = "paired" if paired else "welch"
    if min(len(a), len(b)) < 2:
        return Comparison(mean_a, mean_b, d, math.nan, math.nan, math.nan, math.nan, level, method)
    if paired:
        diffs = a - b
        se = float(diffs.std(ddof=1)) / math.sqrt(len(diffs))
        dof = float(len(diffs) - 1)
    else:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        se = math.sqrt(va + vb)
        dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else math.inf
    if se == 0:
        return Comparison(mean_a, mean_b, d, 0.0, math.nan, dof, math.nan, level, method)
    t = d / se
    p = float(2 * _scipy_stats.t.sf(abs(t), dof))
    return Comparison(mean_a, mean_b, d, se, t, float(dof), p, level, method)


def mean_difference(differences, ses) -> tuple[float, float]:
    r"""The mean of ``k`` independent differences and its standard error.

    .. math:: \bar d = \frac1k \sum_i d_i, \qquad
              \operatorname{se}(\bar d) = \frac1k \sqrt{\textstyle\sum_i \operatorname{se}_i^2}.
    """
    d, se = np.asarray(differences, dtype=float), np.asarray(ses, dtype=float)
    if d.shape != se.shape or d.size == 0:
        raise ValueError(
            f"mean_difference: need one standard error per difference, got {d.size} and {se.size}."
        )
    return float(d.mean()), float(np.sqrt((se**2).sum())) / d.size


def bootstrap_means(values, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of per-seed ``values``.

    The seed bootstrap: each replicate draws ``len(values)`` seeds from the observed
    ones. With few seeds it only mixes the values seen, so its spread is optimistic.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap_means: values must be a non-empty 1-D array.")
    return values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}.")
