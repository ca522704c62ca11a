"""The LoRA layer: a frozen ``nn.Linear`` plus a trainable low-rank update ``s * B A``.

:class:`LoRALinear` is the formula of :mod:`rankkit.lora` in code (initialisation,
forward, merge and unmerge); the checks of a rank and an alpha it shares with
:class:`rankkit.lora.LoraConfig` live here too.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
        check_rank(r, in_features, out_features, where="LoRALinear")
        check_alpha(lora_alpha, where="LoRALinear")
        init = normalise_init(init_lora_weights)

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
        init = normalise_init(init)
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


# --------------------------------------------------------------------------- checks


def check_rank(
    r: Any, in_features: int | None = None, out_features: int | None = None, *, where: str
) -> None:
    """Refuse a rank that is not a positive integer, or (given the shape) above ``min(in, out)``."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{where}: r must be a positive integer, got {r!r}.")
    if in_features is not None and r > min(in_features, out_features):
        raise ValueError(
            f"{where}: r={r} exceeds min(in_features={in_features}, out_features={out_features}) "
            f"= {min(in_features, out_features)}, the largest rank an update of this layer can "
            "have. Lower r, or override it for this module with rank_pattern."
        )


def check_alpha(alpha: Any, *, where: str) -> None:
    """Refuse a ``lora_alpha`` that is not a positive number."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{where}: lora_alpha must be a positive number, got {alpha!r}.")


def normalise_init(init: Any) -> str | bool:
    """An ``init_lora_weights`` value as ``"kaiming"``, ``"gaussian"``, ``"pissa"`` or ``False``."""
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
