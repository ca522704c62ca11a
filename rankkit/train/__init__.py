"""One training loop for every fine-tuning method, one run or many.

* :mod:`rankkit.train.hparams` -- defaults, resolution and the learning-rate schedule;
* :mod:`rankkit.train.optim` -- the optimiser: parameter groups, decay, fused or not;
* :mod:`rankkit.train.data` -- each run's data order;
* :mod:`rankkit.train.loop` -- :func:`fit` (one run) and :func:`train_runs` (the loop
  of K runs, which :func:`rankkit.batched.fit_batched` drives with stacked adapters).

This package imports nothing from tasks, adapters or experiments: they build on it.
"""

from rankkit.devices import autocast_for, resolve_device
from rankkit.train.hparams import DEFAULTS, SCHEDULES, resolve_hparams
from rankkit.train.loop import (
    OneRun,
    Runs,
    TrainResult,
    fit,
    freeze_all_but,
    head_only,
    set_seed,
    train_runs,
)
from rankkit.train.optim import configure_optimizer
from rankkit.utils import count_parameters

__all__ = [
    "DEFAULTS",
    "SCHEDULES",
    "OneRun",
    "Runs",
    "TrainResult",
    "autocast_for",
    "configure_optimizer",
    "count_parameters",
    "fit",
    "freeze_all_but",
    "head_only",
    "resolve_device",
    "resolve_hparams",
    "set_seed",
    "train_runs",
]
