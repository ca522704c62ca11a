"""Model surgery: put :class:`LoRALinear` layers into a model, read them, take them out.

:func:`apply_lora` resolves a :class:`LoraConfig` against a model's module names
(PEFT's matching rules, plus a task's named roles) and wraps each target in place;
:func:`merge_and_unload` folds the adapters back into plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rankkit.adapters import peft_pattern_key
from rankkit.lora.config import LoraConfig
from rankkit.lora.layer import LoRALinear, check_rank
from rankkit.utils import did_you_mean, set_submodule


def apply_lora(
    model: nn.Module,
    config: LoraConfig,
    *,
    roles: Mapping[str, Sequence[str]] | Any = None,
    seed: int | None = None,
) -> nn.Module:
    """Wrap the targeted ``nn.Linear`` layers of ``model`` in :class:`LoRALinear`, in place.

    Afterwards only the adapters' ``A`` and ``B`` (and ``modules_to_save``) have
    ``requires_grad=True``; everything else is frozen.

    Parameters
    ----------
    model : nn.Module
        The pretrained model. It is modified in place and returned.
    config : LoraConfig
        What to adapt.
    roles : mapping of str to list of str, or an object with a ``roles`` attribute
        Optional names for groups of modules (a rankkit task's ``task.roles``, e.g.
        ``{"q": ["blocks.0.attn.q", ...]}``). A ``target_modules`` or
        ``modules_to_save`` entry that is a role expands to its module names.
    seed : int, optional
        Seed for the random initialisation of the ``A`` matrices, drawn from a
        private generator state so the global one is left untouched. Default: draw
        from the global generator (call :func:`rankkit.train.set_seed` first for
        reproducible runs).

    Returns
    -------
    nn.Module
        ``model``, with ``model.rankkit_lora_config`` holding the resolved config
        (the exact module names adapted and saved).

    Raises
    ------
    ValueError
        If a target matches no module (the message lists the candidates), matches a
        module that is not ``nn.Linear``, asks for ``r > min(in, out)``, or if the
        model already has LoRA layers.
    """
    targets, saved = resolve_targets(model, config, roles)
    plan = []
    for name in targets:
        linear = model.get_submodule(name)
        r, alpha = config.rank_and_alpha(name)
        check_rank(r, linear.in_features, linear.out_features, where=f"module {name!r}")
        plan.append((name, linear, r, alpha))

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for name, linear, r, alpha in plan:
            layer = LoRALinear(
                linear,
                r=r,
                lora_alpha=alpha,
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                init_lora_weights=config.init_lora_weights,
            )
            set_submodule(model, name, layer)
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    model.rankkit_lora_config = dataclasses.replace(
        config, target_modules=list(targets), modules_to_save=list(saved) or None
    )
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put the plain ``nn.Linear`` back, in place.

    The returned model contains no :class:`LoRALinear`; its forward equals the
    adapted model's (up to float rounding). ``requires_grad`` flags are left as
    they were (base weights frozen).
    """
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            layer.merge()
        set_submodule(model, name, layer.base_layer)
    if hasattr(model, "rankkit_lora_config"):
        del model.rankkit_lora_config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained part of a LoRA model: every ``lora_A`` / ``lora_B`` and ``modules_to_save``.

    Keys are the model's own ``state_dict`` keys (``blocks.0.attn.q.lora_A``...), so
    ``model.load_state_dict(sd, strict=False)`` restores them.
    """
    state = model.state_dict()
    keep = set()
    for name in lora_layers(model):
        keep.update({f"{name}.lora_A", f"{name}.lora_B"})
    for name in saved_modules(model):
        keep.update(f"{name}.{key}" for key in model.get_submodule(name).state_dict())
    return {key: value for key, value in state.items() if key in keep}


def lora_delta_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: s * B A}`` (float32, CPU, shape (out, in)) for every adapter.

    The matrices feed :func:`rankkit.subspace_similarity` and
    :func:`rankkit.amplification_factor` directly. With ``init_lora_weights="pissa"``
    the product is not zero at initialisation (it starts as the top-r part of W), so
    the fine-tuning update is this minus its initial value.
    """
    with torch.no_grad():
        return {
            name: layer.delta_weight().detach().float().cpu()
            for name, layer in lora_layers(model).items()
        }


# --------------------------------------------------------------------------- helpers


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """``{module name: LoRALinear}`` for every adapter of ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def saved_modules(model: nn.Module) -> list[str]:
    """The ``modules_to_save`` names :func:`apply_lora` resolved for ``model`` (``[]`` if none)."""
    config = getattr(model, "rankkit_lora_config", None)
    return list(config.modules_to_save or []) if config is not None else []


def matches_entry(name: str, entry: str) -> bool:
    """PEFT's rule for a list entry: the module name equals it or ends with ``"." + entry``."""
    return name == entry or name.endswith("." + entry)


def resolve_targets(
    model: nn.Module, config: LoraConfig, roles: Any
) -> tuple[list[str], list[str]]:
    """Module names to adapt and to train in full, validated."""
    if lora_layers(model):
        raise ValueError(
            "apply_lora: the model already has LoRA layers; call merge_and_unload(model) "
            "first, or load weights into them with load_adapter."
        )
    roles = getattr(roles, "roles", roles) or {}
    modules = {name: m for name, m in model.named_modules() if name}
    linear = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    hint = _candidates_hint(linear)

    def expand(entry: str, what: str) -> list[str]:
        if entry in roles:
            names = list(roles[entry])
            absent = [n for n in names if n not in modules]
            if absent:
                raise ValueError(
                    f"apply_lora: role {entry!r} names modules not in the model: {absent}."
                )
            return names
        names = [name for name in modules if matches_entry(name, entry)]
        if not names:
            close = did_you_mean(entry, {n.rsplit(".", 1)[-1] for n in modules})
            raise ValueError(f"apply_lora: {what} entry {entry!r}{close} matches no module. {hint}")
        return names

    saved: list[str] = []
    for entry in config.modules_to_save or []:
        saved += [n for n in expand(entry, "modules_to_save") if n not in saved]

    def excluded(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in saved)

    target = config.target_modules
    if target is None:
        raise ValueError(
            "apply_lora: config.target_modules is not set; pass e.g. ['q', 'v'] or 'all-linear'. "
            + hint
        )
    if isinstance(target, str):
        if target.lower() == "all-linear":
            found = [n for n in linear if not excluded(n)]
        else:
            found = [n for n in modules if re.fullmatch(target, n) and not excluded(n)]
        if not found:
            raise ValueError(f"apply_lora: target_modules={target!r} matches no module. {hint}")
    else:
        found = []
        for entry in target:
            names = [n for n in expand(entry, "target_modules") if not excluded(n)]
            found += [n for n in names if n not in found]
    not_linear = [n for n in found if not isinstance(modules[n], nn.Linear)]
    if not_linear:
        kinds = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in not_linear[:5])
        raise ValueError(
            f"apply_lora: LoRA wraps nn.Linear only, but the targets include {kinds}. {hint}"
        )
    if "" in found:
        raise ValueError(
            "apply_lora: the model itself is an nn.Linear; wrap it with LoRALinear(model)."
        )

    for pattern, label in (
        (config.rank_pattern, "rank_pattern"),
        (config.alpha_pattern, "alpha_pattern"),
    ):
        for key in pattern:
            if not any(peft_pattern_key({key: 0}, n) for n in found):
                raise ValueError(
                    f"apply_lora: {label} key {key!r} matches none of the adapted modules {found}."
                )
    return found, saved


def _candidates_hint(linear: list[str]) -> str:
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
    shown = ", ".join(linear[:12]) + (
        f", ... ({len(linear) - 12} more)" if len(linear) > 12 else ""
    )
    return f"nn.Linear modules in this model: {shown or 'none'}; their last name parts: {suffixes}."
