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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rankkit.devices import autocast_for, peak_memory_mb, resolve_device, to_device
from rankkit.utils import count_parameters, did_you_mean, within

#: Used when neither the caller nor the task's ``default_hparams`` set a value.
DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "lr": 1e-3,
    "batch_size": 32,
    "weight_decay": 0.01,
    "schedule": "cosine",
    "warmup": 0.05,
}
SCHEDULES = ("cosine", "constant")


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


def _hparams(task, **given) -> dict[str, Any]:
    task_defaults = dict(getattr(task, "default_hparams", {}) or {})
    hp = {
        k: (given[k] if given.get(k) is not None else task_defaults.get(k, DEFAULTS[k]))
        for k in DEFAULTS
    }
    if not isinstance(hp["epochs"], int) or hp["epochs"] < 1:
        raise ValueError(f"fit: epochs must be a positive int, got {hp['epochs']!r}.")
    if not isinstance(hp["batch_size"], int) or hp["batch_size"] < 1:
        raise ValueError(f"fit: batch_size must be a positive int, got {hp['batch_size']!r}.")
    if not (isinstance(hp["lr"], (int, float)) and hp["lr"] > 0 and math.isfinite(hp["lr"])):
        raise ValueError(f"fit: lr must be a positive number, got {hp['lr']!r}; try 1e-3.")
    if not hp["weight_decay"] >= 0:
        raise ValueError(f"fit: weight_decay must be >= 0, got {hp['weight_decay']!r}.")
    if hp["schedule"] not in SCHEDULES:
        raise ValueError(f"fit: schedule must be one of {SCHEDULES}, got {hp['schedule']!r}.")
    if not 0 <= hp["warmup"] < 1:
        raise ValueError(f"fit: warmup is a fraction of all steps in [0, 1), got {hp['warmup']!r}.")
    return hp


def _lr_factor(step: int, total: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(
    named: list[tuple[str, torch.Tensor]],
    lr: float,
    weight_decay: float,
    lr_overrides: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices only, and one group per overridden learning rate."""
    overrides = dict(lr_overrides or {})
    for key, value in overrides.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(
                f"fit: lr_overrides[{key!r}] must be a positive number, got {value!r}."
            )
        if not any(within(n, key) for n, _ in named):
            names = ", ".join(n for n, _ in named[:6])
            raise ValueError(
                f"fit: lr_overrides key {key!r} matches no trainable parameter; trainable "
                f"parameters are named like: {names}{', ...' if len(named) > 6 else ''}."
            )

    def rate(name: str) -> float:
        keys = [k for k in overrides if within(name, k)]
        return overrides[max(keys, key=len)] if keys else lr

    groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
    for n, p in named:
        groups.setdefault((rate(n), p.ndim >= 2), []).append(p)
    # Without overrides: exactly two groups, matrices (decayed) first.
    order = sorted(groups, key=lambda k: (k[0] != lr, not k[1]))
    return [
        {"params": groups[k], "lr": k[0], "weight_decay": weight_decay if k[1] else 0.0}
        for k in order
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

    Returns
    -------
    TrainResult
        Metrics of the restored best weights, per-epoch history, parameter counts,
        wall time, peak memory and device. ``model`` holds the best weights, on
        ``result.device``.

    Examples
    --------
    >>> from rankkit.tasks import get_task
    >>> task = get_task("digits")
    >>> model = task.build_model()
    >>> result = fit(model, task, epochs=2, progress=False)  # doctest: +SKIP
    """
    hp = _hparams(
        task,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup=warmup,
    )
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"fit: grad_clip must be positive or None, got {grad_clip!r}.")
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"fit: eval_every must be a positive int, got {eval_every!r}.")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            "fit: the model has no trainable parameters (every requires_grad is False). "
            "Unfreeze some, e.g. rankkit.train.freeze_all_but(model, task.head_modules)."
        )

    start = time.perf_counter()
    set_seed(seed)
    dev = resolve_device(device)
    model.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    autocast = functools.partial(autocast_for, dev)

    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(
        _param_groups(named, hp["lr"], hp["weight_decay"], lr_overrides), lr=hp["lr"]
    )
    loader = DataLoader(
        task.splits()["train"],
        batch_size=hp["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    total_steps = hp["epochs"] * len(loader)
    warmup_steps = round(hp["warmup"] * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total_steps, warmup_steps, hp["schedule"])
    )
    key = f"val_{task.metric_name}"

    def validate() -> float:
        with autocast():
            return float(task.evaluate(model, "val", device=dev))

    # Denormal floats (tiny gradients through a saturated softmax) run ~20x slower
    # on x86 CPUs; flushing them to zero costs no accuracy and keeps runs repeatable.
    flush = dev.type == "cpu" and torch.set_flush_denormal(True)
    try:
        # Only trainable tensors can change, so they are all the checkpoint needs.
        best_score, best_epoch = validate(), 0
        best_state = {n: p.detach().clone() for n, p in named}
        history: list[dict[str, float]] = [
            {"epoch": 0, key: best_score, "elapsed_s": time.perf_counter() - start}
        ]
        bar = _progress_bar(total_steps, f"{getattr(task, 'name', 'fit')}", progress)
        for epoch in range(1, hp["epochs"] + 1):
            model.train()
            loss_sum, n_batches = 0.0, 0
            for batch in loader:
                batch = to_device(batch, dev)
                with autocast():
                    loss = task.loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                scheduler.step()
                value = loss.item()
                if not math.isfinite(value):
                    raise ValueError(
                        f"fit: the training loss became {value} in epoch {epoch}; the run "
                        f"diverged. Lower the learning rate (lr={hp['lr']}) or keep grad_clip on."
                    )
                loss_sum += value
                n_batches += 1
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / max(1, n_batches),
                "lr": optimizer.param_groups[0]["lr"],
            }
            if epoch % eval_every == 0 or epoch == hp["epochs"]:
                row[key] = score = validate()
                bar.set_postfix({key: f"{score:.4f}"}, refresh=False)
                if score > best_score:
                    best_score, best_epoch = score, epoch
                    best_state = {n: p.detach().clone() for n, p in named}
            row["elapsed_s"] = time.perf_counter() - start
            history.append(row)
        bar.close()
        if best_epoch != hp["epochs"]:
            with torch.no_grad():
                for n, p in named:
                    p.copy_(best_state[n])
        with autocast():
            test_score = float(task.evaluate(model, "test", device=dev))
        metrics = {key: best_score, f"test_{task.metric_name}": test_score}
    finally:
        if flush:
            torch.set_flush_denormal(False)
    model.train()
    return TrainResult(
        metrics=metrics,
        history=history,
        trainable_params=sum(p.numel() for p in params),
        total_params=count_parameters(model).total,
        wall_time_s=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(dev),
        device=str(dev),
        best_epoch=best_epoch,
        hparams={
            **hp,
            "grad_clip": grad_clip,
            "seed": seed,
            **({"lr_overrides": dict(lr_overrides)} if lr_overrides else {}),
        },
    )


def _progress_bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
