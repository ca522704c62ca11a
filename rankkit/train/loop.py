"""One training loop for every fine-tuning method.

Full fine-tuning, LoRA and intrinsic-dimension training differ only in *which*
parameters are trainable: all of them, the adapter matrices ``A`` and ``B``, or
the subspace coordinates ``θ_d`` of ``θ = θ₀ + P θ_d``. :func:`fit` therefore
trains exactly the parameters with ``requires_grad=True`` and nothing else, so
the methods are compared under one optimiser, schedule and selection rule.

Each step minimises the task loss with AdamW (Loshchilov & Hutter, 2019)::

    g   = ∇_θ L(θ; batch)                      (clipped to ‖g‖ ≤ grad_clip)
    θ  ← θ - η_t (Adam(g) + λ θ)               (λ only on matrices, not biases / norms)

with the learning rate ``η_t`` warmed up linearly over the first steps and then
decayed along a half cosine to zero (``schedule="cosine"``) or held constant.
After every epoch the model is scored on the validation split; the weights of
the best epoch are restored at the end and scored on validation and test.

Reproducibility: :func:`set_seed` seeds Python, NumPy and torch, and the data
order comes from a generator seeded with the same seed, so two CPU runs with
the same seed give bit-for-bit identical weights and metrics.

:func:`fit` trains one model. :func:`train_runs` is the loop itself: it trains K
runs in lockstep, given a :class:`Runs` object that knows how to compute each
run's loss, clip its gradient, validate it and keep its best weights.
:class:`OneRun` is ``fit``'s (K = 1); :func:`rankkit.batched.fit_batched` passes
K LoRA runs stacked into one model. Both go through every line of the loop:
warm-up and schedule, gradient clipping, ``lr_overrides``, the stop on a
diverging loss, ``eval_every`` and best-epoch selection.

A *task* here is anything with ``splits()``, ``loss(model, batch)``,
``evaluate(model, split, device)``, ``metric_name``, ``name`` and
``default_hparams`` -- every :class:`rankkit.tasks.Task`, and the pretraining
objectives used to build their base weights.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rankkit.devices import autocast_for, peak_memory_mb, resolve_device, to_device
from rankkit.train.data import DataOrders, gather
from rankkit.train.hparams import check_loop_options, lr_factor, resolve_hparams
from rankkit.train.optim import configure_optimizer
from rankkit.utils import count_parameters, did_you_mean

__all__ = [
    "OneRun",
    "Runs",
    "TrainResult",
    "fit",
    "freeze_all_but",
    "head_only",
    "set_seed",
    "train_runs",
]


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    metrics : dict
        ``{"val_<metric>": ..., "test_<metric>": ...}`` of the restored best weights.
    history : list of dict
        One entry per epoch (epoch 0 = before training): ``epoch``, ``train_loss``,
        ``val_<metric>`` (on evaluated epochs), ``lr`` and ``elapsed_s``.
    trainable_params, total_params : int
        Number of trained parameters and of all parameters of the model.
    wall_time_s : float
        Seconds for the whole call, evaluations included.
    peak_memory_mb : float
        Peak accelerator memory allocated during the run (CUDA), or the peak
        resident memory of the process so far (CPU; includes everything the
        process allocated before).
    device : str
        Device the model was trained on; the model stays there.
    best_epoch : int
        Epoch whose weights were restored (0 = the initial weights were best).
    hparams : dict
        The hyper-parameters actually used, after filling in defaults.
    """

    metrics: dict[str, float]
    history: list[dict[str, float]]
    trainable_params: int
    total_params: int
    wall_time_s: float
    peak_memory_mb: float
    device: str
    best_epoch: int
    hparams: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        scores = ", ".join(f"{k}={v:.4f}" for k, v in self.metrics.items())
        return (
            f"{scores} | trained {self.trainable_params:,} of {self.total_params:,} params "
            f"| best epoch {self.best_epoch} | {self.wall_time_s:.1f}s on {self.device}"
        )


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and CUDA)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    random.seed(seed)
    # Seeds the legacy global RNG on purpose: third-party code may still draw from it.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def freeze_all_but(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Make only the parameters of the named modules (or parameters) trainable.

    Parameters
    ----------
    model : nn.Module
    names : iterable of str
        Module names such as ``"head"`` or ``"blocks.0.attn.q"``, or full
        parameter names such as ``"head.bias"``.

    Returns
    -------
    nn.Module
        ``model`` itself, modified in place.
    """
    names = list(names)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in modules and n not in params]
    if unknown:
        hint = "; ".join(f"{n!r}{did_you_mean(n, [*modules, *params])}" for n in unknown)
        raise ValueError(
            f"freeze_all_but: no module or parameter named {hint}. "
            "See dict(model.named_modules()) for the valid names."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        targets = modules[n].parameters() if n in modules else [params[n]]
        for p in targets:
            p.requires_grad_(True)
    return model


def head_only(model: nn.Module, task) -> nn.Module:
    """The *frozen base* baseline: train only ``task.head_modules``."""
    return freeze_all_but(model, task.head_modules)


class Runs(Protocol):
    """K runs that :func:`train_runs` trains in lockstep, one optimiser step for all.

    Attributes
    ----------
    model : nn.Module
        What the optimiser trains: its parameters with ``requires_grad=True``.
    num_runs : int
        K.
    run_dims : int
        0 if ``model``'s parameters belong to one run; 1 if each is stacked along
        its first dimension, one slice per run (weight decay then goes by the
        dimensions of a slice).
    desc : str
        Label of the progress bar.
    """

    model: nn.Module
    num_runs: int
    run_dims: int
    desc: str

    def losses(self, batch) -> torch.Tensor:
        """``(K,)``: each run's mean loss on its own rows of ``batch`` (the K blocks)."""

    def clip(self, max_norm: float) -> None:
        """Clip each run's gradient to global norm ``max_norm``, as ``clip_grad_norm_``."""

    def validate(self) -> list[float]:
        """Each run's validation metric (higher is better)."""

    def keep(self, runs: list[int]) -> None:
        """Remember the current weights of ``runs`` as their best."""

    def restore(self) -> None:
        """Put every run's best weights back."""

    def final_metrics(self, best: list[float]) -> list[dict[str, float]]:
        """Each run's metrics with its best weights (``best``: the validation scores kept)."""

    def parameter_counts(self, k: int) -> tuple[int, int]:
        """Run ``k``'s trained and total number of parameters, as if trained alone."""


class OneRun:
    """:class:`Runs` for one model, as :func:`fit` trains it (K = 1)."""

    num_runs = 1
    run_dims = 0

    def __init__(self, model: nn.Module, task, device: torch.device) -> None:
        self.model, self.task, self.device = model, task, device
        self.desc = f"{getattr(task, 'name', 'fit')}"
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.best: dict[str, torch.Tensor] = {}

    def losses(self, batch) -> torch.Tensor:
        return self.task.loss(self.model, batch).reshape(1)

    def clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_([p for _, p in self.named], max_norm)

    def validate(self) -> list[float]:
        with autocast_for(self.device):
            return [float(self.task.evaluate(self.model, "val", device=self.device))]

    def keep(self, runs: list[int]) -> None:
        # Only trainable tensors can change, so they are all the checkpoint needs.
        self.best = {n: p.detach().clone() for n, p in self.named}

    @torch.no_grad()
    def restore(self) -> None:
        for n, p in self.named:
            p.copy_(self.best[n])

    def final_metrics(self, best: list[float]) -> list[dict[str, float]]:
        with autocast_for(self.device):
            test = float(self.task.evaluate(self.model, "test", device=self.device))
        return [{f"val_{self.task.metric_name}": best[0], f"test_{self.task.metric_name}": test}]

    def parameter_counts(self, k: int) -> tuple[int, int]:
        return sum(p.numel() for _, p in self.named), count_parameters(self.model).total


def train_runs(
    runs: Runs,
    task,
    hp: Mapping[str, Any],
    seeds: Sequence[int],
    device: torch.device,
    *,
    grad_clip: float | None = 1.0,
    eval_every: int = 1,
    lr_overrides: Mapping[str, float] | None = None,
    progress: bool = False,
    on_epoch: Callable[[int, int], None] | None = None,
    start: float | None = None,
) -> list[TrainResult]:
    """The training loop: train K runs in lockstep and keep each one's best epoch.

    Every step draws each run's batch in its own data order (seeded by its seed),
    minimises the sum of the runs' losses (each run's parameters get exactly its
    own loss's gradient), clips each run's gradient, and steps one AdamW for all.
    After every ``eval_every`` epochs each run is validated and keeps its best
    weights, restored at the end. The inputs are trusted: :func:`fit` and
    :func:`rankkit.batched.fit_batched` check them.

    Parameters
    ----------
    runs : Runs
    task : Task
    hp : mapping
        Resolved hyper-parameters (:func:`rankkit.train.hparams.resolve_hparams`).
    seeds : sequence of int
        One per run: its data order.
    device : torch.device
        Where ``runs.model`` already is.
    grad_clip, eval_every, lr_overrides, progress, on_epoch
        As in :func:`fit`.
    start : float, optional
        ``time.perf_counter()`` at the start of the caller's work (default: now).

    Returns
    -------
    list of TrainResult
        One per run; ``wall_time_s`` is each run's share of the total.

    Raises
    ------
    ValueError
        If a run's training loss stops being finite (the run diverged).
    """
    start = time.perf_counter() if start is None else start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    K, key = runs.num_runs, f"val_{task.metric_name}"
    autocast = functools.partial(autocast_for, device)
    named = [(n, p) for n, p in runs.model.named_parameters() if p.requires_grad]
    optimizer = configure_optimizer(
        named, hp["lr"], hp["weight_decay"], device, lr_overrides=lr_overrides,
        run_dims=runs.run_dims,
    )  # fmt: skip
    train = task.splits()["train"]
    orders = DataOrders(len(train), hp["batch_size"], seeds)
    total_steps = hp["epochs"] * orders.steps_per_epoch
    warmup_steps = round(hp["warmup"] * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, hp["schedule"])
    )
    # Denormal floats (tiny gradients through a saturated softmax) run ~20x slower
    # on x86 CPUs; flushing them to zero costs no accuracy and keeps runs repeatable.
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        best_score, best_epoch = runs.validate(), [0] * K
        runs.keep(list(range(K)))
        elapsed = time.perf_counter() - start
        histories = [[{"epoch": 0, key: s, "elapsed_s": elapsed}] for s in best_score]
        bar = tqdm(
            total=total_steps, desc=runs.desc, disable=not progress, leave=False,
            dynamic_ncols=True,
        )  # fmt: skip
        # float64 sums of float32 losses: the same numbers as Python floats would give.
        sum_dtype = torch.float32 if device.type == "mps" else torch.float64
        for epoch in range(1, hp["epochs"] + 1):
            runs.model.train()
            loss_sum = torch.zeros(K, dtype=sum_dtype, device=device)
            n_batches = 0
            for index in orders.epoch():
                batch = to_device(gather(train, index), device)
                with autocast():
                    losses = runs.losses(batch)
                optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
                if grad_clip is not None:
                    runs.clip(grad_clip)
                optimizer.step()
                scheduler.step()
                loss_sum += losses.detach().to(sum_dtype)
                n_batches += 1
                bar.update(1)
            sums = loss_sum.tolist()
            diverged = [k for k in range(K) if not math.isfinite(sums[k])]
            if diverged:
                which = (
                    "the run"
                    if K == 1
                    else f"run(s) {diverged} (seeds {[seeds[k] for k in diverged]})"
                )
                raise ValueError(
                    f"fit: the training loss of {which} became {sums[diverged[0]]} in epoch "
                    f"{epoch}; the run diverged. Lower the learning rate (lr={hp['lr']}) or "
                    "keep grad_clip on."
                )
            lr_now = optimizer.param_groups[0]["lr"]
            rows = [
                {"epoch": epoch, "train_loss": s / max(1, n_batches), "lr": lr_now} for s in sums
            ]
            if epoch % eval_every == 0 or epoch == hp["epochs"]:
                scores = runs.validate()
                improved = [k for k in range(K) if scores[k] > best_score[k]]
                for k in range(K):
                    rows[k][key] = scores[k]
                for k in improved:
                    best_score[k], best_epoch[k] = scores[k], epoch
                if improved:
                    runs.keep(improved)
                bar.set_postfix({key: f"{max(scores):.4f}"}, refresh=False)
            elapsed = time.perf_counter() - start
            for history, row in zip(histories, rows):
                row["elapsed_s"] = elapsed
                history.append(row)
            if on_epoch is not None:
                on_epoch(epoch, hp["epochs"])
        bar.close()
        runs.restore()
        metrics = runs.final_metrics(best_score)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    wall, peak = time.perf_counter() - start, peak_memory_mb(device)
    extra = {"lr_overrides": dict(lr_overrides)} if lr_overrides else {}
    return [
        TrainResult(
            metrics=metrics[k],
            history=histories[k],
            trainable_params=runs.parameter_counts(k)[0],
            total_params=runs.parameter_counts(k)[1],
            wall_time_s=wall / K,
            peak_memory_mb=peak,
            device=str(device),
            best_epoch=best_epoch[k],
            hparams={**hp, "grad_clip": grad_clip, "seed": seeds[k], **extra},
        )
        for k in range(K)
    ]


def fit(
    model: nn.Module,
    task,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    warmup: float | None = None,
    grad_clip: float | None = 1.0,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    eval_every: int = 1,
    lr_overrides: Mapping[str, float] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` on ``task``; keep the best epoch.

    Parameters
    ----------
    model : nn.Module
        Any module whose ``forward`` takes the task's inputs. Only parameters with
        ``requires_grad=True`` are optimised (all of them for full fine-tuning).
    task : Task
        Supplies the data, loss, metric and default hyper-parameters.
    epochs, lr, batch_size, weight_decay, schedule, warmup : optional
        ``None`` takes the value from ``task.default_hparams``, then from
        :data:`DEFAULTS`. ``warmup`` is a fraction of all optimiser steps;
        ``schedule`` is ``"cosine"`` (warm-up, then cosine decay to 0) or
        ``"constant"`` (warm-up, then flat). Weight decay applies to parameters
        with two or more dimensions only.
    grad_clip : float or None
        Clip the global gradient norm of the trainable parameters to this value.
    device : str
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"mps"``...
        On CUDA the forward pass runs under bf16 autocast when supported.
    seed : int
        Seeds Python, NumPy, torch and the data order.
    progress : bool
        Show a tqdm progress bar (terminal or notebook); ``False`` is silent.
    eval_every : int
        Evaluate on the validation split every this many epochs (and after the last).
    lr_overrides : mapping of str to float, optional
        Learning rates for some trainable parameters: a key ``"head"`` applies to the
        parameters named ``head`` or ``head.*`` (the longest matching key wins); the
        others use ``lr``. The schedule scales every rate alike. For example a new
        head trained next to a slowly moving body.
    on_epoch : callable, optional
        ``on_epoch(epoch, epochs)`` after each epoch (a sweep's progress bar uses it).

    Returns
    -------
    TrainResult
        Metrics of the restored best weights, per-epoch history, parameter counts,
        wall time, peak memory and device. ``model`` holds the best weights, on
        ``result.device``.

    Raises
    ------
    ValueError
        On a bad hyper-parameter, a model with nothing to train, or a diverging loss.

    Examples
    --------
    >>> from rankkit.tasks import get_task
    >>> task = get_task("digits")
    >>> model = task.build_model()
    >>> result = fit(model, task, epochs=2, progress=False)  # doctest: +SKIP
    """
    hp = resolve_hparams(
        task, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
        schedule=schedule, warmup=warmup,
    )  # fmt: skip
    check_loop_options(grad_clip, eval_every)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "fit: the model has no trainable parameters (every requires_grad is False). "
            "Unfreeze some, e.g. rankkit.train.freeze_all_but(model, task.head_modules)."
        )
    start = time.perf_counter()
    set_seed(seed)
    dev = resolve_device(device)
    model.to(dev)
    (result,) = train_runs(
        OneRun(model, task, dev), task, hp, [seed], dev, grad_clip=grad_clip,
        eval_every=eval_every, lr_overrides=lr_overrides, progress=progress,
        on_epoch=on_epoch, start=start,
    )  # fmt: skip
    model.train()
    return result
