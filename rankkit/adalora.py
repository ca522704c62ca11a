r"""AdaLoRA from PEFT, trained by rankkit's one training loop.

AdaLoRA (Zhang et al. 2023) writes each layer's update in SVD form,
:math:`\Delta W = B \operatorname{diag}(E) A` (PEFT's names; :math:`P \Lambda Q` in the
paper), starts every adapted layer at rank ``init_r`` and, while training, zeroes the
singular values :math:`E_i` of the least important triplets
:math:`(A_{i\cdot}, E_i, B_{\cdot i})`. A triplet's importance is a smoothed sensitivity
:math:`|\theta \, \partial L / \partial \theta|` of its entries times its uncertainty.
The total budget -- the number of triplets kept over all layers -- falls from
``init_r * L`` to ``target_r * L`` along a cubic schedule, so layers compete for rank.
The budget counts *units of rank*, not parameters: a unit costs ``out + in`` parameters
in its layer (``out + in + 1`` with :math:`E_i`, which folds into :math:`B` for a plain
LoRA adapter), so the final parameter count depends on which layers keep rank.

The schedule, in optimiser steps of the run (``total_step = epochs * steps per epoch``):
``tinit`` = the first 10% (no pruning), then the budget falls to its target, then the
last 50% (``tfinal``) train at the final ranks -- about the proportions of the paper's
GLUE settings -- and ``deltaT = 10`` steps between reallocations (PEFT's examples).
``init_r`` defaults to ``ceil(1.5 target_r)`` (the paper's :math:`b^{(0)} = 1.5 b^{(T)}`)
and the orthogonality penalty to PEFT's ``orth_reg_weight = 0.5``.

How it meets :func:`rankkit.train.train_runs`, the one loop. :class:`AdaLoraRun` is
the loop's :class:`~rankkit.train.OneRun` with three differences:

* its loss adds PEFT's orthogonal regulariser,
  :math:`\operatorname{mean}(\|AA^T - I\|_F, \|B^T B - I\|_F)` over the layers (PEFT adds
  it only to model outputs that carry a ``.loss``; rankkit's tasks compute the loss from
  logits);
* PEFT's ``update_and_allocate(step)`` must run after each optimiser step and before the
  gradients are cleared. The loop clears them right after the next step's forward pass,
  so the run calls it at the start of that forward pass (``losses``), and at the
  validation that follows an epoch's last step;
* epochs validated before the budget is final score ``-inf``, so the best epoch -- the
  weights restored at the end -- is one trained at the final ranks.

Reference: Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning", ICLR 2023, arXiv:2303.10512.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from rankkit.devices import resolve_device
from rankkit.methods import method_lr, prepare_run
from rankkit.train import OneRun, TrainResult, resolve_hparams, set_seed, train_runs
from rankkit.train.data import DataOrders

__all__ = [
    "AdaLoraRun",
    "TrainedAdaLora",
    "final_ranks",
    "fit_adalora",
    "orthogonal_regulariser",
    "require_peft",
]

#: Fractions of the optimiser steps before pruning starts (``tinit``) and at the final
#: ranks (``tfinal``), and steps between reallocations (``deltaT``).
TINIT_FRACTION, TFINAL_FRACTION, DELTA_T = 0.1, 0.5, 10


def require_peft():
    """``import peft``, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "AdaLoRA comes from PEFT, which is not installed: pip install 'rankkit[peft]'."
        ) from err
    return peft


def orthogonal_regulariser(model: nn.Module) -> torch.Tensor:
    r"""PEFT's AdaLoRA penalty: the mean of :math:`\|AA^T - I\|_F` and :math:`\|B^TB - I\|_F`.

    Taken over every trainable ``lora_A`` (r x in) and ``lora_B`` (out x r) of ``model``;
    it keeps :math:`A` and :math:`B` close to orthogonal, so that :math:`E` holds the
    singular values and zeroing one removes one direction.
    """
    terms = []
    for name, p in model.named_parameters():
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
            gram = p @ p.T if ".lora_A." in name else p.T @ p
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean()


class AdaLoraRun(OneRun):
    """:class:`~rankkit.train.OneRun` for a PEFT AdaLoRA model (see the module docstring).

    Parameters
    ----------
    model : peft.PeftModel
        A model wrapped by ``get_peft_model`` with an ``AdaLoraConfig``.
    task, device
        As for :class:`~rankkit.train.OneRun`.
    """

    def __init__(self, model: nn.Module, task, device: torch.device) -> None:
        super().__init__(model, task, device)
        self.desc = f"{getattr(task, 'name', 'fit')} AdaLoRA"
        self.tuner = model.base_model
        self.config = self.tuner.peft_config["default"]
        self.steps = 0  # optimiser steps taken: one per training forward pass
        self.allocated = 0  # steps whose update_and_allocate has run

    @property
    def budget_final(self) -> bool:
        """Whether the ranks are final (PEFT fixes them at step ``total_step - tfinal``)."""
        return self.allocated > self.config.total_step - self.config.tfinal

    def _allocate(self) -> None:
        """Call ``update_and_allocate`` for the last optimiser step, once, with its gradients."""
        if self.allocated < self.steps:
            self.tuner.update_and_allocate(self.steps - 1)
            self.allocated = self.steps

    def losses(self, batch) -> torch.Tensor:
        self._allocate()
        self.steps += 1
        penalty = self.config.orth_reg_weight * orthogonal_regulariser(self.model)
        return super().losses(batch) + penalty

    def validate(self) -> list[float]:
        self._allocate()
        return super().validate() if self.budget_final else [-math.inf]


class TrainedAdaLora(NamedTuple):
    """What :func:`fit_adalora` returns.

    Attributes
    ----------
    model : peft.PeftModel
        At its best epoch among those trained at the final ranks.
    result : TrainResult
        ``trainable_params`` counts what trained: ``init_r`` triplets per layer and the head.
    ranks : dict of str to int
        Final rank of each adapted module (triplets whose E is not masked).
    adapter_params : int
        ``sum(rank * (out + in))``: the parameters of the final adapter as plain LoRA.
    """

    model: nn.Module
    result: TrainResult
    ranks: dict[str, int]
    adapter_params: int

    def save(self, directory: str | Path) -> Path:
        """``save_pretrained``: PEFT's AdaLoRA adapter at the final ranks."""
        with warnings.catch_warnings():
            # A layer pruned to rank 0 is saved as a (0, in) tensor, which PEFT mistakes
            # for an unsharded DeepSpeed / FSDP parameter.
            warnings.filterwarnings("ignore", message=".*invalid shape", category=UserWarning)
            self.model.save_pretrained(str(directory))
        return Path(directory)


def fit_adalora(
    task,
    target_modules: Sequence[str],
    target_r: int,
    *,
    init_r: int | None = None,
    lora_alpha: float | None = None,
    seed: int = 0,
    epochs: int | None = None,
    lr: float | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> TrainedAdaLora:
    """Train AdaLoRA on ``task`` with :func:`rankkit.train.train_runs`.

    The model is the LoRA recipe's (:func:`rankkit.methods.prepare_run`: ``set_seed(seed)``,
    the task's pretrained model, its head trained in full as ``modules_to_save``), wrapped
    by PEFT's ``get_peft_model`` with an ``AdaLoraConfig``.

    Parameters
    ----------
    task : Task
    target_modules : sequence of str
        Names of the ``nn.Linear`` modules to adapt.
    target_r : int
        Final average rank per adapted layer: ``target_r * len(target_modules)`` units
        of rank in all.
    init_r : int, optional
        Initial rank of every layer; default ``ceil(1.5 target_r)``.
    lora_alpha : float, optional
        Scaling numerator; the scaling is ``lora_alpha / init_r``. Default ``init_r``
        (scaling 1, as LoRA with alpha = r).
    seed, epochs, lr, device, progress
        As in :func:`rankkit.train.fit`; ``lr`` defaults to the task's LoRA rate.

    Returns
    -------
    TrainedAdaLora

    Raises
    ------
    ImportError
        If PEFT is not installed (the message says ``pip install 'rankkit[peft]'``).
    """
    peft = require_peft()
    init_r = init_r or math.ceil(1.5 * target_r)
    if not 1 <= target_r <= init_r:
        raise ValueError(f"fit_adalora: need 1 <= target_r <= init_r, got {target_r}, {init_r}.")
    start = time.perf_counter()
    run = prepare_run(task, "frozen", seed, lr=method_lr(task, "lora", lr))
    hp = resolve_hparams(task, epochs=epochs, lr=run.lr)
    total = (
        hp["epochs"]
        * DataOrders(len(task.splits()["train"]), hp["batch_size"], [seed]).steps_per_epoch
    )
    config = peft.AdaLoraConfig(
        init_r=init_r, target_r=target_r, lora_alpha=lora_alpha or init_r,
        target_modules=list(target_modules), modules_to_save=list(task.head_modules),
        total_step=total, tinit=round(TINIT_FRACTION * total),
        tfinal=max(1, round(TFINAL_FRACTION * total)), deltaT=DELTA_T,
    )  # fmt: skip
    model = peft.get_peft_model(run.model, config)
    set_seed(seed)
    dev = resolve_device(device)
    model.to(dev)
    (result,) = train_runs(
        AdaLoraRun(model, task, dev), task, hp, [seed], dev, progress=progress, start=start
    )
    ranks = final_ranks(model)
    layers = {name: model.base_model.model.get_submodule(name) for name in ranks}
    adapter_params = sum(
        r * (layers[m].in_features + layers[m].out_features) for m, r in ranks.items()
    )
    return TrainedAdaLora(model, result, ranks, adapter_params)


def final_ranks(model: nn.Module) -> dict[str, int]:
    """``{module: rank}`` of an AdaLoRA model: its triplets whose E is not masked."""
    pattern = model.peft_config["default"].rank_pattern or {}
    return {key.split(".lora_E")[0]: int(sum(mask)) for key, mask in pattern.items()}
