r"""Extract a LoRA adapter from a full fine-tune: the best rank-r update of every layer.

A full fine-tune moves each weight matrix by :math:`\Delta W = W_{ft} - W_0`
(out x in). LoRA stores an update as :math:`s\,BA` with :math:`B` (out x r),
:math:`A` (r x in) and the scale :math:`s = \alpha / r`. Which rank-r update is
closest to :math:`\Delta W`? With the singular value decomposition
:math:`\Delta W = U \operatorname{diag}(\sigma) V^T`, the Eckart–Young theorem
(Eckart & Young 1936; Mirsky 1960 for every unitarily invariant norm) says it is
the truncation

.. math::

    \Delta W_r = U_r \operatorname{diag}(\sigma_{1..r}) V_r^T, \qquad
    \|\Delta W - \Delta W_r\|_F^2 = \sum_{i > r} \sigma_i^2 = \min_{\operatorname{rank} M \le r}
    \|\Delta W - M\|_F^2 .

We write it as LoRA factors with :math:`\alpha = r` in every module, so
:math:`s = \alpha / r = 1` and

.. math:: B = U_r \operatorname{diag}(\sigma_{1..r})^{1/2}, \qquad
          A = \operatorname{diag}(\sigma_{1..r})^{1/2} V_r^T, \qquad s\,BA = \Delta W_r .

The square root splits each singular value evenly, so :math:`B` and :math:`A` have the
same singular values (a balanced factorisation: neither factor is tiny, which is
also a good start for further training). Where modules get different ranks,
``adapter_config.json`` lists them in ``rank_pattern`` and, since
:math:`\alpha = r`, the same numbers in ``alpha_pattern`` (PEFT's format; the most
common rank is the default ``r``).

How many directions per layer? Exactly one rule:

``rank=N``
    N in every layer (mergekit's LoRA extraction; N must not exceed any layer's
    ``min(out, in)``).
``rank="optimal"``
    the Gavish–Donoho rank of each ΔW: the number of singular values above the
    optimal hard threshold for unknown noise
    (:func:`rankkit.spectra.gavish_donoho_threshold`). It reads ΔW as
    "low-rank signal + noise" and keeps the signal.
``energy=f``
    the smallest rank keeping a fraction ``f`` of each layer's
    :math:`\|\Delta W\|_F^2` (the energy rank of :func:`rankkit.effective_rank`).
``budget=P``
    at most ``P`` adapter parameters in total. One unit of rank in an (out x in)
    layer costs ``out + in`` parameters (a row of A and a column of B). The ranks
    keep the most *absolute* energy: they maximise
    :math:`\sum_l \sum_{i \le r_l} \sigma_{l,i}^2` subject to
    :math:`\sum_l r_l (m_l + n_l) \le P`, i.e. they minimise
    :math:`\sum_l \|\Delta W_l - \Delta W_{l,r_l}\|_F^2 = \|\theta_{ft} - \theta_{LoRA}\|_2^2`,
    the squared distance in weight space between the fine-tuned model and the
    base plus the adapter (see :func:`allocate_budget`).

Why absolute and not per-layer relative energy? The quantity we want to keep is the
fine-tuned model, and its distance from base + adapter is the sum of the per-layer
errors. Relative energy would weigh a layer that barely moved (a tiny
:math:`\|\Delta W_l\|`) as much as one that moved a lot, spending rank on
directions that change the weights by almost nothing; it would also change when one
layer's ΔW is rescaled, although the other layers' errors do not. The weight-space
error is still a proxy: it ignores how large each layer's inputs are (an
activation-weighted error would need data), which is why quality is measured, not
assumed (``docs/extraction.md``).

Only what LoRA can hold is extracted: the weight matrices of linear layers.
Biases, norms, new heads, embeddings and convolution kernels are listed in
``skipped`` with the reason; a fine-tune that changed them loses those changes.
A newly initialised head holds little of the energy but all of the task: copy it
in full with ``modules_to_save`` (PEFT's name), outside the budget.

References
----------
Eckart & Young 1936, "The approximation of one matrix by another of lower rank",
Psychometrika 1(3). Mirsky 1960, "Symmetric gauge functions and unitarily invariant
norms", Q. J. Math. 11(1). Gavish & Donoho 2014, "The optimal hard threshold for
singular values is 4/sqrt(3)", IEEE Trans. Inf. Theory 60(8). Hu et al. 2021, "LoRA",
arXiv:2106.09685. Goddard et al. 2024, "Arcee's MergeKit" (LoRA extraction),
arXiv:2403.13257.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from rankkit.adapters import is_adapter, peft_pattern_key
from rankkit.allocation import Allocation, allocate_budget
from rankkit.checkpoints import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    StateSource,
    match_checkpoints,
    open_checkpoint,
    save_state_dict,
    short_list,
)
from rankkit.devices import resolve_device
from rankkit.lora import LoraConfig
from rankkit.reports import LayerUpdate, format_skipped, plan_updates
from rankkit.spectra import FLOAT64_MAX_ENTRIES, effective_rank, singular_values

_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# Module names that usually mean nn.Embedding (tok_emb, embed_tokens, wte, wpe...).
_EMBEDDING_NAME = re.compile(r"emb|(^|\.)(wte|wpe|shared)$", re.IGNORECASE)


# --------------------------------------------------------------------------- the rule


@dataclasses.dataclass(frozen=True)
class RankRule:
    """The one rule that chooses each layer's rank (see the module docstring)."""

    kind: str  # "rank", "optimal", "energy" or "budget"
    value: float | int | None = None

    def __str__(self) -> str:
        if self.kind == "optimal":
            return 'rank="optimal" (Gavish–Donoho rank of each ΔW)'
        if self.kind == "rank":
            return f"rank={self.value} in every layer"
        if self.kind == "energy":
            return f"energy={self.value:g} (energy rank of each ΔW)"
        return f"budget={self.value:,} adapter parameters (most total energy kept)"


def rank_rule(
    rank: int | str | None = None, energy: float | None = None, budget: int | None = None
) -> RankRule:
    """Check that exactly one of ``rank``, ``energy``, ``budget`` is given, and read it."""
    given = {
        k: v for k, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None
    }
    if len(given) != 1:
        what = "none" if not given else " and ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(
            f"extract_lora: give exactly one rule -- rank=N, rank='optimal', energy=F or "
            f"budget=P -- got {what}. Each rule chooses every layer's rank on its own."
        )
    if rank is not None:
        if isinstance(rank, str) and rank.lower() == "optimal":
            return RankRule("optimal")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"rank must be a positive integer or 'optimal', got {rank!r}.")
        return RankRule("rank", int(rank))
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
            raise ValueError(
                f"energy must be a fraction in (0, 1] of each layer's squared Frobenius norm "
                f"(e.g. 0.9), got {energy!r}."
            )
        return RankRule("energy", float(energy))
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive number of parameters, got {budget!r}.")
    return RankRule("budget", int(budget))


# --------------------------------------------------------------------------- extraction


@dataclasses.dataclass
class ExtractedAdapter:
    """A LoRA adapter extracted from a fine-tune, with what each layer kept.

    Attributes
    ----------
    config : dict
        The ``adapter_config.json`` content (PEFT's LoRA format).
    tensors : dict of str to torch.Tensor
        ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, and
        ``base_model.model.<module>.<param>`` for ``modules_to_save``.
    layers : pandas.DataFrame
        One row per weight matrix considered: ``name``, ``module``, ``rows``, ``cols``,
        ``rank``, ``parameters`` (``rank * (rows + cols)``), ``energy``
        (:math:`\\|\\Delta W\\|_F^2`), ``kept`` (:math:`\\sum_{i \\le r} \\sigma_i^2`),
        ``kept_fraction``. A layer with rank 0 gets no adapter.
    skipped : dict of str to str
        Tensors not extracted and why.
    rule : RankRule
    allocation : Allocation or None
        For ``budget=``: how the ranks were found (exact or greedy, with its bound).
    directory : Path or None
        Where it was written, if it was.
    warnings : list of str
        Things to check before loading it (e.g. names that look like embeddings,
        written as linear layers because the checkpoints do not say the module type).
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    layers: pd.DataFrame
    skipped: dict[str, str]
    rule: RankRule
    allocation: Allocation | None = None
    directory: Path | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        """``{module: rank}`` of the modules that got an adapter."""
        return {m: int(r) for m, r in zip(self.layers["module"], self.layers["rank"]) if r > 0}

    @property
    def n_parameters(self) -> int:
        """Adapter parameters: ``sum(rank * (rows + cols))``."""
        return int(self.layers["parameters"].sum())

    @property
    def n_saved_parameters(self) -> int:
        """Parameters of ``modules_to_save``, copied in full (not in ``n_parameters``)."""
        return sum(
            int(t.numel()) for k, t in self.tensors.items() if not k.endswith(_FACTOR_SUFFIXES)
        )

    @property
    def kept_fraction(self) -> float:
        """Energy kept over all layers, :math:`\\sum_l \\|\\Delta W_{l,r}\\|_F^2 / \\sum_l \\|\\Delta W_l\\|_F^2`."""
        total = float(self.layers["energy"].sum())
        return float(self.layers["kept"].sum()) / total if total > 0 else 1.0

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``directory``."""
        directory = Path(directory)
        save_state_dict(self.tensors, directory / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        # Not sort_keys: the order of rank_pattern keys decides which one PEFT applies.
        (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        self.directory = directory
        return directory

    def summary(self, max_name: int = 40) -> str:
        """A readable table of the per-layer ranks, and the totals."""
        table = self.layers.assign(
            shape=[f"{r}x{c}" for r, c in zip(self.layers["rows"], self.layers["cols"])],
            kept=[f"{100 * f:.1f}%" for f in self.layers["kept_fraction"]],
            layer=[
                n if len(n) <= max_name else "…" + n[-max_name + 1 :] for n in self.layers["module"]
            ],
        )[["layer", "shape", "rank", "parameters", "kept"]]
        lines = [f"rule: {self.rule}", table.to_string(index=False)]
        total = (
            f"total: {self.n_parameters:,} adapter parameters in {len(self.ranks)} modules, "
            f"{100 * self.kept_fraction:.2f}% of the energy sum ||ΔW||_F^2 kept"
        )
        if self.allocation is not None:
            a = self.allocation
            total += (
                f"; allocation {a.method}"
                + (
                    f" (within {a.bound:.3g} of the optimum's energy)"
                    if a.method == "greedy"
                    else ""
                )
                + f", budget {self.rule.value:,}"
            )
        lines.append(total)
        if self.n_saved_parameters:
            lines.append(
                f"plus {self.n_saved_parameters:,} parameters of modules_to_save "
                f"({', '.join(self.config['modules_to_save'])}), copied in full"
            )
        skipped = format_skipped(self.skipped)
        if skipped:
            lines.append(skipped)
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def extract_lora(
    base: StateSource,
    finetuned: StateSource,
    *,
    rank: int | str | None = None,
    energy: float | None = None,
    budget: int | None = None,
    layers: str | None = None,
    modules_to_save: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
) -> ExtractedAdapter:
    """Extract a LoRA adapter whose ``s·B·A`` is the best rank-r approximation of each ΔW.

    Parameters
    ----------
    base, finetuned : nn.Module, state dict, or path
        The pretrained and the fully fine-tuned weights: anything
        :func:`rankkit.rank_report` reads (files, sharded checkpoints, model
        folders, wrapper prefixes). ``finetuned`` may also be a LoRA adapter folder,
        which re-ranks that adapter. Read one layer at a time.
    rank : int or "optimal", optional
        ``N``: rank N in every layer. ``"optimal"``: the Gavish–Donoho rank of each ΔW.
    energy : float, optional
        Keep this fraction of each layer's squared Frobenius norm (smallest such rank).
    budget : int, optional
        At most this many adapter parameters in total, allocated across layers to keep
        the most total energy (:func:`allocate_budget`).
    layers : str, optional
        Regular expression (``re.search``) selecting weight names.
    modules_to_save : list of str, optional
        Modules copied in full from the fine-tune instead (every parameter, biases
        included), e.g. a new classification head, as PEFT's ``modules_to_save``.
        An entry matches a module named like it or ending in ``"." + entry``
        (``"head"``: ``head``, ``cls.head``); the config lists the full names found.
        Their parameters are not counted in ``budget``.
    out : path, optional
        Write the adapter folder here (``adapter_config.json`` +
        ``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained``
        on the base or :func:`rankkit.load_adapter`.
    device : str or torch.device
        Where to run the SVDs (``"auto"``: CUDA when available).

    Give exactly one of ``rank``, ``energy``, ``budget``.

    Returns
    -------
    ExtractedAdapter
        The config, tensors, per-layer table (rank, parameters, energy kept) and what
        was skipped.

    Raises
    ------
    ValueError
        For zero or several rules, a rank above some layer's ``min(out, in)``, a budget
        below one rank-1 adapter of the cheapest layer, or when every layer gets rank 0.
    rankkit.checkpoints.CheckpointError
        If the checkpoints share no weight matrix.

    Notes
    -----
    Module names are the base's parameter names without ``.weight``. With two
    files, every 2-D ``*.weight`` matrix is written as a linear layer's adapter;
    with an ``nn.Module`` base, weights of non-linear modules (embeddings...) are
    skipped by type. Pass ``layers=`` to exclude an embedding stored in a file.

    Examples
    --------
    >>> import rankkit
    >>> base, tuned = rankkit.spectra.demo_pair()
    >>> adapter = rankkit.extract_lora(base, tuned, rank="optimal")
    >>> adapter.ranks
    {'layer0.q': 1, 'layer0.v': 4, 'layer1.fc1': 8, 'layer1.fc2': 16}
    """
    rule = rank_rule(rank, energy, budget)
    device = resolve_device(device)
    plan = plan_updates(base, finetuned, layers)
    skipped = dict(plan.skipped)
    saved, saved_modules = {}, None
    if modules_to_save:
        saved, saved_modules = _saved_modules(base, finetuned, modules_to_save, skipped)
    candidates = _linear_layers(plan.layers, base, finetuned, layers, skipped)
    candidates = {m: u for m, u in candidates.items() if f"{PEFT_PREFIX}{m}.weight" not in saved}
    if not candidates:
        raise ValueError(
            "extract_lora: no weight matrix of a linear layer to extract; "
            f"{len(plan.layers)} compared matrices were all skipped ({_first(skipped)})."
        )
    _check_rule_fits(rule, candidates)

    chosen, allocation = {}, None
    if rule.kind == "budget":  # the ranks need every spectrum first: read each layer twice
        chosen, allocation = _allocate(candidates, rule.value, device, skipped)

    tensors, rows = {}, []
    for module, update in candidates.items():
        U, s, Vh = _svd(update.formed_delta(), device)
        if s[0] == 0:
            skipped[update.name] = "unchanged (ΔW = 0)"
            continue
        (m, n), s_np = _matrix_shape(update), s.cpu().to(torch.float64).numpy()
        r = chosen[module] if rule.kind == "budget" else _rank_of(rule, s_np, (m, n))
        s2 = s_np**2
        if r > 0:  # B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T, and s = alpha / r = 1
            root = s[:r].sqrt()
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (root[:, None] * Vh[:r]).cpu()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (U[:, :r] * root).cpu()
        rows.append(dict(name=update.name, module=module, rows=m, cols=n, rank=r,
                         parameters=r * (m + n), energy=s2.sum(), kept=s2[:r].sum(),
                         kept_fraction=s2[:r].sum() / s2.sum()))  # fmt: skip
        del U, s, Vh
    table = pd.DataFrame(rows)
    if table.empty or not (table["rank"] > 0).any():
        raise ValueError(
            f"extract_lora: {rule} gives every layer rank 0, so there is no adapter to "
            "write (ΔW looks like noise to this rule, or the budget is too small); choose "
            "a fixed rank=N or a larger budget."
        )
    config = _peft_config(
        table, known=[*candidates, *_module_names(skipped)], base=base,
        modules_to_save=saved_modules,
    )  # fmt: skip
    tensors.update(saved)
    extracted = ExtractedAdapter(config, tensors, table, skipped, rule, allocation)
    if not any(isinstance(s, nn.Module) for s in (base, finetuned)):
        looks = [m for m in extracted.ranks if _EMBEDDING_NAME.search(m)]
        if looks:
            extracted.warnings.append(
                f"{short_list(looks, limit=4)} look{'s' if len(looks) == 1 else ''} like "
                "embeddings; from checkpoint files every 2-D weight is written as a linear "
                "layer's LoRA, which PEFT does not load into an nn.Embedding. If they are "
                "embeddings, exclude them with layers= (or pass the base as an nn.Module)."
            )
    if out is not None:
        extracted.save(out)
    return extracted


def _allocate(
    candidates: dict[str, LayerUpdate], budget: int, device: torch.device, skipped: dict
) -> tuple[dict[str, int], Allocation]:
    """First pass of ``budget=``: every layer's singular values, then the ranks."""
    spectra = {m: singular_values(u.formed_delta().to(device)) for m, u in candidates.items()}
    for module in [m for m, s in spectra.items() if s[0] == 0]:
        skipped[candidates.pop(module).name] = "unchanged (ΔW = 0)"
        del spectra[module]
    costs = [sum(_matrix_shape(u)) for u in candidates.values()]
    allocation = allocate_budget(list(spectra.values()), costs, budget)
    return dict(zip(candidates, allocation.ranks)), allocation


def _rank_of(rule: RankRule, s: np.ndarray, shape: tuple[int, int]) -> int:
    if rule.kind == "rank":
        return rule.value
    if rule.kind == "optimal":
        return int(effective_rank(s, "optimal", shape=shape))
    return int(effective_rank(s, "energy", threshold=rule.value))


def _matrix_shape(update: LayerUpdate) -> tuple[int, int]:
    return update.shape[0], update.shape[1]


def _svd(dW: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Thin SVD in float64 for small matrices, float32 for large (rankkit.spectra's policy)."""
    dtype = (
        torch.float64
        if dW.numel() <= FLOAT64_MAX_ENTRIES or dW.dtype == torch.float64
        else torch.float32
    )
    if device.type == "mps" and dtype == torch.float64:
        device = torch.device("cpu")  # MPS has no float64
    U, s, Vh = torch.linalg.svd(dW.to(device=device, dtype=dtype), full_matrices=False)
    out_dtype = dW.dtype if dW.dtype in (torch.float32, torch.float64) else torch.float32
    return U.to(out_dtype), s.to(out_dtype), Vh.to(out_dtype)


def _linear_layers(
    updates: list[LayerUpdate],
    base: StateSource,
    finetuned: StateSource,
    layers: str | None,
    skipped: dict[str, str],
) -> dict[str, LayerUpdate]:
    """``{module name in the base: update}`` for the updates a linear layer's LoRA can hold."""
    base_keys = {}
    if not is_adapter(finetuned):
        # Name modules as the base does (plan names have any wrapper prefix removed).
        matching = match_checkpoints(
            open_checkpoint(base, name="base"), open_checkpoint(finetuned, name="finetuned"), layers
        )
        base_keys = {p.name: p.base_key for p in matching.pairs}
    module_type = _module_types(base, finetuned)
    out = {}
    for update in updates:
        key = base_keys.get(update.name, update.name)
        if len(update.shape) != 2:
            skipped[update.name] = (
                f"not a linear layer: a {len(update.shape)}-D kernel {tuple(update.shape)} "
                "(PEFT's Conv LoRA is not written)"
            )
        elif not key.endswith(".weight"):
            skipped[update.name] = "not a module's .weight (LoRA adapts modules)"
        elif module_type(key[: -len(".weight")]) not in (None, nn.Linear):
            kind = module_type(key[: -len(".weight")]).__name__
            skipped[update.name] = f"not a linear layer: nn.{kind} (rankkit writes Linear LoRA)"
        else:
            out[key[: -len(".weight")]] = update
    return out


def _saved_modules(
    base: StateSource, finetuned: StateSource, entries: Sequence[str], skipped: dict[str, str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``{PEFT key: fine-tuned tensor}`` of every parameter of the modules to save, and
    the base's names of those modules."""
    if is_adapter(finetuned):
        raise ValueError(
            "modules_to_save copies modules from a fine-tuned checkpoint; an adapter has none."
        )
    entries = [entries] if isinstance(entries, str) else list(entries)
    base_ckpt = open_checkpoint(base, name="base")
    ft_ckpt = open_checkpoint(finetuned, name="finetuned")
    matching = match_checkpoints(base_ckpt, ft_ckpt)
    tensors, modules, used = {}, {}, set()
    for ft_key in ft_ckpt:
        name = ft_key.removeprefix(matching.finetuned_prefix)
        parts = name.split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts))]
        match = [(o, e) for e in entries for o in owners if o == e or o.endswith("." + e)]
        if not match:
            continue
        owner, entry = match[0]
        used.add(entry)
        base_key = next(
            (k for k in (matching.base_prefix + name, name) if k in base_ckpt.info), None
        )
        if base_key is None or base_ckpt.info[base_key].shape != ft_ckpt.info[ft_key].shape:
            why = "is not in the base" if base_key is None else "changed shape"
            raise ValueError(
                f"modules_to_save {entry!r}: {name} {why}; PEFT loads a saved module onto the "
                "base's module of the same shape. Save only modules both models have."
            )
        tensors[f"{PEFT_PREFIX}{base_key}"] = ft_ckpt[ft_key]
        modules[base_key[: len(base_key) - len(name) + len(owner)]] = None
        skipped.pop(name, None)
    unused = [e for e in entries if e not in used]
    if unused:
        raise ValueError(
            f"modules_to_save {unused[0]!r} matches no module of the fine-tuned model; "
            f"its modules include {short_list(sorted(_module_names(dict.fromkeys(ft_ckpt))))}."
        )
    return tensors, list(modules)


def _module_types(*sources: Any) -> Callable[[str], type | None]:
    """The class of module ``name`` in whichever source is an nn.Module (None if unknown)."""
    modules = [s for s in sources if isinstance(s, nn.Module)]

    def kind(name: str) -> type | None:
        for model in modules:
            try:
                found = type(model.get_submodule(name))
            except AttributeError:
                continue
            return nn.Linear if issubclass(found, nn.Linear) else found
        return None

    return kind


def _check_rule_fits(rule: RankRule, candidates: Mapping[str, LayerUpdate]) -> None:
    """Errors a user can fix, raised before any weight is read."""
    shapes = {m: _matrix_shape(u) for m, u in candidates.items()}
    if rule.kind == "rank":
        small = {m: s for m, s in shapes.items() if min(s) < rule.value}
        if small:
            module, (m, n) = next(iter(small.items()))
            raise ValueError(
                f"rank={rule.value} is above min(out, in) = {min(m, n)} of {module!r} "
                f"({m}x{n}; {len(small)} layer(s) in all): a {m}x{n} matrix has at most "
                f"{min(m, n)} singular directions. Choose rank <= "
                f"{min(min(s) for s in shapes.values())}, exclude those layers with layers=, "
                "or use rank='optimal', energy= or budget=."
            )
    if rule.kind == "budget":
        module, (m, n) = min(shapes.items(), key=lambda kv: sum(kv[1]))
        if rule.value < m + n:
            raise ValueError(
                f"budget={rule.value:,} is below one rank-1 adapter of the cheapest layer, "
                f"{module!r} ({m}x{n}: {m + n} parameters). Give a budget of at least {m + n}."
            )


def _peft_config(
    table: pd.DataFrame, known: list[str], base: Any, modules_to_save: list[str] | None
) -> dict[str, Any]:
    """adapter_config.json: the most common rank as ``r``, the others as patterns; alpha = r."""
    ranks = {m: int(r) for m, r in zip(table["module"], table["rank"]) if r > 0}
    default = Counter(ranks.values()).most_common(1)[0][0]
    pattern = _exact_patterns(ranks, default)
    targets = _exact_targets(list(ranks), known)
    config = LoraConfig(
        r=default, lora_alpha=default, target_modules=targets,
        rank_pattern=pattern, alpha_pattern=pattern, modules_to_save=modules_to_save,
    ).to_peft_dict()  # fmt: skip
    if isinstance(base, (str, os.PathLike)):
        config["base_model_name_or_path"] = str(base)
    return config


def _exact_patterns(ranks: dict[str, int], default: int) -> dict[str, int]:
    """A ``rank_pattern`` under which PEFT's rule gives every module exactly its rank.

    PEFT applies the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``, so
    key ``"fc"`` also matches ``"head.fc"``. Keys go longest first, and a module that
    would pick up another's key gets its own (escaped if a ``.`` wildcard misleads).
    """
    pattern = {m: r for m, r in ranks.items() if r != default}
    for _ in range(len(ranks) + 1):
        pattern = dict(sorted(pattern.items(), key=lambda kv: -len(kv[0].replace("\\", ""))))
        wrong = [m for m, r in ranks.items() if _resolve(pattern, m, default) != r]
        if not wrong:
            return pattern
        for m in wrong:
            own = [k for k in pattern if k.replace("\\", "") == m]
            if own:
                pattern[re.escape(m)] = pattern.pop(own[0])
            else:
                pattern[m] = ranks[m]
    raise AssertionError(f"no exact rank_pattern found for {sorted(ranks)}")  # pragma: no cover


def _resolve(pattern: Mapping[str, int], module: str, default: int) -> int:
    key = peft_pattern_key(pattern, module)
    return pattern[key] if key is not None else default


def _exact_targets(modules: list[str], known: list[str]) -> list[str] | str:
    """``target_modules``: the names, or an exact regex if a name is a suffix of another.

    A list entry ``"fc"`` also targets ``"head.fc"`` (PEFT's rule), which would give a
    module without extracted weights a fresh adapter.
    """
    chosen = set(modules)
    others = [k for k in known if k not in chosen]
    if any(k.endswith("." + m) for m in modules for k in others):
        return "(" + "|".join(re.escape(m) for m in modules) + ")"
    return list(modules)


def _module_names(skipped: Mapping[str, str]) -> list[str]:
    return [n.removesuffix(".weight") for n in skipped if n.endswith(".weight")]


def _first(skipped: Mapping[str, str]) -> str:
    if not skipped:
        return "nothing compared"
    name, why = next(iter(skipped.items()))
    return f"e.g. {name}: {why}"
