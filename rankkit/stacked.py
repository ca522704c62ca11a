r"""K runs stacked in one model: their layers, random numbers, and the loop's view of them.

:func:`rankkit.batched.fit_batched` trains K LoRA runs in lockstep on one frozen
base. Every adapted ``nn.Linear`` becomes a :class:`MultiLoRALinear` (one base
product for all runs' rows, plus each run's own ``s_k B_k A_k`` on its rows), every
trained head a :class:`MultiLinear`, and :class:`PerRunRandomness` fills each run's
rows of a random operation (dropout) from that run's own generator.
:class:`StackedRuns` is what the one training loop (:func:`rankkit.train.train_runs`)
trains: each run's loss, gradient clipping, validation and best weights. Why this
equals K separate runs is explained in :mod:`rankkit.batched`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from rankkit.devices import autocast_for
from rankkit.lora import LoRALinear
from rankkit.tasks import Task
from rankkit.utils import count_parameters

__all__ = ["MultiLinear", "MultiLoRALinear", "PerRunRandomness", "StackedRuns"]


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
        K, lead = self.num_runs, _leading_shape(x, self.num_runs, "MultiLoRALinear")
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
        K, lead = self.num_runs, _leading_shape(x, self.num_runs, "MultiLinear")
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


def _leading_shape(x: torch.Tensor, K: int, layer: str) -> torch.Size:
    """``x.shape[:-1]``, after checking that the rows split into the K runs' blocks."""
    lead = x.shape[:-1]
    if lead[0] % K:
        raise ValueError(f"{layer}: the batch of {lead[0]} rows does not split into {K} runs.")
    return lead


# --------------------------------------------------------------------------- the runs


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
