"""Figures. Every function returns a matplotlib ``Figure`` and never calls ``plt.show()``.

In a notebook the returned figure displays itself; in a script, save it with
``fig.savefig("name.png", dpi=150, bbox_inches="tight")``. Legends sit outside the
data so the figures stay legible when they are shrunk into a README.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
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
