"""The optimiser of every run: which parameters decay, at which rate, fused or not.

Like nanoGPT's ``configure_optimizers``, one function owns these rules, and the
training loop of one run and of K stacked runs both call it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from rankkit.utils import within

__all__ = ["FUSED_DEVICES", "configure_optimizer", "param_groups"]


def param_groups(
    named: list[tuple[str, torch.Tensor]],
    lr: float,
    weight_decay: float,
    lr_overrides: Mapping[str, float] | None = None,
    run_dims: int = 0,
) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices only, and one group per overridden learning rate.

    Parameters
    ----------
    named : list of (name, parameter)
        The trainable parameters.
    lr, weight_decay : float
    lr_overrides : mapping of str to float, optional
        ``{"head": 1e-2}``: the parameters named ``head`` or ``head.*`` train at that
        rate (the longest matching key wins); the others at ``lr``.
    run_dims : int
        Leading dimensions that index stacked runs (1 for K runs trained as one
        tensor): a parameter is a matrix, and decays, when it has two or more
        dimensions *per run*.

    Raises
    ------
    ValueError
        An override that is not a positive number, or matches no trainable parameter.
    """
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
        groups.setdefault((rate(n), p.ndim - run_dims >= 2), []).append(p)
    # Without overrides: exactly two groups, matrices (decayed) first.
    order = sorted(groups, key=lambda k: (k[0] != lr, not k[1]))
    return [
        {"params": groups[k], "lr": k[0], "weight_decay": weight_decay if k[1] else 0.0}
        for k in order
    ]


#: Devices where AdamW runs its fused kernel (one pass over each tensor): faster than
#: the per-tensor loop for one run and for a batch of runs alike
#: (``benchmarks/bench_fused.py``, results in benchmarks/README.md).
FUSED_DEVICES = ("cpu", "cuda")


def configure_optimizer(
    named: list[tuple[str, torch.Tensor]],
    lr: float,
    weight_decay: float,
    device: torch.device,
    *,
    lr_overrides: Mapping[str, float] | None = None,
    run_dims: int = 0,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused on :data:`FUSED_DEVICES`.

    The fused kernel does the same element-wise update in one pass per tensor; its
    results differ from the per-tensor loop's in the last bits only.
    """
    groups = param_groups(named, lr, weight_decay, lr_overrides, run_dims)
    return torch.optim.AdamW(groups, lr=lr, fused=device.type in FUSED_DEVICES)
