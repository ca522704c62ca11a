"""LoRA adapter files in PEFT's format: ``adapter_model.safetensors`` + ``adapter_config.json``.

:func:`save_adapter` names tensors as ``peft.PeftModel.save_pretrained`` does
(``base_model.model.<module>.lora_A.weight``), so PEFT loads a rankkit adapter, and
:func:`load_adapter` reads adapters written by PEFT: it reads the files, checks every
tensor against the model, and only then copies anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from rankkit.checkpoints import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    CheckpointError,
    load_state_dict,
    save_state_dict,
)
from rankkit.lora.config import LoraConfig
from rankkit.lora.layer import LoRALinear
from rankkit.lora.model import (
    apply_lora,
    lora_layers,
    matches_entry,
    resolve_targets,
    saved_modules,
)


class SavedAdapter(NamedTuple):
    """What :func:`save_adapter` wrote, with sizes to compare against a full checkpoint."""

    directory: Path
    adapter_bytes: int
    """Size of ``adapter_model.safetensors`` on disk."""
    full_model_bytes: int
    """Tensor bytes a full checkpoint of the (merged) model would hold."""


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> SavedAdapter:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` in PEFT's layout.

    Tensors are stored as ``base_model.model.<module>.lora_A.weight`` /
    ``.lora_B.weight`` and, for ``modules_to_save``, ``base_model.model.<module>.<param>``,
    exactly as ``peft.PeftModel.save_pretrained`` names them. ``target_modules`` is
    written as the list of adapted module names and per-module ranks / alphas as
    explicit ``rank_pattern`` / ``alpha_pattern`` entries, so PEFT adapts exactly
    the same layers.

    Returns
    -------
    SavedAdapter
        The directory, the adapter file size and the size of a full checkpoint.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers; call apply_lora first.")
    config = getattr(model, "rankkit_lora_config", None)
    if config is None:  # LoRALinear placed by hand: describe the layers as they are
        first = next(iter(layers.values()))
        config = LoraConfig(
            r=first.r,
            lora_alpha=first.lora_alpha,
            use_rslora=first.use_rslora,
            init_lora_weights=first.init_lora_weights,
        )
    if len({layer.use_rslora for layer in layers.values()}) > 1:
        raise ValueError("save_adapter: PEFT stores one use_rslora flag; the layers disagree.")

    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if layer.r != config.r:
            rank_pattern[name] = layer.r
        if layer.lora_alpha != config.lora_alpha:
            alpha_pattern[name] = layer.lora_alpha
    saved = saved_modules(model)
    for name in saved:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value

    peft_config = dataclasses.replace(
        config,
        target_modules=list(layers),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=next(iter(layers.values())).use_rslora,
        modules_to_save=saved or None,
    ).to_peft_dict()
    peft_config["base_model_name_or_path"] = base_model_name_or_path

    directory = Path(directory)
    weights = save_state_dict(tensors, directory / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True))

    full = sum(
        value.numel() * value.element_size()
        for key, value in model.state_dict().items()
        if not key.endswith((".lora_A", ".lora_B"))
    )
    return SavedAdapter(directory, weights.stat().st_size, full)


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    roles: Mapping[str, Sequence[str]] | Any = None,
) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` or by PEFT's ``save_pretrained``.

    On a plain model the adapter's config is applied first (:func:`apply_lora`,
    including PiSSA's residual, exactly as PEFT does when it loads a PiSSA
    adapter onto the original base); on a model that already has LoRA layers the
    weights are copied into them. Everything is checked before anything is copied.

    Raises
    ------
    CheckpointError
        If the files are missing or unreadable.
    ValueError
        If an adapter tensor's shape does not match the model (the message names
        the module), or the adapter and the model adapt different modules.
    """
    config, lora_tensors, saved_tensors = _read_adapter(Path(directory))
    layers = lora_layers(model)
    expected, saved = _expected_adapters(model, layers, config, roles)
    _check_lora_tensors(expected, lora_tensors)
    model_state = model.state_dict()
    _check_saved_tensors(model_state, saved, saved_tensors)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("load_adapter: the model's adapters are merged; unmerge them first.")

    if not layers:
        apply_lora(model, config, roles=roles)
        layers = lora_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(lora_tensors[name]["lora_A"])
            layer.lora_B.copy_(lora_tensors[name]["lora_B"])
        for key, tensor in saved_tensors.items():
            model_state[key].copy_(tensor)
    return model


def _read_adapter(
    directory: Path,
) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """An adapter folder's config, its LoRA tensors by module, and its modules_to_save tensors."""
    config_path = directory / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"load_adapter: no {ADAPTER_CONFIG_NAME} in {str(directory)!r}.")
    try:
        config = LoraConfig.from_peft_dict(json.loads(config_path.read_text()))
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"load_adapter: {str(config_path)!r} is not valid JSON ({err})."
        ) from err
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    if not weights_path.exists() and (directory / "adapter_model.bin").exists():
        weights_path = directory / "adapter_model.bin"  # old PEFT; read with weights_only
    lora_tensors, saved_tensors = _split_adapter_keys(load_state_dict(weights_path, name="adapter"))
    return config, lora_tensors, saved_tensors


def _expected_adapters(
    model: nn.Module, layers: dict[str, LoRALinear], config: LoraConfig, roles: Any
) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    """``{module: (r, in, out)}`` the file must hold, and the modules_to_save.

    From the model's LoRA layers if it has some, else from the adapter's config
    resolved against the model (as :func:`apply_lora` will apply it).
    """
    if layers:
        expected = {
            name: (layer.r, layer.in_features, layer.out_features) for name, layer in layers.items()
        }
        return expected, saved_modules(model)
    targets, saved = resolve_targets(model, config, roles)
    expected = {}
    for name in targets:
        linear = model.get_submodule(name)
        expected[name] = (
            config.rank_and_alpha(name)[0],
            linear.in_features,
            linear.out_features,
        )
    return expected, saved


def _check_lora_tensors(
    expected: dict[str, tuple[int, int, int]], lora_tensors: dict[str, dict[str, torch.Tensor]]
) -> None:
    """The file adapts exactly the expected modules, each with ``A`` and ``B`` of the right shape."""
    missing = sorted(set(expected) - set(lora_tensors))
    extra = sorted(set(lora_tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"load_adapter: the adapter and the model disagree on which modules are adapted. "
            f"Adapted in the model but not in the file: {missing or 'none'}; in the file but "
            f"not adapted in the model: {extra or 'none'}."
        )
    for name, (r, n_in, n_out) in expected.items():
        for which, shape in (("lora_A", (r, n_in)), ("lora_B", (n_out, r))):
            tensor = lora_tensors[name].get(which)
            if tensor is None:
                raise ValueError(
                    f"load_adapter: module {name!r} has no {which} in the adapter file."
                )
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"load_adapter: module {name!r}: {which} in the file has shape "
                    f"{tuple(tensor.shape)} but the model needs {shape} (r={r}, in={n_in}, "
                    f"out={n_out}). Was the adapter trained on a different base model or rank?"
                )


def _check_saved_tensors(
    model_state: Mapping[str, torch.Tensor],
    saved: list[str],
    saved_tensors: dict[str, torch.Tensor],
) -> None:
    """Every other tensor of the file is a parameter of a modules_to_save, with its shape."""
    for key, tensor in saved_tensors.items():
        module = key.rsplit(".", 1)[0]
        if key not in model_state or not any(
            matches_entry(module, s) or module.startswith(s + ".") for s in saved
        ):
            raise ValueError(
                f"load_adapter: the file holds {key!r}, which is not a parameter of the model's "
                f"modules_to_save {saved or '[]'}."
            )
        if model_state[key].shape != tensor.shape:
            raise ValueError(
                f"load_adapter: module {module!r}: {key!r} has shape {tuple(tensor.shape)} "
                f"in the file but {tuple(model_state[key].shape)} in the model."
            )


def _split_adapter_keys(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Sort PEFT keys into ``{module: {"lora_A": t, "lora_B": t}}`` and modules_to_save tensors."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    # PEFT drops the adapter name on save, but tolerate "lora_A.default.weight" too.
    pattern = re.compile(r"(?P<module>.+)\.(?P<which>lora_A|lora_B)(\.[^.]+)?\.weight")
    for key, tensor in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        match = pattern.fullmatch(key)
        if match:
            lora.setdefault(match["module"], {})[match["which"]] = tensor
        elif any(part in key for part in ("lora_", "magnitude_vector")):
            raise ValueError(
                f"load_adapter: tensor {key!r} belongs to a LoRA variant rankkit does not "
                "implement (DoRA, LoRA on embeddings, LoRA bias...)."
            )
        else:
            saved[key] = tensor
    return lora, saved
