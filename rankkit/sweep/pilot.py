r"""Spectral allocation: per-layer LoRA ranks from the spectra of a pilot full fine-tune.

Uniform LoRA at rank r spends :math:`P_r = r \sum_l (m_l + n_l)` parameters on the
layers a target set adapts (layer :math:`l` is :math:`m_l \times n_l`, and one unit of
rank costs :math:`m_l + n_l`). ``allocation="spectral"`` spends the same budget
differently: it fine-tunes the model in full once (the *pilot*, seed
:data:`PILOT_SEED`), takes the singular values :math:`\sigma_{l,i}` of each adapted
layer's :math:`\Delta W_l`, and gives layer :math:`l` the rank :math:`r_l` that solves

.. math:: \max_{r} \sum_l \sum_{i \le r_l} \sigma_{l,i}^2
          \quad\text{subject to}\quad \sum_l r_l (m_l + n_l) \le P_r ,

the allocation of ``python -m rankkit extract --budget`` (:func:`rankkit.allocate_budget`):
the ranks whose truncation of the pilot's ΔW lies closest to it in weight space. A layer
that gets rank 0 gets no adapter. Each layer's ``lora_alpha`` follows the sweep's alpha
rule at its own rank, as in uniform runs: with the default ``alpha = "sqrt(r)"`` layer
:math:`l` has scale :math:`1/\sqrt{r_l}`, with ``alpha = "r"`` every layer has scale 1.

One pilot, not one per seed: a practitioner pays for one full fine-tune, and every seed
of a spectral run then trains the same configuration, so the seed spread of spectral
runs measures training noise exactly as it does for uniform runs. The pilot lives in
``<out>/pilot/`` (``base.safetensors``, ``finetuned.safetensors``, ``metrics.json``, as
:func:`rankkit.finetune` writes them) and is reused while its recipe -- task, seed,
learning rate, epochs and the other hyper-parameters -- matches the sweep's full
fine-tuning; it is trained again otherwise. It is not the ``full-s0`` baseline run
(which the sweep may skip with ``baselines=False``), but it follows the same recipe.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rankkit.allocation import allocate_budget
from rankkit.checkpoints import load_state_dict
from rankkit.lora import LoraConfig, apply_lora
from rankkit.methods import finetune, method_lr
from rankkit.spectra import singular_values
from rankkit.sweep.config import SweepConfig, target_modules
from rankkit.sweep.store import Claims
from rankkit.tasks import get_task
from rankkit.train import resolve_hparams

__all__ = [
    "PILOT_SEED",
    "adapted_layers",
    "describe_pattern",
    "pilot_finetune",
    "rank_patterns",
    "spectral_rank_patterns",
]

#: Seed of the pilot full fine-tune.
PILOT_SEED = 0


def adapted_layers(task, targets: str) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of the layers a target set adapts, in model order.

    Read from a model on the ``meta`` device: shapes only, no memory, no weights and no
    random numbers.
    """
    with torch.device("meta"):
        model = task.build_model(pretrained=False, seed=None)
        config_r1 = LoraConfig(
            r=1, target_modules=target_modules(targets), modules_to_save=task.head_modules
        )
        apply_lora(model, config_r1, roles=task.roles)
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if hasattr(m, "lora_A")
    }


def rank_patterns(
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    layers: Mapping[str, tuple[int, int]],
    ranks: Sequence[int],
) -> dict[int, dict[str, int]]:
    """For each uniform rank r, the per-layer ranks that spend its parameters best.

    Parameters
    ----------
    base, finetuned : mapping of str to Tensor
        State dicts before and after the pilot fine-tune (``<module>.weight`` keys).
    layers : mapping of str to (out, in)
        The adapted layers (:func:`adapted_layers`).
    ranks : sequence of int
        Uniform ranks; rank r's budget is ``r * sum(out + in)``.

    Returns
    -------
    dict
        ``{r: {module: rank}}`` with the modules of rank >= 1 only, in model order. The
        parameters ``sum(rank * (out + in))`` never exceed uniform rank r's.
    """
    spectra, costs = [], []
    for name, (m, n) in layers.items():
        delta = finetuned[f"{name}.weight"].double() - base[f"{name}.weight"].double()
        spectra.append(singular_values(delta, name=name))
        costs.append(m + n)
    unit = sum(costs)
    out = {}
    for r in ranks:
        allocation = allocate_budget(spectra, costs, r * unit)
        out[r] = {name: k for name, k in zip(layers, allocation.ranks) if k > 0}
    return out


def pilot_finetune(
    config: SweepConfig,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    poll_s: float = 1.0,
) -> Path:
    """The pilot full fine-tune of ``<out_dir>/pilot/``: reused if its recipe matches, else trained.

    Several processes running the same sweep train it once: the first claims it (the
    claim ``pilot`` in ``<out_dir>/.claims/``), the others wait and then read it.

    Returns
    -------
    Path
        The pilot's folder.
    """
    task = get_task(config.task)
    directory = Path(out_dir) / "pilot"
    wanted = resolve_hparams(task, epochs=config.epochs, lr=method_lr(task, "full", config.full_lr))
    claims = Claims(Path(out_dir))
    waited = False
    while claims.try_claim("pilot") is None:
        if not waited:
            log(f"waiting for {claims.holder('pilot')} to fine-tune the pilot in {directory}")
            waited = True
        time.sleep(poll_s)
    try:
        if _recipe_matches(directory, task.name, wanted):
            log(f"spectral allocation: reusing the pilot full fine-tune in {directory}")
        else:
            log(f"spectral allocation: pilot full fine-tune (seed {PILOT_SEED}) into {directory}")
            finetune(
                task, directory, method="full", seed=PILOT_SEED, lr=wanted["lr"],
                epochs=wanted["epochs"], device=config.device, progress=False,
            )  # fmt: skip
    finally:
        claims.release("pilot", done=True)
    return directory


def _recipe_matches(directory: Path, task: str, wanted: Mapping[str, Any]) -> bool:
    """Whether ``directory`` holds a finished pilot fine-tuned with exactly ``wanted``."""
    try:
        record = json.loads((directory / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    done = all((directory / f).exists() for f in ("base.safetensors", "finetuned.safetensors"))
    hp = record.get("hparams", {})
    return (
        done
        and record.get("task") == task
        and record.get("method") == "full"
        and hp.get("seed") == PILOT_SEED
        and all(hp.get(k) == v for k, v in wanted.items())
    )


def spectral_rank_patterns(
    config: SweepConfig, out_dir: str | Path, log: Callable[[str], None] = print
) -> dict[tuple[str, int], dict[str, int]]:
    """``{(targets, rank): {module: rank}}`` for every target set and rank of the sweep.

    Trains (or reuses) the pilot (:func:`pilot_finetune`) and allocates each uniform
    rank's budget over each target set's layers (:func:`rank_patterns`).
    """
    task = get_task(config.task)
    directory = pilot_finetune(config, out_dir, log)
    base = load_state_dict(directory / "base.safetensors", name="pilot base")
    tuned = load_state_dict(directory / "finetuned.safetensors", name="pilot fine-tune")
    patterns = {}
    for targets in config.targets:
        layers = adapted_layers(task, targets)
        for rank, pattern in rank_patterns(base, tuned, layers, config.ranks).items():
            patterns[targets, rank] = pattern
            spent = sum(k * sum(layers[m]) for m, k in pattern.items())
            log(
                f"spectral ranks for targets {targets!r}, budget of rank {rank} "
                f"({rank * sum(map(sum, layers.values())):,} parameters): {describe_pattern(pattern)} ({spent:,})"
            )
    return patterns


def describe_pattern(pattern: Mapping[str, int] | Sequence[tuple[str, int]]) -> str:
    """``"fc1:3 fc2:5"``: a rank pattern in one results cell."""
    items = pattern.items() if isinstance(pattern, Mapping) else pattern
    return " ".join(f"{m}:{int(k)}" for m, k in items)
