"""Figures. Every function returns a matplotlib ``Figure`` and never shows it itself.

In a notebook the returned figure displays itself; in a script, save it with
``fig.savefig("name.png", dpi=150, bbox_inches="tight")``. Legends sit outside the
data so the figures stay legible when they are shrunk into a README.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rankkit.spectra import batched_singular_values, random_singular_values


def _spectra_of(matrices: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return batched_singular_values(matrices)


def plot_spectra(
    deltas: Mapping[str, Any],
    *,
    seed: int = 0,
    max_layers: int = 12,
    title: str = "Singular values of ΔW vs a random matrix of the same shape and norm",
) -> Figure:
    r"""Normalised singular values :math:`s_i / s_1` of each ΔW on a log scale.

    Each layer is drawn next to the spectrum of a Gaussian matrix of the same shape and
    Frobenius norm (dashed, normalised by the *layer's* :math:`s_1`), so a spectrum that
    drops far below its dashed partner has low-rank structure.

    Parameters
    ----------
    deltas : mapping name -> matrix
        For example :func:`rankkit.delta_weights` or ``rankkit.lora_delta_weights``.
    seed : int
        Seed of the random baselines.
    max_layers : int
        Draw at most this many layers (the first ones), to keep the legend readable.
    """
    names = list(deltas)[:max_layers]
    spectra = _spectra_of({n: deltas[n] for n in names})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(names), 1)))
    for color, name in zip(colors, names):
        s = spectra[name]
        if s[0] <= 0:
            continue
        k = np.arange(1, len(s) + 1)
        ax.plot(k, s / s[0], color=color, lw=1.8, label=name)
        shape = tuple(np.shape(deltas[name]))[:2]
        rand = random_singular_values(shape, norm=float(np.sqrt((s**2).sum())), seed=seed)
        ax.plot(k, rand / s[0], color=color, lw=1, ls="--", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("index i of singular value")
    ax.set_ylabel("s_i / s_1 of ΔW")
    ax.set_title(title, fontsize=10)
    ax.plot([], [], color="gray", ls="--", label="random baseline\n(same shape, same ‖ΔW‖_F)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    return fig


def plot_energy(
    deltas: Mapping[str, Any],
    *,
    thresholds: tuple[float, ...] = (0.9,),
    seed: int = 0,
    max_layers: int = 12,
) -> Figure:
    r"""Cumulative energy :math:`\sum_{i\le k} s_i^2 / \sum_i s_i^2` of each ΔW against k.

    The curve for the random baseline of the first layer's shape is dashed; the
    horizontal lines mark the energy thresholds, whose crossing gives the energy rank.
    """
    names = list(deltas)[:max_layers]
    spectra = _spectra_of({n: deltas[n] for n in names})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(names), 1)))
    for color, name in zip(colors, names):
        s2 = spectra[name] ** 2
        if s2.sum() <= 0:
            continue
        ax.plot(np.arange(1, len(s2) + 1), np.cumsum(s2) / s2.sum(), color=color, label=name)
    if names:
        shape = tuple(np.shape(deltas[names[0]]))[:2]
        r2 = random_singular_values(shape, seed=seed) ** 2
        ax.plot(
            np.arange(1, len(r2) + 1),
            np.cumsum(r2) / r2.sum(),
            color="gray",
            ls="--",
            label=f"random {shape[0]}x{shape[1]}",
        )
    for t in thresholds:
        ax.axhline(t, color="black", lw=0.8, ls=":")
        ax.text(1, t, f" {t:.0%}", va="bottom", fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("number of singular directions k")
    ax.set_ylabel("fraction of ‖ΔW‖_F² captured")
    ax.set_title("Cumulative energy of ΔW", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.grid(True, alpha=0.2)
    fig.tight_layout()
    return fig


def plot_effective_rank(
    report: pd.DataFrame, method: str = "energy90", *, relative: bool = False
) -> Figure:
    """Effective rank of ΔW per layer (bars) against the random baseline (markers).

    Parameters
    ----------
    report : DataFrame
        Output of :func:`rankkit.rank_report`.
    method : str
        A measure reported as ``dW_<method>`` and ``rand_<method>``: ``entropy``,
        ``stable``, ``participation``, ``numerical``, ``optimal``, ``energy90``, ...
    relative : bool
        Divide by ``min(rows, cols)`` so layers of different widths compare.
    """
    col, rand = f"dW_{method}", f"rand_{method}"
    if col not in report or rand not in report:
        options = sorted(c[3:] for c in report.columns if c.startswith("dW_"))
        raise ValueError(f"report has no column {col!r}; available methods: {', '.join(options)}.")
    width = np.minimum(report["rows"], report["cols"]).to_numpy() if relative else 1.0
    values = report[col].to_numpy() / width
    baseline = report[rand].to_numpy() / width
    y = np.arange(len(report))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(report) + 1.5))
    ax.barh(y, values, color="tab:blue", label=f"ΔW ({method})")
    ax.scatter(baseline, y, color="tab:red", marker="|", s=200, label="random baseline", zorder=3)
    ax.set_yticks(y, report["name"], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{method} rank" + (" / min(rows, cols)" if relative else ""))
    ax.set_title(f"Effective rank of ΔW per layer ({method})", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.grid(True, axis="x", alpha=0.2)
    fig.tight_layout()
    return fig


def _human(n: float) -> str:
    """12345 -> '12k'; readable parameter counts for annotations."""
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _sweep_groups(results: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    ok = results[results["status"] == "ok"]
    if ok.empty:
        raise ValueError("the sweep has no finished runs to plot.")
    metric = (
        str(ok["metric"].dropna().iloc[0])
        if "metric" in ok and ok["metric"].notna().any()
        else "metric"
    )
    return ok, metric


def _reference_lines(ax, ok: pd.DataFrame) -> None:
    styles = {
        "full": ("full fine-tuning", "black", "--"),
        "frozen": ("frozen base (head only)", "tab:gray", ":"),
    }
    for method, (label, color, ls) in styles.items():
        values = ok.loc[ok["method"] == method, "test_metric"]
        if len(values):
            ax.axhline(
                values.mean(), color=color, ls=ls, lw=1.2, label=f"{label}: {values.mean():.3f}"
            )
            if len(values) > 1:
                ax.axhspan(values.min(), values.max(), color=color, alpha=0.08, lw=0)


def plot_rank_tradeoff(results: pd.DataFrame, rslora: bool = False) -> Figure:
    """Test metric against LoRA rank (log2 axis), mean and min–max over seeds.

    One line per target set; horizontal references for full fine-tuning and the frozen
    base. Trainable parameters are read off the legend: LoRA adds ``r (in + out)`` per
    adapted matrix, so a target set's count is ``a·r + b`` (``b``: the trained head),
    shown as that formula; with a single target set each point is labelled too.

    Parameters
    ----------
    results : DataFrame
        ``results.csv`` of a sweep (:func:`rankkit.sweep.load_results`).
    rslora : bool
        The sweep scaled by alpha / sqrt(r) (its ``config.json``); the title says so.
    """
    ok, metric = _sweep_groups(results)
    lora = ok[ok["method"] == "lora"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (targets, group) in enumerate(lora.groupby("targets", sort=False)):
        stats = group.groupby("rank").agg(
            mean=("test_metric", "mean"), lo=("test_metric", "min"), hi=("test_metric", "max"),
            params=("trainable_params", "mean"), n=("test_metric", "size"),
        )  # fmt: skip
        color = plt.cm.tab10(i % 10)
        label = f"LoRA on {targets}: {_params_formula(stats.index, stats['params'])}"
        ax.plot(stats.index, stats["mean"], "o-", color=color, label=label)
        ax.fill_between(stats.index, stats["lo"], stats["hi"], color=color, alpha=0.15, lw=0)
        if lora["targets"].nunique() == 1:
            for rank, row in stats.iterrows():
                ax.annotate(
                    _human(row["params"]), (rank, row["mean"]), textcoords="offset points",
                    xytext=(0, 7), ha="center", fontsize=7, color=color,
                )  # fmt: skip
    _reference_lines(ax, ok)
    ax.set_xscale("log", base=2)
    ranks = sorted(lora["rank"].dropna().unique())
    if ranks:
        ax.set_xticks(ranks, [str(int(r)) for r in ranks])
    ax.set_xlabel("LoRA rank r (log₂ scale)")
    ax.set_ylabel(f"test {metric}")
    seeds = ok["seed"].nunique()
    ax.set_title(
        f"{ok['task'].iloc[0]}: quality vs LoRA rank{_alpha_note(lora, rslora)} "
        f"(mean, min–max over {seeds} seeds)",
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.grid(True, alpha=0.2)
    fig.tight_layout()
    return fig


def _alpha_note(lora: pd.DataFrame, rslora: bool = False) -> str:
    """``", lora_alpha = sqrt(r)"``, ``", lora_alpha = 8"``... when the sweep used one rule."""
    if "alpha" not in lora or lora["alpha"].isna().any() or lora.empty:
        return ""
    if (lora["alpha"] == lora["rank"]).all():
        rule = "r"
    elif np.allclose(lora["alpha"], np.sqrt(lora["rank"].astype(float))):
        rule = "sqrt(r)"
    elif lora["alpha"].nunique() == 1:
        rule = f"{lora['alpha'].iloc[0]:g}"
    else:
        return ""
    return f", lora_alpha = {rule}" + (", rsLoRA scale alpha/√r" if rslora else "")


def _params_formula(ranks, params) -> str:
    """``"2,048·r + 7,224 params"`` when the counts are linear in r, else their range."""
    r, n = np.asarray(ranks, float), np.asarray(params, float)
    if len(r) >= 2:
        slope, intercept = np.polyfit(r, n, 1)
        a, b = round(slope), round(intercept)
        if a > 0 and b >= 0 and np.array_equal(a * r + b, n):
            return f"{a:,}·r + {b:,} params" if b else f"{a:,}·r params"
    return f"{_human(n.min())}–{_human(n.max())} params" if len(n) > 1 else f"{_human(n[0])} params"


def pareto_front(params: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats (fewer or equal params and higher quality)."""
    order = np.lexsort((-quality, params))
    front, best = [], -np.inf
    for i in order:
        if quality[i] > best:
            front.append(i)
            best = quality[i]
    return np.array(front, dtype=int)


def plot_params_tradeoff(results: pd.DataFrame, d90: Mapping[str, Any] | None = None) -> Figure:
    """Test metric against trainable parameters (log axis), with the Pareto front marked.

    Each configuration (method, target set, rank) is one point at its mean over seeds,
    with a bar for the min–max. ``d90`` (from ``intrinsic_dimension.json``, written by
    ``python -m rankkit intrinsic-dim --out RUN_DIR``) adds a vertical line at the
    intrinsic dimension: the number of trainable *directions* random-subspace training needed.
    """
    ok, metric = _sweep_groups(results)
    ok = ok.assign(targets=ok["targets"].fillna("-"), rank=ok["rank"].fillna(-1))
    stats = (
        ok.groupby(["method", "targets", "rank"], sort=False)
        .agg(mean=("test_metric", "mean"), lo=("test_metric", "min"), hi=("test_metric", "max"),
             params=("trainable_params", "mean"))
        .reset_index()
    )  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 4.8))
    markers = {
        "full": ("*", "black", "full fine-tuning"),
        "frozen": ("s", "tab:gray", "frozen base (head only)"),
    }
    target_sets = [t for t in stats.loc[stats["method"] == "lora", "targets"].unique()]
    for _, row in stats.iterrows():
        if row["method"] == "lora":
            i = target_sets.index(row["targets"])
            marker, color, label = "o", plt.cm.tab10(i % 10), f"LoRA on {row['targets']}"
        else:
            marker, color, label = markers[row["method"]]
        ax.errorbar(
            row["params"], row["mean"], yerr=[[row["mean"] - row["lo"]], [row["hi"] - row["mean"]]],
            fmt=marker, color=color, ms=9 if marker == "*" else 6, capsize=2, label=label,
        )  # fmt: skip
        if row["method"] == "lora":
            ax.annotate(f"r={int(row['rank'])}", (row["params"], row["mean"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=color)  # fmt: skip
    front = pareto_front(stats["params"].to_numpy(float), stats["mean"].to_numpy(float))
    fp = stats.iloc[front]
    ax.step(
        fp["params"],
        fp["mean"],
        where="post",
        color="tab:red",
        lw=1,
        alpha=0.7,
        label="Pareto front",
    )
    if d90 and d90.get("d90"):
        ax.axvline(d90["d90"], color="tab:purple", ls="-.", lw=1.2,
                   label=f"intrinsic dimension d90 = {_human(d90['d90'])}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{ok['task'].iloc[0]}: quality vs trainable parameters", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(
        unique.values(),
        unique.keys(),
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
        frameon=False,
    )
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    return fig


def plot_subspace_similarity(
    grid: np.ndarray, *, xlabel: str = "j", ylabel: str = "i", title: str | None = None
) -> Figure:
    r"""Heatmap of :math:`\phi(i, j)` from :func:`rankkit.subspace_similarity_grid`."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(
        grid,
        origin="lower",
        vmin=0,
        vmax=1,
        cmap="magma",
        aspect="auto",
        extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5),
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "subspace similarity φ(i, j)", fontsize=10)
    fig.colorbar(im, ax=ax, label="φ")
    fig.tight_layout()
    return fig


def plot_intrinsic_dimension(
    results: Any,
    *,
    labels: list[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Metric of random-subspace training against ``d`` (log axis), with d90 marked.

    Each run is a faint dot; the line joins the mean over seeds at each ``d``. The
    dashed horizontal line is ``fraction x baseline`` (the 90% line), the dotted one
    the baseline itself, and the dash-dotted vertical line d90, with its bracket
    (largest failing ``d``, d90] shaded.

    Parameters
    ----------
    results : IntrinsicDimensionResult, sequence of them, or mapping label -> result
        From :func:`rankkit.estimate_intrinsic_dimension`. Several results share
        the axes, e.g. fine-tuning against training from scratch.
    labels : list of str, optional
        Legend labels (default: the problem, projection and mode of each result).
    title : str, optional
    """
    from matplotlib.ticker import FuncFormatter

    if isinstance(results, Mapping):
        labels = labels or [str(k) for k in results]
        results = list(results.values())
    elif not isinstance(results, (list, tuple)):
        results = [results]
    labels = labels or [f"{r.problem} [{r.projection}/{r.mode}]" for r in results]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.cm.tab10(np.arange(len(results)) % 10)
    for color, label, r in zip(colors, labels, results):
        curve = r.curve
        ax.scatter(curve["d"], curve["metric"], color=color, s=12, alpha=0.35, lw=0)
        mean = curve.groupby("d")["metric"].mean()
        ax.plot(mean.index, mean.to_numpy(), color=color, marker="o", ms=4, lw=1.6, label=label)
        pct = f"{r.fraction:.0%}"
        ax.axhline(r.threshold, color=color, ls="--", lw=1, alpha=0.8)
        ax.axhline(r.baseline, color=color, ls=":", lw=1, alpha=0.8)
        ax.plot(
            [], [], color=color, ls="--", lw=1, label=f"  {pct} of baseline ({r.baseline_source})"
        )
        if r.d90 is not None:
            lo, hi = r.d90_bracket
            ax.axvspan(max(lo, 0.9), hi, color=color, alpha=0.08, lw=0)
            ax.axvline(
                r.d90, color=color, ls="-.", lw=1.2, label=f"  d{pct[:-1]} = {_human(r.d90)}"
            )
        elif len(curve):
            ax.plot(
                [], [], ls="none", label=f"  d{pct[:-1]} > {_human(curve['d'].max())} (not reached)"
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.set_xlabel("subspace dimension d (trained parameters)")
    ax.set_ylabel(results[0].metric_name if results else "metric")
    ax.set_title(title or "Training in a random subspace θ = θ₀ + P θ_d", fontsize=10)
    ax.plot([], [], color="gray", ls=":", lw=1, label="baseline (normal training)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    return fig


def plot_extraction_budgets(
    summary: pd.DataFrame,
    *,
    task_name: str,
    metric_name: str,
    saved: list[str],
    trained: pd.DataFrame | None = None,
) -> Figure:
    """Test metric against adapter parameters for LoRA extracted from a full fine-tune.

    ``summary`` is :func:`rankkit.budgets.summarize_study`'s table: the uniform, energy and
    budget rules at each budget (mean ± sd over seeds), drawn against full fine-tuning,
    the frozen base and the extraction at full rank (horizontal lines); ``trained`` adds
    trained LoRA from a sweep (:func:`rankkit.budgets.trained_lora`).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"uniform": ("o", 9, "-"), "energy": ("s", 5, "--"), "budget": ("^", 6, ":")}
    for name, (marker, size, line) in styles.items():  # uniform under the others, hollow
        part = summary[summary["allocation"] == name].sort_values("parameters")
        ax.errorbar(part["parameters"], part["mean"], yerr=part["std"].fillna(0), marker=marker,
                    markersize=size, linestyle=line, capsize=3,
                    markerfacecolor="none" if name == "uniform" else None,
                    label=f"extracted, {name} ranks")  # fmt: skip
    for targets, part in [] if trained is None else trained.groupby("targets"):
        part = part.sort_values("parameters")
        ax.errorbar(part["parameters"], part["mean"], yerr=part["std"].fillna(0), marker="x",
                    capsize=3, color="black", label=f"trained LoRA ({targets})")  # fmt: skip
    lines = (("full fine-tuning", "--", "gray"), ("all of ΔW", "-.", "tab:red"),
             ("frozen base", ":", "gray"))  # fmt: skip
    for name, style, color in lines:
        row = summary[summary["allocation"] == name].iloc[0]
        label = "extracted at full rank" if name == "all of ΔW" else name
        ax.axhline(row["mean"], linestyle=style, color=color, label=f"{label} ({row['mean']:.3f})")
    ax.set_xscale("log")
    ticks = sorted(summary.loc[summary["allocation"] == "uniform", "parameters"].dropna())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(ticks, [f"{t / 1000:.3g}k" for t in ticks])
    ax.set_xlabel(f"adapter parameters (LoRA factors + {', '.join(saved)} in full)")
    ax.set_ylabel(f"test {metric_name}")
    runs = int(summary["runs"].max())
    ax.set_title(f"{task_name}: LoRA extracted from a full fine-tune (mean ± sd, {runs} seeds)")
    ax.legend(fontsize=8)
    return fig
