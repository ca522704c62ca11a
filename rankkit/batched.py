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
  recipe of a single run (``set_seed(seed)``, ``task.build_model(seed=seed)``,
  :func:`rankkit.lora.apply_lora`); its data order from a generator seeded like
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
digits MLP (about 3x in ``benchmarks/README.md``), while a transformer step that is
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

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset, default_collate

from rankkit.devices import autocast_for, resolve_device
from rankkit.lora import LoraConfig, LoRALinear, apply_lora
from rankkit.methods import prepare_run
from rankkit.tasks import Task
from rankkit.train import TrainResult, fit, train_runs
from rankkit.train.hparams import check_loop_options, resolve_hparams
from rankkit.utils import count_parameters, set_submodule

__all__ = [
    "BatchedRun",
    "MultiLinear",
    "MultiLoRALinear",
    "PerRunRandomness",
    "fit_batched",
    "max_batch_runs",
]

#: Largest number of runs trained together when the caller does not say (see
#: :func:`max_batch_runs`). On a CPU, batching only applies to small steps, and the
#: default digits sweep ran 3.07x faster than one run at a time in groups of 6 and
#: 3.47x as one batch of 18 (benchmarks/README.md); a killed sweep loses at most the
#: batch in flight, a few seconds of such runs. A GPU keeps gaining up to many more runs.
DEFAULT_MAX_RUNS = {"cpu": 18, "cuda": 64, "mps": 16}
#: Fraction of the free memory that a batch may plan to use.
MEMORY_FRACTION = 0.5
#: On a CPU, batching pays while a run's training step is small, so that Python and
#: per-operation overhead dominate it. A step that keeps more activations than this
#: for backward is compute-bound on a CPU: stacking runs does the same arithmetic on
#: larger tensors and is no faster (measured in benchmarks/README.md: digits, 0.16 MiB
#: per run and step, about 3x faster batched; topics, 22 MiB, 0.9-1.1x). Such runs are
#: trained one at a time on a CPU unless ``max_runs`` is given.
CPU_SMALL_STEP_BYTES = 8 * 2**20


# --------------------------------------------------------------------------- layers


class MultiLoRALinear(nn.Module):
    r"""One frozen ``nn.Linear`` shared by K runs, each with its own LoRA update.

    The input holds the K runs' rows one after another along the first dimension
    (run ``k``: rows ``[k*n, (k+1)*n)``). The output is

    .. math::  h[k] = W x[k] + b + s_k B_k (A_k x[k])

    computed as one matrix product with ``W`` for all rows plus two batched
    products over the run dimension.

    Parameters
    ----------
    base_layer : nn.Linear
        The pretrained layer; frozen.
    ranks : sequence of int
        Rank of each run's adapter; 0 for a run that does not adapt this layer.
    scalings : sequence of float
        Each run's ``s_k`` (``alpha / r`` or ``alpha / sqrt(r)``; 0 when not adapted).
    lora_dropout : float
        Dropout on the adapter branch's input (the same for every run).

    Attributes
    ----------
    lora_A : nn.Parameter
        Shape ``(K, r_max, in)``; rows ``r_k:`` of run ``k`` are zero padding.
    lora_B : nn.Parameter
        Shape ``(K, out, r_max)``; columns ``r_k:`` of run ``k`` are zero padding.
    scaling : torch.Tensor
        Buffer of shape ``(K,)``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        ranks: Sequence[int],
        scalings: Sequence[float],
        lora_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(ranks) != len(scalings) or not ranks:
            raise ValueError("MultiLoRALinear: give one rank and one scaling per run.")
        out_features, in_features = base_layer.weight.shape
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.ranks = [int(r) for r in ranks]
        self.num_runs = len(self.ranks)
        r_max = max(max(self.ranks), 1)
        factory = {"dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        self.lora_A = nn.Parameter(torch.zeros(self.num_runs, r_max, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.num_runs, out_features, r_max, **factory))
        self.register_buffer("scaling", torch.tensor([float(s) for s in scalings], **factory))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.num_runs
        lead = x.shape[:-1]
        if lead[0] % K:
            raise ValueError(
                f"MultiLoRALinear: the batch of {lead[0]} rows does not split into {K} runs."
            )
        # Same order as LoRALinear.forward: adapter branch first (its dropout draws), then W x.
        x_runs = self.lora_dropout(x).reshape(K, -1, self.in_features)  # (K, n, in)
        ax = torch.bmm(x_runs, self.lora_A.mT)  # (K, n, r_max): A_k x
        ax = ax * self.scaling.view(K, 1, 1).to(ax.dtype)  # s_k A_k x (the small tensor)
        h = self.base_layer(x)  # ONE matrix product with W for all K runs
        # h[k] += B_k (s_k A_k x), the addition fused into the batched product
        h = torch.baddbmm(h.reshape(K, -1, self.out_features), ax, self.lora_B.mT)
        return h.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"runs={self.num_runs}, ranks={self.ranks}"


class MultiLinear(nn.Module):
    """K independent ``nn.Linear`` layers of the same shape, one per run (a trained head).

    Run ``k``'s rows (``[k*n, (k+1)*n)`` along the first dimension) go through run
    ``k``'s weight ``(out, in)`` and bias, as one batched product.

    Parameters
    ----------
    layers : sequence of nn.Linear
        Each run's layer; their values are copied.
    """

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        shapes = {tuple(layer.weight.shape) for layer in layers}
        biases = {layer.bias is not None for layer in layers}
        if len(shapes) != 1 or len(biases) != 1:
            raise ValueError("MultiLinear: every run's layer must have the same shape and bias.")
        self.num_runs = len(layers)
        self.out_features, self.in_features = shapes.pop()
        with torch.no_grad():
            self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
            self.bias = (
                nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))
                if biases.pop()
                else None
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.num_runs
        lead = x.shape[:-1]
        if lead[0] % K:
            raise ValueError(
                f"MultiLinear: the batch of {lead[0]} rows does not split into {K} runs."
            )
        x_runs = x.reshape(K, -1, self.in_features)
        if self.bias is None:
            y = torch.bmm(x_runs, self.weight.mT)
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), x_runs, self.weight.mT)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"runs={self.num_runs}, in={self.in_features}, out={self.out_features}"


# --------------------------------------------------------------------------- randomness


class PerRunRandomness(TorchDispatchMode):
    """Give every run its own random numbers inside a batched forward pass.

    A run trained alone draws its dropout masks from the global generator, which
    :func:`rankkit.train.fit` seeds with the run's seed. In a batched forward one
    ``dropout`` call covers all K runs' rows, so with the global generator run
    ``k`` would see different masks than alone. Under this mode every random
    operation (PyTorch tags them ``nondeterministic_seeded``) is split along the
    first dimension into the K runs' blocks, and block ``k`` is filled from
    ``generators[k]``. Each run's generator then advances exactly as the global
    one does in a standalone run: same operations, same shapes, same order.

    Parameters
    ----------
    generators : sequence of torch.Generator
        One per run, e.g. ``torch.Generator().manual_seed(seed)``.
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.generators = list(generators)
        self.draws = 0  # random operations split so far

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        names = [a.name for a in func._schema.arguments]
        K = len(self.generators)
        target = args[0] if args else None
        if "generator" not in names or not isinstance(target, torch.Tensor):
            raise NotImplementedError(
                f"batched training: the forward pass calls the random operation {func}, which "
                "cannot be given one generator per run. Train these runs one by one "
                "(python -m rankkit sweep --no-batch)."
            )
        if target.ndim == 0 or target.shape[0] % K:
            raise ValueError(
                f"batched training: a random operation ({func}) on a tensor of shape "
                f"{tuple(target.shape)}, whose first dimension is not the batch of {K} runs."
            )
        self.draws += 1
        outputs = [
            func(block, *args[1:], **{**kwargs, "generator": gen})
            for block, gen in zip(target.chunk(K), self.generators)
        ]
        if func._schema.is_mutable:  # in place (bernoulli_, uniform_...): the blocks are views
            return target
        return torch.cat(outputs)


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

        set_seed(seeds[k])
        model = task.build_model(pretrained=True, seed=seeds[k])
        apply_lora(model, configs[k], roles=task.roles)
        fit(model, task, epochs, lr, ..., seed=seeds[k])

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
        lr_overrides=lr_overrides, fused=dev.type in ("cpu", "cuda"), progress=progress,
        on_epoch=on_epoch, start=start,
    )  # fmt: skip
    for run in runs:  # give each returned model its own copy of the frozen base
        _unshare_frozen(run)
    return [BatchedRun(run, result) for run, result in zip(runs, results)]


class StackedRuns:
    """:class:`rankkit.train.Runs` for K LoRA runs stacked into one model (K > 1).

    ``model`` holds the shared frozen base with every adapted layer replaced by a
    :class:`MultiLoRALinear` and every trained head by a :class:`MultiLinear`;
    ``runs[k]`` is run ``k``'s standalone model (the reference recipe's), sharing
    the base's frozen tensors, into which its slices are copied for evaluation.
    """

    run_dims = 1

    def __init__(
        self,
        task,
        model: nn.Module,
        runs: list[nn.Module],
        layers: dict[str, MultiLoRALinear],
        heads: dict[str, MultiLinear],
        seeds: Sequence[int],
        device: torch.device,
    ) -> None:
        self.task, self.model, self.runs, self.device = task, model, runs, device
        self.layers, self.heads = layers, heads
        self.num_runs = K = len(runs)
        self.desc = f"{getattr(task, 'name', 'fit')} x{K} runs"
        self.stacked = [p for p in model.parameters() if p.requires_grad]
        self.best: list[torch.Tensor] = []
        # Per-run random numbers (CPU). fit seeds the global generator with the run's
        # seed; then its validation (task.evaluate) and its dropout masks draw from it
        # in turn. Here each run has a generator seeded the same way, which its dropout
        # masks (PerRunRandomness) and its validations (_run_rng) draw from in the same
        # order. On CUDA, dropout uses the shared CUDA generator instead.
        self.generators = (
            [torch.Generator().manual_seed(s) for s in seeds] if device.type == "cpu" else None
        )
        self.rng_mode = PerRunRandomness(self.generators) if self.generators else None
        self.fast_eval = _is_plain_accuracy(task)

    def losses(self, batch) -> torch.Tensor:
        inputs, targets = batch
        with self.rng_mode or contextlib.nullcontext():
            outputs = self.model(inputs)
        if self.rng_mode is not None and self.rng_mode.draws == 0:
            self.rng_mode = None  # the forward pass draws nothing: no need to split
        # Each run's own mean loss on its own rows; their sum has, for every run's
        # parameters, exactly that run's gradient.
        return _per_run_losses(self.task, outputs, inputs, targets, self.num_runs)

    def clip(self, max_norm: float) -> None:
        _clip_per_run(self.stacked, self.num_runs, max_norm)

    def validate(self) -> list[float]:
        task, K, dev = self.task, self.num_runs, self.device
        if self.fast_eval:
            with autocast_for(dev):
                scores = _batched_accuracy(task, self.model, "val", K, dev)
            if self.generators is not None:
                for k in range(K):  # what Task.evaluate draws: its DataLoader iterator's seed
                    with _run_rng(self.generators, k):
                        iter(DataLoader(task.splits()["val"], batch_size=256))
            return scores
        scores = []
        for k, run in enumerate(self.runs):
            _copy_into(run, k, self.layers, self.heads)
            with autocast_for(dev), _run_rng(self.generators, k):
                scores.append(float(task.evaluate(run, "val", device=dev)))
        return scores

    @torch.no_grad()
    def keep(self, runs: list[int]) -> None:
        if not self.best:
            self.best = [p.detach().clone() for p in self.stacked]
            return
        index = torch.tensor(runs, device=self.device)
        for best, p in zip(self.best, self.stacked):
            best[index] = p.detach()[index]

    @torch.no_grad()
    def restore(self) -> None:
        for p, best in zip(self.stacked, self.best):
            p.copy_(best)

    def final_metrics(self, best: list[float]) -> list[dict[str, float]]:
        """Every run's metrics on its own standalone model, through the single-run code."""
        task, dev, metrics = self.task, self.device, []
        for k, run in enumerate(self.runs):
            _copy_into(run, k, self.layers, self.heads)
            with autocast_for(dev):
                metrics.append(
                    {
                        f"val_{task.metric_name}": float(task.evaluate(run, "val", device=dev)),
                        f"test_{task.metric_name}": float(task.evaluate(run, "test", device=dev)),
                    }
                )
            run.train()
        return metrics

    def parameter_counts(self, k: int) -> tuple[int, int]:
        counts = count_parameters(self.runs[k])
        return counts.trainable, counts.total


# --------------------------------------------------------------------------- helpers


class _Outputs(nn.Module):
    """A stand-in "model" that returns already computed outputs, for ``task.loss``."""

    def __init__(self, outputs: torch.Tensor) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, _inputs) -> torch.Tensor:
        return self.outputs


def _per_run_losses(task, outputs, inputs, targets, K: int) -> torch.Tensor:
    """``(K,)``: each run's ``task.loss`` on its own block of rows."""
    if _is_base_method(task, "loss"):  # mean cross-entropy: one call for all runs
        per_row = F.cross_entropy(outputs, targets, reduction="none")
        return per_row.reshape(K, -1).mean(dim=1)
    return torch.stack(
        [
            task.loss(_Outputs(out), (x, y))
            for out, x, y in zip(outputs.chunk(K), inputs.chunk(K), targets.chunk(K))
        ]
    )


def _is_base_method(task, name: str) -> bool:
    """Whether ``task.<name>`` is :class:`rankkit.tasks.Task`'s own (not overridden)."""
    return isinstance(task, Task) and getattr(type(task), name) is getattr(Task, name)


def _is_plain_accuracy(task) -> bool:
    """Whether validation is Task.evaluate's argmax accuracy on an ``(inputs, labels)`` split."""
    val = task.splits()["val"]
    return (
        _is_base_method(task, "evaluate")
        and isinstance(val, TensorDataset)
        and len(val.tensors) == 2
    )


@torch.no_grad()
def _batched_accuracy(
    task, model: nn.Module, split: str, K: int, device, rows: int = 1024
) -> list[float]:
    """:meth:`Task.evaluate` (argmax accuracy) of all K runs in one pass over ``split``.

    Each chunk of examples is repeated K times, so run ``k`` sees all of them in its
    block of rows; about ``rows`` rows go through the batched model at a time.
    """
    inputs, labels = task.splits()[split].tensors
    chunk = max(1, rows // K)
    was_training = model.training
    model.eval()
    correct = torch.zeros(K, dtype=torch.long)
    for start in range(0, len(labels), chunk):
        x, y = inputs[start : start + chunk], labels[start : start + chunk]
        x = x.to(device).repeat(K, *([1] * (x.ndim - 1)))
        predictions = model(x).argmax(-1).reshape(K, len(y)).cpu()
        correct += (predictions == y).sum(dim=1)
    model.train(was_training)
    return [c / len(labels) for c in correct.tolist()]


@contextlib.contextmanager
def _run_rng(generators: Sequence[torch.Generator] | None, k: int):
    """Make run ``k``'s generator the global CPU generator for the duration (if any)."""
    if generators is None:
        yield
        return
    saved = torch.get_rng_state()
    torch.set_rng_state(generators[k].get_state())
    try:
        yield
    finally:
        generators[k].set_state(torch.get_rng_state())
        torch.set_rng_state(saved)


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


@torch.no_grad()
def _copy_into(
    run: nn.Module,
    k: int,
    layers: dict[str, MultiLoRALinear],
    heads: dict[str, MultiLinear],
) -> None:
    """Copy run ``k``'s slices of the stacked tensors into its standalone model."""
    for name, multi in layers.items():
        layer = run.get_submodule(name)
        if isinstance(layer, LoRALinear):
            layer.lora_A.copy_(multi.lora_A[k, : layer.r])
            layer.lora_B.copy_(multi.lora_B[k, :, : layer.r])
    for name, multi in heads.items():
        head = run.get_submodule(name)
        head.weight.copy_(multi.weight[k])
        if head.bias is not None:
            head.bias.copy_(multi.bias[k])


@torch.no_grad()
def _clip_per_run(params: Sequence[torch.Tensor], K: int, max_norm: float) -> None:
    """``clip_grad_norm_`` for each run on its own slices: norm_k over run k's gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(K, -1), dim=1) for g in grads])
    total = torch.linalg.vector_norm(norms, dim=0)  # (K,) one global norm per run
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(K, *([1] * (g.ndim - 1))).to(g.dtype))
