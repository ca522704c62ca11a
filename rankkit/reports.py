r"""ΔW of two checkpoints, layer by layer: pairing, streaming, and the rank report.

Fine-tuning moves each weight matrix from :math:`W_0` to :math:`W = W_0 + \Delta W`.
This module turns two checkpoints (or a LoRA adapter, :math:`\Delta W = s\,BA`) into
a per-layer report of how low-rank each :math:`\Delta W` is, with the measures of
:mod:`rankkit.spectra` and a Gaussian matrix of the same shape as the baseline.

It works in two steps, so that a model larger than memory can be analysed:

1. :func:`plan_updates` describes every :math:`\Delta W` without reading a weight:
   the checkpoints' headers are paired by name (:func:`rankkit.checkpoints.match_checkpoints`)
   and each pair becomes a :class:`LayerUpdate` that reads its tensors when asked;
2. :func:`rank_report` walks the plan one layer at a time: read, upcast, analyse, drop
   (in worker processes with ``jobs > 1``).

An adapter's spectrum comes from its factors (:func:`rankkit.spectra.lowrank_singular_values`),
never from the formed :math:`s\,BA`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from rankkit.adapters import LoraAdapter, is_adapter, open_adapter
from rankkit.checkpoints import (
    SKIP_REASONS,
    Checkpoint,
    CheckpointError,
    StateSource,
    TensorInfo,
    compile_layers,
    match_checkpoints,
    open_checkpoint,
    short_list,
)
from rankkit.devices import resolve_device
from rankkit.spectra import (
    REPORT_ENERGY_THRESHOLDS,
    all_effective_ranks,
    lowrank_amplification_factor,
    lowrank_singular_values,
    random_baseline,
    singular_values,
)

# --------------------------------------------------------------------------- ΔW of two models


class DeltaWeights(dict):
    """``{name: ΔW}`` for every weight matrix, plus what was skipped and why.

    Attributes
    ----------
    skipped : dict of str to str
        Tensors that were not compared (1-D, buffers, only on one side, filtered
        out...) and why; see :data:`rankkit.checkpoints.SKIP_REASONS`.
    """

    def __init__(self, *args: Any, skipped: Mapping[str, str] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.skipped: dict[str, str] = dict(skipped or {})


@dataclasses.dataclass
class LayerUpdate:
    """One ΔW to analyse, described before anything is read.

    Exactly one of ``delta`` (the dense update) and ``factors`` (``(B, A, s)`` with
    ``ΔW = s·B@A``) is set; each is a function that reads the tensors when called,
    so a report holds one layer in memory at a time.
    """

    name: str
    shape: tuple[int, ...]
    delta: Callable[[], torch.Tensor] | None = None
    factors: Callable[[], tuple[torch.Tensor, torch.Tensor, float]] | None = None
    weight: Callable[[], torch.Tensor] | None = None  # the fine-tuned W
    pretrained: Callable[[], torch.Tensor] | None = None  # W₀, for the amplification factor
    rank: int | None = None  # the adapter's r
    eps: float = float(np.finfo(np.float32).eps)  # of the dtype the weights were stored in

    def formed_delta(self) -> torch.Tensor:
        if self.delta is not None:
            return self.delta()
        B, A, s = self.factors()
        return s * (B @ A)


@dataclasses.dataclass
class UpdatePlan:
    """The updates of a comparison, in order, and what was left out and why."""

    layers: list[LayerUpdate]
    skipped: dict[str, str]
    description: str = ""


def _check_finite(name: str, which: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{which} parameter {name!r} contains NaN or Inf values; the checkpoint is "
            "corrupt or the run diverged. Fix or exclude it (layers=REGEX) and retry."
        )


def _upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float64 if every input is float64, float32 otherwise (bf16/fp16 upcast)."""
    dtype = torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tuple(t.to(dtype) for t in tensors)


def plan_updates(
    base: StateSource | None,
    finetuned: StateSource | None,
    layers: str | None = None,
) -> UpdatePlan:
    """Describe every ΔW of a comparison without reading any weight.

    Parameters
    ----------
    base : nn.Module, state dict, path or None
        The pretrained weights: anything :func:`rankkit.checkpoints.open_checkpoint`
        reads (a file, a sharded index, a model folder...). ``None`` with an adapter.
    finetuned : nn.Module, state dict, path
        The fine-tuned weights, or a PEFT LoRA adapter folder (then ΔW = s·B·A).
    layers : str, optional
        Regular expression (``re.search``) on the layer names.
    """
    if is_adapter(finetuned):
        return _plan_adapter(open_adapter(finetuned), base, layers)
    if finetuned is None:
        raise TypeError("give the fine-tuned weights (or a LoRA adapter folder) to compare.")
    base_ckpt = open_checkpoint(base, name="base")
    ft_ckpt = open_checkpoint(finetuned, name="finetuned")
    matching = match_checkpoints(base_ckpt, ft_ckpt, layers)
    updates = []
    for pair in matching.pairs:
        info = ft_ckpt.info[pair.finetuned_key]

        def delta(pair=pair) -> torch.Tensor:
            b, f = base_ckpt[pair.base_key], ft_ckpt[pair.finetuned_key]
            _check_finite(pair.name, "base", b)
            _check_finite(pair.name, "finetuned", f)
            b, f = _upcast(b, f)
            return f - b

        updates.append(
            LayerUpdate(
                pair.name, pair.shape, delta=delta,
                weight=lambda pair=pair: ft_ckpt[pair.finetuned_key],
                eps=info.eps,
            )
        )  # fmt: skip
    removed = [
        f"{prefix!r} from {side}"
        for prefix, side in (
            (matching.base_prefix, "base"),
            (matching.finetuned_prefix, "finetuned"),
        )
        if prefix
    ]
    prefixes = f"; names paired after removing {' and '.join(removed)}" if removed else ""
    return UpdatePlan(
        updates,
        matching.skipped,
        f"base: {base_ckpt.description}, finetuned: {ft_ckpt.description}{prefixes}",
    )


def _plan_adapter(adapter: LoraAdapter, base: StateSource | None, layers: str | None) -> UpdatePlan:
    """ΔW = s·B·A of every adapted module, named like the weight it updates."""
    names = {f"{module}.weight": m for module, m in adapter.modules.items()}
    pattern = compile_layers(layers)
    skipped = dict(adapter.skipped)
    base_ckpt = open_checkpoint(base, name="base") if base is not None else None
    base_keys: dict[str, str] = {}
    if base_ckpt is not None:
        view = Checkpoint(
            {n: TensorInfo(m.shape, "float32", str(adapter.directory)) for n, m in names.items()},
            read=lambda n: torch.empty(0),
            description="LoRA adapter",
            label="adapter",
        )
        matching = match_checkpoints(base_ckpt, view, require_pairs=False)
        base_keys = {p.finetuned_key: p.base_key for p in matching.pairs}
        misfit = {
            n: why for n, why in matching.skipped.items() if why.startswith(SKIP_REASONS["shape"])
        }
        if misfit or not base_keys:
            name, why = next(iter(misfit.items())) if misfit else ("", "no module name matches")
            raise CheckpointError(
                f"adapter {str(adapter.directory)!r} does not fit this base: {name} {why} "
                f"(base -> adapter; {len(misfit)} module(s) in all). Pass the base model the "
                "adapter was trained on."
            )
        for n, why in matching.skipped.items():
            if why == SKIP_REASONS["only_base"]:
                skipped[n] = "not adapted"
        for n in names:
            if n not in base_keys:
                skipped[n] = "adapted, but not in base"
    updates = []
    for name, m in names.items():
        if pattern is not None and not pattern.search(name):
            skipped[name] = SKIP_REASONS["filtered"]
            continue
        if base_ckpt is not None and name not in base_keys:
            continue
        update = LayerUpdate(name, m.shape, factors=lambda m=m: adapter.factors(m.module), rank=m.r)
        if base_ckpt is not None:
            key = base_keys[name]
            update.pretrained = lambda key=key: base_ckpt[key]
            update.weight = lambda key=key, update=update: (
                _upcast(base_ckpt[key])[0] + (update.formed_delta())
            )
            update.eps = base_ckpt.info[key].eps
        updates.append(update)
    if not updates:
        raise ValueError(
            f"layers={layers!r} matches no adapted module; candidates are: "
            f"{short_list(list(names))}."
            if layers
            else f"adapter {str(adapter.directory)!r}: no adapted module of it is in the base."
        )
    where = f"{len(adapter.modules)} LoRA modules in {str(adapter.directory)!r}"
    if base_ckpt is not None:
        where += f", base: {base_ckpt.description}"
    return UpdatePlan(updates, skipped, where)


def delta_weights(
    base: StateSource | None, finetuned: StateSource | None = None, layers: str | None = None
) -> DeltaWeights:
    """ΔW = W_finetuned − W_base for every weight matrix two models share.

    Parameters
    ----------
    base, finetuned : nn.Module, state dict, or path
        The pretrained and the fine-tuned weights: modules, state dicts, ``.safetensors``
        or ``.pt`` files, sharded indexes or model folders (read safely, see
        :func:`rankkit.checkpoints.open_checkpoint`). Names are matched after removing a
        wrapper prefix one side has (``bert.``, ``model.``...). ``finetuned`` may be a
        PEFT LoRA adapter folder: ΔW is then its ``s·B·A``, and ``base`` may be ``None``.
    layers : str, optional
        Regular expression; only names it matches (``re.search``) are kept.

    Returns
    -------
    DeltaWeights
        A dict ``{name: ΔW}`` of float32 tensors (float64 if both inputs are float64).
        Everything not compared (1-D parameters, buffers, tensors on one side only,
        changed shapes) is listed in ``.skipped`` with the reason.

    Raises
    ------
    CheckpointError
        If the checkpoints share no weight matrix (the message shows names of both).
    ValueError
        If a compared matrix has NaN/Inf values, or ``layers`` selects nothing.

    Notes
    -----
    This holds every ΔW in memory; :func:`rank_report` walks one layer at a time.
    """
    if finetuned is None and is_adapter(base):
        base, finetuned = None, base
    plan = plan_updates(base, finetuned, layers)
    return DeltaWeights({u.name: u.formed_delta() for u in plan.layers}, skipped=plan.skipped)


# --------------------------------------------------------------------------- rank report


def rank_report(
    base: StateSource | None,
    finetuned: StateSource | None = None,
    layers: str | None = None,
    *,
    seed: int = 0,
    thresholds: Iterable[float] = REPORT_ENERGY_THRESHOLDS,
    include_weights: bool = True,
    device: str | torch.device | None = "auto",
    jobs: int = 1,
    progress: bool = False,
) -> pd.DataFrame:
    """Per-layer spectral report of ΔW = W_finetuned − W_base against a random baseline.

    The checkpoints are read one layer at a time (ΔW and W of a layer are read,
    analysed and dropped before the next), so memory does not grow with the number
    of layers and models larger than memory can be analysed.

    Parameters
    ----------
    base : nn.Module, state dict, path, or None
        The pretrained weights: a module, a state dict, a ``.safetensors`` / ``.pt`` /
        ``.bin`` file, a sharded ``*.index.json`` or a Hugging Face model folder.
    finetuned : same kinds, or a PEFT LoRA adapter folder
        The fine-tuned weights. Names are paired after removing a wrapper prefix that
        one side has (``bert.``, ``model.``...); a new head, a dropped buffer or a
        resized matrix is listed in ``df.attrs["skipped"]`` rather than failing. With an
        adapter, ΔW = s·B·A and its spectrum comes from the factors
        (:func:`lowrank_singular_values`); ``rank_report(adapter)`` analyses an adapter
        alone, and with a base the report adds ``W_*`` columns for W₀ + ΔW and the LoRA
        paper's ``amplification`` factor at the adapter's rank.
    layers : str, optional
        Regular expression selecting layer names.
    seed : int
        Seed of the random baseline draws (one per distinct shape).
    thresholds : iterable of float
        Energy fractions reported as ``dW_energy50`` etc.
    include_weights : bool
        Also report the effective ranks of the fine-tuned W itself (``W_*`` columns).
    device : str or torch.device
        Where to run the SVDs; ``"auto"`` uses CUDA when available.
    jobs : int
        Analyse layers in this many worker processes (sources must be paths).
    progress : bool
        Show a progress bar over layers.

    Returns
    -------
    pandas.DataFrame
        One row per weight matrix: ``name``, ``shape``, ``rows``, ``cols``, ``norm_W``,
        ``norm_dW``, ``rel_change`` (= ``norm_dW / norm_W``), ``dW_<method>`` for every
        method in :data:`EFFECTIVE_RANK_METHODS`, ``dW_energy<t>``, the same ``W_<...>``
        columns for the fine-tuned weight, and ``rand_<...>`` for a Gaussian matrix of the
        same shape; for adapters also ``lora_r``. ``df.attrs["skipped"]`` lists tensors
        not analysed and why; ``df.attrs["source"]`` says what was read.

    Examples
    --------
    >>> import rankkit
    >>> base, tuned = rankkit.spectra.demo_pair()
    >>> report = rankkit.rank_report(base, tuned)
    >>> report[["name", "dW_optimal", "rand_optimal"]]  # doctest: +SKIP
    """
    if finetuned is None and is_adapter(base):
        base, finetuned = None, base
    thresholds = tuple(thresholds)
    options = dict(seed=seed, thresholds=thresholds, include_weights=include_weights,
                   device=str(resolve_device(device)))  # fmt: skip
    jobs = _check_jobs(jobs, base, finetuned)
    plan = plan_updates(base, finetuned, layers)
    if jobs == 1:
        rows = [_update_row(u, **options) for u in _progress(plan.layers, progress)]
    else:
        rows = _rows_in_processes(base, finetuned, layers, len(plan.layers), jobs, options,
                                  progress)  # fmt: skip
    return _report_frame(rows, plan)


def delta_report(
    deltas: Mapping[str, Any] | StateSource,
    weights: Mapping[str, Any] | StateSource | None = None,
    *,
    seed: int = 0,
    thresholds: Iterable[float] = REPORT_ENERGY_THRESHOLDS,
    include_weights: bool = True,
    device: str | torch.device | None = "auto",
) -> pd.DataFrame:
    """:func:`rank_report` for updates you already have, e.g. a LoRA model's ``s·BA``.

    ``rankkit.delta_report(rankkit.lora_delta_weights(model))`` answers "how low-rank
    is what this adapter learned?" without merging a copy of the model.

    Parameters
    ----------
    deltas : mapping of str to tensor or array, or a checkpoint source
        ``{name: ΔW}``, or anything :func:`rankkit.checkpoints.open_checkpoint` reads
        that holds updates. A PEFT adapter folder is analysed from its factors, as by
        ``rank_report(weights, deltas)``. Entries with fewer than two dimensions are
        skipped and listed in ``report.attrs["skipped"]``; ΔW must be finite.
    weights : mapping of str to tensor or array, or a checkpoint source, optional
        The weights the updates belong to (the fine-tuned W), same names and shapes:
        adds ``norm_W``, ``rel_change`` and, with ``include_weights``, the ``W_*``
        columns. Without it those columns are left out. For an adapter, the base.
    seed, thresholds, include_weights, device
        As in :func:`rank_report`.

    Returns
    -------
    pandas.DataFrame
        The columns of :func:`rank_report` (see there), one row per matrix.
    """
    thresholds = tuple(thresholds)
    options = dict(seed=seed, thresholds=thresholds, include_weights=include_weights,
                   device=str(resolve_device(device)))  # fmt: skip
    if is_adapter(deltas):
        plan = plan_updates(weights, deltas)
        return _report_frame([_update_row(u, **options) for u in plan.layers], plan)
    updates_ckpt = open_checkpoint(deltas, name="deltas")
    weights_ckpt = open_checkpoint(weights, name="weights") if weights is not None else None
    skipped = dict(getattr(deltas, "skipped", {}))
    updates = []
    for name, info in updates_ckpt.info.items():
        if len(info.shape) < 2:
            skipped[name] = f"1-D ({info.shape}): no singular values"
            continue
        update = LayerUpdate(
            name, info.shape, delta=lambda name=name: updates_ckpt[name], eps=info.eps
        )
        if weights_ckpt is not None:
            if name not in weights_ckpt.info:
                raise KeyError(
                    f"delta_report: weights has no entry {name!r}; give the weight of every "
                    "update (same names), or weights=None."
                )
            w_info = weights_ckpt.info[name]
            if w_info.shape != info.shape:
                raise ValueError(
                    f"delta_report: {name}: update shape {info.shape} differs from the "
                    f"weight's {w_info.shape}."
                )
            update.weight = lambda name=name: weights_ckpt[name]
            if w_info.is_float:  # the weights' precision, as rank_report uses
                update.eps = w_info.eps
        updates.append(update)
    plan = UpdatePlan(updates, skipped, "updates given directly")
    return _report_frame([_update_row(u, **options) for u in plan.layers], plan)


def _check_jobs(jobs: Any, base: Any, finetuned: Any) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}.")
    in_memory = [
        s for s in (base, finetuned) if s is not None and not isinstance(s, (str, os.PathLike))
    ]
    if jobs > 1 and in_memory:
        raise ValueError(
            "jobs > 1 analyses layers in worker processes that reopen the checkpoints, so "
            "base and finetuned must be paths (files or folders); use jobs=1 for modules "
            "and state dicts."
        )
    return jobs


def _progress(items: Iterable, enabled: bool, total: int | None = None):
    from tqdm.auto import tqdm

    total = len(items) if total is None else total
    return tqdm(items, total=total, desc="layers", unit="layer", disable=not enabled or total < 2)


_WORKER_PLAN: dict[tuple, UpdatePlan] = {}


def _worker_rows(key: tuple, indices: list[int], options: dict) -> list[tuple[int, dict]]:
    """Rows of some layers, in a worker process that opens the sources once."""
    if key not in _WORKER_PLAN:
        _WORKER_PLAN.clear()
        _WORKER_PLAN[key] = plan_updates(*key)
    plan = _WORKER_PLAN[key]
    return [(i, _update_row(plan.layers[i], **options)) for i in indices]


def _rows_in_processes(base, finetuned, layers, n, jobs, options, progress) -> list[dict]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    key = (
        None if base is None else str(base),
        str(finetuned),
        layers,
    )
    threads = max(1, torch.get_num_threads() // jobs)
    chunks = [list(range(i, n, jobs * 4)) for i in range(min(n, jobs * 4))]
    rows: dict[int, dict] = {}
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=mp.get_context("spawn"),
        initializer=torch.set_num_threads, initargs=(threads,),
    ) as pool:  # fmt: skip
        futures = [pool.submit(_worker_rows, key, chunk, options) for chunk in chunks]
        for future in _progress(as_completed(futures), progress, total=len(futures)):
            rows.update(future.result())
    return [rows[i] for i in range(n)]


def _update_row(
    update: LayerUpdate,
    *,
    seed: int,
    thresholds: tuple[float, ...],
    include_weights: bool,
    device: str,
) -> dict[str, Any]:
    """One report row: read the layer, compute its spectra, and let it go."""
    shape = (update.shape[0], math.prod(update.shape[1:]))
    row: dict[str, Any] = {
        "name": update.name,
        "shape": "x".join(str(d) for d in update.shape),
        "rows": shape[0],
        "cols": shape[1],
    }
    if update.factors is not None:
        B, A, scale = update.factors()
        s_delta = lowrank_singular_values(B, A, scale)
        row["lora_r"] = update.rank
    else:
        s_delta = singular_values(update.delta().to(device), name=update.name)
    norm_dW = float(math.sqrt((s_delta**2).sum()))
    if update.weight is not None:
        W = update.weight()
        row["norm_W"] = float(torch.linalg.vector_norm(W.to(torch.float64)))
        row["norm_dW"] = norm_dW
        row["rel_change"] = norm_dW / row["norm_W"] if row["norm_W"] > 0 else float("nan")
    else:
        W = None
        row["norm_dW"] = norm_dW
    if update.pretrained is not None and update.factors is not None:
        row["amplification"] = lowrank_amplification_factor(
            B, A, scale, update.pretrained(), update.rank
        )
    for k, v in all_effective_ranks(s_delta, shape, update.eps, thresholds).items():
        row[f"dW_{k}"] = v
    if W is not None and include_weights:
        s_weight = singular_values(W.to(device), name=update.name)
        for k, v in all_effective_ranks(s_weight, shape, update.eps, thresholds).items():
            row[f"W_{k}"] = v
    for k, v in _cached_baseline(shape, seed, thresholds).items():
        if k not in ("spectral_norm", "frobenius_norm"):
            row[f"rand_{k}"] = v
    return row


@functools.lru_cache(maxsize=64)
def _cached_baseline(shape: tuple[int, int], seed: int, thresholds: tuple[float, ...]) -> dict:
    return random_baseline(shape, seed=seed, thresholds=thresholds)


def _report_frame(rows: list[dict[str, Any]], plan: UpdatePlan) -> pd.DataFrame:
    report = pd.DataFrame(rows)
    report.attrs["skipped"] = plan.skipped
    report.attrs["source"] = plan.description
    return report


def format_report(report: pd.DataFrame, max_name: int = 40) -> str:
    """A compact, readable text table of :func:`rank_report`'s main columns."""
    if report.empty:
        return "(no weight matrices)"
    cols = {
        "name": "layer",
        "shape": "shape",
        "lora_r": "r",
        "rel_change": "|dW|/|W|",
        "dW_entropy": "erank",
        "rand_entropy": "erank(rand)",
        "dW_stable": "stable",
        "dW_energy90": "k90%",
        "rand_energy90": "k90%(rand)",
        "dW_optimal": "GD rank",
        "amplification": "amplif.",
    }
    table = report[[c for c in cols if c in report]].rename(columns=cols).copy()
    table["layer"] = [n if len(n) <= max_name else "…" + n[-max_name + 1 :] for n in table["layer"]]
    text = table.to_string(
        index=False,
        float_format=lambda x: f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}",
    )
    skipped = format_skipped(report.attrs.get("skipped", {}))
    return text + ("\n" + skipped if skipped else "")


def format_skipped(skipped: Mapping[str, str], examples: int = 3) -> str:
    """``skipped`` grouped by reason, one line per reason with a few names.

    >>> print(format_skipped({"a.bias": "1-D (bias or norm)", "b.bias": "1-D (bias or norm)"}))
    not analysed: 2 tensors
      2 1-D (bias or norm): a.bias, b.bias
    """
    if not skipped:
        return ""
    groups: dict[str, list[str]] = {}
    for name, why in skipped.items():
        groups.setdefault(why.split(":")[0], []).append(name)
    lines = [f"not analysed: {len(skipped)} tensor{'s' if len(skipped) > 1 else ''}"]
    for why, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(names)} {why}: {short_list(names, limit=examples)}")
    return "\n".join(lines)
