r"""Intrinsic dimension: train a network only inside a random subspace.

The idea (Li et al. 2018)
-------------------------
Freeze a network's ``D`` parameters at :math:`\theta_0` and train only
:math:`\theta_d \in \mathbb{R}^d` in

.. math::  \theta = \theta_0 + P\,\theta_d, \qquad \theta_d \text{ starts at } 0,

where :math:`P \in \mathbb{R}^{D \times d}` is a fixed random matrix with
unit-norm columns (:mod:`rankkit.projections`: ``dense``, ``sparse`` or
``fastfood``). For small ``d`` the subspace misses every good solution; as ``d``
grows it eventually intersects the set of good solutions. The
**intrinsic dimension** :math:`d_{int90}` is the smallest ``d`` whose subspace
training reaches 90% of the performance of normal training (Li et al. call it
:math:`d_{int90}`, Aghajanyan et al. call the fine-tuning version :math:`d_{90}`).
It measures how many degrees of freedom the *problem* needs, not how many the
model has: Li et al. find :math:`d_{int90} \approx 750` for an MNIST MLP with
199,210 parameters.

Their toy example makes the definition concrete (:class:`HyperplaneProblem`):
``D = 1000`` parameters in 10 groups of 100, and the loss asks each group to sum
to its target 1, 2, ..., 10. The solutions form a 990-dimensional hyperplane, so
a generic ``d``-dimensional subspace through :math:`\theta_0` reaches it exactly
when ``d >= 10`` and misses it when ``d < 10``: the intrinsic dimension is 10.

Fine-tuning (Aghajanyan et al. 2020)
------------------------------------
With :math:`\theta_0` the *pretrained* weights, the same measurement asks how many
dimensions fine-tuning needs. Aghajanyan et al. find that pretraining makes
:math:`d_{90}` small (about 200 trained numbers for RoBERTa-Large on MRPC, with
SAID) and that it keeps shrinking as pretraining proceeds; LoRA cites this as its
motivation.

Modes:

``did`` (direct intrinsic dimension)
    one projection for all parameters, :math:`\theta = \theta_0 + P\theta_d`.
``said`` (structure-aware intrinsic dimension)
    plus one trainable scale :math:`\lambda_i` per parameter tensor ``i`` (each
    weight matrix and bias vector), :math:`\theta_i = \theta_{0,i} + \lambda_i
    (P\theta_{d-m})_i`. The ``m`` scales are counted inside ``d``: only
    ``d - m`` dimensions are projected. Scales start at one (a scale starting at
    zero would make :math:`\theta_d = 0` a saddle point with zero gradient), so
    SAID starts exactly where DID does.

Measuring d90 (:func:`estimate_intrinsic_dimension`)
---------------------------------------------------
1. The **baseline**: normal training of all parameters (from scratch, or full
   fine-tuning), averaged over seeds ("run"), or a fixed number you supply
   ("global", as in Li et al.'s MNIST numbers).
2. A **coarse pass** over log-spaced ``d`` (1, 2, 5, 10, 20, 50, ...), several
   seeds per ``d``: a ``d`` *passes* when the mean metric over seeds reaches
   ``fraction * baseline``.
3. **Bisection** (in log space) between the largest failing and the smallest
   passing ``d``, until they are within ``rtol`` of each other.

:math:`d_{90}` is the smallest passing ``d``; its uncertainty is the bracket
``(largest failing d below it, d90]`` and the spread of the per-seed values.

References
----------
Li, Farkhoor, Liu & Yosinski (2018), Measuring the Intrinsic Dimension of
Objective Landscapes, ICLR, arXiv:1804.08838.
Aghajanyan, Zettlemoyer & Gupta (2020), Intrinsic Dimensionality Explains the
Effectiveness of Language Model Fine-Tuning, arXiv:2012.13255.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from torch import Tensor, nn
from tqdm.auto import tqdm

from rankkit.methods import PreparedRun, method_lr, prepare_run
from rankkit.projections import (
    DEFAULT_MAX_DENSE_BYTES,
    PROJECTIONS,
    check_dimensions,
)
from rankkit.subspace import MODES, HyperplaneProblem, HyperplaneToy, SubspaceModel
from rankkit.tasks import get_task
from rankkit.train import DEFAULTS
from rankkit.utils import check_choice, within

__all__ = [
    "MODES",
    "SUBSPACE_LR",
    "HyperplaneProblem",
    "HyperplaneToy",
    "IntrinsicDimensionResult",
    "SubspaceModel",
    "SubspaceProblem",
    "TaskProblem",
    "default_dims",
    "estimate_intrinsic_dimension",
    "search_intrinsic_dimension",
]

SUBSPACE_LR = {"digits": 0.1, "topics": 0.1, "code": 0.1}
"""Default AdamW learning rate of subspace training per task (:class:`TaskProblem`).

topics: from a short check at d = 1000 (0.03 to 1); digits and code: topics' rule,
checked on each (``docs/intrinsic.md``). Over wide ranges of d use it with
``TaskProblem(lr_ref_d=1000)``: a fixed rate that suits d = 1000 is too large at
d = 10,000. Other tasks default to 0.3.
"""


# --------------------------------------------------------------------------- problems


class SubspaceProblem(Protocol):
    """What :func:`estimate_intrinsic_dimension` needs from a problem.

    :class:`HyperplaneProblem` (the toy) and :class:`TaskProblem` (a
    :mod:`rankkit.tasks` task) implement it; so can your own class.
    """

    name: str
    metric_name: str

    def num_params(self) -> int:
        """``D``, the number of parameters taking part."""

    def num_tensors(self) -> int:
        """``m``, the number of parameter tensors taking part (SAID needs ``d > m``)."""

    def train_full(self, seed: int) -> float:
        """Train all parameters normally; return the metric (higher is better)."""

    def train_subspace(
        self, d: int, seed: int, *, projection: str, mode: str, max_dense_bytes: int
    ) -> float:
        """Train in a random ``d``-dimensional subspace; return the metric."""


class TaskProblem:
    r"""A :mod:`rankkit.tasks` task as a :class:`SubspaceProblem`.

    Both the baseline and the subspace runs use :func:`rankkit.train.fit`, the
    loop every method in rankkit shares, with the task's default
    hyperparameters unless overridden.

    Parameters
    ----------
    task : str or task object
        A task name for :func:`rankkit.tasks.get_task` (``"digits"``, ``"topics"``)
        or a task object.
    from_scratch : bool
        False (default): :math:`\theta_0` is the pretrained base and the baseline
        is full fine-tuning (Aghajanyan et al.'s :math:`d_{90}`). True:
        :math:`\theta_0` is a random initialisation (seeded) and the baseline is
        normal training from scratch (Li et al.'s :math:`d_{int90}`).
    exclude_head : bool
        Keep the task's head modules (``task.head_modules``) out of the subspace,
        frozen at :math:`\theta_0`. Default False: the head takes part, as in
        Aghajanyan et al. (rankkit's task heads are newly initialised even on a
        pretrained base, so a frozen head stays random).
    train_head : bool
        Keep the head out of the subspace and train it directly, at the task's
        ``head_lr`` (else its ``lr``), the way LoRA trains a new head
        (``modules_to_save``). ``d`` then counts only the body's dimensions; the
        head's parameters come on top.
        This separates "learn a classifier" from "adapt the body": with a random
        head inside the subspace, a random direction spends only
        ``head size / D`` of its length on the head.
    epochs, lr, batch_size : optional
        Hyperparameters of the baseline (default: ``task.default_hparams``).
    subspace_epochs, subspace_lr : optional
        Hyperparameters of subspace training. Default: the baseline's epochs, and
        the learning rate in :data:`SUBSPACE_LR` for the task (else 0.3). AdamW
        moves each coordinate of :math:`\theta_d` by about ``lr`` per step, which
        moves each weight by only about ``lr`` :math:`\sqrt{d/D}`, so subspace
        training wants a learning rate orders of magnitude above normal training's.
    lr_ref_d : int, optional
        If given, ``subspace_lr`` is the learning rate at ``d = lr_ref_d`` and other
        ``d`` use ``subspace_lr * sqrt(lr_ref_d / d)``, which keeps each weight's step
        size the same at every ``d`` (a fixed learning rate that suits d = 100 can
        diverge at d = 100,000).
    split : str
        Split whose metric decides d90 (default ``"val"``; the test metric is
        recorded too).
    model_fn : callable, optional
        ``model_fn(pretrained: bool, seed: int) -> nn.Module``; default
        ``task.build_model(pretrained=pretrained, seed=seed)``.
    device : str
        Passed to ``fit``.
    """

    def __init__(
        self,
        task: Any,
        *,
        from_scratch: bool = False,
        exclude_head: bool = False,
        train_head: bool = False,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        subspace_epochs: int | None = None,
        subspace_lr: float | None = None,
        lr_ref_d: int | None = None,
        split: str = "val",
        model_fn: Callable[[bool, int], nn.Module] | None = None,
        device: str = "auto",
    ) -> None:
        if isinstance(task, str):
            task = get_task(task)
        self.task = task
        self.from_scratch = bool(from_scratch)
        hp = dict(getattr(task, "default_hparams", {}) or {})
        self.epochs = int(epochs if epochs is not None else hp.get("epochs", DEFAULTS["epochs"]))
        self.lr = float(method_lr(task, "full", lr) or DEFAULTS["lr"])
        self.batch_size = batch_size  # None: fit's (the task's, else DEFAULTS)
        self.subspace_epochs = int(subspace_epochs if subspace_epochs is not None else self.epochs)
        task_name = getattr(task, "name", type(task).__name__)
        if subspace_lr is None:
            subspace_lr = SUBSPACE_LR.get(task_name, 0.3)
        self.subspace_lr = float(subspace_lr)
        if lr_ref_d is not None and not (isinstance(lr_ref_d, int) and lr_ref_d > 0):
            raise ValueError(
                f"lr_ref_d must be a positive int (a subspace dimension), got {lr_ref_d!r}."
            )
        self.lr_ref_d = lr_ref_d
        self.exclude = tuple(task.head_modules) if exclude_head or train_head else ()
        self.train_head = bool(train_head)
        self.head_lr = float(hp.get("head_lr", self.lr))
        self.split = split
        self.model_fn = model_fn or (
            lambda pretrained, seed: task.build_model(pretrained=pretrained, seed=seed)
        )
        self.device = device
        self.metric_name = f"{split}_{task.metric_name}"
        self.name = f"{task_name} ({'from scratch' if self.from_scratch else 'fine-tuning'}"
        self.name += ", head trained directly)" if self.train_head else ")"
        self.last_metrics: dict[str, float] = {}

    def build_model(self, seed: int) -> nn.Module:
        """The starting point :math:`\\theta_0`: the base (plus a new head) or a random init."""
        return self.model_fn(not self.from_scratch, seed)

    def _taking_part(self) -> list[Tensor]:
        model = self.build_model(0)
        return [
            p for n, p in model.named_parameters() if not any(within(n, e) for e in self.exclude)
        ]

    def num_params(self) -> int:
        return sum(p.numel() for p in self._taking_part())

    def num_tensors(self) -> int:
        return len(self._taking_part())

    def _fit(self, run: PreparedRun, epochs: int) -> float:
        result = run.fit(
            self.task, epochs=epochs, batch_size=self.batch_size, device=self.device,
            progress=False,
        )  # fmt: skip
        self.last_metrics = dict(result.metrics)
        return float(result.metrics[self.metric_name])

    def train_full(self, seed: int) -> float:
        # A directly trained head trains here too; a head outside the subspace stays frozen.
        run = prepare_run(
            self.task, "full", seed, lr=self.lr, pretrained=not self.from_scratch,
            exclude=() if self.train_head else self.exclude, model_fn=self.model_fn,
        )  # fmt: skip
        return self._fit(run, self.epochs)

    def train_subspace(
        self,
        d: int,
        seed: int,
        *,
        projection: str = "fastfood",
        mode: str = "did",
        max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
    ) -> float:
        run = prepare_run(
            self.task, "subspace", seed, lr=self.lr_at(d), pretrained=not self.from_scratch,
            d=d, projection=projection, mode=mode, exclude=self.exclude,
            train_head=self.train_head, head_lr=self.head_lr, max_dense_bytes=max_dense_bytes,
            model_fn=self.model_fn,
        )  # fmt: skip
        return self._fit(run, self.subspace_epochs)

    def lr_at(self, d: int) -> float:
        """Learning rate of subspace training at dimension ``d``."""
        if self.lr_ref_d is None:
            return self.subspace_lr
        return self.subspace_lr * math.sqrt(self.lr_ref_d / d)


# --------------------------------------------------------------------------- the search


def default_dims(D: int) -> list[int]:
    """The coarse grid 1, 2, 5, 10, 20, 50, ... up to ``D`` (``D`` included)."""
    dims, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale >= D:
                return [*dims, D]
            dims.append(m * scale)
        scale *= 10


@dataclass
class IntrinsicDimensionResult:
    """Outcome of :func:`estimate_intrinsic_dimension`.

    Attributes
    ----------
    curve : DataFrame
        One row per run: ``d``, ``seed``, ``metric``, ``stage`` (``coarse`` or
        ``bisect``), ``seconds``.
    d90 : int or None
        Smallest ``d`` whose mean metric over seeds reached ``threshold``; None if
        none did.
    d90_bracket : (int, int or None)
        ``(largest failing d below d90, d90)``: d90 lies in ``(low, high]``.
    d90_per_seed : dict
        For each seed, the smallest tested ``d`` at which that seed alone reached
        the threshold (None if it never did): the seed-to-seed spread.
    baseline : float
        Performance of normal training.
    baseline_source : {"run", "global"}
        ``run``: measured here (mean of ``baseline_runs``); ``global``: supplied.
    baseline_runs : list of float
        The baseline runs, one per seed (empty for ``global``).
    fraction, threshold : float
        ``threshold = fraction * baseline``.
    D : int
        Number of parameters taking part.
    projection, mode, problem, metric_name : str
        What was measured.
    """

    curve: pd.DataFrame
    d90: int | None
    d90_bracket: tuple[int, int | None]
    d90_per_seed: dict[int, int | None]
    baseline: float
    baseline_source: str
    baseline_runs: list[float]
    fraction: float
    threshold: float
    D: int
    projection: str
    mode: str
    problem: str
    metric_name: str
    extra: dict[str, Any] = field(default_factory=dict)

    def by_d(self) -> pd.DataFrame:
        """Per-``d`` summary: mean, std, min, max and number of seeds, and whether it passed."""
        g = self.curve.groupby("d")["metric"]
        table = pd.DataFrame(
            {"mean": g.mean(), "std": g.std(ddof=0), "min": g.min(), "max": g.max(), "n": g.size()}
        ).reset_index()
        table["passed"] = table["mean"] >= self.threshold
        return table

    def summary(self) -> str:
        """A short human-readable report."""
        lo, hi = self.d90_bracket
        if self.d90 is None:
            found = (
                f"no tested d reached {self.fraction:.0%} of the baseline (largest d tried: {lo})"
            )
        else:
            seeds = [v for v in self.d90_per_seed.values() if v is not None]
            spread = f"; per seed {min(seeds)}..{max(seeds)}" if seeds else ""
            found = f"d{round(100 * self.fraction)} = {self.d90}  (bracket ({lo}, {hi}]{spread})"
        return "\n".join(
            [
                f"intrinsic dimension of {self.problem}",
                f"  D = {self.D:,} parameters, projection = {self.projection}, mode = {self.mode}",
                f"  baseline {self.metric_name} = {self.baseline:.4f} ({self.baseline_source}); "
                f"threshold {self.fraction:.0%} = {self.threshold:.4f}",
                f"  {found}",
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (everything but the curve)."""
        return {
            "problem": self.problem,
            "metric": self.metric_name,
            "D": self.D,
            "projection": self.projection,
            "mode": self.mode,
            "fraction": self.fraction,
            "baseline": self.baseline,
            "baseline_source": self.baseline_source,
            "baseline_runs": self.baseline_runs,
            "threshold": self.threshold,
            "d90": self.d90,
            "d90_bracket": list(self.d90_bracket),
            "d90_per_seed": {str(k): v for k, v in self.d90_per_seed.items()},
            **self.extra,
        }

    def save(self, out_dir: str | Path, stem: str = "intrinsic_dimension") -> dict[str, Path]:
        """Write ``<stem>.csv`` (the curve) and ``<stem>.json`` (the summary) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
        self.curve.assign(
            threshold=self.threshold, baseline=self.baseline, projection=self.projection
        ).to_csv(paths["csv"], index=False)
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return paths

    @classmethod
    def load(
        cls, out_dir: str | Path, stem: str = "intrinsic_dimension"
    ) -> IntrinsicDimensionResult:
        """Read back what :meth:`save` (or ``python -m rankkit intrinsic-dim``) wrote."""
        out = Path(out_dir)
        path = out / f"{stem}.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{out} has no {stem}.json; write one with "
                f"'python -m rankkit intrinsic-dim --out {out}'."
            )
        info = json.loads(path.read_text())
        curve = pd.read_csv(out / f"{stem}.csv")[["d", "seed", "metric", "stage", "seconds"]]
        known = {f.name for f in fields(cls)}
        return cls(
            curve=curve,
            d90=info["d90"],
            d90_bracket=tuple(info["d90_bracket"]),
            d90_per_seed={int(k): v for k, v in info["d90_per_seed"].items()},
            baseline=info["baseline"],
            baseline_source=info["baseline_source"],
            baseline_runs=info["baseline_runs"],
            fraction=info["fraction"],
            threshold=info["threshold"],
            D=info["D"],
            projection=info["projection"],
            mode=info["mode"],
            problem=info["problem"],
            metric_name=info["metric"],
            extra={k: v for k, v in info.items() if k not in known and k != "metric"},
        )


def _bisection_midpoint(failing: int, passing: int) -> int:
    """The next d to try between a failing and a passing d: their geometric mean."""
    mid = round(math.sqrt(max(failing, 1) * passing))
    return min(max(mid, failing + 1), passing - 1)


def _bisection_steps(failing: int, passing: int, rtol: float) -> int:
    """About how many steps the bisection will take (for a progress bar's total).

    The longer of the two extreme paths, every step passing or every step failing;
    mixed paths take about as many.
    """
    longest = 0
    for always_passes in (True, False):
        low, high, steps = failing, passing, 0
        while high - low > max(1, rtol * high):
            mid = _bisection_midpoint(low, high)
            low, high = (low, mid) if always_passes else (mid, high)
            steps += 1
        longest = max(longest, steps)
    return longest


def search_intrinsic_dimension(
    score: Callable[[int, int], float],
    threshold: float,
    *,
    D: int,
    dims: Sequence[int] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    rtol: float = 0.05,
    d_min: int = 1,
    progress: bool = True,
    desc: str = "intrinsic dim",
) -> tuple[pd.DataFrame, int | None, tuple[int, int | None]]:
    """Find the smallest ``d`` with ``mean(score(d, seed) for seed in seeds) >= threshold``.

    The generic search behind :func:`estimate_intrinsic_dimension`; ``score`` can
    be any callable. A coarse pass runs ``dims`` in increasing order (default
    :func:`default_dims`, stopping one grid point after the first pass), then
    bisection in log space narrows the bracket ``(largest failing, smallest
    passing]`` until ``high - low <= max(1, rtol * high)``. ``d_min`` is the
    smallest valid ``d`` (SAID needs ``d > m``); ``d_min - 1`` counts as failing.

    Returns
    -------
    curve : DataFrame
        Columns ``d, seed, metric, stage, seconds``.
    d90 : int or None
    bracket : (int, int or None)
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed, e.g. seeds=(0, 1, 2).")
    explicit = dims is not None
    dims = sorted({int(x) for x in (dims if explicit else default_dims(D))})
    if not explicit:
        dims = sorted({d_min, *(x for x in dims if x > d_min)})
    for x in dims:
        check_dimensions(D, x)
        if x < d_min:
            raise ValueError(
                f"d={x} is below the smallest valid d={d_min} (mode='said' needs d > m)."
            )
    rows: list[dict[str, Any]] = []
    # The total: the coarse grid (it may stop early), then, once it has bracketed d90,
    # the runs done plus about as many as the bisection has left.
    bar = tqdm(
        total=len(dims) * len(seeds), desc=desc, unit="run", disable=not progress, leave=False
    )

    def mean_at(d: int, stage: str) -> float:
        values = []
        for seed in seeds:
            t0 = time.perf_counter()
            value = float(score(d, seed))
            rows.append(
                {
                    "d": d,
                    "seed": seed,
                    "metric": value,
                    "stage": stage,
                    "seconds": time.perf_counter() - t0,
                }
            )
            values.append(value)
            bar.update(1)
            bar.set_postfix(d=d, metric=f"{value:.3f}")
        return float(np.mean(values))

    passing: int | None = None
    failing = d_min - 1
    extra_after_pass = len(dims) if explicit else 1
    for d in dims:
        if passing is not None:
            if extra_after_pass == 0:
                break
            extra_after_pass -= 1
            mean_at(d, "coarse")
            continue
        if mean_at(d, "coarse") >= threshold:
            passing = d
        else:
            failing = d

    if passing is not None:
        while passing - failing > max(1, rtol * passing):
            bar.total = bar.n + len(seeds) * _bisection_steps(failing, passing, rtol)
            bar.refresh()
            mid = _bisection_midpoint(failing, passing)
            if mean_at(mid, "bisect") >= threshold:
                passing = mid
            else:
                failing = mid
    bar.total = bar.n
    bar.close()
    curve = pd.DataFrame(rows, columns=["d", "seed", "metric", "stage", "seconds"])
    return curve, passing, (failing, passing)


def estimate_intrinsic_dimension(
    problem: Any,
    *,
    projection: str = "fastfood",
    mode: str = "did",
    fraction: float = 0.9,
    dims: Sequence[int] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    baseline: float | None = None,
    rtol: float = 0.05,
    from_scratch: bool = False,
    max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
    progress: bool = True,
) -> IntrinsicDimensionResult:
    r"""Measure :math:`d_{90}`: the smallest subspace reaching ``fraction`` of normal training.

    Parameters
    ----------
    problem : SubspaceProblem, task, or str
        :class:`HyperplaneProblem`, :class:`TaskProblem`, any object following
        :class:`SubspaceProblem`, or a task / task name (wrapped in
        ``TaskProblem(problem, from_scratch=from_scratch)``); ``"toy"`` is
        :class:`HyperplaneProblem`.
    projection : {"fastfood", "dense", "sparse"}
        How the random subspace is drawn.
    mode : {"did", "said"}
        Direct, or with one scale per parameter tensor (counted in ``d``).
    fraction : float
        Fraction of the baseline that counts as solved (0.9 for d90).
    dims : sequence of int, optional
        Coarse grid, all run. Default: 1, 2, 5, 10, 20, 50, ... stopping one
        point after the first that passes.
    seeds : sequence of int
        Seeds per ``d`` (each seed draws its own projection and, from scratch,
        its own :math:`\theta_0`); a ``d`` passes when the mean over seeds does.
    baseline : float, optional
        None: measured by ``problem.train_full`` for each seed ("run").
        A number: used as is ("global"), like Li et al.'s MNIST baselines.
    rtol : float
        Bisection stops when the bracket is within ``max(1, rtol * d90)``; use 0
        for the exact integer.
    from_scratch : bool
        Only when ``problem`` is a task or task name; see :class:`TaskProblem`.
    max_dense_bytes : int
        Memory budget for ``projection="dense"``.
    progress : bool
        Show tqdm progress bars.

    Returns
    -------
    IntrinsicDimensionResult

    Examples
    --------
    >>> r = estimate_intrinsic_dimension(HyperplaneProblem(), seeds=(0,), rtol=0, progress=False)
    >>> r.d90
    10
    """
    projection = check_choice("projection", projection, PROJECTIONS)
    mode = check_choice("mode", mode, MODES)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction} (0.9 gives d90).")
    if isinstance(problem, str) and problem.lower() in ("toy", "hyperplane"):
        problem = HyperplaneProblem()
    elif isinstance(problem, str) or (
        hasattr(problem, "build_model") and not hasattr(problem, "train_subspace")
    ):
        problem = TaskProblem(problem, from_scratch=from_scratch)
    seeds = [int(s) for s in seeds]
    D = int(problem.num_params())

    if baseline is None:
        runs = [float(problem.train_full(seed)) for seed in seeds]
        base_value, source = float(np.mean(runs)), "run"
    else:
        runs, base_value, source = [], float(baseline), "global"
    threshold = fraction * base_value

    def score(d: int, seed: int) -> float:
        return problem.train_subspace(
            d, seed, projection=projection, mode=mode, max_dense_bytes=max_dense_bytes
        )

    m = int(problem.num_tensors()) if mode == "said" and hasattr(problem, "num_tensors") else 0
    curve, d90, bracket = search_intrinsic_dimension(
        score,
        threshold,
        D=D + m,
        d_min=m + 1,
        dims=dims,
        seeds=seeds,
        rtol=rtol,
        progress=progress,
        desc=f"{projection}/{mode}",
    )
    per_seed: dict[int, int | None] = {}
    for seed in seeds:
        ok = curve[(curve["seed"] == seed) & (curve["metric"] >= threshold)]
        per_seed[seed] = int(ok["d"].min()) if len(ok) else None
    return IntrinsicDimensionResult(
        curve=curve,
        d90=d90,
        d90_bracket=bracket,
        d90_per_seed=per_seed,
        baseline=base_value,
        baseline_source=source,
        baseline_runs=runs,
        fraction=fraction,
        threshold=threshold,
        D=D,
        projection=projection,
        mode=mode,
        problem=problem.name,
        metric_name=problem.metric_name,
    )
