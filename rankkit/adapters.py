"""PEFT LoRA adapter folders, read lazily: ``ΔW = s · B @ A`` for every adapted module.

A PEFT adapter folder holds ``adapter_config.json`` (``r``, ``lora_alpha``,
``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``...) and
``adapter_model.safetensors`` with the factors of each adapted module under
``base_model.model.<module>.lora_A.weight`` (r x in) and ``.lora_B.weight`` (out x r).
The update of a module is

.. math:: \\Delta W = s\\,B A, \\qquad s = \alpha / r \\;\\; (\alpha / \\sqrt{r} \text{ with use\\_rslora}),

with ``r`` and ``alpha`` taken from ``rank_pattern`` / ``alpha_pattern`` when a pattern
matches the module's name (PEFT's rule, :func:`peft_pattern_key`). Adapter types whose
update is not ``s·B·A`` (LoHa, LoKr, IA3, DoRA...) are refused by name rather than read
wrongly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rankkit.checkpoints import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    Checkpoint,
    CheckpointError,
    open_checkpoint,
)


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One adapted module of a PEFT adapter: ``ΔW = scale · B @ A``."""

    module: str  # module name in the base model, without "base_model.model."
    a_key: str
    b_key: str
    r: int
    alpha: float
    scale: float
    shape: tuple[int, int]  # (out, in) of ΔW
    transposed: bool = False  # LoRA on an embedding stores ΔWᵀ's factors


class LoraAdapter:
    """A PEFT LoRA adapter folder, read lazily (see :func:`open_adapter`).

    Attributes
    ----------
    directory : Path
    config : dict
        ``adapter_config.json`` as written.
    modules : dict of str to LoraModule
        One entry per adapted module, with its rank, alpha and scale resolved from
        ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and ``use_rslora``.
    skipped : dict of str to str
        Tensors in the file that are not LoRA factors (``modules_to_save``) and why.
    """

    def __init__(self, directory: Path, config: dict, tensors: Checkpoint):
        self.directory = directory
        self.config = config
        self.tensors = tensors
        self.modules: dict[str, LoraModule] = {}
        self.skipped: dict[str, str] = {}
        self._resolve()

    def __repr__(self) -> str:
        return f"<LoraAdapter {str(self.directory)!r}: {len(self.modules)} modules>"

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(B, A, scale)`` of one module in float32 or float64, with ``ΔW = scale·B@A``."""
        m = self.modules[module]
        A, B = self.tensors[m.a_key], self.tensors[m.b_key]
        dtype = torch.float64 if A.dtype == B.dtype == torch.float64 else torch.float32
        A, B = A.to(dtype), B.to(dtype)
        if m.transposed:  # embedding: ΔW = s (B A)ᵀ = s Aᵀ Bᵀ
            A, B = B.mT, A.mT
        for which, t in (("lora_A", A), ("lora_B", B)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"adapter {str(self.directory)!r}: {which} of {module!r} contains NaN or "
                    "Inf values; the adapter is corrupt or its training diverged."
                )
        return B, A, m.scale

    def delta(self, module: str) -> torch.Tensor:
        """The formed update ``scale · B @ A`` (out x in) of one module."""
        B, A, scale = self.factors(module)
        return scale * (B @ A)

    def _resolve(self) -> None:
        cfg = self.config
        key_re = re.compile(
            r"(?P<module>.+)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
            r"(\.[^.]+)?(\.weight)?"
        )
        found: dict[str, dict[str, str]] = {}
        for key in self.tensors:
            match = key_re.fullmatch(key.removeprefix(PEFT_PREFIX))
            if match:
                found.setdefault(match["module"], {})[match["which"]] = key
            elif "lora_" in key or "magnitude" in key:
                raise CheckpointError(
                    f"adapter {str(self.directory)!r}: tensor {key!r} belongs to a LoRA variant "
                    "rankkit does not read (DoRA, LoRA bias...)."
                )
            else:
                self.skipped[key.removeprefix(PEFT_PREFIX)] = (
                    "trained in full (modules_to_save), not a low-rank update"
                )
        for module, keys in found.items():
            embedding = "lora_embedding_A" in keys
            a_key = keys.get("lora_embedding_A" if embedding else "lora_A")
            b_key = keys.get("lora_embedding_B" if embedding else "lora_B")
            if a_key is None or b_key is None:
                raise CheckpointError(
                    f"adapter {str(self.directory)!r}: module {module!r} has only "
                    f"{', '.join(sorted(keys))}; a LoRA module needs both A and B. The file "
                    "is incomplete; re-save the adapter."
                )
            a_shape, b_shape = self.tensors.info[a_key].shape, self.tensors.info[b_key].shape
            r = a_shape[0]
            if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != r:
                raise CheckpointError(
                    f"adapter {str(self.directory)!r}: module {module!r} has A {a_shape} and "
                    f"B {b_shape}; expected A (r, in) and B (out, r)."
                )
            r_key = peft_pattern_key(cfg.get("rank_pattern") or {}, module)
            r_config = int((cfg.get("rank_pattern") or {}).get(r_key, cfg.get("r", r)))
            if r_config != r:
                where = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
                raise CheckpointError(
                    f"adapter {str(self.directory)!r}: {ADAPTER_CONFIG_NAME} gives {module!r} "
                    f"rank {r_config} ({where}) but its lora_A has {r} rows; the config and the "
                    "weights come from different adapters. Re-save them together."
                )
            alpha_key = peft_pattern_key(cfg.get("alpha_pattern") or {}, module)
            alpha = float((cfg.get("alpha_pattern") or {}).get(alpha_key, cfg.get("lora_alpha", 8)))
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            shape = (a_shape[1], b_shape[0]) if embedding else (b_shape[0], a_shape[1])
            self.modules[module] = LoraModule(module, a_key, b_key, r, alpha, scale, shape,
                                              embedding)  # fmt: skip


# Adapter settings that change what ΔW is; rankkit reads only their neutral values.
_UNSUPPORTED_LORA_SETTINGS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers that store W transposed)",
    "lora_bias": "LoRA bias terms",
    "use_qalora": "QALoRA",
}


def is_adapter(source: Any) -> bool:
    """True if ``source`` is a path to a PEFT adapter folder (or its adapter_config.json)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    return (path.is_dir() and (path / ADAPTER_CONFIG_NAME).is_file()) or (
        path.name == ADAPTER_CONFIG_NAME and path.is_file()
    )


def open_adapter(directory: str | os.PathLike) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder: ``adapter_config.json`` + its weights.

    Each adapted module's update is ``ΔW = s · B @ A`` with ``A`` (r x in), ``B``
    (out x r) and ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
    ``use_rslora``), where ``r`` and ``lora_alpha`` come from ``rank_pattern`` and
    ``alpha_pattern`` when a pattern matches the module name (PEFT's rule, see
    :func:`peft_pattern_key`).

    Raises
    ------
    CheckpointError
        If the folder lacks the config or the weights, the config is not JSON, the
        adapter is not plain LoRA (LoHa, LoKr, IA3, DoRA...: the message names the
        type), or the config and the weights disagree on a module's rank.
    """
    path = Path(directory)
    if path.name == ADAPTER_CONFIG_NAME:
        path = path.parent
    config_path = path / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(
            f"no {ADAPTER_CONFIG_NAME} in {str(path)!r}; pass the folder PEFT's "
            "save_pretrained wrote (adapter_config.json + adapter_model.safetensors)."
        )
    try:
        config = json.loads(config_path.read_text())
        assert isinstance(config, dict)
    except (ValueError, AssertionError) as err:
        raise CheckpointError(
            f"{str(config_path)!r} is not a JSON object ({err}); re-save the adapter."
        ) from err
    check_lora_config(config, where=str(config_path))
    for name in (ADAPTER_WEIGHTS_NAME, "adapter_model.bin"):
        if (path / name).is_file():
            tensors = open_checkpoint(path / name, name=f"adapter {str(path)!r}")
            return LoraAdapter(path, config, tensors)
    raise CheckpointError(
        f"{str(path)!r} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME} (or "
        "adapter_model.bin); the adapter's weights are missing. Copy them next to the config."
    )


def check_lora_config(config: Mapping[str, Any], where: str = ADAPTER_CONFIG_NAME) -> None:
    """Raise CheckpointError unless ``config`` describes a plain LoRA adapter."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"{where}: peft_type is {peft_type!r}, an adapter type whose update is not s·B·A; "
            "rankkit reads plain LoRA adapters. Merge this adapter into the model with PEFT "
            "(merge_and_unload, then save_pretrained) and compare the merged model with its base."
        )
    for key, what in _UNSUPPORTED_LORA_SETTINGS.items():
        if config.get(key):
            raise CheckpointError(
                f"{where}: {key}={config[key]!r}: {what} is a LoRA variant rankkit does not "
                "read. Merge the adapter with PEFT and compare the merged model with its base."
            )


def peft_pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key that applies to ``module``, if any.

    PEFT's rule: the first key ``k`` (in insertion order) for which
    ``re.match(rf"(.*\\.)?({k})$", module)`` succeeds.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None
