r"""Train many LoRA runs at once: batched multi-adapter training on one frozen base.

A rank sweep trains K small, independent LoRA runs (different ranks, seeds,
alphas, target sets) on the *same* frozen pretrained model. Run one after another,
each run multiplies a batch of B examples by the base weights in many small
matrix products, and most of the time goes into Python overhead and idle
hardware. This module trains the K runs *in lockstep* in one model:

* the inputs of all runs are stacked along the batch dimension: rows
  ``[k*B, (k+1)*B)`` of a ``(K*B, ...)`` batch are run ``k``'s own batch, drawn in
  run ``k``'s own data order;
* every adapted ``nn.Linear`` becomes a :class:`MultiLoRALinear`: the frozen base
  is applied to all ``K*B`` rows in **one** large matrix product, and run ``k``'s
  update ``s_k B_k A_k`` only to its own rows, as a batched product
  (``torch.bmm`` over the run dimension)::

      h[k] = W x[k] + b + s_k * B_k (A_k x[k])          k = 0 .. K-1

  with ``A`` stacked to ``(K, r_max, in)`` and ``B`` to ``(K, out, r_max)``;
* every trained head (``modules_to_save``) becomes a :class:`MultiLinear`, one
  ``(out, in)`` weight per run, again applied by ``torch.bmm``;
* everything else in the model works sample by sample (embeddings, layer norms,
  attention within a sequence, activations), so it simply sees a larger batch.

Why this is *exactly* K independent runs (up to float rounding)
---------------------------------------------------------------
* **Loss.** The batched step minimises ``L = sum_k L_k``, the sum of each run's
  own mean loss over its own rows. Run ``k``'s parameters only touch run ``k``'s
  rows, so ``dL/dθ_k = dL_k/dθ_k``: each run gets exactly the gradient it would
  get alone. (Summing, not averaging, over runs is what keeps each gradient
  unscaled.)
* **Padded ranks.** Ranks are padded to the largest one with zeros: the extra
  rows of ``A_k`` and columns of ``B_k`` are 0. Their gradients are then 0 as well
  (``dL/dB_k = s_k g (A_k x)^T`` vanishes on the padded columns because the padded
  rows of ``A_k x`` are 0, and ``dL/dA_k = s_k B_k^T g x^T`` vanishes on the padded
  rows because the padded columns of ``B_k`` are 0), and AdamW leaves a zero
  parameter with a zero gradient at exactly 0. So the padding never becomes
  non-zero and contributes nothing -- no mask is needed. A run that does not adapt
  a layer has scaling ``s_k = 0`` and all-zero slices, so it is untouched the same
  way.
* **Optimiser.** AdamW is element-wise: the update of one number depends only on
  its own gradient history. One AdamW over the stacked tensors therefore equals K
  separate AdamWs. Weight decay follows :func:`rankkit.train.fit`'s rule on the
  *per-run* tensor: ``A``, ``B`` and head weights (matrices) decay, head biases
  (vectors, stored stacked as ``(K, out)``) do not.
* **Gradient clipping** is per run: run ``k``'s global norm is taken over its own
  slices only, and its gradients are scaled by
  ``min(1, max_norm / (norm_k + 1e-6))``, the formula of ``clip_grad_norm_``.
* **Schedule, data order, initialisation.** All runs of a batch share epochs,
  learning rate, batch size and schedule (one set of arguments), so one LR schedule
  serves all. Each run's initial ``A``, ``B`` and head come from the reference
  recipe of a single run (:func:`rankkit.methods.prepare_run`: ``set_seed(seed)``,
  ``task.build_model(seed=seed)``, :func:`rankkit.lora.apply_lora`); its data order
  from a generator seeded like
  ``fit``'s ``DataLoader``.
* **Random numbers.** A single run draws dropout masks from the global generator,
  which ``fit`` seeds with the run's seed -- and its validation passes draw from
  it too (a ``DataLoader`` seeds its iterator from it). On CPU each run here has
  its own generator seeded the same way; every random operation of the batched
  forward pass fills run ``k``'s rows from run ``k``'s generator
  (:class:`PerRunRandomness`), and run ``k``'s validations draw from it as well,
  so each generator is consumed exactly as in the standalone run.
* **Model selection.** After every epoch each run is scored on the validation
  split (``task.evaluate`` on its own standalone model; for a plain accuracy
  task, the same argmax accuracy computed for all runs in one batched pass) and
  keeps its own best epoch. Final metrics and saved adapters come from each run's
  standalone model, through exactly the code a single run uses.

So the saved adapters and metrics of a batched run match the same configuration
trained alone with the same seed; ``tests/test_batched.py`` checks this. What
remains is float rounding: a large matrix product may sum in a different order
than a small one.

When it is faster: batching removes per-step overhead (Python, small-kernel
launches), not arithmetic. On a GPU, where a single small run leaves the device
idle, that is most of the time; on a CPU it is for small models such as the
digits MLP (measured in ``benchmarks/README.md``), while a transformer step that is
already compute-bound gains nothing (:data:`CPU_SMALL_STEP_BYTES`).

Limits: models whose layers mix examples across the batch (batch norm) are
refused; trained heads must be ``nn.Linear``; on CUDA, dropout masks come from the
shared CUDA generator (every run still gets independent masks, but not the ones
its standalone run would draw -- bitwise equality is not expected under bf16
anyway).

Example
-------
>>> from rankkit.batched import fit_batched
>>> from rankkit.lora import LoraConfig
>>> from rankkit.tasks import get_task
>>> task = get_task("digits")
>>> configs = [LoraConfig(r=r, lora_alpha=r, target_modules="all-linear",
...                       modules_to_save=task.head_modules) for r in (1, 4, 16)]
>>> runs = fit_batched(task, configs, seeds=[0, 0, 0], epochs=2)  # doctest: +SKIP
>>> runs[1].result.metrics  # doctest: +SKIP
{'val_accuracy': ..., 'test_accuracy': ...}
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import default_collate

from rankkit.devices import resolve_device
from rankkit.lora import LoraConfig, LoRALinear, apply_lora
from rankkit.methods import prepare_run
from rankkit.stacked import MultiLinear, MultiLoRALinear, PerRunRandomness, StackedRuns
from rankkit.train import TrainResult, fit, train_runs
from rankkit.train.hparams import check_loop_options, resolve_hparams
from rankkit.utils import set_submodule

__all__ = [
    "BatchedRun",
    "MultiLinear",
    "MultiLoRALinear",
    "PerRunRandomness",
    "fit_batched",
    "max_batch_runs",
]

#: Largest number of runs trained together when the caller does not say (see
#: :func:`max_batch_runs`). On a CPU, batching only applies to small steps; 18 is the
#: default digits sweep's LoRA runs (6 ranks x 3 seeds), so it trains as one batch
#: (benchmarks/README.md measures batch sizes), and a killed sweep loses at most the
#: batch in flight, seconds of such runs. A GPU keeps gaining up to many more runs.
DEFAULT_MAX_RUNS = {"cpu": 18, "cuda": 64, "mps": 16}
#: Fraction of the free memory that a batch may plan to use.
MEMORY_FRACTION = 0.5
#: On a CPU, batching pays while a run's training step is small, so that Python and
#: per-operation overhead dominate it. A step that keeps more activations than this
#: for backward is compute-bound on a CPU: stacking runs does the same arithmetic on
#: larger tensors and is no faster (benchmarks/README.md: the digits MLP's step is far
#: below this and batches well, the topics transformer's far above and does not). Such
#: runs are trained one at a time on a CPU unless ``max_runs`` is given.
CPU_SMALL_STEP_BYTES = 8 * 2**20


# --------------------------------------------------------------------------- results


class BatchedRun(NamedTuple):
    """One run of :func:`fit_batched`.

    Attributes
    ----------
    model : nn.Module
        A standalone LoRA model of this run (``apply_lora`` layers, best weights
        restored), built like the run's reference recipe: ``save_adapter``,
        ``task.evaluate`` and everything else work on it as on a single run's model.
    result : TrainResult
        As :func:`rankkit.train.fit` returns it. ``wall_time_s`` is this run's
        share of the batch (batch wall time / number of runs); ``peak_memory_mb``
        is the batch's.
    """

    model: nn.Module
    result: TrainResult


# --------------------------------------------------------------------------- batch size


def _available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, else the system's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 4 * 2**30


def _activation_bytes(model: nn.Module, task, batch) -> int:
    """Bytes autograd keeps for the backward pass of one training step (weights excluded)."""
    seen: dict[tuple, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and t.untyped_storage().data_ptr() not in weights:
            key = (t.untyped_storage().data_ptr(), t.dtype)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.loss(model, batch)
    del loss
    return sum(seen.values())


def max_batch_runs(
    task,
    config: LoraConfig,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    max_runs: int | None = None,
    memory_bytes: int | None = None,
) -> int:
    """How many runs like ``config`` to train together, from the memory available.

    One run of the batch needs the activations of a training step on its
    ``batch_size`` examples (measured: the bytes autograd saves for backward in
    one step of a standalone model) plus, for its trained tensors, the weights,
    gradients, two AdamW moments and the best-epoch copy (5x), plus a standalone
    copy of the model for evaluation. The result is
    ``min(max_runs, MEMORY_FRACTION * free memory // bytes per run)``, at least 1.
    On a CPU, without ``max_runs``, runs whose step keeps more than
    :data:`CPU_SMALL_STEP_BYTES` of activations get 1: batching does not speed them up.

    Parameters
    ----------
    task : Task
    config : LoraConfig
        The most expensive configuration of the batch (largest rank, most targets).
    batch_size : int, optional
        Examples per run and step; default the task's.
    device : str
        Where the batch will train (``"auto"`` as in ``fit``).
    max_runs : int, optional
        Upper bound; default :data:`DEFAULT_MAX_RUNS` for the device type.
    memory_bytes : int, optional
        Free memory to plan with, instead of asking the device.
    """
    dev = resolve_device(device)
    hp = resolve_hparams(task, batch_size=batch_size)
    cap = max_runs if max_runs is not None else DEFAULT_MAX_RUNS.get(dev.type, 8)
    if cap < 1:
        raise ValueError(f"max_batch_runs: max_runs must be at least 1, got {cap}.")
    with torch.random.fork_rng(devices=[]):
        model = task.build_model(pretrained=True, seed=0)
        apply_lora(model, config, roles=getattr(task, "roles", None))
        train = task.splits()["train"]
        batch = default_collate([train[i] for i in range(min(len(train), hp["batch_size"]))])
        activations = _activation_bytes(model, task, batch)
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    per_run = activations + 5 * trained + whole
    if dev.type == "cpu" and max_runs is None and activations > CPU_SMALL_STEP_BYTES:
        return 1
    free = memory_bytes if memory_bytes is not None else _available_memory_bytes(dev)
    return max(1, min(cap, int(MEMORY_FRACTION * free) // max(1, per_run)))


# --------------------------------------------------------------------------- training


def fit_batched(
    task,
    configs: Sequence[LoraConfig],
    seeds: Sequence[int],
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    warmup: float | None = None,
    grad_clip: float | None = 1.0,
    device: str | torch.device = "auto",
    progress: bool = False,
    eval_every: int = 1,
    lr_overrides: Mapping[str, float] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> list[BatchedRun]:
    """Train K LoRA runs on the same task and frozen base simultaneously.

    Run ``k`` is the reference recipe of a single LoRA run::

        run = prepare_run(task, "lora", seeds[k], lora_config=configs[k])
        fit(run.model, task, epochs, lr, ..., seed=seeds[k])

    and its adapter weights and metrics match that recipe up to float rounding
    (see the module docstring for why). All runs share the training
    hyper-parameters, which mean exactly what they mean for
    :func:`rankkit.train.fit`.

    Parameters
    ----------
    task : Task
        A rankkit task (or anything with ``build_model``, ``splits``, ``loss``,
        ``evaluate``, ``metric_name``, ``roles``), whose model keeps the batch as
        the first dimension everywhere.
    configs : sequence of LoraConfig
        One per run: any ranks, alphas, ``use_rslora`` and target sets. Their
        ``modules_to_save`` (the trained head) must be the same ``nn.Linear``
        modules in every run, and ``init_lora_weights`` must leave the base
        weights alone (not ``"pissa"``).
    seeds : sequence of int
        One per run (repeats allowed).
    epochs, lr, batch_size, weight_decay, schedule, warmup, grad_clip, eval_every, lr_overrides
        As in :func:`rankkit.train.fit`, shared by all runs. The loop is
        :func:`rankkit.train.train_runs`, the one ``fit`` runs; one config is ``fit`` itself.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``... On CUDA the forward pass runs under bf16
        autocast when supported, like ``fit``.
    progress : bool
        Show a progress bar over the batch's steps.
    on_epoch : callable, optional
        ``on_epoch(epoch, epochs)`` after each epoch (a sweep's progress bar uses it).

    Returns
    -------
    list of BatchedRun
        ``(model, result)`` per run, in the order of ``configs``.

    Raises
    ------
    ValueError
        On mismatched ``configs`` / ``seeds``, runs that do not share one frozen
        base, a trained module that is not an ``nn.Linear``, different
        ``lora_dropout`` values, or a model with batch normalisation.
    """
    configs, seeds = list(configs), list(seeds)
    if not configs:
        raise ValueError("fit_batched: give at least one LoraConfig.")
    if len(configs) != len(seeds):
        raise ValueError(
            f"fit_batched: {len(configs)} configs but {len(seeds)} seeds; give one seed per run."
        )
    for config in configs:
        if not isinstance(config, LoraConfig):
            raise TypeError(
                f"fit_batched: configs must be LoraConfig, got {type(config).__name__}."
            )
    hparams = {
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
        "schedule": schedule, "warmup": warmup, "grad_clip": grad_clip, "device": device,
        "eval_every": eval_every, "lr_overrides": lr_overrides, "progress": progress,
        "on_epoch": on_epoch,
    }  # fmt: skip
    if len(configs) == 1:  # K = 1 is fit itself: nothing to stack
        run = prepare_run(task, "lora", seeds[0], lora_config=configs[0])
        return [BatchedRun(run.model, fit(run.model, task, seed=seeds[0], **hparams))]
    hp = resolve_hparams(
        task, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
        schedule=schedule, warmup=warmup,
    )  # fmt: skip
    check_loop_options(grad_clip, eval_every)

    start = time.perf_counter()
    dev = resolve_device(device)
    model, runs = _initial_runs(task, configs, seeds)  # runs share model's frozen weights
    layers, heads = _stack_adapters(model, runs)
    model.to(dev)
    for run in runs:
        _share_frozen(run, model, check=False)  # .to() keeps them shared; make sure
        run.to(dev)
    stacked = StackedRuns(task, model, runs, layers, heads, seeds, dev)
    results = train_runs(
        stacked, task, hp, seeds, dev, grad_clip=grad_clip, eval_every=eval_every,
        lr_overrides=lr_overrides, progress=progress,
        on_epoch=on_epoch, start=start,
    )  # fmt: skip
    for run in runs:  # give each returned model its own copy of the frozen base
        _unshare_frozen(run)
    return [BatchedRun(run, result) for run, result in zip(runs, results)]


# --------------------------------------------------------------------------- helpers


def _canonical(name: str) -> str:
    """``blocks.0.attn.q.base_layer.weight`` -> ``blocks.0.attn.q.weight``."""
    return name.replace(".base_layer.", ".")


def _frozen_tensors(model: nn.Module, saved: Sequence[str]) -> dict[str, torch.Tensor]:
    """Frozen parameters and buffers by canonical name, without the trained modules."""

    def in_saved(name: str) -> bool:
        return any(name.startswith(s + ".") for s in saved)

    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and not in_saved(name):
            out[_canonical(name)] = p
    for name, b in model.named_buffers():
        if not in_saved(name):
            out[_canonical(name)] = b
    return out


def _initial_runs(
    task, configs: Sequence[LoraConfig], seeds: Sequence[int]
) -> tuple[nn.Module, list[nn.Module]]:
    """The shared frozen base, and every run's model at initialisation sharing its weights.

    Each run's model is made by the reference recipe, checked to hold exactly the
    base's frozen weights, and then pointed at the base's tensors (so K runs cost
    one copy of the base).
    """
    saved = {tuple(c.modules_to_save or ()) for c in configs}
    if len(saved) > 1:
        raise ValueError(
            f"fit_batched: every run must train the same modules_to_save; got {sorted(saved)}."
        )
    dropouts = {c.lora_dropout for c in configs}
    if len(dropouts) > 1:
        raise ValueError(f"fit_batched: runs differ in lora_dropout {sorted(dropouts)}.")
    base = task.build_model(pretrained=True, seed=seeds[0]).requires_grad_(False)
    batch_norms = [
        n for n, m in base.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if batch_norms:
        raise ValueError(
            f"fit_batched: the model has batch normalisation ({batch_norms[:3]}), which mixes "
            "the runs' examples; train these runs one by one."
        )
    runs = []
    for k, (config, seed) in enumerate(zip(configs, seeds)):
        run = prepare_run(task, "lora", seed, lora_config=config).model
        saved_names = run.rankkit_lora_config.modules_to_save or []
        for name, p in run.named_parameters():
            owner = run.get_submodule(name.rpartition(".")[0])
            in_saved = any(name.startswith(s + ".") for s in saved_names)
            if p.requires_grad and not (isinstance(owner, LoRALinear) or in_saved):
                raise ValueError(
                    f"fit_batched: run {k} trains {name!r}, which is neither a LoRA adapter "
                    "nor in modules_to_save."
                )
        try:
            _share_frozen(run, base)
        except ValueError as err:
            raise ValueError(f"fit_batched: run {k} {err}") from None
        runs.append(run)
    return base, runs


def _stack_adapters(
    model: nn.Module, runs: Sequence[nn.Module]
) -> tuple[dict[str, MultiLoRALinear], dict[str, MultiLinear]]:
    """Replace, in ``model``, every adapted layer and trained head by its K-run version."""
    targets = [{n for n, m in r.named_modules() if isinstance(m, LoRALinear)} for r in runs]
    if runs[0].rankkit_lora_config.lora_dropout > 0 and any(t != targets[0] for t in targets):
        raise ValueError(
            "fit_batched: with lora_dropout > 0 every run must adapt the same modules "
            "(each run's dropout draws must match its own run)."
        )
    order = [n for n, _ in model.named_modules() if any(n in t for t in targets)]
    layers: dict[str, MultiLoRALinear] = {}
    for name in order:
        per_run = [run.get_submodule(name) if name in t else None for run, t in zip(runs, targets)]
        multi = MultiLoRALinear(
            model.get_submodule(name),
            ranks=[m.r if m is not None else 0 for m in per_run],
            scalings=[m.scaling if m is not None else 0.0 for m in per_run],
            lora_dropout=runs[0].rankkit_lora_config.lora_dropout,
        )
        with torch.no_grad():
            for k, m in enumerate(per_run):
                if m is not None:
                    multi.lora_A[k, : m.r].copy_(m.lora_A)
                    multi.lora_B[k, :, : m.r].copy_(m.lora_B)
        set_submodule(model, name, multi)
        layers[name] = multi
    heads: dict[str, MultiLinear] = {}
    for name in runs[0].rankkit_lora_config.modules_to_save or []:
        per_run = [run.get_submodule(name) for run in runs]
        if not all(type(m) is nn.Linear for m in per_run):
            kinds = sorted({type(m).__name__ for m in per_run})
            raise ValueError(
                f"fit_batched: modules_to_save {name!r} is a {', '.join(kinds)}; batched "
                "training stacks nn.Linear heads only."
            )
        heads[name] = MultiLinear(per_run)
        set_submodule(model, name, heads[name])
    if not layers:
        raise ValueError("fit_batched: no run adapts any layer.")
    return layers, heads


def _share_frozen(run: nn.Module, base: nn.Module, check: bool = True) -> None:
    """Point ``run``'s frozen weights at ``base``'s tensors of the same (canonical) name.

    With ``check``, first make sure they are equal: runs can only share a base they
    all start from.
    """
    saved = list(run.rankkit_lora_config.modules_to_save or [])
    if check:
        mine, theirs = _frozen_tensors(run, saved), _frozen_tensors(base, saved)
        differ = sorted(set(mine) ^ set(theirs)) or [
            n for n in theirs if not torch.equal(mine[n], theirs[n])
        ]
        if differ:
            raise ValueError(
                f"does not share the frozen base of the others (differs in {differ[:3]}). "
                "Runs can only be batched on one frozen base: not with "
                "init_lora_weights='pissa', nor with a frozen head that each seed "
                "initialises differently."
            )
    shared = {_canonical(n): p for n, p in base.named_parameters() if not p.requires_grad}
    for name, p in list(run.named_parameters()):
        if p.requires_grad or any(name.startswith(s + ".") for s in saved):
            continue
        owner, _, attr = name.rpartition(".")
        setattr(run.get_submodule(owner), attr, shared[_canonical(name)])


def _unshare_frozen(run: nn.Module) -> None:
    """Give ``run`` private copies of its frozen parameters (safe to merge or modify)."""
    for name, p in list(run.named_parameters()):
        if not p.requires_grad:
            owner, _, attr = name.rpartition(".")
            setattr(run.get_submodule(owner), attr, nn.Parameter(p.detach().clone(), False))
