"""Reading a sweep's results: the gain over the frozen base, and the rank that reaches it.

The *gain* of a run is ``(metric - frozen) / (full - frozen)``: 0 means no better than
the frozen base, 1 means as good as full fine-tuning. :func:`rank_for_gain` reads off
the smallest rank reaching 90% or 95% of the gain, :func:`rank_for_gain_interval` says
how much that answer moves when the seeds are resampled (a bootstrap), and
:func:`format_summary` prints both under the table of :func:`summarize`.
:func:`compare_allocations` sets spectral ranks and AdaLoRA against uniform rank at the
same budget, with the seed noise of the difference.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rankkit.stats import bootstrap_means, compare_seeds, mean_difference

# --------------------------------------------------------------------------- summaries


def _references(results: pd.DataFrame) -> tuple[float | None, float | None]:
    ok = results[results["status"] == "ok"]
    full = ok[ok["method"] == "full"]["test_metric"]
    frozen = ok[ok["method"] == "frozen"]["test_metric"]
    return (
        float(full.mean()) if len(full) else None,
        float(frozen.mean()) if len(frozen) else None,
    )


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread of the test metric per configuration, with the gain over the frozen base."""
    ok = results[results["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame()
    ok["targets"] = ok["targets"].fillna("-")
    ok["rank"] = ok["rank"].fillna(-1)
    table = (
        ok.groupby(["method", "targets", "rank"], sort=False)
        .agg(
            runs=("test_metric", "size"),
            test_mean=("test_metric", "mean"),
            test_std=("test_metric", "std"),
            trainable_params=("trainable_params", "mean"),
            trainable_fraction=("trainable_fraction", "mean"),
        )
        .reset_index()
    )
    table["rank"] = table["rank"].map(lambda r: "-" if r == -1 else int(r))
    full, frozen = _references(results)
    if full is not None and frozen is not None and full > frozen:
        table["gain"] = (table["test_mean"] - frozen) / (full - frozen)
    return table


#: Slack of "reaches the threshold": a mean equal to ``frozen + f (full - frozen)`` up to
#: float round-off counts as reaching it (0.86 with frozen 0.5, full 0.9 and f = 0.9).
GAIN_TOLERANCE = 1e-9


def _reaches(mean, frozen, full, fraction: float):
    """Whether ``mean >= frozen + fraction (full - frozen)``, up to :data:`GAIN_TOLERANCE`.

    Works on floats and on NumPy arrays alike.
    """
    return mean >= frozen + fraction * (full - frozen) - GAIN_TOLERANCE


def rank_for_gain(results: pd.DataFrame, fraction: float, targets: str | None = None) -> int | None:
    """Smallest LoRA rank whose mean test metric reaches ``fraction`` of the full-FT gain.

    gain(r) = (mean metric at r - frozen base) / (full fine-tuning - frozen base); a rank
    reaches ``fraction`` when its mean is at least ``frozen + fraction (full - frozen)``
    (compared directly, with a round-off tolerance, not as a ratio). Returns ``None`` if no
    rank reaches it, the baselines are missing, or full fine-tuning is not above the
    frozen base (no gain to reach).
    """
    full, frozen = _references(results)
    if full is None or frozen is None or full <= frozen:
        return None
    ok = results[(results["status"] == "ok") & (results["method"] == "lora")]
    if targets is not None:
        ok = ok[ok["targets"] == targets]
    means = ok.groupby("rank")["test_metric"].mean().sort_index()
    for rank, mean in means.items():
        if _reaches(mean, frozen, full, fraction):
            return int(rank)
    return None


def rank_for_gain_interval(
    results: pd.DataFrame,
    fraction: float,
    targets: str | None = None,
    *,
    level: float = 0.9,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """How sure is :func:`rank_for_gain`? A bootstrap over seeds.

    Each replicate resamples, with replacement, the seeds of every configuration
    (each LoRA rank, full fine-tuning and the frozen base) independently, recomputes
    the mean metrics and reads off the smallest rank reaching ``fraction`` of the
    gain. The interval is the central ``level`` quantiles of that rank over the
    replicates, with ``math.inf`` for "not reached at any swept rank".

    With three seeds this is a coarse, optimistic picture (the resamples only mix
    the three values observed), but it shows at a glance when the answer is fragile.

    Returns
    -------
    (low, high) or None
        ``None`` when there is nothing to resample: a missing baseline or LoRA
        results, or at most one run per configuration.
    """
    if not 0 < level < 1:
        raise ValueError(f"rank_for_gain_interval: level must be in (0, 1), got {level!r}.")
    ok = results[results["status"] == "ok"]
    lora = ok[ok["method"] == "lora"]
    if targets is not None:
        lora = lora[lora["targets"] == targets]
    full = ok.loc[ok["method"] == "full", "test_metric"].to_numpy(float)
    frozen = ok.loc[ok["method"] == "frozen", "test_metric"].to_numpy(float)
    by_rank = {int(r): g["test_metric"].to_numpy(float) for r, g in lora.groupby("rank")}
    groups = [full, frozen, *by_rank.values()]
    if not by_rank or min(len(g) for g in groups) < 1 or max(len(g) for g in groups) < 2:
        return None
    rng = np.random.default_rng(seed)

    def resampled_means(values: np.ndarray) -> np.ndarray:
        return bootstrap_means(values, n_boot, rng)

    full_b, frozen_b = resampled_means(full), resampled_means(frozen)
    ranks = sorted(by_rank)
    means_b = np.stack([resampled_means(by_rank[r]) for r in ranks], axis=1)
    reached = _reaches(means_b, frozen_b[:, None], full_b[:, None], fraction)
    reached &= (full_b > frozen_b)[:, None]
    first = np.where(
        reached.any(axis=1), np.asarray(ranks, float)[reached.argmax(axis=1)], math.inf
    )
    tail = (1 - level) / 2
    return (
        float(np.quantile(first, tail, method="lower")),
        float(np.quantile(first, 1 - tail, method="higher")),
    )


def _rank_text(rank: float | None) -> str:
    return "not reached" if rank is None or math.isinf(rank) else str(int(rank))


def format_summary(results: pd.DataFrame) -> str:
    table = summarize(results)
    if table.empty:
        return "(no finished runs)"
    metric = results["metric"].dropna().iloc[0] if results["metric"].notna().any() else "metric"
    shown = table.rename(columns={"test_mean": f"test {metric}", "test_std": "± std"})
    text = shown.to_string(index=False, float_format=lambda x: f"{x:.4g}")
    lines = [text]
    any_interval = False
    lora_targets = results.loc[results["method"] == "lora", "targets"].dropna().unique()
    missing = [name for name, ref in zip(("full fine-tuning", "frozen-base"), _references(results))
               if ref is None]  # fmt: skip
    if missing and len(lora_targets):
        # Without both references there is no gain: say what was measured, conclude nothing.
        lines.append(
            f"no finished {' or '.join(missing)} runs, so no full-FT gain to measure ranks "
            "against: the table shows each rank's test metric only (sweep without "
            "--no-baselines for the rank reaching 90%/95% of the gain)"
        )
        lora_targets = []
    full, frozen = _references(results)
    if not missing and len(lora_targets) and full <= frozen:
        lines.append(_full_below_frozen(results, full, frozen, metric))
        lora_targets = []
    elif not missing and len(lora_targets):
        lines += _unresolved_gain(results)
    for targets in lora_targets:
        parts = []
        swept = results.loc[(results["method"] == "lora") & (results["targets"] == targets), "rank"]
        for fraction in (0.9, 0.95):
            rank = rank_for_gain(results, fraction, targets)
            text = (
                f"at rank {int(rank)}"
                if rank is not None
                else f"not reached by rank {swept.max():g}"
            )
            interval = rank_for_gain_interval(results, fraction, targets)
            if interval is not None:
                any_interval = True
                low, high = (_rank_text(x) for x in interval)
                text += f" [{low}, {high}]" if low != high else f" [{low}]"
            parts.append(text)
        lines.append(f"targets {targets}: 90% of the full-FT gain {parts[0]}, 95% {parts[1]}")
    if any_interval:
        lines.append(
            "[low, high]: 90% bootstrap interval of that rank, resampling each configuration's "
            "seeds (rank_for_gain_interval)"
        )
    if "gain" in table:
        # Far below the frozen base (by half the full-FT gain or more): training broke down.
        below = table[(table["method"] == "lora") & (table["gain"] < -0.5)]
        if len(below):
            where = ", ".join(f"{t} r={r}" for t, r in zip(below["targets"], below["rank"]))
            collapsed = results[
                (results["method"] == "lora")
                & results["rank"].isin(below["rank"])
                & results["targets"].isin(below["targets"])
            ]
            hint = (
                "with lora_alpha = r the update per step grows with r; try a fixed --alpha "
                "(e.g. 8), --rslora or a lower --lr"
                if (collapsed["alpha"] == collapsed["rank"]).any()
                else "try a lower --lr"
            )
            lines.append(f"warning: LoRA scored far below the frozen base at {where}: {hint}")
    lines += _allocation_lines(results)
    errors = results[results["status"] == "error"]
    if len(errors):
        lines.append(f"{len(errors)} run(s) failed; see the 'error' column of results.csv")
    return "\n".join(lines)


def _unresolved_gain(results: pd.DataFrame) -> list[str]:
    """A warning when full fine-tuning's lead over the frozen base is within seed noise."""
    ok = results[results["status"] == "ok"]
    c = compare_seeds(
        ok.loc[ok["method"] == "full", "test_metric"],
        ok.loc[ok["method"] == "frozen", "test_metric"],
    )
    if c.verdict != "within noise":
        return []
    return [
        f"warning: full fine-tuning - frozen base = {c.difference:+.4g} ± {c.se:.2g} is within "
        "seed noise (Welch t-test, 5%): the gain divides by a difference the seeds do not "
        "resolve, so the ranks reaching 90%/95% of it are not resolved either"
    ]


def _full_below_frozen(results: pd.DataFrame, full: float, frozen: float, metric: str) -> str:
    """What happened when full fine-tuning did not beat the frozen base (no gain to measure)."""
    lora = results[(results["status"] == "ok") & (results["method"] == "lora")]
    means = lora.groupby(["targets", "rank"])["test_metric"].mean()
    (targets, rank), best = means.idxmax(), float(means.max())
    verdict = (
        "above both baselines"
        if best > frozen
        else "above full fine-tuning, below the frozen base"
        if best > full
        else "below both baselines"
    )
    return (
        f"full fine-tuning ({metric} {full:.4g}) did not beat the frozen base ({frozen:.4g}), "
        "so there is no full-FT gain to measure ranks against; LoRA's best mean is "
        f"{best:.4g} (targets {targets}, r={int(rank)}), {verdict}. Full fine-tuning may need a "
        "lower --full-lr or more --epochs."
    )


# --------------------------------------------------------------------------- allocations

#: The allocation of each LoRA method's rows (results written before the ``allocation``
#: column existed hold uniform ``lora`` runs only).
ALLOCATION_OF = {"lora": "uniform", "lora-spectral": "spectral", "adalora": "adalora"}
#: Significance level of :func:`compare_allocations`' verdicts.
ALLOCATION_LEVEL = 0.05


def compare_allocations(results: pd.DataFrame) -> pd.DataFrame:
    r"""Spectral ranks and AdaLoRA against uniform rank at the same budget, per target set.

    A ``lora-spectral`` or ``adalora`` run at rank r spends uniform rank r's budget, so
    each is compared with the uniform runs of the same target set and rank. With
    :math:`n_a` and :math:`n_u` seeds, means :math:`\bar x_a, \bar x_u` and sample
    standard deviations :math:`s_a, s_u`, the difference and its standard error are

    .. math:: d = \bar x_a - \bar x_u, \qquad
              \operatorname{se}(d) = \sqrt{s_a^2 / n_a + s_u^2 / n_u},

    the runs of the two allocations being independent. The verdict is "better than
    uniform" or "worse than uniform" when Welch's two-sided t-test rejects
    :math:`d = 0` at :data:`ALLOCATION_LEVEL`, and "within seed noise" otherwise.
    A spectral run whose per-layer ranks are uniform's in every run is "same ranks as
    uniform": the same configuration (at rank 1 of two layers the budget often buys
    nothing else). AdaLoRA always gets Welch's verdict, even where it ends at uniform's
    ranks: it trains another parametrisation (P Λ Q, pruned from more units), so its
    difference is the method's.

    Returns
    -------
    pandas.DataFrame
        One row per (targets, rank, allocation): ``uniform`` and ``mean`` (test metric
        means), ``difference``, ``se``, ``z`` (= difference / se), ``p`` (Welch),
        ``seeds`` (runs of the allocation), ``uniform_params`` and ``params`` (mean
        ``adapter_params``), ``verdict``. Empty if there is nothing to compare.
    """
    ok = results[(results["status"] == "ok") & results["method"].isin(ALLOCATION_OF)]
    ok = ok.assign(allocation=ok["method"].map(ALLOCATION_OF))
    if "adapter_params" not in ok:
        ok = ok.assign(adapter_params=np.nan)
    rows = []
    for (targets, rank), part in ok.groupby(["targets", "rank"], sort=True):
        uniform = part[part["allocation"] == "uniform"]
        for allocation in ("spectral", "adalora"):
            other = part[part["allocation"] == allocation]
            if uniform.empty or other.empty:
                continue
            a, u = other["test_metric"].to_numpy(float), uniform["test_metric"].to_numpy(float)
            rows.append(dict(
                targets=targets, rank=int(rank), allocation=allocation,
                uniform=u.mean(), mean=a.mean(), **_difference(a, u), seeds=len(a),
                uniform_params=uniform["adapter_params"].mean(), params=other["adapter_params"].mean(),
            ))  # fmt: skip
            both = pd.concat([uniform, other])
            known = "rank_pattern" in both and both["rank_pattern"].notna().all()
            if allocation == "spectral" and known and both["rank_pattern"].nunique() == 1:
                rows[-1]["verdict"] = "same ranks as uniform"
    return pd.DataFrame(rows)


def _difference(a: np.ndarray, u: np.ndarray) -> dict[str, float | str]:
    """``a - u``: difference, standard error, t, Welch's p and the verdict (:mod:`rankkit.stats`)."""
    c = compare_seeds(a, u, level=ALLOCATION_LEVEL)
    verdict = {
        "no noise estimate": "one seed, no noise estimate",
        "within noise": "within seed noise",
        "higher": "better than uniform",
        "lower": "worse than uniform",
    }[c.verdict]
    if c.se == 0 and c.difference == 0:
        verdict = "identical"
    return dict(difference=c.difference, se=c.se, z=c.statistic, p=c.p, verdict=verdict)


def _allocation_lines(results: pd.DataFrame) -> list[str]:
    """One line per (allocation, target set): the difference from uniform at each rank."""
    table = compare_allocations(results)
    if table.empty:
        return []
    lines = []
    for (allocation, targets), part in table.groupby(["allocation", "targets"], sort=False):
        cells = [
            f"r={r} {d:+.3f} ± {se:.3f}" + ("" if v == "within seed noise" else f" ({v})")
            for r, d, se, v in zip(part["rank"], part["difference"], part["se"], part["verdict"])
        ]
        counts = part["verdict"].value_counts()
        noise = counts.get("within seed noise", 0)
        line = (
            f"{allocation} - uniform at the same budget, targets {targets} (mean difference ± "
            f"s.e. over seeds): {', '.join(cells)}; within seed noise at {noise} of "
            f"{len(part)} ranks (Welch t-test, 5%)"
        )
        differ = part[part["verdict"] != "same ranks as uniform"]
        if len(differ) > 1 and differ["se"].notna().all():
            mean, se = pooled_difference(differ)
            which = "ranks" if len(differ) == len(part) else "ranks it allocates differently"
            line += f"; mean over the {len(differ)} {which}: {mean:+.3f} ± {se:.3f}"
        lines.append(line)
    return lines


def pooled_difference(table: pd.DataFrame) -> tuple[float, float]:
    r"""The mean of k rows' differences and its standard error, :math:`\sqrt{\sum se^2} / k`.

    ``table`` holds rows of :func:`compare_allocations` (independent runs at each rank);
    the arithmetic is :func:`rankkit.stats.mean_difference`.
    """
    return mean_difference(table["difference"], table["se"])
