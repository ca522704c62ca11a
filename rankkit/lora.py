r"""LoRA adapters: inject, train, merge, save -- in PEFT's vocabulary and file format.

The idea (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685): freeze a pretrained linear layer of weight ``W`` (out x in) and
learn only a low-rank update

.. math::

    W' = W + s \, B A, \qquad A \in \mathbb{R}^{r \times in},\;
    B \in \mathbb{R}^{out \times r},\; r \ll \min(in, out),

so the forward pass is ``h = W x + s * B (A x)`` and a layer trains
``r * (in + out)`` numbers instead of ``in * out``.

Scaling ``s``
    ``s = lora_alpha / r`` (the paper). With rank-stabilised LoRA
    (``use_rslora=True``; Kalajdzievski 2023, "A Rank Stabilization Scaling Factor
    for Fine-Tuning with LoRA", arXiv:2312.03732) ``s = lora_alpha / sqrt(r)``,
    which keeps the update's magnitude from collapsing as ``r`` grows.

Initialisation (``init_lora_weights``)
    ``"kaiming"`` (PEFT's ``True``, the reference default): ``A`` kaiming-uniform
    with ``a = sqrt(5)`` (PyTorch's ``nn.Linear`` default), ``B = 0``. Since
    ``B = 0``, ``B A = 0`` and the adapted model starts *exactly* at the
    pretrained one, while gradients still reach ``B`` (``dL/dB = s (dL/dh)(A x)^T``).

    ``"gaussian"``: ``A ~ N(0, std=1/r)``, ``B = 0`` (PEFT's convention: the
    standard deviation, not the variance, is ``1/r``).

    ``"pissa"`` (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular
    Vectors Adaptation", arXiv:2404.02948): with the SVD ``W = U S V^T``,
    ``A = sqrt(S_r / s) V_r^T`` and ``B = U_r sqrt(S_r / s)``, so ``s B A`` is the
    best rank-``r`` approximation of ``W``; the frozen weight keeps the residual
    ``W - s B A``. The initial output is unchanged (up to float rounding) but the
    adapter now trains the principal directions of ``W``.

    ``False``: ``A`` and ``B`` both kaiming-uniform, so the adapter starts
    *non-zero* (useful to test merging; not for training).

Merging
    ``merge()`` folds the update into the weight, ``W <- W + s B A``; the forward is
    then one matmul, so a merged LoRA model has no extra inference latency.
    ``unmerge()`` subtracts it again.

File format
    :func:`save_adapter` writes ``adapter_model.safetensors`` and
    ``adapter_config.json`` with PEFT's key names
    (``base_model.model.<module>.lora_A.weight``), so
    ``peft.PeftModel.from_pretrained(base, DIR)`` loads a rankkit adapter, and
    :func:`load_adapter` reads adapters written by PEFT.

Example
-------
>>> import torch
>>> from torch import nn
>>> from rankkit.lora import LoraConfig, apply_lora, count_parameters
>>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
>>> _ = apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
>>> count_parameters(model).trainable        # 2 * (16 + 16)
64
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rankkit.checkpoints import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    CheckpointError,
    load_state_dict,
    peft_pattern_key,
    save_state_dict,
)
from rankkit.utils import ParameterCount, count_parameters, did_you_mean, set_submodule

__all__ = [
    "LoRALinear",
    "LoraConfig",
    "ParameterCount",
    "SavedAdapter",
    "apply_lora",
    "count_parameters",
    "load_adapter",
    "lora_delta_weights",
    "lora_state_dict",
    "merge_and_unload",
    "save_adapter",
]

INIT_METHODS = ("kaiming", "gaussian", "pissa")

# --------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``s * B A``.

    Parameters
    ----------
    base_layer : nn.Linear
        The pretrained layer, weight ``W`` of shape (out, in). Its parameters are
        frozen (``requires_grad=False``).
    r : int
        Rank of the update, ``1 <= r <= min(in, out)``.
    lora_alpha : float
        Numerator of the scaling ``s``.
    lora_dropout : float
        Dropout applied to the input of the adapter branch only.
    use_rslora : bool
        ``s = lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
    init_lora_weights : {"kaiming", "gaussian", "pissa", True, False}
        See the module docstring. ``True`` means ``"kaiming"``. ``"pissa"``
        modifies ``base_layer.weight`` (it keeps the residual).

    Attributes
    ----------
    lora_A : nn.Parameter
        Shape (r, in).
    lora_B : nn.Parameter
        Shape (out, r).
    scaling : float
        ``s``.
    merged : bool
        Whether ``s B A`` is currently folded into ``base_layer.weight``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: str | bool = "kaiming",
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}.")
        out_features, in_features = base_layer.weight.shape
        _check_rank(r, in_features, out_features, where="LoRALinear")
        _check_alpha(lora_alpha, where="LoRALinear")
        init = _normalise_init(init_lora_weights)

        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.init_lora_weights = init
        self.merged = False
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

        factory = {"dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        base_layer.requires_grad_(False)
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str | bool = "kaiming") -> None:
        """(Re)initialise ``A`` and ``B``; ``"pissa"`` also rewrites the frozen weight."""
        init = _normalise_init(init)
        if init == "pissa":
            self._pissa_init()
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def _pissa_init(self) -> None:
        if self.merged:
            raise RuntimeError(
                "PiSSA init on a merged layer would mix W with s*B*A; unmerge first."
            )
        weight = self.base_layer.weight
        # SVD in float32 even for half-precision weights: PEFT does the same, and the
        # residual must be computed identically for adapters to load across libraries.
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root_S = torch.sqrt(S[: self.r] / self.scaling)
        A = root_S[:, None] * Vh[: self.r]  # sqrt(S_r/s) V_r^T
        B = U[:, : self.r] * root_S[None, :]  # U_r sqrt(S_r/s)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        weight.copy_(weight.float() - self.scaling * B @ A)

    def delta_weight(self) -> torch.Tensor:
        """The update ``s * B A``, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        # Two thin matmuls, x -> A x -> B A x, never the (out x in) product B A.
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        # h = W x + b + s * lora, scaled and added in place: one kernel, no extra buffer.
        return self.base_layer(x).add_(lora, alpha=self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s * B A`` into the frozen weight (a second call warns and does nothing)."""
        if self.merged:
            warnings.warn("LoRALinear is already merged; nothing to do.", stacklevel=2)
            return
        self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``s * B A`` from the weight again (warns if not merged)."""
        if not self.merged:
            warnings.warn("LoRALinear is not merged; nothing to do.", stacklevel=2)
            return
        self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
            f"use_rslora={self.use_rslora}, merged={self.merged}"
        )


# --------------------------------------------------------------------------- config


class _UnknownKeyError(TypeError, ValueError):
    """An unknown keyword: a TypeError like any bad keyword, and a ValueError for callers
    that catch rankkit's configuration errors."""


@dataclasses.dataclass(init=False)
class LoraConfig:
    """Which layers get adapters, and how -- with PEFT's ``LoraConfig`` names.

    Parameters
    ----------
    r : int, default 8
        Rank of every adapter unless ``rank_pattern`` says otherwise.
    lora_alpha : float, default 8
        Scaling numerator: ``s = lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA).
    target_modules : list of str or str
        Which ``nn.Linear`` modules to adapt. A list entry matches a module whose
        name equals it or ends with ``"." + entry`` (PEFT's rule), so role names
        such as ``["q", "v"]`` select ``blocks.0.attn.q``, ``blocks.1.attn.q``...
        A string is a regular expression matched against the whole module name,
        except ``"all-linear"``, which selects every ``nn.Linear`` (minus
        ``modules_to_save``).
    lora_dropout : float, default 0.0
        Dropout on the adapter branch's input.
    use_rslora : bool, default False
        Rank-stabilised scaling ``lora_alpha / sqrt(r)``.
    init_lora_weights : {"kaiming", "gaussian", "pissa", True, False}, default "kaiming"
        Initialisation, see :mod:`rankkit.lora`. ``True`` is PEFT's name for
        ``"kaiming"``.
    rank_pattern, alpha_pattern : dict of str to number
        Per-module overrides of ``r`` and ``lora_alpha``. A key ``k`` applies to a
        module named ``name`` when ``re.match(rf"(.*\\.)?({k})$", name)`` (PEFT's
        rule), e.g. ``{"blocks.1.attn.q": 2}`` or ``{"fc1": 16}``.
    modules_to_save : list of str, optional
        Modules trained in full next to the adapters (a classifier head), matched
        like ``target_modules`` list entries. They are never given an adapter.
    bias : {"none"}
        Biases stay frozen. PEFT's ``"all"`` / ``"lora_only"`` are not supported.

    Raises
    ------
    ValueError
        On a non-positive ``r`` / ``lora_alpha``, a dropout outside [0, 1), an
        unknown ``init_lora_weights`` or ``bias``, or an unknown keyword (the
        closest valid name is suggested).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: str | bool = "kaiming"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: list[str] | None = None
    bias: str = "none"

    def __init__(
        self,
        r: int = 8,
        lora_alpha: float = 8,
        target_modules: Sequence[str] | str | None = None,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: str | bool = "kaiming",
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float] | None = None,
        modules_to_save: Sequence[str] | None = None,
        bias: str = "none",
        **unknown: Any,
    ) -> None:
        if unknown:
            raise _UnknownKeyError(_unknown_keys_message(unknown, "LoraConfig"))
        _check_rank(r, where="LoraConfig")
        _check_alpha(lora_alpha, where="LoraConfig")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {lora_dropout}.")
        if bias != "none":
            raise ValueError(
                f"LoraConfig: bias={bias!r} is not supported; rankkit keeps biases frozen "
                "(bias='none', PEFT's default)."
            )
        self.r = r
        self.lora_alpha = lora_alpha
        self.target_modules = _as_targets(target_modules)
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.init_lora_weights = _normalise_init(init_lora_weights)
        self.rank_pattern = dict(rank_pattern or {})
        self.alpha_pattern = dict(alpha_pattern or {})
        for key, value in self.rank_pattern.items():
            _check_rank(value, where=f"LoraConfig.rank_pattern[{key!r}]")
        for key, value in self.alpha_pattern.items():
            _check_alpha(value, where=f"LoraConfig.alpha_pattern[{key!r}]")
        if isinstance(modules_to_save, str):
            modules_to_save = [modules_to_save]
        self.modules_to_save = list(modules_to_save) if modules_to_save else None
        self.bias = bias

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` for the module called ``name``, after the patterns."""
        r_key = peft_pattern_key(self.rank_pattern, name)
        alpha_key = peft_pattern_key(self.alpha_pattern, name)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[alpha_key] if alpha_key is not None else self.lora_alpha
        return r, alpha

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT expects (``peft_type="LORA"``)."""
        init = self.init_lora_weights
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "init_lora_weights": True if init == "kaiming" else init,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": self.modules_to_save,
            "bias": self.bias,
            "fan_in_fan_out": False,
            "use_dora": False,
            "lora_bias": False,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build a config from an ``adapter_config.json`` written by PEFT or rankkit.

        PEFT writes dozens of keys; those that only describe provenance or features
        left at their defaults are ignored. A feature rankkit does not implement
        (DoRA, ``fan_in_fan_out``, ``layers_to_transform``...) raises ValueError
        rather than silently loading a different model.
        """
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ValueError(
                f"adapter_config.json: peft_type is {peft_type!r}; rankkit loads LORA."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, neutral in _PEFT_NEUTRAL.items():
            if key in data and data[key] not in neutral:
                raise ValueError(
                    f"adapter_config.json sets {key}={data[key]!r}, a PEFT feature rankkit does "
                    "not implement; load this adapter with peft instead."
                )
        unknown = {
            k: v
            for k, v in data.items()
            if k not in fields and k not in _PEFT_NEUTRAL and k not in _PEFT_IGNORED and v
        }
        if unknown:
            warnings.warn(
                f"adapter_config.json: ignoring keys rankkit does not know: {sorted(unknown)}.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in fields and v is not None})


# Keys PEFT writes that rankkit accepts only at these values (anything else changes the model).
_PEFT_NEUTRAL: dict[str, tuple] = {
    "fan_in_fan_out": (False, None),
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "exclude_modules": (None, [], ""),
    "target_parameters": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "alora_invocation_tokens": (None, []),
    "arrow_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "kasa_config": (None,),
    "megatron_config": (None,),
}
# Provenance and bookkeeping keys with no effect on the weights.
_PEFT_IGNORED = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "ensure_weight_tying",
    "modules_to_tie",
}


# --------------------------------------------------------------------------- model surgery


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
    targets, saved = _resolve(model, config, roles)
    plan = []
    for name in targets:
        linear = model.get_submodule(name)
        r, alpha = config.rank_and_alpha(name)
        _check_rank(r, linear.in_features, linear.out_features, where=f"module {name!r}")
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
    for name, layer in _lora_layers(model).items():
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
    for name in _lora_layers(model):
        keep.update({f"{name}.lora_A", f"{name}.lora_B"})
    for name in _saved_modules(model):
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
            for name, layer in _lora_layers(model).items()
        }


# --------------------------------------------------------------------------- files


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
    layers = _lora_layers(model)
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
    saved = _saved_modules(model)
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
    directory = Path(directory)
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

    layers = _lora_layers(model)
    if layers:
        expected = {
            name: (layer.r, layer.in_features, layer.out_features) for name, layer in layers.items()
        }
        saved = _saved_modules(model)
    else:
        targets, saved = _resolve(model, config, roles)
        expected = {}
        for name in targets:
            linear = model.get_submodule(name)
            expected[name] = (
                config.rank_and_alpha(name)[0],
                linear.in_features,
                linear.out_features,
            )

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
    model_state = model.state_dict()
    for key, tensor in saved_tensors.items():
        module = key.rsplit(".", 1)[0]
        if key not in model_state or not any(
            _matches(module, s) or module.startswith(s + ".") for s in saved
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
    if any(layer.merged for layer in layers.values()):
        raise ValueError("load_adapter: the model's adapters are merged; unmerge them first.")

    if not layers:
        apply_lora(model, config, roles=roles)
        layers = _lora_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(lora_tensors[name]["lora_A"])
            layer.lora_B.copy_(lora_tensors[name]["lora_B"])
        for key, tensor in saved_tensors.items():
            model_state[key].copy_(tensor)
    return model


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


# --------------------------------------------------------------------------- helpers


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _saved_modules(model: nn.Module) -> list[str]:
    config = getattr(model, "rankkit_lora_config", None)
    return list(config.modules_to_save or []) if config is not None else []


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _resolve(model: nn.Module, config: LoraConfig, roles: Any) -> tuple[list[str], list[str]]:
    """Module names to adapt and to train in full, validated."""
    if _lora_layers(model):
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
        names = [name for name in modules if _matches(name, entry)]
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


def _check_rank(
    r: Any, in_features: int | None = None, out_features: int | None = None, *, where: str
) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{where}: r must be a positive integer, got {r!r}.")
    if in_features is not None and r > min(in_features, out_features):
        raise ValueError(
            f"{where}: r={r} exceeds min(in_features={in_features}, out_features={out_features}) "
            f"= {min(in_features, out_features)}, the largest rank an update of this layer can "
            "have. Lower r, or override it for this module with rank_pattern."
        )


def _check_alpha(alpha: Any, *, where: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{where}: lora_alpha must be a positive number, got {alpha!r}.")


def _normalise_init(init: Any) -> str | bool:
    if init is True:
        return "kaiming"
    if init is False:
        return False
    if isinstance(init, str) and init.lower() in INIT_METHODS:
        return init.lower()
    raise ValueError(
        f"init_lora_weights must be one of {INIT_METHODS}, True (= 'kaiming') or False "
        f"(A and B both random), got {init!r}."
    )


def _as_targets(target: Any) -> list[str] | str | None:
    if target is None or isinstance(target, str):
        return target
    if isinstance(target, (Sequence, set, frozenset)) and all(isinstance(t, str) for t in target):
        # Sets (PEFT writes target_modules as one) have no order; sort for reproducibility.
        return sorted(target) if isinstance(target, (set, frozenset)) else list(target)
    raise ValueError(
        f"target_modules must be a list of module names / suffixes, a regex string or "
        f"'all-linear', got {target!r}."
    )


def _unknown_keys_message(unknown: Mapping[str, Any], owner: str) -> str:
    valid = [f.name for f in dataclasses.fields(LoraConfig)]
    parts = []
    for key in unknown:
        # "rank" is the commonest slip and too short for difflib to pair with "r".
        close = " (did you mean 'r'?)" if key == "rank" else did_you_mean(key, valid, cutoff=0.5)
        parts.append(f"{key!r}{close}")
    return f"{owner} got unknown keyword(s) {', '.join(parts)}. Valid keys: {', '.join(valid)}."
