"""Regenerate the figures in ``figures/`` -- the ones the README shows -- from scratch.

``python -m rankkit figures`` (or :func:`make_figures`) trains everything it plots
with the public API, on the built-in ``digits`` task, and writes PNG files:

==================================  ===========================================================
file                                what it shows
==================================  ===========================================================
``digits_dW_spectrum.png``          singular values of full fine-tuning's ΔW per layer, against
                                    a random matrix of the same shape and norm (notebook 2)
``digits_rank_vs_quality.png``      test accuracy against LoRA rank on ``fc1,fc2``, mean and
                                    min-max over seeds, with full fine-tuning and the frozen
                                    base (notebook 4)
``digits_params_vs_quality.png``    the same runs against trainable parameters, with the Pareto
                                    front and the intrinsic dimension d90 of fine-tuning
``digits_subspace_similarity.png``  φ(A_r=8, A_r=64, i, j) of ``fc2``'s adapters: the LoRA
                                    paper's Figure 3 in miniature (notebook 5)
``digits_intrinsic_dimension.png``  random-subspace training θ = θ₀ + P θ_d, fine-tuning versus
                                    training from scratch, with d90 marked (notebook 6)
``toy_intrinsic_dimension.png``     Li et al.'s toy problem, whose intrinsic dimension is 10
==================================  ===========================================================

Everything is seeded, so a rerun on the same machine redraws the same figures. The
default ("full") settings are the ones the notebooks' full mode uses; the intrinsic
dimension of ``digits`` is the long part (the two searches of ``docs/intrinsic.md``, about
half an hour together on two busy CPU cores), and ``intrinsic_from`` draws it from their
saved results instead. ``quick=True`` shrinks every run to a smoke test (a minute or two)
whose figures are not meant to be published.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from rankkit.checkpoints import load_state_dict
from rankkit.intrinsic import (
    HyperplaneProblem,
    IntrinsicDimensionResult,
    TaskProblem,
    estimate_intrinsic_dimension,
)
from rankkit.methods import prepare_run
from rankkit.plots import (
    plot_intrinsic_dimension,
    plot_params_tradeoff,
    plot_rank_tradeoff,
    plot_spectra,
    plot_subspace_similarity,
)
from rankkit.reports import delta_weights
from rankkit.spectra import subspace_similarity_grid
from rankkit.sweep import SweepConfig, run_sweep
from rankkit.tasks import get_task
from rankkit.train import fit

#: File name -> one-line description of every figure :func:`make_figures` writes.
FIGURES = {
    "digits_dW_spectrum.png": "digits: singular values of full fine-tuning's ΔW per layer vs a "
    "random matrix of the same shape and norm",
    "digits_rank_vs_quality.png": "digits: test accuracy vs LoRA rank (fc1,fc2), mean and min-max "
    "over seeds, with full fine-tuning and the frozen base",
    "digits_params_vs_quality.png": "digits: test accuracy vs trainable parameters, Pareto front, "
    "and the intrinsic dimension d90 of fine-tuning",
    "digits_subspace_similarity.png": "digits: subspace similarity φ(A_r=8, A_r=64, i, j) of fc2's "
    "LoRA A matrices (LoRA paper, Figure 3)",
    "digits_intrinsic_dimension.png": "digits: accuracy of random-subspace training vs d, "
    "fine-tuning vs from scratch, d90 marked",
    "toy_intrinsic_dimension.png": "Li et al.'s toy problem: precision vs subspace dimension d, "
    "intrinsic dimension 10",
}


@dataclass(frozen=True)
class FigureSettings:
    """Sizes of the runs behind the figures (``full`` or ``quick``)."""

    ranks: tuple[int, ...]
    seeds: tuple[int, ...]
    epochs: int | None  # None: the task's default
    intrinsic_dims: tuple[int, ...]
    intrinsic_seeds: tuple[int, ...]
    intrinsic_rtol: float  # bisection tolerance; 1.0 = no bisection after the coarse grid

    @classmethod
    def get(cls, quick: bool) -> FigureSettings:
        if quick:
            return cls(ranks=(1, 8, 64), seeds=(0,), epochs=3, intrinsic_dims=(10, 100, 1000),
                       intrinsic_seeds=(0,), intrinsic_rtol=1.0)  # fmt: skip
        # The grid and bisection of docs/intrinsic.md's digits commands.
        return cls(ranks=(1, 2, 4, 8, 16, 32, 64), seeds=(0, 1, 2), epochs=None,
                   intrinsic_dims=(300, 1000, 3000, 10000, 30000), intrinsic_seeds=(0, 1, 2),
                   intrinsic_rtol=0.5)  # fmt: skip


#: Label on the intrinsic-dimension figure -> (from scratch?, folder name under ``intrinsic_from``).
INTRINSIC_RUNS = {
    "fine-tuning (pretrained θ₀)": (False, "digits-intrinsic-finetune"),
    "from scratch (random θ₀)": (True, "digits-intrinsic-scratch"),
}


def _digits_problem(from_scratch: bool, epochs: int | None) -> TaskProblem:
    # The subspace rate is the task's at d = 1000, scaled by sqrt(1000 / d) (docs/intrinsic.md).
    return TaskProblem("digits", from_scratch=from_scratch, epochs=epochs, lr_ref_d=1000)


def make_figures(
    out: str | os.PathLike = "figures",
    *,
    quick: bool = False,
    jobs: int = 1,
    work_dir: str | os.PathLike | None = None,
    intrinsic_from: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Train what the figures need and write them into ``out``; return the paths written.

    Parameters
    ----------
    out : path
        Directory for the PNG files (created if needed).
    quick : bool
        Tiny runs for a smoke test instead of the published settings.
    jobs : int
        Worker processes for the rank sweep.
    work_dir : path, optional
        Keep the sweep's runs (``results.csv``, adapters) here; default a temporary
        directory that is deleted afterwards.
    intrinsic_from : path, optional
        A directory holding ``digits-intrinsic-finetune/`` and ``digits-intrinsic-scratch/``
        as ``python -m rankkit intrinsic-dim --out`` writes them (``docs/records`` has the
        published ones): draw digits' intrinsic dimension from them instead of training.
    progress : bool
        Show progress bars.
    log : callable
        Where status lines go.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = FigureSettings.get(quick)
    saved = None if intrinsic_from is None else _load_intrinsic(Path(intrinsic_from), settings)
    if work_dir is not None:
        return _make_all(out, Path(work_dir), settings, jobs, progress, log, saved)
    with tempfile.TemporaryDirectory(prefix="rankkit-figures-") as tmp:
        return _make_all(out, Path(tmp), settings, jobs, progress, log, saved)


def _load_intrinsic(directory: Path, settings: FigureSettings) -> dict:
    """The two saved digits searches, checked to be what their labels say (fails early)."""
    saved = {}
    for label, (scratch, folder) in INTRINSIC_RUNS.items():
        result = IntrinsicDimensionResult.load(directory / folder)
        expected = _digits_problem(scratch, settings.epochs).name
        if result.problem != expected:
            raise ValueError(
                f"{directory / folder} holds the search of {result.problem!r}, not "
                f"{expected!r}; write it with python -m rankkit intrinsic-dim --task digits"
                f"{' --from-scratch' if scratch else ''} --out {directory / folder}"
            )
        saved[label] = result
    return saved


def _save(fig, path: Path, log: Callable[[str], None]) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    log(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def _make_all(out, work, settings, jobs, progress, log, saved) -> list[Path]:
    start = time.perf_counter()
    task = get_task("digits")
    written = [_spectrum_figure(task, out, settings, progress, log)]
    intrinsic_figures, finetune_d90 = _intrinsic_figures(out, settings, progress, log, saved)
    written += intrinsic_figures
    written += _sweep_figures(out, work, settings, jobs, progress, log, finetune_d90)
    log(f"done in {time.perf_counter() - start:.0f}s")
    return written


def _spectrum_figure(task, out, settings, progress, log) -> Path:
    """1. Spectrum of full fine-tuning's update."""
    log("[1/4] full fine-tuning of digits (seed 0) -> spectrum of ΔW")
    model = prepare_run(task, "full", seed=0).model
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = fit(model, task, epochs=settings.epochs, seed=0, progress=progress)
    log(f"      {result}")
    fig = plot_spectra(
        delta_weights(base, model),
        title="digits, full fine-tuning: singular values of ΔW vs a random matrix of the same "
        "shape and norm",
    )
    return _save(fig, out / "digits_dW_spectrum.png", log)


def _intrinsic_figures(out, settings, progress, log, saved) -> tuple[list[Path], dict]:
    """2. Intrinsic dimension: toy, then digits fine-tuning vs from scratch."""
    log("[2/4] intrinsic dimension: toy problem, digits fine-tuning and from scratch")
    toy = estimate_intrinsic_dimension(
        HyperplaneProblem(), seeds=(0, 1, 2), rtol=0, progress=progress
    )
    log(f"      toy: d90 = {toy.d90}")
    fig = plot_intrinsic_dimension(toy, title="Li et al.'s toy problem: intrinsic dimension 10")
    written = [_save(fig, out / "toy_intrinsic_dimension.png", log)]
    intrinsic = saved or {
        label: estimate_intrinsic_dimension(
            _digits_problem(scratch, settings.epochs),
            dims=settings.intrinsic_dims,
            seeds=settings.intrinsic_seeds,
            rtol=settings.intrinsic_rtol,
            progress=progress,
        )
        for label, (scratch, _) in INTRINSIC_RUNS.items()
    }
    for label, result in intrinsic.items():
        log(f"      {label}: d90 = {result.d90}{' (saved)' if saved else ''}")
    fig = plot_intrinsic_dimension(
        intrinsic, title="digits MLP: training in a random subspace θ = θ₀ + P θ_d"
    )
    written.append(_save(fig, out / "digits_intrinsic_dimension.png", log))
    return written, next(iter(intrinsic.values())).to_dict()


def _sweep_figures(out, work, settings, jobs, progress, log, finetune_d90) -> list[Path]:
    """3. Rank sweep trade-offs (d90 on the parameter axis); 4. subspace similarity."""
    log(
        f"[3/4] LoRA rank sweep on digits: ranks {list(settings.ranks)}, seeds {list(settings.seeds)}"
    )
    config = SweepConfig(
        task="digits",
        ranks=list(settings.ranks),
        seeds=list(settings.seeds),
        targets=["fc1,fc2"],
        epochs=settings.epochs,  # learning rates: the task's lora_lr, lr and head_lr defaults
        out=str(work / "digits-sweep"),
        jobs=jobs,
    )
    sweep = run_sweep(config, progress=progress, plot=False, log=log)
    results = sweep.results
    failed = results[results["status"] != "ok"]
    if len(failed):
        raise RuntimeError(f"{len(failed)} sweep run(s) failed: {failed['error'].tolist()[:3]}")
    written = [_save(plot_rank_tradeoff(results), out / "digits_rank_vs_quality.png", log)]
    fig = plot_params_tradeoff(results, d90=finetune_d90)
    written.append(_save(fig, out / "digits_params_vs_quality.png", log))

    # Subspace similarity of two of the sweep's adapters (seed 0): r = 8 vs the largest.
    lora = results[(results["method"] == "lora") & (results["seed"] == settings.seeds[0])]
    ranks = sorted(int(r) for r in lora["rank"].unique())
    low = 8 if 8 in ranks else ranks[0]
    high = ranks[-1]
    log(f"[4/4] subspace similarity of fc2's adapters: r = {low} vs r = {high}")

    def lora_A(rank: int):
        row = lora[lora["rank"] == rank].iloc[0]
        tensors = load_state_dict(sweep.directory / row["adapter"])
        return tensors["base_model.model.fc2.lora_A.weight"]

    grid = subspace_similarity_grid(lora_A(low), lora_A(high))
    fig = plot_subspace_similarity(
        grid,
        xlabel=f"j (top-j right singular vectors of A, r = {high})",
        ylabel=f"i (top-i of A, r = {low})",
        title=f"digits fc2: φ(A_r={low}, A_r={high}, i, j)",
    )
    written.append(_save(fig, out / "digits_subspace_similarity.png", log))
    return written
