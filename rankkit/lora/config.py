"""Which layers get adapters, and how: :class:`LoraConfig`, with PEFT's names.

:meth:`LoraConfig.to_peft_dict` and :meth:`LoraConfig.from_peft_dict` convert to and
from PEFT's ``adapter_config.json``; a PEFT feature rankkit does not implement is
refused rather than silently loading a different model.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from rankkit.adapters import peft_pattern_key
from rankkit.lora.layer import check_alpha, check_rank, normalise_init
from rankkit.utils import did_you_mean


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
        check_rank(r, where="LoraConfig")
        check_alpha(lora_alpha, where="LoraConfig")
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
        self.init_lora_weights = normalise_init(init_lora_weights)
        self.rank_pattern = dict(rank_pattern or {})
        self.alpha_pattern = dict(alpha_pattern or {})
        for key, value in self.rank_pattern.items():
            check_rank(value, where=f"LoraConfig.rank_pattern[{key!r}]")
        for key, value in self.alpha_pattern.items():
            check_alpha(value, where=f"LoraConfig.alpha_pattern[{key!r}]")
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
