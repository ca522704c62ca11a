"""One recipe per fine-tuning method: which parameters train, and at which rate.

rankkit compares four ways to adapt a task's pretrained model. They differ only in
what :func:`rankkit.train.fit` is allowed to change:

``frozen``
    The frozen base: only the new task head (``task.head_modules``) trains, at the
    task's ``head_lr``. What you get for free.
``full``
    Full fine-tuning: every parameter trains, at the task's ``lr``.
``lora``
    LoRA adapters (:func:`rankkit.lora.apply_lora`) plus the head
    (``modules_to_save``), at the task's ``lora_lr``.
``subspace``
    Random-subspace training :math:`\\theta = \\theta_0 + P\\theta_d`
    (:class:`rankkit.subspace.SubspaceModel`); the learning rate is the caller's
    (:mod:`rankkit.intrinsic` picks it per task and ``d``).

:func:`prepare_run` is the one place that builds a run of any method: the sweep,
batched training, the intrinsic dimension, the command line and the tests all
call it, so "a LoRA run of rank 4, seed 0" means the same model everywhere.
:func:`finetune` prepares a ``frozen`` or ``full`` run, trains it and writes the
checkpoints that ``python -m rankkit spectrum`` compares.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rankkit.checkpoints import save_state_dict
from rankkit.lora import LoraConfig, apply_lora
from rankkit.projections import DEFAULT_MAX_DENSE_BYTES
from rankkit.subspace import SubspaceModel
from rankkit.tasks import Task, get_task
from rankkit.tasks.base import roles_by_suffix
from rankkit.train import TrainResult, fit, set_seed
from rankkit.utils import check_choice, within

__all__ = ["METHODS", "PreparedRun", "finetune", "method_lr", "prepare_run"]

METHODS = ("frozen", "full", "lora", "subspace")
#: The task's ``default_hparams`` key holding each method's learning rate (else ``lr``).
LR_KEYS = {"frozen": "head_lr", "full": "lr", "lora": "lora_lr", "subspace": "lr"}


@dataclass
class PreparedRun:
    """A model ready for :func:`rankkit.train.fit`, and the rates to train it at.

    Attributes
    ----------
    model : nn.Module
        Exactly the method's parameters have ``requires_grad=True``.
    method : str
        One of :data:`METHODS`.
    seed : int
        Seeds the model's initialisation and, passed to ``fit``, the training.
    lr : float or None
        Peak learning rate; None leaves it to ``fit`` (the task's ``lr``).
    lr_overrides : dict or None
        Per-module rates for ``fit`` (a directly trained head next to a subspace).
    """

    model: nn.Module
    method: str
    seed: int
    lr: float | None = None
    lr_overrides: dict[str, float] | None = None

    def fit(self, task, **fit_kwargs: Any) -> TrainResult:
        """``fit(self.model, task, lr=..., lr_overrides=..., seed=..., **fit_kwargs)``."""
        return fit(
            self.model, task, lr=self.lr, lr_overrides=self.lr_overrides, seed=self.seed,
            **fit_kwargs,
        )  # fmt: skip


def method_lr(task, method: str, lr: float | None = None) -> float | None:
    """``lr`` if given, else the task's default rate for ``method`` (see :data:`LR_KEYS`).

    None means the task sets no rate either, and ``fit`` falls back to its defaults.
    """
    if lr is not None:
        return lr
    hp = dict(getattr(task, "default_hparams", {}) or {})
    return hp.get(LR_KEYS[method], hp.get("lr"))


def prepare_run(
    task,
    method: str,
    seed: int = 0,
    *,
    lr: float | None = None,
    pretrained: bool = True,
    lora_config: LoraConfig | None = None,
    d: int | None = None,
    projection: str = "fastfood",
    mode: str = "did",
    exclude: Iterable[str] = (),
    train_head: bool = False,
    head_lr: float | None = None,
    max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
    model_fn: Callable[[bool, int], nn.Module] | None = None,
) -> PreparedRun:
    """Build the model of one run of ``method`` on ``task``, with the right parameters trainable.

    The recipe of every method: ``set_seed(seed)``, ``task.build_model(pretrained,
    seed)``, then the method's own step (nothing, freeze the body, ``apply_lora`` or
    wrap in a :class:`~rankkit.subspace.SubspaceModel`). Batched training
    (:func:`rankkit.batched.fit_batched`) starts every run from exactly this model.

    Parameters
    ----------
    task : Task or str
    method : {"frozen", "full", "lora", "subspace"}
    seed : int
    lr : float, optional
        The run's learning rate; default :func:`method_lr`.
    pretrained : bool
        Start from the task's base weights (default) or a random initialisation.
    lora_config : LoraConfig
        Required for ``"lora"`` (and only there).
    d, projection, mode, max_dense_bytes
        ``"subspace"``: dimension ``d`` (required) and the subspace's kind; see
        :class:`~rankkit.subspace.SubspaceModel`. The projection's seed is ``seed``.
    exclude : iterable of str
        ``"full"`` and ``"subspace"``: parameters or modules kept frozen at their
        initial value (out of the subspace).
    train_head : bool
        ``"subspace"``: train the excluded modules directly, at the task's
        ``head_lr``, next to the subspace.
    head_lr : float, optional
        The rate of that head; default the ``"frozen"`` method's (:func:`method_lr`).
    model_fn : callable, optional
        ``model_fn(pretrained, seed)`` instead of ``task.build_model``.

    Returns
    -------
    PreparedRun
    """
    task = get_task(task) if isinstance(task, str) else task
    method = check_choice("method", method, METHODS)
    if (lora_config is not None) != (method == "lora"):
        raise ValueError(
            f"prepare_run: a LoraConfig goes with method='lora' (and only there); "
            f"got method={method!r} and lora_config={lora_config!r}."
        )
    if (d is not None) != (method == "subspace"):
        raise ValueError(
            f"prepare_run: the subspace dimension d goes with method='subspace' (and only "
            f"there); got method={method!r} and d={d!r}."
        )
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    set_seed(seed)
    model = (model_fn or _builder(task))(pretrained, seed)
    run = PreparedRun(model, method, seed, lr=method_lr(task, method, lr))
    if method == "frozen":
        heads = tuple(task.head_modules)
        for name, p in model.named_parameters():
            p.requires_grad_(any(within(name, h) for h in heads))
    elif method == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(not any(within(name, e) for e in exclude))
    elif method == "lora":
        # A model from ``model_fn`` need not be the task's own, so name its roles from itself.
        roles = getattr(task, "roles", None) if model_fn is None else roles_by_suffix(model)
        apply_lora(model, lora_config, roles=roles)
    else:
        run.model = SubspaceModel(
            model, d, projection=projection, mode=mode, exclude=exclude, seed=seed,
            max_dense_bytes=max_dense_bytes,
        )  # fmt: skip
        if train_head:
            for name, p in model.named_parameters():
                p.requires_grad_(any(within(name, e) for e in exclude))
            rate = method_lr(task, "frozen", head_lr)
            run.lr_overrides = {f"base.{e}": rate for e in exclude}
    return run


def _builder(task) -> Callable[[bool, int], nn.Module]:
    return lambda pretrained, seed: task.build_model(pretrained=pretrained, seed=seed)


def finetune(
    task,
    out: str | None = None,
    *,
    method: str = "full",
    task_options: Mapping[str, Any] | None = None,
    pretrained: bool = True,
    seed: int = 0,
    lr: float | None = None,
    **fit_kwargs: Any,
) -> tuple[TrainResult, dict[str, str]]:
    """Fine-tune a task's base model and (optionally) write the results to ``out``.

    Prepares a ``"full"`` run (every weight trains) or a ``"frozen"`` one (only
    ``task.head_modules``, at the task's ``head_lr`` unless ``lr`` is given) with
    :func:`prepare_run`, trains it with :func:`rankkit.train.fit`, and writes

    * ``base.safetensors`` -- the weights *before* training (pretrained body plus
      the freshly initialised head), so every key has a fine-tuned counterpart,
    * ``finetuned.safetensors`` -- the restored best weights,
    * ``metrics.json`` -- metrics, history, hyper-parameters and counts.

    ``python -m rankkit spectrum out/base.safetensors out/finetuned.safetensors``
    then measures the rank of ΔW.

    Returns
    -------
    (TrainResult, dict)
        The training result and ``{"base", "finetuned", "metrics"}`` paths (empty
        when ``out`` is None).
    """
    method = check_choice("finetune method", method, ("full", "frozen"))
    if not isinstance(task, Task):
        task = get_task(task, **(task_options or {}))
    run = prepare_run(task, method, seed, lr=lr, pretrained=pretrained)
    base_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    result = run.fit(task, **fit_kwargs)
    if out is None:
        return result, {}
    out = Path(out)
    meta = {"task": task.name, "method": method}
    paths = {
        "base": save_state_dict(base_state, out / "base.safetensors", metadata=meta),
        "finetuned": save_state_dict(run.model, out / "finetuned.safetensors", metadata=meta),
    }
    record = {
        **meta,
        "pretrained": pretrained,
        "command": " ".join(["python -m rankkit", *sys.argv[1:]])
        if Path(sys.argv[0]).name in ("__main__.py", "rankkit", "cli.py")
        else None,
        **result.to_dict(),
    }
    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(record, indent=2) + "\n")
    return result, {k: str(v) for k, v in paths.items()}
