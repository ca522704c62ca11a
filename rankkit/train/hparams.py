"""Training hyper-parameters: defaults, resolution and the learning-rate schedule.

A value is taken from the caller, else from the task's ``default_hparams``, else
from :data:`DEFAULTS`; :func:`resolve_hparams` does this once and checks the
result, so the loop trusts its inputs.
"""

from __future__ import annotations

import math
from typing import Any

from rankkit.utils import check_choice

__all__ = ["DEFAULTS", "SCHEDULES", "check_loop_options", "lr_factor", "resolve_hparams"]

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


def resolve_hparams(task, **given: Any) -> dict[str, Any]:
    """The hyper-parameters of a run: ``given`` (None = unset), the task's, :data:`DEFAULTS`.

    Raises
    ------
    ValueError
        Naming the hyper-parameter and what it must be.
    """
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
    hp["schedule"] = check_choice("schedule", hp["schedule"], SCHEDULES)
    if not 0 <= hp["warmup"] < 1:
        raise ValueError(f"fit: warmup is a fraction of all steps in [0, 1), got {hp['warmup']!r}.")
    return hp


def check_loop_options(grad_clip: float | None, eval_every: int) -> None:
    """Check the loop's own options (gradient clipping, evaluation interval)."""
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"fit: grad_clip must be positive or None, got {grad_clip!r}.")
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"fit: eval_every must be a positive int, got {eval_every!r}.")


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, then a half cosine to zero
    (``"cosine"``) or flat (``"constant"``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
